"""The report as markdown: the runs, full depth, maximum contexts, the CPU estimate and the
paper's tables, each with the command that produced it."""

from __future__ import annotations

from torchtitan_upipe.tools.perf_model import comm as cm

from . import paper
from .analysis import DEVICE_GIB, HOST_GIB, RESERVE_GIB, analyze, max_context
from .settings import display_names, setting_of

K, M = 2**10, 2**20


def fmt_len(n: int | None) -> str:
    """131072 -> 128K, 5242880 -> 5M, 1536 -> 1.5K."""
    if n is None:
        return "-"
    for unit, name in ((M, "M"), (K, "K")):
        if n >= unit:
            v = n / unit
            return f"{v:g}{name}" if v == int(v) or v < 10 else f"{v:.1f}{name}"
    return str(n)


def _f(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def paper_tps(key: tuple[str, int], row: str | None, seq_len: int) -> str:
    """The paper's tokens/s per GPU of ``row`` at ``seq_len`` as a cell ("" if not published)."""
    table = paper.table3(key).get(row, {})
    if seq_len not in table:
        return ""
    v = table[seq_len]
    return "—" if v is None else v if isinstance(v, str) else f"{v:.2f}"


def paper_table(key: tuple[str, int] = ("8B", 8)) -> str:
    """The paper's Table 3 for ``key`` (flavor, CP degree) with its maximum contexts."""
    lengths = paper.TABLE3_SEQ_LENS
    head = "| Method | " + " | ".join(fmt_len(s) for s in lengths) + " | max context |"
    lines = [head, "|" + "---|" * (len(lengths) + 2)]
    for row in paper.table3(key):
        cells = [paper_tps(key, row, s) for s in lengths]
        lines.append(f"| {row} | " + " | ".join(cells)
                     + f" | {fmt_len(paper.max_context(key)[row])} |")
    return "\n".join(lines)


def markdown(data: list[dict], device_gib: float = DEVICE_GIB, reserve_gib: float = RESERVE_GIB,
             net: cm.Network | None = None, overlap: bool | tuple[str, ...] = True) -> str:
    net = net or cm.Network()
    points = analyze(data, net, overlap)
    names = display_names([p.setting for p in points])
    out = ["# CP benchmark: one rank of an N-GPU job (TorchTitan fake backend)", ""]
    for d in data:
        env = d.get("environment", {})
        out += [f"- `{d['path']}` ({env.get('device', '?')}, torch {env.get('torch', '?')}):",
                "", "  ```", f"  {d.get('command', '?')}", "  ```"]
    out += [
        "",
        ("Step time and memory are one real rank with no-op collectives (compute only, no NCCL "
        "buffers; on a machine without CUDA the memory columns are the process's peak RSS).  "
        "Full depth = affine fit over the layer count unless measured.  Modeled tps "
        "adds the communication of `torchtitan_upipe/tools/perf_model/comm.py` "
        f"(NVLink {net.nvlink_GBps:g} GB/s, IB "
        f"{net.ib_GBps:g} GB/s per GPU, efficiency {net.efficiency:g}, latency "
        f"{net.latency_us:g} us: assumptions, not measurements)."),
        "",
        "## Runs",
        "",
        "| setting | S | layers | status | reserved GiB | active GiB | step s | tps/GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in data:
        for r in d["runs"]:
            if r.get("kind") == "estimate":
                continue  # the estimate section below
            sp = r["spec"]
            status = "ok" if r.get("ok") else "OOM" if r.get("oom") else (
                "timeout" if "timeout" in (r.get("error") or "").lower()[:200] else "failed")
            out.append(f"| {names[setting_of(sp)]} | {fmt_len(sp['seq_len'])} | {sp.get('n_layers') or 'all'} "
                       f"| {status} | {_f(r.get('reserved_gib'))} | {_f(r.get('active_gib'))} "
                       f"| {_f(r.get('step_s'), '.3f')} | {_f(r.get('tps'), '.1f')} |")
    out += [
        "",
        "## Full depth",
        "",
        ("| setting | S | L | peak reserved GiB | source | mem fit err | step s (compute) "
         "| time fit err | tps/GPU compute | comm s | modeled tps/GPU | modeled, ring overlapped "
         "| paper tps/GPU |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if not p.layers and not p.oom:
            continue  # estimated only: the estimate section below
        out.append(
            f"| {names[p.setting]} | {fmt_len(p.seq_len)} | {p.setting.full_layers} "
            f"| {'OOM' if p.oom and p.mem_gib is None else _f(p.mem_gib)} | {p.mem_source} "
            f"| {_pct(p.mem_fit_err)} | {_f(p.step_s, '.3f')} | {_pct(p.step_fit_err)} "
            f"| {_f(p.compute_tps, '.1f')} | {_f(p.model and p.model['comm_s'], '.3f')} "
            f"| {_f(p.model and p.model['tps'], '.1f')} "
            f"| {_f(p.model_overlap and p.model_overlap['tps'], '.1f')} "
            f"| {paper_tps(p.setting.paper_key, p.setting.paper_row(), p.seq_len)} |")
    out += [
        "",
        f"## Maximum context (full-depth peak + {reserve_gib:g} GiB reserve <= {device_gib:g} GiB)",
        "",
        "| setting | max context | first length that does not fit | paper row | paper max context |",
        "|---|---|---|---|---|",
    ]
    for mc in max_context(points, device_gib, reserve_gib):
        bound = "" if mc.first_fail or mc.max_len is None else ">= "
        out.append(f"| {mc.label} | {bound}{fmt_len(mc.max_len)} | {fmt_len(mc.first_fail)} "
                   f"| {mc.paper_row or '-'} | {fmt_len(mc.setting.paper_max_context())} |")
    estimated = [p for p in points if p.estimates]
    if estimated:
        out += [
            "",
            "## CPU memory estimate (fake tensors, no GPU)",
            "",
            ("`python -m torchtitan_upipe.tools.estimate` runs the same job options under "
             "FakeTensorMode on CPU and counts live storage bytes (allocated, not reserved), "
             "with FA2's backward workspace counted at each attention backward.  Error = "
             "(estimate - measured peak active) / measured, at full depth."),
            "",
            "| setting | S | L | estimated peak GiB | host (offloaded) GiB | measured active GiB "
            "| error |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in estimated:
            full = p.setting.full_layers
            active = p.layers.get(full, {}).get("active_gib")
            out.append(f"| {names[p.setting]} | {fmt_len(p.seq_len)} | {full} | {_f(p.est_gib)} "
                       f"| {_f(p.est_host_gib)} | {_f(active)} | {_pct(p.est_err)} |")
        out += [
            "",
            (f"Estimated maximum context (estimated peak + {reserve_gib:g} GiB reserve <= "
             f"{device_gib:g} GiB, and host memory per node <= {HOST_GIB:g} GiB):"),
            "",
            "| setting | max context | first length that does not fit | paper max context |",
            "|---|---|---|---|",
        ]
        for mc in max_context(points, device_gib, reserve_gib, estimated=True):
            bound = "" if mc.first_fail or mc.max_len is None else ">= "
            out.append(f"| {mc.label} | {bound}{fmt_len(mc.max_len)} | {fmt_len(mc.first_fail)} "
                       f"| {fmt_len(mc.setting.paper_max_context())} |")
    out += [
        "",
        "## Paper, Table 3: Llama3-8B on 8xH100, tokens/s per GPU",
        "",
        (f"Source: {paper.SOURCE}.  Rows map to our styles as: Ulysses = `ulysses`, UPipe = "
        "`upipe` (U = C = 8), Native PyTorch = `ring` (torch's DTensor ring attention), Ring = "
        "`usp` with u = 1 (zigzag ring).  The paper ran FA3 kernels; its Native PyTorch row had "
        "no tiled MLP, ours runs every style with the same memory stack."),
        "",
        paper_table(),
        "",
    ]
    keys = {p.setting.paper_key for p in points}
    if ("32B", 16) in keys:
        out += ["## Paper, Table 3: Qwen3-32B (our flavor 32B) on 16xH100, tokens/s per GPU", "",
                ("Same source.  Ulysses = `usp` with u = 8 (the paper's USP-Hybrid 8 x 2), UPipe = "
                 "`upipe` with u = 8 (8 x 2), Ring = `usp` with u = 1, Native PyTorch = `ring`."),
                "", paper_table(("32B", 16)), ""]
    if ("8B", 16) in keys:
        fig5 = paper.max_context(("8B", 16))
        out += ["## Paper, Fig. 5: Llama3-8B on 16xH100, maximum context", "",
                f"USP-Hybrid 8 x 2 (`usp` with u = 8): {fmt_len(fig5['Ulysses'])}; UPipe 8 x 2: "
                f"{fmt_len(fig5['UPipe'])}.", ""]
    return "\n".join(out)
