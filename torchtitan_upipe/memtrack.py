"""Device-independent peak-memory tracking at the dispatcher level (works on CPU).

:class:`LiveTensorTracker` is a ``TorchDispatchMode`` that records the storage of every tensor
produced by an op while it is active and keeps the running and peak sum of the bytes of
storages that are still referenced.  Storages that existed before the mode was entered
(parameters, inputs) are not counted, so ``peak_bytes`` is the transient memory a region of
code allocates on top of what it was given.  The tracker holds those pre-existing storages
alive while it is active, so their addresses cannot be reused by new allocations inside the
region (which would otherwise be mistaken for pre-existing memory).  It is a measurement tool for tests and the CPU
memory estimator, not something to leave on in training: every op pays a Python callback.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._refs: dict[int, list[weakref.ref]] = {}
        self._preexisting: dict[int, object] = {}  # data_ptr -> storage, held alive
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
                    self._preexisting[st.data_ptr()] = st
        return super().__enter__()

    def __exit__(self, *exc):
        self._preexisting.clear()  # release the pre-existing storages held during the region
        return super().__exit__(*exc)

    def _refresh(self) -> None:
        live = 0
        for key in list(self._refs):
            tensors = [t for t in (r() for r in self._refs[key]) if t is not None]
            if tensors:
                self._refs[key] = [weakref.ref(t) for t in tensors]
                # current size: a storage can be released in place (``resize_(0)``)
                live += tensors[0].untyped_storage().nbytes()
            else:
                del self._refs[key]
        self.live_bytes = live
        self.peak_bytes = max(self.peak_bytes, live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._refresh()  # frees that happened since the last op
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                try:
                    st = t.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                key = st.data_ptr()
                if key in self._preexisting or st.nbytes() == 0:
                    continue
                self._refs.setdefault(key, []).append(weakref.ref(t))
        self._refresh()
        return out
