"""Memory stays flat over a long run: 100 steps at a fixed length (torchrun, CPU, 2 ranks).

The debug job with the whole memory stack (offloaded block inputs, tiles, chunked loss). On
CPU TorchTitan's ``memory/max_reserved(GiB)`` is the process's peak RSS, which only grows; it
settles within the first tens of steps (allocator pools warming up). Over the second half it
must not grow by more than 1%: a leak of one step's offloaded inputs (1.25 MiB here) would add
60 MiB there, 8%. The offloader's host buffers, ``memory/host_offload(GiB)``, must be the same
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
    half = STEPS // 2
    growth = rss[STEPS] - rss[half]
    mib = {s: round(rss[s] * 1024, 1) for s in (1, 10, 20, half, STEPS)}
    print(f"peak RSS (MiB) by step: {mib}")
    assert growth <= 0.01 * rss[STEPS], mib
    assert len(set(host.values())) == 1 and host[1] > 0, host
