"""``python -m torchtitan_upipe.tools.plan``: plan a run before renting the GPUs.

    python -m torchtitan_upipe.tools.plan --gpus 8 --gpu h100 \\
        --job.config_file train_configs/llama3_8b_8xh100_upipe.toml --max-context
    python -m torchtitan_upipe.tools.plan --gpus 8 --gpu h200 \\
        --job.config_file train_configs/llama3_8b_8xh100_upipe.toml --training.seq_len 2097152

Every option it does not know is train.py's.  See :mod:`.planner` for the answers.
"""

from __future__ import annotations

from ...titan.cpu_compat import cpu_compat

if __name__ == "__main__":
    with cpu_compat():  # before TorchTitan is first imported (the estimator runs its trainer)
        from .planner import main

        code = main()
    raise SystemExit(code)
