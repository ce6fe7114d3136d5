"""Memory stays flat over a long run: 100 steps at a fixed length (torchrun, CPU, 2 ranks).

The debug job with the whole memory stack (offloaded block inputs, tiles, chunked loss). On
CPU TorchTitan's ``memory/max_reserved(GiB)`` is the process's peak RSS, which only grows. It
grows in jumps of a few MiB that come ever less often while the allocator's pools fill: two
runs on a 2-core VM went 679 -> 766 -> 801 MiB at steps 1, 20, 71 and flat after, and
657 -> 760 -> 785 MiB at steps 1, 20, 60 and flat after. Over the last quarter (steps 75-100)
it must grow by at most 2%: a leak of one step's offloaded inputs (1.25 MiB here) would add
31 MiB there, 4%. The offloader's host buffers, ``memory/host_offload(GiB)``, must be the same
at every step: reused, not re-created.
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
    settled = 3 * STEPS // 4
    growth = rss[STEPS] - rss[settled]
    mib = {s: round(rss[s] * 1024, 1) for s in (1, 20, STEPS // 2, settled, STEPS)}
    print(f"peak RSS (MiB) by step: {mib}")
    assert growth <= 0.02 * rss[STEPS], mib
    assert len(set(host.values())) == 1 and host[1] > 0, host
