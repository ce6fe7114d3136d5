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
    # TorchTitan's ConfigManager binds sys.argv when it is imported, so default it first.
    if not any(a.split("=")[0] in ("--job.config_file", "--job.config-file") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--job.config_file", DEFAULT_CONFIG]

    from torchtitan_upipe.titan.cpu_compat import cpu_compat

    with cpu_compat():  # before TorchTitan is imported; patches nothing when CUDA is present
        import torchtitan_upipe.train_spec  # noqa: F401  (registers model.name = "upipe_llama3")
        from torchtitan.train import main as torchtitan_main

        from torchtitan_upipe.titan.trainer import UPipeTrainer

        torchtitan_main(UPipeTrainer)


if __name__ == "__main__":
    main()
