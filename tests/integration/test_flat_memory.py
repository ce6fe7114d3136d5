"""Memory stays flat over a long run: 100 steps at a fixed length (torchrun, CPU, 2 ranks).

The debug job with the whole memory stack (offloaded block inputs, tiles, chunked loss). On
CPU TorchTitan's ``memory/max_reserved(GiB)`` is the process's peak RSS, which only grows. It
grows in jumps of a few MiB, at irregular steps, while the allocator's pools fill: from step 20
to step 100, five runs on a 2-core VM grew by 25, 29, 35, 35 and 57 MiB (the last with the
machine loaded; e.g. 679 -> 766 -> 801 MiB at steps 1, 20, 100). A leak of one step's offloaded
inputs (``memory/host_offload``, 1.25 MiB here) would add 100 MiB over those 80 steps on top of
that; the growth allowed is the leak's alone. The offloader's host buffers, the process groups
and the RoPE table must be the same at every step: reused, not re-created (their counters,
:func:`~torchtitan_upipe.titan.metrics.reuse_metrics`, do not move after step 1).
"""

import pytest

from tests.helpers.trainer import check, run_train, tensorboard_scalars

pytestmark = pytest.mark.slow

STEPS = 100


def test_memory_is_flat_over_100_steps(tmp_path):
    dump = tmp_path / "long"
    check(run_train(2, "llama3_debug_upipe_memory.toml", f"--job.dump_folder={dump}",
                    f"--training.steps={STEPS}", "--training.seq_len=256", "--metrics.log_freq=1",
                    cwd=tmp_path, timeout=900))
    rss = tensorboard_scalars(str(dump), "memory/max_reserved(GiB)")
    host = tensorboard_scalars(str(dump), "memory/host_offload(GiB)")
    assert sorted(rss) == list(range(1, STEPS + 1)) and sorted(host) == sorted(rss)
    start = 20
    growth = rss[STEPS] - rss[start]
    leak = (STEPS - start) * host[1]  # one step's offloaded inputs kept at every step
    mib = {s: round(rss[s] * 1024, 1) for s in (1, start, STEPS // 2, STEPS)}
    print(f"peak RSS (MiB) by step: {mib}; growth {growth * 1024:.1f} MiB, a leak would add "
          f"{leak * 1024:.0f}")
    assert growth <= leak, mib
    assert len(set(host.values())) == 1 and host[1] > 0, host
    assert_reused(dump, offloaded_layers=5)  # debugmodel: 6 layers, offload_keep_layers = 1


def assert_reused(dump, offloaded_layers: int, steps: int = STEPS) -> None:
    """The reuse counters are the same at every step, at the values of a run that built
    each thing once: one host buffer per offloaded layer, one RoPE table per build."""
    counters = {name: tensorboard_scalars(str(dump), name)
                for name in ("memory/host_buffer_allocs", "cp/process_groups",
                             "cp/rope_table_builds")}
    for name, by_step in counters.items():
        assert len(by_step) == steps and len(set(by_step.values())) == 1, (name, by_step)
    assert counters["memory/host_buffer_allocs"][1] == offloaded_layers
    assert counters["cp/process_groups"][1] >= 1
