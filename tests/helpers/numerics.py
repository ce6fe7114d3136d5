"""Shared by the memory ops' tests: exact-comparison tolerances, random leaves, and a
dispatcher-level peak of live storage bytes."""

from __future__ import annotations

import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

TOL = dict(atol=1e-10, rtol=1e-10)
S = 7  # 3 tiles do not divide it
TILES = [1, 3, S, S + 4]
DIM, HIDDEN, VOCAB = 8, 24, 19


def close(a, b, **kw):
    torch.testing.assert_close(a, b, **(kw or TOL))


def leaf(*shape, dtype=torch.float64, scale=1.0, gen=None):
    return (torch.randn(*shape, dtype=dtype, generator=gen) * scale).requires_grad_()


def assert_same_module(ref, mod, seed: int) -> None:
    """``mod`` computes what ``ref`` computes on a random float64 ``(2, S, DIM)`` input:
    output, input gradient and every parameter's gradient (parameters paired in order)."""
    x = leaf(2, S, DIM, gen=torch.Generator().manual_seed(seed))
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(2, S, DIM, dtype=torch.float64)
    y_ref, y = ref(x), mod(x2)
    close(y, y_ref)
    y_ref.backward(gy)
    y.backward(gy)
    close(x2.grad, x.grad)
    for p, q in zip(ref.parameters(), mod.parameters(), strict=True):
        close(q.grad, p.grad)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


class LiveBytes(TorchDispatchMode):
    """Peak of live tensor-storage bytes allocated by ops run under this mode."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, nbytes = st.data_ptr(), st.nbytes()
                if nbytes == 0 or key in self._seen:
                    continue
                self._seen.add(key)
                self.live += nbytes
                weakref.finalize(st, self._free, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out
