"""``--png``: predicted peak device memory per rank against the sequence length, one line per
row (style and ``u``) at its leanest configuration (the smallest ``U``, every block input
offloaded, no prefetch, the tiles and the chunked loss), with the device's limit."""

from __future__ import annotations

from ...titan import fitting as fm
from ...titan import memory_model as mm
from .search import Job, kernel_ok, smallest_u


def series(job: Job, lengths: list[int]) -> dict[str, list[float | None]]:
    """GiB per row at each length (``None`` where the layout or the kernel cannot run it)."""
    out = {}
    for layout, st in smallest_u(job).values():
        q = fm.seq_quantum(st)
        vals = []
        for s in lengths:
            x = fm.leanest(mm.replace(st, seq_len=max(q, s // q * q)))
            vals.append(fm.fit(x, job.budget).peak / fm.GiB if kernel_ok(x, job.hardware, job.kernel)
                        else None)
        out[layout.label(job.cp)] = vals
    return out


def plot_peaks(job: Job, path: str, lengths: list[int] | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise fm.ConfigError(f"--png needs matplotlib ({e}); pip install matplotlib") from None
    lengths = lengths or sorted({int(m * (1 << k)) for k in range(17, 24) for m in (1, 1.5)})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", "-.", ":"]
    for i, (label, vals) in enumerate(series(job, lengths).items()):
        xs = [s for s, v in zip(lengths, vals) if v is not None]
        ax.plot(xs, [v for v in vals if v is not None], marker="os^vD<>"[i % 7], ms=3,
                ls=styles[i % len(styles)], label=label)
    b = job.budget
    ax.set_ylim(0, 2 * b.device_gib)
    ax.axhline(b.device_gib - b.reserve_gib, color="k", ls=":",
               label=f"{b.device_gib:g} GiB less {b.reserve_gib:g} reserve")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training.seq_len (tokens)")
    ax.set_ylabel("predicted peak per GPU (GiB)")
    ax.set_title(f"{job.job_config.model.flavor} on {job.world} x {job.hardware.gpu.name}: "
                 "leanest options", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
