"""Packed documents: causal attention that stays inside each document (``block_causal``).

A packed sample of ``S`` tokens holds several documents back to back.  Query ``i`` attends to
key ``j`` when ``j <= i`` and both lie in the same document: a block-diagonal causal mask.
The semantics are TorchTitan 0.2.2's ``block_causal`` (``get_document_mask_mod``,
``create_varlen_metadata_for_document``): a document ends *at* each ``eos_id`` token (the EOS
is its last token), the next token starts the next one, and the end of the row ends the last.
Positions are not reset per document (RoPE sees global positions, as in TorchTitan), which
changes nothing inside a document: RoPE scores depend on position differences only.

:class:`Documents` holds the boundaries of a ``(B, S)`` batch as varlen offsets over the
row-major flattened batch, ``cu_seqlens = [0, c_1, ..., B*S]`` (every multiple of ``S`` is
one): ``O(documents)`` integers, kept in host memory so that no layer waits for the device to
read them, never an ``S x S`` mask.

:class:`DocumentKernel` wraps any :class:`~.kernels.AttentionKernel` into its
document-masked variant with the same interface and layout contract (``q (B, S, H, D)``,
``k, v (B, S, H_kv, D)``, ``lse (B, H, S)``).  A kernel with a varlen path
(``forward_varlen``/``backward_varlen``: ``sdpa`` on CUDA, FlashAttention-2's varlen call)
computes all documents in one call.  Any other kernel runs its causal forward and backward on
each document's rows, one call per document, which is exact, because a document's queries see
exactly its own keys, causally, with equal query and key lengths.  The Ulysses-family
styles use it after their all-to-all, where each rank holds the whole sequence (in natural
order) for its heads, so the documents of the sample are the documents of every call.  A
document may end anywhere: inside a rank's shard, at a shard edge, inside a UPipe stage's call (a stage is a
set of heads over the whole sequence, never a piece of the sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .kernels.base import AttentionKernel, check_shapes


@dataclass(frozen=True, eq=False)
class Documents:
    """Document boundaries of a ``(batch, seq_len)`` batch.

    ``cu_seqlens``: 1-D int64 CPU tensor ``[0, c_1, ..., c_n = batch * seq_len]``, strictly
    increasing, containing every multiple of ``seq_len``: document ``d`` is the flattened
    tokens ``[c_d, c_{d+1})``.
    """

    cu_seqlens: torch.Tensor
    batch: int
    seq_len: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_on_device", {})
        cu = self.cu_seqlens
        if cu.dim() != 1 or cu.device.type != "cpu" or cu.dtype != torch.int64:
            raise ValueError(f"cu_seqlens must be a 1-D int64 CPU tensor, got {cu.dtype} "
                             f"{tuple(cu.shape)} on {cu.device}")
        total = self.batch * self.seq_len
        bounds = set(cu.tolist())
        if (cu.numel() < 2 or cu[0] != 0 or cu[-1] != total or not bool((cu[1:] > cu[:-1]).all())
                or not bounds.issuperset(range(0, total + 1, self.seq_len))):
            raise ValueError(f"cu_seqlens must rise strictly from 0 to batch * seq_len = {total} "
                             f"through every multiple of seq_len={self.seq_len}")

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, eos_id: int) -> Documents:
        """The documents of ``tokens (B, S)``: each ends at an ``eos_id`` token or at the end of
        its row (TorchTitan's ``block_causal``).  Reads the tokens once (one device-to-host
        copy when they are on a device)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq_len), got {tuple(tokens.shape)}")
        batch, seq_len = tokens.shape
        flat = tokens.detach().reshape(-1)
        ends = (flat == eos_id).nonzero().reshape(-1).to("cpu", torch.int64) + 1
        rows = torch.arange(0, batch * seq_len + 1, seq_len, dtype=torch.int64)
        return cls(torch.unique(torch.cat([rows, ends])), batch, seq_len)

    @classmethod
    def whole_rows(cls, batch: int, seq_len: int) -> Documents:
        """One document per row: ``block_causal`` equals ``causal``."""
        return cls(torch.arange(0, batch * seq_len + 1, seq_len, dtype=torch.int64), batch, seq_len)

    @property
    def count(self) -> int:
        """Documents in the batch (a row's last one counted even without an EOS)."""
        return self.cu_seqlens.numel() - 1

    @cached_property
    def segments(self) -> tuple[tuple[int, int, int], ...]:
        """``(row, start, end)`` of every document, positions within its row."""
        cu = self.cu_seqlens.tolist()
        return tuple((a // self.seq_len, a % self.seq_len, a % self.seq_len + (e - a))
                     for a, e in zip(cu[:-1], cu[1:]))

    @property
    def max_len(self) -> int:
        """The longest document's length."""
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    @property
    def whole(self) -> bool:
        """Every row is one document (the masked attention is plain causal attention)."""
        return self.count == self.batch

    def offsets(self, device: torch.device) -> torch.Tensor:
        """``cu_seqlens`` as int32 on ``device`` (what varlen kernels take), copied once."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self.cu_seqlens.to(device=device, dtype=torch.int32)
        return self._on_device[key]

    def doc_ids(self) -> torch.Tensor:
        """``(B, S)`` int64: the index of each token's document (for references and tests)."""
        ids = torch.zeros(self.batch * self.seq_len, dtype=torch.int64)
        ids[self.cu_seqlens[1:-1]] = 1
        return ids.cumsum(0).reshape(self.batch, self.seq_len)

    def __repr__(self) -> str:
        return (f"Documents(batch={self.batch}, seq_len={self.seq_len}, count={self.count}, "
                f"max_len={self.max_len})")


class DocumentKernel(AttentionKernel):
    """``inner``'s causal attention restricted to each of ``documents`` (module docstring).

    Only causal calls over the whole sequence are defined: ``q``, ``k`` and ``v`` must hold
    ``documents.seq_len`` positions in natural order and ``documents.batch`` rows.  Each
    document's rows go to ``inner`` as one causal call of equal query and key lengths; the
    results are written into whole-sequence ``out``/``lse`` (forward) and ``dq``/``dk``/``dv``
    (backward); with a varlen path on the tensors' device, ``inner`` takes them all in one
    call.  With one document per row it calls ``inner`` on the whole tensors.
    """

    def __init__(self, inner: AttentionKernel, documents: Documents) -> None:
        self.inner, self.documents = inner, documents
        self.name = inner.name

    def unavailable_reason(self, device):
        return self.inner.unavailable_reason(device)

    def _check(self, q, k, causal: bool) -> None:
        docs = self.documents
        if not causal:
            raise ValueError("document masks are causal: DocumentKernel takes causal calls only")
        if (q.shape[0], q.shape[1], k.shape[1]) != (docs.batch, docs.seq_len, docs.seq_len):
            raise ValueError(
                f"the documents describe (batch, seq_len) = {(docs.batch, docs.seq_len)}, but the "
                f"attention call has q{tuple(q.shape)} k{tuple(k.shape)}: document masks need "
                f"the whole sequence in natural order"
            )

    def uses_varlen(self, device: torch.device) -> bool:
        """Whether the documents go to ``inner`` in one varlen call on ``device`` (the inner
        kernel's ``varlen_on(device)``)."""
        varlen_on = getattr(self.inner, "varlen_on", None)
        return varlen_on is not None and varlen_on(torch.device(device))

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])

    def forward(self, q, k, v, *, causal, scale):
        check_shapes(q, k, v)
        self._check(q, k, causal)
        docs = self.documents
        if docs.whole:
            return self.inner.forward(q, k, v, causal=True, scale=scale)
        if self.uses_varlen(q.device):
            out, lse = self.inner.forward_varlen(
                self._flat(q), self._flat(k), self._flat(v), docs.offsets(q.device),
                docs.max_len, scale=scale)
            b, s, h, _ = q.shape
            return out.view(q.shape), lse.view(h, b, s).transpose(0, 1)
        out = torch.empty_like(q)
        lse = None
        for row, a, e in self.documents.segments:
            o, l = self.inner.forward(q[row:row + 1, a:e], k[row:row + 1, a:e],
                                      v[row:row + 1, a:e], causal=True, scale=scale)
            if lse is None:
                lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=l.dtype)
            out[row:row + 1, a:e] = o
            lse[row:row + 1, :, a:e] = l
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        self._check(q, k, causal)
        docs = self.documents
        if docs.whole:
            return self.inner.backward(dout, q, k, v, out, lse, causal=True, scale=scale)
        if self.uses_varlen(q.device):
            b, s, h, _ = q.shape
            dq, dk, dv = self.inner.backward_varlen(
                self._flat(dout), self._flat(q), self._flat(k), self._flat(v), self._flat(out),
                lse.transpose(0, 1).reshape(h, b * s), docs.offsets(q.device), docs.max_len,
                scale=scale)
            return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for row, a, e in self.documents.segments:
            rows = (slice(row, row + 1), slice(a, e))
            g = self.inner.backward(dout[rows], q[rows], k[rows], v[rows], out[rows],
                                    lse[row:row + 1, :, a:e], causal=True, scale=scale)
            dq[rows], dk[rows], dv[rows] = g
        return dq, dk, dv

    def __repr__(self) -> str:
        return f"DocumentKernel({self.inner!r}, {self.documents!r})"
