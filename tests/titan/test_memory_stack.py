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

from tests.helpers.dist import run_distributed
from tests.helpers.numerics import DIM, assert_same_module
from torchtitan_upipe.memory import HostOffloader, apply_offloaded_ac, apply_tiled_mlp
from torchtitan_upipe.titan.memory_stack import (TiledFeedForward, apply_offloaded_checkpointing,
                                               apply_tiling)
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
    base = dict(offload_activations=False, offload_keep_layers=1, offload_prefetch=True,
                offload_refetch_input=False, offload_inplace_residual_grads=False, offload_stride=1,
                keep_attention_output="none", tiled_mlp=False, mlp_tiles=0, tiled_norm=False,
                norm_tiles=0, chunked_loss=False, loss_chunks=0)
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
        _mem(offload_activations=True, offload_keep_layers=1, offload_refetch_input=True),
        _mem(offload_activations=True, offload_keep_layers=1,
             offload_inplace_residual_grads=True),
        _mem(offload_activations=True, offload_keep_layers=0, tiled_mlp=True, tiled_norm=True,
             chunked_loss=True, offload_refetch_input=True, offload_inplace_residual_grads=True),
        _mem(offload_activations=True, offload_keep_layers=1, offload_stride=2),
        _mem(offload_activations=True, offload_keep_layers=0, offload_stride=3,
             offload_prefetch=False),
        _mem(offload_activations=True, offload_keep_layers=0, offload_stride=3, tiled_mlp=True,
             tiled_norm=True, chunked_loss=True, offload_refetch_input=True,
             offload_inplace_residual_grads=True),
    ],
    ids=["tiled_mlp", "tiled_norm", "chunked_loss", "offload", "offload_no_prefetch", "refetch",
         "inplace_residual_grads", "everything", "stride_2", "stride_3_no_prefetch",
         "stride_3_everything"],
)
def test_memory_stack_is_exact(mem, head_dim):
    ref = _model(head_dim)
    model = copy.deepcopy(ref)
    keys = list(ref.state_dict())
    apply_tiling(model, mem, local_seq_len=22)
    if mem.offload_activations:
        apply_offloaded_ac(model, HostOffloader(torch.device("cpu")), mem.offload_keep_layers,
                           mem.offload_prefetch, refetch_input=mem.offload_refetch_input,
                           inplace_residual_grads=mem.offload_inplace_residual_grads,
                           stride=mem.offload_stride)
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


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("keep", [0, 2])
def test_inplace_residual_grads_are_bit_identical(keep, tiled):
    """memory.offload_inplace_residual_grads adds each norm's input gradient to the residual's
    gradient.  With the tiled norms (one autograd node each) that is autograd's addition: every
    gradient is bit for bit that of the offloaded checkpointing without it (input refetched
    too).  TorchTitan's composite RMSNorm reads its input twice, so autograd adds those two
    terms to the residual's one at a time, and the in-place sum adds their sum: equal within
    float64 rounding."""
    def run(inplace):
        model = _model()
        mem = _mem(offload_activations=True, tiled_mlp=tiled, mlp_tiles=3, tiled_norm=tiled,
                   norm_tiles=2)
        apply_tiling(model, mem, local_seq_len=22)
        apply_offloaded_ac(model, HostOffloader(torch.device("cpu")), keep, refetch_input=True,
                           inplace_residual_grads=inplace)
        tokens = torch.randint(0, 97, (2, 22), generator=torch.Generator().manual_seed(4))
        out = model(tokens)
        out.square().sum().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}

    (out_ref, grads_ref), (out, grads) = run(False), run(True)
    assert torch.equal(out, out_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        if tiled:
            assert torch.equal(grads[name], g), name
        else:
            torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"{name}: {m}")
        assert grads[name].abs().max() > 0, name  # every weight gets a gradient


def test_inplace_residual_grads_leave_an_expanded_incoming_gradient_alone():
    """A block whose output is summed gets an expanded (stride 0) gradient from ``sum()``:
    nothing is written into it, and the gradients are those without the option."""
    def run(inplace):
        model = _model()
        apply_offloaded_ac(model, HostOffloader(torch.device("cpu")), 0,
                           inplace_residual_grads=inplace)
        x = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        x.requires_grad_()
        model.layers["0"](x, model.freqs_cis[:6], None, None).sum().backward()
        return x.grad, {n: p.grad for n, p in model.layers["0"].named_parameters()}

    (dx_ref, ref), (dx, got) = run(False), run(True)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-14)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")


def test_inplace_residual_grads_need_torchtitans_block_forward():
    """A block whose forward is not TorchTitan's is refused: the in-place sums follow its
    residual structure, and another structure would get other gradients."""
    model = _model()

    class Other(type(model.layers["0"])):
        def forward(self, x, *args, **kwargs):
            return super().forward(x, *args, **kwargs) * 2

    model.layers["1"].__class__ = Other
    mem = _mem(offload_activations=True, offload_inplace_residual_grads=True)
    with pytest.raises(ValueError, match=r"layer 1's block \(Other\) does not run TorchTitan's "
                                         r"Llama3 TransformerBlock.forward.*"
                                         r"memory.offload_inplace_residual_grads=false"):
        apply_offloaded_checkpointing(model, mem, HostOffloader(torch.device("cpu")))
    del model.layers["1"].ffn_norm  # without the submodules it runs, the memory layer refuses
    with pytest.raises(ValueError, match=r"layer 1's block \(Other\) has no ffn_norm module"):
        apply_offloaded_ac(model, HostOffloader(torch.device("cpu")), 0,
                           inplace_residual_grads=True)


def test_offload_keeps_only_host_copies_between_forward_and_backward():
    model = _model()
    offloader = HostOffloader(torch.device("cpu"))
    apply_offloaded_ac(model, offloader, keep_layers=1)
    tokens = torch.randint(0, 97, (1, 16))
    out = model(tokens)
    # layers 1 and 2 were offloaded, layer 0 kept
    assert offloader.layers() == [1, 2]
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
             offload_prefetch=True, keep_attention_output="none", offload_optimizer_state=False,
             offload_refetch_input=False, offload_inplace_residual_grads=False,
             offload_stride=1, fuse_output_projection=False)
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
    for keep, where in (("device", "on the device"),
                        ("host", "in host memory, copied and prefetched with the block inputs")):
        kept = NS(**{**vars(off), "keep_attention_output": keep})
        assert describe(kept, 1000, 3, 256, 6) == [
            f"memory.keep_attention_output={keep!r}: each layer's attention output and LSE kept "
            f"from the forward {where}; the recompute replays them instead of running the "
            f"attention kernel forward"]
    refetch = NS(**{**vars(none_kept), "offload_refetch_input": True})
    assert describe(refetch, 1000, 3, 256, 6) == [
        "memory.offload_activations: block inputs of layers 0-5 (6 of 6) in pageable host memory, "
        "none kept on the device (offload_keep_layers=0); prefetch on; each input freed after "
        "its recompute and refetched for the attention norm's backward (offload_refetch_input)"]
    inplace = NS(**{**vars(none_kept), "offload_inplace_residual_grads": True})
    assert describe(inplace, 1000, 3, 256, 6) == [
        "memory.offload_activations: block inputs of layers 0-5 (6 of 6) in pageable host memory, "
        "none kept on the device (offload_keep_layers=0); prefetch on; residual gradients "
        "summed in place (offload_inplace_residual_grads)"]
    fused = NS(**{**vars(off), "fuse_output_projection": True})
    assert describe(fused, 1000, 3, 256, 6) == [
        "memory.fuse_output_projection: UPipe's op applies wo; its backward makes each stage's "
        "output gradient from the block's (no full-width gradient of wo's input)"]
    optimizer = NS(**{**vars(off), "offload_optimizer_state": True})
    assert describe(optimizer, 1000, 3, 256, 6) == [
        "memory.offload_optimizer_state: the optimizer's state in pageable host memory during "
        "the forward and backward, back on the device for the optimizer step"]


# ---- memory.keep_attention_output: the recompute replays the forward's attention ---------

SEQ = 16  # divisible by 2 * C = 8 (the ring's zigzag over 4 ranks)
# (world, ulysses degree, style, U): ulysses, usp (2 x ring 2), upipe with 1 and several
# stages, UPipe x ring; on 4 ranks H_kv = 2 < C replicates the KV heads
KEEP_CASES = {
    2: [(2, "ulysses", 0), (2, "upipe", 2), (2, "upipe", 4)],
    4: [(4, "ulysses", 0), (2, "usp", 0), (4, "upipe", 4), (2, "upipe", 2)],
}


def _cp_model(groups, style, chunk_heads, fuse_wo=False):
    from torchtitan_upipe.cp.kernels import get_kernel
    from torchtitan_upipe.titan.attention import (
        ContextParallelAttention,
        UlyssesStrategy,
        UPipeStrategy,
    )

    model = _model()
    for block in model.layers.values():
        strategy = (UPipeStrategy(groups, "math", chunk_heads, fuse_wo=fuse_wo) if style == "upipe"
                    else UlyssesStrategy(groups, get_kernel("math", torch.device("cpu"))))
        block.attention = ContextParallelAttention(block.attention, strategy)
    return model


def _step(model, tokens, labels):
    """One forward and backward on this rank's shard; the loss and every gradient."""
    model.zero_grad()
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1),
                                             reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _keep_cases(rank, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tests.helpers.comm_trace import CollectiveTrace
    from torchtitan_upipe.cp.kernels.math import MathKernel
    from torchtitan_upipe.titan.groups import build_cp_groups
    from torchtitan_upipe.titan.sharding import sharder_for

    forwards = [0]
    math_forward = MathKernel.forward

    def counting(self, *args, **kwargs):  # this spawned process's kernel only
        forwards[0] += 1
        return math_forward(self, *args, **kwargs)

    MathKernel.forward = counting
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 97, (2, SEQ), generator=g)
    labels = torch.randint(0, 97, (2, SEQ), generator=g)
    for u, style, chunk_heads in KEEP_CASES[world]:
        groups = build_cp_groups(mesh, u)
        sharder = sharder_for(groups)
        local = [sharder.shard(t) for t in (tokens, labels)]
        results = {}
        for keep in ("none", "device", "host"):
            model = _cp_model(groups, style, chunk_heads)
            model.use_local_rope(sharder.indices(SEQ))
            offloader = HostOffloader(torch.device("cpu"))
            apply_offloaded_ac(model, offloader, keep_layers=1, keep_attention_output=keep)
            with torch.no_grad(), CollectiveTrace() as trace:
                forwards[0] = 0
                model(local[0])  # outside the checkpoint: computes, keeps nothing
            one_forward = (forwards[0], trace.sent[:])
            for _ in range(2):  # the second step reuses the slots and the host buffers
                forwards[0] = 0
                with CollectiveTrace() as trace:
                    loss, grads = _step(model, *local)
            results[keep] = (loss, grads, forwards[0], trace.sent[:], offloader)
        case = f"{style} C={world} u={u} U={chunk_heads}"
        loss, grads, kernel_none, sent_none, _ = results["none"]
        fwd_kernels, fwd_sent = one_forward
        assert kernel_none == 2 * fwd_kernels, case  # forward and recompute
        for keep in ("device", "host"):
            k_loss, k_grads, kernels, sent, offloader = results[keep]
            assert torch.equal(k_loss, loss), (case, keep)
            for name, grad in grads.items():
                assert torch.equal(k_grads[name], grad), (case, keep, name)
            assert kernels == fwd_kernels, (case, keep)  # once per stage per layer per step
            kinds = lambda s, k: [b for kind, b in s if kind == k]  # noqa: E731
            if style == "upipe":  # the replay runs no stage: no collective at all
                expected = kinds(sent_none, "all-to-all")
                for b in kinds(fwd_sent, "all-to-all"):
                    expected.remove(b)
                assert sorted(kinds(sent, "all-to-all")) == sorted(expected), (case, keep)
            else:  # the recompute still sends q, k|v and o (the kernel backward needs them)
                assert kinds(sent, "all-to-all") == kinds(sent_none, "all-to-all"), (case, keep)
            rings = kinds(fwd_sent, "send")
            assert len(kinds(sent, "send")) == len(kinds(sent_none, "send")) - len(rings), case
            # inputs of layers 1 and 2 (+ every layer's attention out and LSE), made once
            assert offloader.allocations == 2 + (6 if keep == "host" else 0), (case, keep)
        dist.barrier()


def test_kept_attention_output_is_exact_and_runs_each_kernel_forward_once_2_ranks():
    run_distributed(_keep_cases, 2)


def test_kept_attention_output_is_exact_and_runs_each_kernel_forward_once_4_ranks():
    run_distributed(_keep_cases, 4)


# ---- memory.fuse_output_projection: UPipe's op applies wo ---------------------------------

def _fused_wo_cases(rank, world):
    """Every UPipe case of KEEP_CASES (UPipe x ring on 4 ranks) with wo fused into the op and
    without, under the offloaded checkpointing with each kept-result choice and the in-place
    residual gradients: the same loss and every gradient within float64 rounding."""
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan_upipe.titan.groups import build_cp_groups
    from torchtitan_upipe.titan.sharding import sharder_for

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 97, (2, SEQ), generator=g)
    labels = torch.randint(0, 97, (2, SEQ), generator=g)
    ran = 0
    for u, style, chunk_heads in KEEP_CASES[world]:
        if style != "upipe":
            continue
        groups = build_cp_groups(mesh, u)
        sharder = sharder_for(groups)
        local = [sharder.shard(t) for t in (tokens, labels)]
        for keep, inplace in (("none", False), ("host", True), ("device", False)):
            results = []
            for fuse in (False, True):
                model = _cp_model(groups, style, chunk_heads, fuse_wo=fuse)
                model.use_local_rope(sharder.indices(SEQ))
                apply_offloaded_ac(model, HostOffloader(torch.device("cpu")), keep_layers=1,
                                   keep_attention_output=keep, inplace_residual_grads=inplace)
                results.append(_step(model, *local))
            (loss, grads), (f_loss, f_grads) = results
            case = f"C={world} u={u} U={chunk_heads} keep={keep} inplace={inplace}"
            torch.testing.assert_close(f_loss, loss, rtol=1e-12, atol=1e-12, msg=case)
            for name, grad in grads.items():
                torch.testing.assert_close(f_grads[name], grad, rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"{case} {name}: {m}")
            ran += 1
    assert ran == 6, ran  # two UPipe layouts x three choices


@pytest.mark.parametrize("world", [2, 4])
def test_fused_output_projection_gives_every_gradient(world):
    run_distributed(_fused_wo_cases, world)


def test_fused_output_projection_refuses_a_converted_wo():
    """A wo that is not TorchTitan's bias-free nn.Linear would be bypassed: an error that
    names the option, when the style installs the attention."""
    from torchtitan_upipe.titan.attention import check_fusable_wo

    model = _model()
    attention = model.layers["0"].attention
    check_fusable_wo(attention)  # TorchTitan's

    class Converted(torch.nn.Linear):
        pass

    attention.wo = Converted(attention.wo.in_features, attention.wo.out_features, bias=False)
    with pytest.raises(ValueError, match=r"memory.fuse_output_projection=true applies wo inside "
                                         r"the UPipe op, but this model's wo is Converted.*"
                                         r"set memory.fuse_output_projection=false"):
        check_fusable_wo(attention)
    attention.wo = torch.nn.Linear(attention.wo.in_features, attention.wo.out_features)
    with pytest.raises(ValueError, match="wo is Linear with a bias"):
        check_fusable_wo(attention)
