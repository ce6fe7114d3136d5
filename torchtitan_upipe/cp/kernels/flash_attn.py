"""The ``flash-attn`` package (``kernel = "flash_attn"``): CUDA only, optional dependency.

Layout contract (see :mod:`.base`): ``q (B, S_q, H, D)``, ``k, v (B, S_k, H_kv, D)``;
``out (B, S_q, H, D)``; ``lse (B, H, S_q)`` float32 natural-log LSE.  flash-attn works in
BSHD natively and supports GQA natively (``dk``/``dv`` come back with ``H_kv`` heads), so
nothing is transposed or repeated.

* dtypes: float16/bfloat16 (flash-attn's own restriction).
* Head dims that are not a multiple of 8 are zero-padded before the call and the results
  sliced back, as ``flash_attn.FlashAttnFunc`` does (the explicit ``softmax_scale`` keeps the
  scores unchanged by the padding).
* ``flash_attn.flash_attn_interface._flash_attn_forward/_flash_attn_backward`` changed their
  signatures across 2.x (``window_size`` tuple vs ``window_size_left/right``, ``softcap``,
  4- vs 8-tuple results); the signature is read with :mod:`inspect` on first use and the
  arguments are passed by keyword.  flash-attn 2.8.3 is the target.  The package is imported
  lazily, so this module imports without it.

Exercised only on GPU machines with flash-attn installed, never by the CPU test suite.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys

import torch
import torch.nn.functional as F

from .base import AttentionKernel, check_causal_alignment, check_fa2_backward, check_shapes
from .registry import register_kernel


def _params(fn) -> list[str]:
    """Parameter names of a flash-attn entry point (a ``torch.library.custom_op`` in 2.7+,
    whose own signature is ``(*args, **kwargs)``; the wrapped function is ``_init_fn``)."""
    target = getattr(fn, "_init_fn", fn)
    sig = inspect.signature(target)
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def _call(fn, names: list[str], values: dict):
    missing = [n for n in names if n not in values]
    if missing:
        raise RuntimeError(
            f"unsupported flash-attn version: {getattr(fn, '__name__', fn)} takes "
            f"{names}; no value known for {missing}"
        )
    return fn(**{n: values[n] for n in names})


_INTERFACE = "flash_attn.flash_attn_interface"


def flash_attn_interface():
    """The flash-attn interface module.  A failed import is tried once per process and its
    error raised again on every later call (``kernel = "auto"`` asks at every layer of every
    step); a module already in ``sys.modules`` is used as it is."""
    module = sys.modules.get(_INTERFACE)
    if module is not None:
        return module
    module, error = _import_interface()
    if error is not None:
        raise error
    return module


@functools.cache
def _import_interface():
    try:
        return importlib.import_module(_INTERFACE), None
    except Exception as e:  # not installed, or installed but broken (ABI/CUDA mismatch, ...)
        return None, e


def _pad_d(t: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(t, [0, pad]) if pad else t


@register_kernel
class FlashAttnKernel(AttentionKernel):
    """``flash_attn`` 2.x forward/backward with the LSE kept."""

    name = "flash_attn"

    def __init__(self) -> None:
        self._fwd_params: list[str] | None = None
        self._bwd_params: list[str] | None = None

    def _interface(self):
        return flash_attn_interface()

    def unavailable_reason(self, device: torch.device) -> str | None:
        try:
            self._interface()
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] == "flash_attn":
                return "flash-attn is not installed"
            return f"flash-attn is installed but failed to import: {e}"
        except Exception as e:  # installed but broken (ABI/CUDA mismatch, ...)
            return f"flash-attn is installed but failed to import: {e}"
        if torch.device(device).type != "cuda":
            return f"flash-attn needs a CUDA device, got {torch.device(device).type}"
        return None

    def _common(self, causal: bool, scale: float) -> dict:
        return {
            "dropout_p": 0.0,
            "softmax_scale": scale,
            "causal": causal,
            "window_size": (-1, -1),
            "window_size_left": -1,
            "window_size_right": -1,
            "softcap": 0.0,
            "alibi_slopes": None,
            "deterministic": False,
            "return_softmax": False,
            "rng_state": None,
        }

    def forward(self, q, k, v, *, causal, scale):
        check_shapes(q, k, v)
        check_causal_alignment(q, k, causal, self.name)
        fn = self._interface()._flash_attn_forward
        if self._fwd_params is None:
            self._fwd_params = _params(fn)
        d = q.shape[-1]
        pad = (-d) % 8
        values = self._common(causal, scale)
        values.update(q=_pad_d(q, pad), k=_pad_d(k, pad), v=_pad_d(v, pad))
        res = _call(fn, self._fwd_params, values)
        if len(res) == 8:  # <= 2.5: out, q, k, v, out_padded, lse, S_dmask, rng_state
            out, lse = res[4], res[5]
        else:  # >= 2.6: out_padded, lse, S_dmask, rng_state
            out, lse = res[0], res[1]
        return out[..., :d], lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        check_causal_alignment(q, k, causal, self.name)
        check_fa2_backward(q, self.name)
        fn = self._interface()._flash_attn_backward
        if self._bwd_params is None:
            self._bwd_params = _params(fn)
        d = q.shape[-1]
        pad = (-d) % 8
        qp, kp, vp = _pad_d(q, pad), _pad_d(k, pad), _pad_d(v, pad)
        # the backward writes into preallocated dq/dk/dv (its return value is softmax_d)
        dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
        values = self._common(causal, scale)
        values.update(
            dout=_pad_d(dout, pad).contiguous(),
            q=qp,
            k=kp,
            v=vp,
            out=_pad_d(out, pad).contiguous(),
            softmax_lse=lse.to(torch.float32).contiguous(),
            dq=dq,
            dk=dk,
            dv=dv,
        )
        _call(fn, self._bwd_params, values)
        return dq[..., :d], dk[..., :d], dv[..., :d]
