"""Collectives as the dispatcher sees them: what the code under test really sends.

``CommDebugMode`` (torch's) counts collectives; :class:`CollectiveTrace` also records the
bytes one rank sends, so the communication model can be checked against the ops' real
traffic.  Both observe the c10d ops through a ``TorchDispatchMode``: nothing is patched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class CollectiveTrace(TorchDispatchMode):
    """Records ``(kind, bytes sent by this rank)`` for every all-to-all and p2p send.

    An all-to-all of a ``X``-byte buffer over ``k`` ranks sends ``X (k - 1) / k`` (the part
    for this rank stays); a send sends its tensor.  Receives are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.c10d.alltoall_base_.default:
            buf, k = args[1], dist.ProcessGroup.unbox(args[2]).size()
            self.sent.append(("all-to-all", buf.numel() * buf.element_size() * (k - 1) / k))
        elif func is torch.ops.c10d.send.default:
            self.sent.append(("send", sum(t.numel() * t.element_size() for t in _tensors(args[0]))))
        return out

    def clear(self) -> None:
        self.sent.clear()

    def total(self) -> tuple[float, int]:
        """``(bytes, count)`` of what was recorded."""
        return sum(b for _, b in self.sent), len(self.sent)
