"""The plugin's train spec: TorchTitan's Llama3 pieces with this plugin's model, hook and loss."""

from types import SimpleNamespace

import pytest
import torch
from torchtitan.protocols.train_spec import get_train_spec as registered

import torchtitan_upipe.train_spec as old_path
from torchtitan_upipe.titan import train_spec
from torchtitan_upipe.titan.llama3 import FLAVORS, Transformer
from torchtitan_upipe.titan.parallelize import parallelize_llama_cp


def test_registered_once_under_its_name():
    train_spec.register()  # idempotent
    spec = registered(train_spec.MODEL_NAME)
    assert spec.model_cls is Transformer and spec.parallelize_fn is parallelize_llama_cp
    assert set(spec.model_args) == set(FLAVORS) and "32B" in spec.model_args
    assert spec.pipelining_fn is None
    assert old_path.register is train_spec.register  # train.py and users import the old path


def test_chunked_loss_passes_the_models_loss_through():
    job = SimpleNamespace(memory=SimpleNamespace(chunked_loss=True))
    loss_fn = train_spec.build_loss(job)
    loss = torch.tensor(3.0)
    assert loss_fn(loss, None) is loss
    with pytest.raises(RuntimeError, match="returned logits instead of the loss sum"):
        loss_fn(torch.zeros(2, 3), None)


def test_synthetic_data_needs_no_tokenizer():
    job = SimpleNamespace(training=SimpleNamespace(dataset=train_spec.SYNTHETIC_DATASET))
    assert train_spec.build_tokenizer(job) is None
