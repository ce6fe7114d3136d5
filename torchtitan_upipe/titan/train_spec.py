"""Registers the plugin's TorchTitan train spec(s).  Import this module to use them.

``model.name = "upipe_llama3"``: TorchTitan's Llama3 model and flavors (the same parameters,
so checkpoints are plain TorchTitan Llama3 checkpoints) plus the paper's ``32B`` flavor
(Llama3 at Qwen3-32B sizes, ``head_dim`` 128), with :func:`parallelize_llama_cp` as the
parallelize hook, an offline debug tokenizer/dataset and a synthetic-token dataloader option.

``training.dataset``:

* ``"upipe_debug_text"`` -- generated English-like text; its BPE tokenizer is generated into
  ``model.hf_assets_path`` on first use if no ``tokenizer.json`` is there.
* ``"synthetic"`` -- random tokens of any ``seq_len`` (benchmarks; no tokenizer read).
* anything TorchTitan knows (``c4``, ``c4_test``, ...) -- TorchTitan's own loader.
"""

from __future__ import annotations

import dataclasses
import os

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.models import llama3
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec
from torchtitan.protocols import train_spec as _train_spec_registry

from .data import build_synthetic_dataloader, ensure_debug_tokenizer, register_debug_dataset
from .metrics import build_cp_metrics_processor
from .llama3 import FLAVORS, Transformer
from .parallelize import parallelize_llama_cp

MODEL_NAME = "upipe_llama3"
DEBUG_DATASET = "upipe_debug_text"
SYNTHETIC_DATASET = "synthetic"


def prepare_assets(job_config) -> None:
    """Generate the debug dataset's tokenizer into ``model.hf_assets_path`` if it is not there."""
    path = job_config.model.hf_assets_path
    if job_config.training.dataset == DEBUG_DATASET and not os.path.exists(
        os.path.join(path, "tokenizer.json")
    ):
        from torchtitan.tools.logging import logger

        logger.info(f"Generating the {DEBUG_DATASET} tokenizer into model.hf_assets_path={path} "
                    f"(first run)")
        ensure_debug_tokenizer(path)


def build_tokenizer(job_config):
    if job_config.training.dataset == SYNTHETIC_DATASET:
        return None
    prepare_assets(job_config)
    return build_hf_tokenizer(job_config)


def build_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite: bool = True):
    if job_config.training.dataset == SYNTHETIC_DATASET:
        args = FLAVORS[job_config.model.flavor]  # tokens over the model's whole vocab
        return build_synthetic_dataloader(
            dp_world_size, dp_rank, tokenizer, job_config, infinite=infinite,
            vocab_size=args.vocab_size, eos_id=args.eos_id,
        )
    register_debug_dataset()
    return build_text_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite=infinite)


def _loss_already_computed(pred, labels):
    if pred.dim() != 0:
        raise RuntimeError("memory.chunked_loss: the model returned logits instead of the loss sum")
    return pred


def build_loss(job_config, **kwargs):
    """TorchTitan's sum-reduced cross entropy, or (chunked loss) the output layer's loss sum."""
    if job_config.memory.chunked_loss:
        return _loss_already_computed
    return build_cross_entropy_loss(job_config, **kwargs)


def get_train_spec() -> TrainSpec:
    return dataclasses.replace(
        llama3.get_train_spec(),
        model_cls=Transformer,
        model_args=dict(FLAVORS),
        build_loss_fn=build_loss,
        build_metrics_processor_fn=build_cp_metrics_processor,
        parallelize_fn=parallelize_llama_cp,
        pipelining_fn=None,
        build_tokenizer_fn=build_tokenizer,
        build_dataloader_fn=build_dataloader,
    )


def register() -> None:
    """Register the train spec(s); idempotent."""
    if MODEL_NAME not in _train_spec_registry._extra_train_specs:
        register_train_spec(MODEL_NAME, get_train_spec())


register()
