"""Device-independent peak-memory tracking at the dispatcher level (CPU, and fake tensors).

:class:`LiveTensorTracker` is a ``TorchDispatchMode`` that records the storage of every tensor
produced by an op while it is active and keeps the running and peak sum of the bytes of
storages that are still referenced.  Storages that existed before the mode was entered
(parameters, inputs) are not counted, so ``peak_bytes`` is the transient memory a region of
code allocates on top of what it was given.  The tracker holds those pre-existing storages
alive while it is active, so their addresses cannot be reused by new allocations inside the
region (which would otherwise be mistaken for pre-existing memory).  It is a measurement tool for tests and the CPU
memory estimator, not something to leave on in training: every op pays a Python callback.

Storages are identified by their Python object (one per ``StorageImpl``; views share it), not
by address, so the tracker also works under ``FakeTensorMode``, where every storage has data
pointer 0: the fake-tensor estimator (:mod:`torchtitan_upipe.tools.estimate`) counts with it.
``ignore(tensor)`` excludes storages from the count (meta tensors, host buffers).

``workspace(func, args)`` returns bytes an op allocates inside itself and frees before it
returns (a kernel's workspace, invisible to the dispatcher); they are counted at that op, on
top of what is live with its inputs and outputs, and raise the peak if they reach it.

``attribute=True`` also labels every counted storage with where it was made (the aten op, the
autograd node running it in a backward, and the innermost ``torchtitan``/``torchtitan_upipe``
source line) and keeps the live storages of the highest peak: :meth:`peak_breakdown` answers
"what is alive at the peak", which the estimator prints with ``--breakdown``.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class LiveTensorTracker(TorchDispatchMode):
    def __init__(self, ignore: Callable[[torch.Tensor], bool] | None = None,
                 attribute: bool = False,
                 workspace: Callable[[object, tuple], int] | None = None) -> None:
        super().__init__()
        self._ignore = ignore
        self._workspace = workspace
        self.workspace_peak = 0  # the largest workspace counted
        self._attribute = attribute
        self._labels: dict[int, str] = {}  # id(storage) -> where it was made (attribute=True)
        self._at_peak: dict[str, list[int]] = {}  # label -> [bytes, storages] at the peak
        self._refs: dict[int, weakref.ref] = {}  # id(storage) -> weak reference to it
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes counted for it
        self._preexisting: dict[int, object] = {}  # id(storage) -> storage, held alive
        self.live_bytes = 0
        self.peak_bytes = 0
        self._outer_resize = None  # UntypedStorage.resize_ as it was before __enter__

    def __enter__(self):
        # storages alive before entering are inputs, not allocations of the tracked region
        import gc
        import warnings

        with warnings.catch_warnings():  # isinstance() on deprecated torch aliases warns
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                try:
                    if not isinstance(obj, torch.Tensor):
                        continue
                except ReferenceError:  # a weakref.proxy whose referent is gone
                    continue
                try:
                    st = obj.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                self._preexisting[id(st)] = st
        self._watch_resizes()
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._outer_resize  # trackers nest like their modes
        self._preexisting.clear()  # release the pre-existing storages held during the region
        return super().__exit__(*exc)

    def _watch_resizes(self) -> None:
        """Route ``UntypedStorage.resize_`` through this tracker while it is active (in-place
        resizes from Python are invisible to the dispatcher); an enclosing tracker's route
        stays in the chain."""
        outer = self._outer_resize = torch.UntypedStorage.resize_

        def resize_(storage, size):
            result = outer(storage, size)
            self._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_

    # The count is kept incrementally: + a storage's bytes when an op first returns it, - them
    # when the storage dies (weak-reference callback), +/- a change of size when an op returns
    # it again or Python code resizes it in place (FSDP2 frees and regrows its all-gather
    # buffers with ``untyped_storage().resize_``; offload.py releases a block output that way).
    def _count(self, key: int, nbytes: int) -> None:
        self.live_bytes += nbytes - self._sizes.get(key, 0)
        self._sizes[key] = nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            if self._attribute:
                self._snapshot()

    def _count_workspace(self, func, args) -> None:
        nbytes = self._workspace(func, args)
        if not nbytes:
            return
        self.workspace_peak = max(self.workspace_peak, nbytes)
        if self.live_bytes + nbytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes + nbytes
            if self._attribute:
                self._snapshot()
                self._at_peak[f"{func._opname} workspace (modelled)"] = [nbytes, 0]

    def _release(self, key: int, ref: weakref.ref) -> None:
        if self._refs.get(key) is ref:  # not a newer storage that reused the id
            del self._refs[key]
            self.live_bytes -= self._sizes.pop(key)
            self._labels.pop(key, None)

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (a new phase); the breakdown follows."""
        self.peak_bytes = self.live_bytes
        if self._attribute:
            self._snapshot()

    def _snapshot(self) -> None:
        at_peak: dict[str, list[int]] = {}
        for key, nbytes in self._sizes.items():
            entry = at_peak.setdefault(self._labels.get(key, "?"), [0, 0])
            entry[0] += nbytes
            entry[1] += 1
        self._at_peak = at_peak

    def peak_breakdown(self) -> list[tuple[str, int, int]]:
        """``(label, bytes, storages)`` of the storages counted at the current peak, largest
        first, and the workspace (0 storages) if an op's workspace made the peak
        (``attribute=True``).  Their bytes add up to ``peak_bytes``."""
        if not self._attribute:
            raise RuntimeError("peak_breakdown needs LiveTensorTracker(attribute=True)")
        return sorted(((k, v[0], v[1]) for k, v in self._at_peak.items()), key=lambda r: -r[1])

    def _resized(self, st) -> bool:
        """Re-read the size of ``st`` if it is counted; return whether it is."""
        key = id(st)
        ref = self._refs.get(key)
        if ref is None or ref() is not st:
            return False
        self._count(key, st.nbytes())
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable:  # may have resized an input's storage and returned nothing
            for t in _plain_tensors(tree_flatten((args, kwargs))[0]):
                try:
                    self._resized(t.untyped_storage())
                except (RuntimeError, NotImplementedError):
                    continue
        for t in _plain_tensors(tree_flatten(out)[0]):
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if self._resized(st):  # returned again (in place, a view): only its size can change
                continue
            key = id(st)
            if key in self._preexisting:
                continue
            if self._ignore is not None and self._ignore(t):
                continue
            # a weak reference to the storage, not the tensor: tensors with weak references
            # cannot be swapped (``module.to_empty`` swaps parameters)
            self._refs[key] = weakref.ref(st, functools.partial(self._release, key))
            if self._attribute:
                self._labels[key] = _label(func)
            self._count(key, st.nbytes())
        if self._workspace is not None:
            self._count_workspace(func, args)
        return out


_SOURCES = tuple(os.sep + d + os.sep for d in ("torchtitan_upipe", "torchtitan"))


def _label(func) -> str:
    """``op [autograd node] @ file:line function`` for a storage made by ``func`` now."""
    node = torch._C._current_autograd_node()
    where = "?"
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path != __file__ and any(d in path for d in _SOURCES):
            tail = path[path.rindex(os.sep + "torchtitan"):].lstrip(os.sep)
            where = f"{tail}:{frame.f_lineno} {frame.f_code.co_name}"
            break
        frame = frame.f_back
    op = func._opname if node is None else f"{func._opname} [{node.name()}]"
    return f"{op} @ {where}"


def _plain_tensors(values):
    """The plain tensors in ``values``; a wrapper subclass (DTensor) is replaced by its inner
    tensors, which hold its memory and were made by ops this mode did not see (the subclass's
    own dispatch runs below the mode)."""
    for v in values:
        if not isinstance(v, torch.Tensor):
            continue
        if is_traceable_wrapper_subclass(v):
            names, _ = v.__tensor_flatten__()
            yield from _plain_tensors(getattr(v, n) for n in names)
        else:
            yield v
