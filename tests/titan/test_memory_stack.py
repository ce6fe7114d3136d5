"""The [memory] stack applied to a real TorchTitan Llama3 model: same loss and gradients.

Tiled MLP, tiled RMSNorm, the chunked-loss output layer and host-offloaded block
checkpointing together must give the loss and every parameter gradient of the plain model
(float64, single process), with an unchanged state dict.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from torchtitan.models.llama3.model.model import FeedForward

from tests.helpers.numerics import DIM, assert_same_module
from torchtitan_upipe.memory import HostOffloader, apply_offloaded_ac, apply_tiled_mlp
from torchtitan_upipe.titan.memory_stack import TiledFeedForward, apply_tiling
from torchtitan_upipe.titan.llama3 import LlamaArgs, Transformer


def _model(head_dim=None):
    args = LlamaArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=24,
                     multiple_of=16, rope_theta=10000, head_dim=head_dim)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Transformer(args).to(torch.float64)
        with torch.no_grad():
            model.init_weights()
    return model


def _mem(**kw):
    base = dict(offload_activations=False, offload_keep_layers=1, offload_prefetch=True, tiled_mlp=False, mlp_tiles=0,
                tiled_norm=False, norm_tiles=0, chunked_loss=False, loss_chunks=0)
    base.update(kw)
    return SimpleNamespace(**base)


def _loss_and_grads(model, tokens, labels, chunked):
    model.zero_grad()
    if chunked:
        model.output.set_labels(labels)
        loss = model(tokens)
    else:
        # TorchTitan's loss (sum over non-ignored tokens), kept in float64 for an exact check
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(0, 1), reduction="sum", ignore_index=-100
        )
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("head_dim", [None, 12])
@pytest.mark.parametrize(
    "mem",
    [
        _mem(tiled_mlp=True, mlp_tiles=5),
        _mem(tiled_norm=True, norm_tiles=7),
        _mem(chunked_loss=True, loss_chunks=3),
        _mem(offload_activations=True, offload_keep_layers=1),
        _mem(offload_activations=True, offload_keep_layers=2, offload_prefetch=False),
        _mem(offload_activations=True, offload_keep_layers=0, tiled_mlp=True, tiled_norm=True,
             chunked_loss=True),
    ],
    ids=["tiled_mlp", "tiled_norm", "chunked_loss", "offload", "offload_no_prefetch", "everything"],
)
def test_memory_stack_is_exact(mem, head_dim):
    ref = _model(head_dim)
    model = copy.deepcopy(ref)
    keys = list(ref.state_dict())
    apply_tiling(model, mem, local_seq_len=22)
    if mem.offload_activations:
        apply_offloaded_ac(model, HostOffloader(torch.device("cpu")), mem.offload_keep_layers,
                           mem.offload_prefetch)
    assert list(model.state_dict()) == keys  # canonical weights: nothing renamed

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 22), generator=g)
    labels = torch.randint(0, 97, (2, 22), generator=g)
    labels[0, :5] = -100  # ignored positions
    loss_ref, grads_ref = _loss_and_grads(ref, tokens, labels, chunked=False)
    loss, grads = _loss_and_grads(model, tokens, labels, chunked=mem.chunked_loss)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    for name, gr in grads_ref.items():
        torch.testing.assert_close(grads[name], gr, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_offload_keeps_only_host_copies_between_forward_and_backward():
    model = _model()
    offloader = HostOffloader(torch.device("cpu"))
    apply_offloaded_ac(model, offloader, keep_layers=1)
    tokens = torch.randint(0, 97, (1, 16))
    out = model(tokens)
    # layers 1 and 2 were offloaded, layer 0 kept
    assert sorted(offloader._host) == [1, 2]
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_chunked_loss_without_labels_is_an_error():
    model = _model()
    apply_tiling(model, _mem(chunked_loss=True), local_seq_len=8)
    with pytest.raises(RuntimeError, match="set_labels"):
        model(torch.randint(0, 97, (1, 8)))


def test_recomputed_block_output_is_released_before_the_inner_backward():
    """The offloaded checkpoint frees the recomputed output (only the backward's root): the
    backward's peak drops by about one block-sized tensor, and the gradients do not change."""
    from torchtitan_upipe.tools.memtrack import LiveTensorTracker

    def run(release):
        model = _model()
        apply_offloaded_ac(model, HostOffloader(torch.device("cpu")), keep_layers=0,
                           release_output=release)
        tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
        out = model(tokens)
        with LiveTensorTracker() as tracker:
            out.sum().backward()
        return tracker.peak_bytes, [p.grad.clone() for p in model.parameters()]

    kept_peak, kept_grads = run(False)
    freed_peak, freed_grads = run(True)
    block_bytes = 2 * 24 * 32 * 8  # (b, s, dim) float64
    assert kept_peak - freed_peak >= block_bytes, (kept_peak, freed_peak)
    for a, b in zip(kept_grads, freed_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- TorchTitan's FeedForward, tiled ----------------------------------------------------


def _feed_forward(seed=0):
    torch.manual_seed(seed)
    ff = FeedForward(dim=DIM, hidden_dim=4 * DIM, multiple_of=4, ffn_dim_multiplier=None)
    with torch.no_grad():
        ff.init_weights(0.2)
    return ff.double()


@pytest.mark.parametrize("num_tiles", [3, None])
def test_apply_tiled_mlp_module(num_tiles):
    ref = _feed_forward()
    tiled = apply_tiled_mlp(copy.deepcopy(ref), num_tiles)
    assert isinstance(tiled, FeedForward) and isinstance(tiled, TiledFeedForward)
    assert tiled.num_tiles == num_tiles
    assert list(tiled.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in tiled.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for k, v in ref.state_dict().items():
        assert torch.equal(tiled.state_dict()[k], v)

    assert_same_module(ref, tiled, seed=3)

    # re-applying updates the tile count; a fresh TiledFeedForward has the same keys
    assert apply_tiled_mlp(tiled, 5).num_tiles == 5
    fresh = TiledFeedForward(DIM, 4 * DIM, 4, None, num_tiles=2)
    assert list(fresh.state_dict()) == list(ref.state_dict())
    fresh.load_state_dict(ref.state_dict())  # strict
    assert "num_tiles=2" in repr(fresh)


def test_each_memory_option_that_is_on_says_what_it_takes_effect_with():
    from types import SimpleNamespace as NS

    from torchtitan_upipe.titan.memory_stack import describe

    mem = NS(tiled_mlp=True, mlp_tiles=0, tiled_norm=True, norm_tiles=3, chunked_loss=True,
             loss_chunks=0, offload_activations=True, offload_keep_layers=1, offload_pinned=False,
             offload_prefetch=True)
    assert describe(mem, local_seq=1000, batch=3, dim=256, n_layers=6) == [
        "memory.tiled_mlp: the MLP over 4 tiles of <= 250 tokens per sample "
        "(mlp_tiles=0: ceil(1000 / dim 256))",
        "memory.tiled_norm: RMSNorm over 3 tiles of <= 334 tokens per sample (norm_tiles=3)",
        "memory.chunked_loss: output projection and loss over 3 chunks of <= 334 tokens per sample "
        "(loss_chunks=0: about 1024 tokens each)",
        "memory.offload_activations: block inputs of layers 1-5 (5 of 6) in pageable host memory, "
        "layer 0 kept on the device (offload_keep_layers=1); prefetch on",
    ]
    off = NS(**{**vars(mem), "tiled_mlp": False, "tiled_norm": False, "chunked_loss": False,
                "offload_activations": False})
    assert describe(off, 1000, 3, 256, 6) == []
    none_kept = NS(**{**vars(off), "offload_activations": True, "offload_keep_layers": 0})
    assert describe(none_kept, 1000, 3, 256, 6) == [
        "memory.offload_activations: block inputs of layers 0-5 (6 of 6) in pageable host memory, "
        "none kept on the device (offload_keep_layers=0); prefetch on"]
