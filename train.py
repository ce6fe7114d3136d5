"""Launch TorchTitan's trainer with the torchtitan-upipe plugin.

    torchrun --nproc_per_node N train.py --job.config_file train_configs/<name>.toml [--section.key value]

With no ``--job.config_file`` it runs the embedded default: the Llama3 debug model with UPipe
on 2 CPU ranks (``train_configs/llama3_debug_upipe.toml``):
``torchrun --nproc_per_node 2 train.py``.
"""

import os
import sys

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "train_configs", "llama3_debug_upipe.toml"
)


def main() -> None:
    # Long-context runs fragment the caching allocator; use expandable segments unless the
    # user chose.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # TorchTitan's ConfigManager binds sys.argv when it is imported, so default it first
    # (the console module does not import TorchTitan).
    from torchtitan_upipe.titan.console import clean_console, config_file, parse_args, user_errors

    if not config_file(sys.argv[1:]):
        sys.argv[1:1] = ["--job.config_file", DEFAULT_CONFIG]
    from torchtitan_upipe.titan.cpu_compat import cpu_compat

    # One rank logs (LOG_RANK, default 0), inapplicable warnings are dropped, and a user error
    # is one line and exit code 2 (UPIPE_TRACEBACK=1: the traceback).
    with clean_console() as console, user_errors("train.py"):
        with cpu_compat():  # before TorchTitan is imported; patches nothing when CUDA is present
            import torchtitan_upipe.train_spec  # noqa: F401  (registers model.name = "upipe_llama3")
            from torchtitan.tools.logging import init_logger
            from torchtitan.train import main as torchtitan_main

            from torchtitan_upipe.titan.train_spec import prepare_assets
            from torchtitan_upipe.titan.trainer import UPipeTrainer

            init_logger()  # TorchTitan's main sets it up again
            job_config = parse_args(quiet=not console.log_rank)  # TorchTitan parses it again
            console.set_job(job_config)
            prepare_assets(job_config)  # the debug tokenizer, before TorchTitan looks for it
            torchtitan_main(UPipeTrainer)


if __name__ == "__main__":
    main()
