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
pointer 0: the fake-tensor estimator (:mod:`torchtitan_upipe.estimate`) counts with it.
``ignore(tensor)`` excludes storages from the count (meta tensors, host buffers).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class LiveTensorTracker(TorchDispatchMode):
    def __init__(self, ignore: Callable[[torch.Tensor], bool] | None = None) -> None:
        super().__init__()
        self._ignore = ignore
        self._refs: dict[int, weakref.ref] = {}  # id(storage) -> weak reference to it
        self._preexisting: dict[int, object] = {}  # id(storage) -> storage, held alive
        self.live_bytes = 0
        self.peak_bytes = 0

    def __enter__(self):
        # storages alive before entering are inputs, not allocations of the tracked region
        import gc
        import warnings

        with warnings.catch_warnings():  # isinstance() on deprecated torch aliases warns
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor):
                    try:
                        st = obj.untyped_storage()
                    except (RuntimeError, NotImplementedError):
                        continue
                    self._preexisting[id(st)] = st
        return super().__enter__()

    def __exit__(self, *exc):
        self._preexisting.clear()  # release the pre-existing storages held during the region
        return super().__exit__(*exc)

    def _refresh(self) -> None:
        live = 0
        for key in list(self._refs):
            st = self._refs[key]()
            if st is None:
                del self._refs[key]
            else:  # current size: a storage can be released or regrown in place (``resize_``)
                live += st.nbytes()
        self.live_bytes = live
        self.peak_bytes = max(self.peak_bytes, live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._refresh()  # frees that happened since the last op
        for t in _plain_tensors(tree_flatten(out)[0]):
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = id(st)
            if key in self._preexisting or key in self._refs:
                continue
            if self._ignore is not None and self._ignore(t):
                continue
            # a weak reference to the storage, not the tensor: tensors with weak references
            # cannot be swapped (``module.to_empty`` swaps parameters)
            self._refs[key] = weakref.ref(st)
        self._refresh()
        return out


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
