"""The cost of document-masked attention against causal attention, one kernel, one device.

    python scripts/bench_documents.py [--seq 4096] [--heads 4] [--head-dim 64] [--kernel sdpa]
        [--device cpu] [--repeats 5] [--out docs/results/documents_cpu.json]

For each mean document length (geometric lengths, seeded; ``whole`` = one document per row)
it times the forward and the forward + backward of
:class:`~torchtitan_upipe.cp.documents.DocumentKernel` around the kernel and of the kernel's
plain causal call on the same tensors, ``--repeats`` times after one warm-up, in turn (so a
slow phase of the machine hits all four alike), and prints the medians and their ratio
(masked / causal), measured in the same run.  A document mask removes
work (the pairs across documents), so the ratio falls below 1 as documents get shorter, until
the per-document calls' overhead dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchtitan_upipe.cp.documents import DocumentKernel, Documents  # noqa: E402
from torchtitan_upipe.cp.kernels import get_kernel  # noqa: E402
from torchtitan_upipe.titan.data import SyntheticTokenDataset  # noqa: E402

EOS = 1


def _documents(seq: int, mean_len: int | None) -> Documents:
    if mean_len is None:
        return Documents.whole_rows(1, seq)
    data = SyntheticTokenDataset(seq, vocab_size=1000, seed=0, document_len=mean_len, eos_id=EOS)
    return Documents.from_tokens(data.sample(0)[0]["input"][None], EOS)


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _interleaved_medians(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each of ``fns``, timed in turn within every repeat (A B A B ...), so
    that a slow phase of the machine hits both alike; one warm-up round first."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def _command(argv: list[str]) -> str:
    """The command line, without where its output was written (no machine paths)."""
    kept = [a for i, a in enumerate(argv)
            if not a.startswith("--out") and not (i and argv[i - 1] == "--out")]
    return " ".join(["python scripts/bench_documents.py", *kept])


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    kernel = get_kernel(args.kernel, device)
    gen = torch.Generator().manual_seed(0)
    shape = (1, args.seq, args.heads, args.head_dim)
    q, k, v, dout = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(4))
    scale = args.head_dim ** -0.5
    rows = []
    for mean_len in [None, *args.doc_lens]:
        docs = _documents(args.seq, mean_len)
        fns = {}
        for name, kern in (("causal", kernel), ("masked", DocumentKernel(kernel, docs))):
            def forward(kern=kern):
                return kern.forward(q, k, v, causal=True, scale=scale)

            def forward_backward(kern=kern, forward=forward):
                out, lse = forward()
                return kern.backward(dout, q, k, v, out, lse, causal=True, scale=scale)

            fns[name, "fwd"], fns[name, "fwd_bwd"] = forward, forward_backward
        med = _interleaved_medians(fns, args.repeats, device)
        timed = {name: (med[name, "fwd"], med[name, "fwd_bwd"]) for name in ("causal", "masked")}
        rows.append({
            "mean_doc_len": mean_len or args.seq, "documents": docs.count,
            "causal_fwd_s": timed["causal"][0], "masked_fwd_s": timed["masked"][0],
            "causal_fwd_bwd_s": timed["causal"][1], "masked_fwd_bwd_s": timed["masked"][1],
            "ratio_fwd": timed["masked"][0] / timed["causal"][0],
            "ratio_fwd_bwd": timed["masked"][1] / timed["causal"][1],
        })
    return {
        "command": _command(sys.argv[1:]),
        "python": "python", "torch": torch.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": args.device if device.type == "cpu" else torch.cuda.get_device_name(device),
        "kernel": kernel.name, "dtype": args.dtype, "seq": args.seq, "heads": args.heads,
        "head_dim": args.head_dim, "repeats": args.repeats, "statistic": "median", "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = ["| mean document | documents | causal fwd+bwd (s) | masked fwd+bwd (s) | ratio fwd | "
             "ratio fwd+bwd |", "|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['mean_doc_len']} | {r['documents']} | {r['causal_fwd_bwd_s']:.3f} | "
                     f"{r['masked_fwd_bwd_s']:.3f} | {r['ratio_fwd']:.2f} | {r['ratio_fwd_bwd']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kernel", default="sdpa")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--doc-lens", type=int, nargs="+", default=[1024, 128, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args(argv)
    result = measure(args)
    print(markdown(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
