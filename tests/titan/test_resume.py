"""Resume checks: the checkpoint a run resumes from is checked before anything is loaded.

Real DCP checkpoints in a temporary folder and TorchTitan's own step lookup; the end-to-end
runs (train, stop, resume, extend) are in ``tests/integration/test_first_hour.py``.
"""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchtitan_upipe.train_spec  # noqa: F401  (registers upipe_llama3)
from tests.helpers.paths import CONFIGS
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.config import ConfigManager
from torchtitan_upipe.titan.config import ConfigError
from torchtitan_upipe.titan.resume import (
    RECORD,
    RunRecord,
    check_resume,
    checkpoint_to_resume,
    differences,
    rebuild_schedule,
    schedule_of,
)


def _config(*args):
    return ConfigManager().parse_args(
        ["--job.config_file", os.path.join(CONFIGS, "llama3_debug_upipe.toml"), *args])


def _checkpointer(folder):
    """The attributes and TorchTitan's own methods :func:`check_resume` uses."""
    ns = SimpleNamespace(enable=True, folder=str(folder), exclude_from_loading=[])
    ns._find_load_step = lambda folder="": CheckpointManager._find_load_step(ns, folder)
    ns._create_checkpoint_id = lambda step, folder="": CheckpointManager._create_checkpoint_id(
        ns, step, folder)
    return ns


def _save(folder, step, *, optimizer=True, record=None):
    state = {"model": {"w": torch.ones(2)}, "train_state": {"step": step}}
    if optimizer:
        state["optimizer"] = {"state.w.exp_avg": torch.zeros(2)}
    if record is not None:
        state[RECORD] = record
    dcp.save(state, checkpoint_id=os.path.join(folder, f"step-{step}"))


def test_the_schedule_is_what_the_lr_scheduler_is_built_from():
    s = schedule_of(_config())
    assert s == {"total_steps": 10, "warmup_steps": 2, "decay_ratio": 0.8, "decay_type": "linear",
                 "min_lr_factor": 0.0, "lr": 8e-4}
    assert schedule_of(_config("--lr_scheduler.total_steps=20"))["total_steps"] == 20
    assert differences(s, {**s, "total_steps": 6}) == {"total_steps": (10, 6)}
    assert differences(s, s) == {}


def test_nothing_to_resume(tmp_path):
    cfg = _config("--checkpoint.enable")
    assert checkpoint_to_resume(_checkpointer(tmp_path / "none"), cfg) is None
    _save(tmp_path, 0)  # a seed checkpoint: weights by design
    assert checkpoint_to_resume(_checkpointer(tmp_path), cfg) is None
    assert check_resume(_checkpointer(tmp_path), cfg, RunRecord(cfg, lambda: 0)) == {}


def test_a_weights_only_checkpoint_is_refused_by_name(tmp_path):
    cfg = _config("--checkpoint.enable")
    _save(tmp_path, 3, optimizer=False)
    assert checkpoint_to_resume(_checkpointer(tmp_path), cfg) == (3, str(tmp_path / "step-3"))
    with pytest.raises(ConfigError, match=r"step-3, step 3\) holds the model weights only.*"
                       r"checkpoint.last_save_model_only=true.*--checkpoint.no_last_save_model_only"):
        check_resume(_checkpointer(tmp_path), cfg, RunRecord(cfg, lambda: 0))


def test_a_plain_torchtitan_checkpoint_resumes_without_the_record(tmp_path):
    cfg = _config("--checkpoint.enable")
    _save(tmp_path, 3)
    ckpt = _checkpointer(tmp_path)
    assert check_resume(ckpt, cfg, RunRecord(cfg, lambda: 0)) == {}
    assert ckpt.exclude_from_loading == [RECORD]  # the load does not ask for what is not there


def test_a_changed_schedule_is_an_error_unless_rebuilt(tmp_path):
    saved = _config("--checkpoint.enable", "--training.steps=3")
    _save(tmp_path, 3, record=RunRecord(saved, lambda: 3072))
    same = _config("--checkpoint.enable", "--training.steps=3")
    assert check_resume(_checkpointer(tmp_path), same, RunRecord(same, lambda: 0)) == {}
    longer = _config("--checkpoint.enable", "--training.steps=6", "--optimizer.lr=1e-3")
    with pytest.raises(ConfigError, match=(
            r"step 3\) was trained on another LR schedule \(training.steps: 3 then, 6 now, "
            r"optimizer.lr: 0.0008 then, 0.001 now\).*checkpoint.on_schedule_change='rebuild' "
            r"\(valid: \['error', 'rebuild'\]\).*lr_scheduler.total_steps")):
        check_resume(_checkpointer(tmp_path), longer, RunRecord(longer, lambda: 0))
    rebuild = _config("--checkpoint.enable", "--training.steps=6",
                      "--checkpoint.on_schedule_change=rebuild")
    assert check_resume(_checkpointer(tmp_path), rebuild, RunRecord(rebuild, lambda: 0)) == {
        "total_steps": (3, 6)}
    # planned with lr_scheduler.total_steps, stopping early changes nothing
    planned = _config("--checkpoint.enable", "--training.steps=3", "--lr_scheduler.total_steps=6")
    _save(tmp_path / "planned", 3, record=RunRecord(planned, lambda: 3072))
    more = _config("--checkpoint.enable", "--training.steps=6", "--lr_scheduler.total_steps=6")
    assert check_resume(_checkpointer(tmp_path / "planned"), more, RunRecord(more, lambda: 0)) == {}


def test_the_record_round_trips_through_dcp(tmp_path):
    cfg = _config()
    _save(tmp_path, 2, record=RunRecord(cfg, lambda: 2048))
    loaded = RunRecord(cfg, lambda: 0)
    dcp.load({RECORD: loaded}, checkpoint_id=str(tmp_path / "step-2"))
    assert loaded.saved == {"schedule": schedule_of(cfg), "tokens_seen": 2048}


def _schedulers(cfg, model):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
    return build_lr_schedulers([opt], cfg.lr_scheduler, cfg.training.steps)


def _steps(scheds, n):
    for _ in range(n):
        for s in scheds.schedulers:
            s.optimizer.step()
        scheds.step()


def _lrs(scheds):
    return [g["lr"] for s in scheds.schedulers for g in s.optimizer.param_groups]


def test_rebuild_puts_the_next_steps_on_the_new_schedule():
    """3 steps on a 3-step schedule, then the state loaded into a 6-step one: TorchTitan would
    train step 4 at the old last LR; rebuilt, steps 4-6 get the 6-step schedule's LRs."""
    model = torch.nn.Linear(2, 2)
    short, long_cfg = _config("--training.steps=3"), _config("--training.steps=6", "--optimizer.lr=1e-3")
    old = _schedulers(short, model)
    _steps(old, 3)
    reference = _schedulers(long_cfg, torch.nn.Linear(2, 2))
    _steps(reference, 3)
    resumed = _schedulers(long_cfg, model)
    resumed.load_state_dict(old.state_dict())
    for s_old, s_new in zip(old.schedulers, resumed.schedulers):  # what the optimizer load does
        s_new.optimizer.load_state_dict(s_old.optimizer.state_dict())
    assert _lrs(resumed) != _lrs(reference)  # the mix the check refuses
    rebuild_schedule(resumed, long_cfg)
    for _ in range(3):
        assert _lrs(resumed) == pytest.approx(_lrs(reference), rel=1e-12)
        _steps(resumed, 1)
        _steps(reference, 1)


def _model_checkpoint(folder, step=3, **tensors):
    state = {"optimizer": {"state.w.exp_avg": torch.zeros(2)}, "train_state": {"step": step},
             **tensors}
    path = os.path.join(folder, f"step-{step}")
    dcp.save(state, checkpoint_id=path)
    return path


def test_a_checkpoint_of_another_model_is_refused_by_the_first_tensor_that_differs(tmp_path):
    from torchtitan_upipe.titan.resume import check_model_matches, read_metadata

    cfg = _config()
    path = _model_checkpoint(tmp_path, **{"tok_embeddings.weight": torch.ones(2048, 8),
                                          "layers.0.w": torch.ones(8)})
    md = read_metadata(path)
    check_model_matches(path, md, {"tok_embeddings.weight": torch.zeros(2048, 8),
                                   "layers.0.w": torch.zeros(8)}, cfg)
    flavor = r"\(model.name='upipe_llama3', model.flavor='debugmodel'\); use the model options"
    with pytest.raises(ConfigError, match=r"is of another model: tok_embeddings.weight is "
                       r"\[2048, 8\] there and \[4096, 8\] here " + flavor):
        check_model_matches(path, md, {"tok_embeddings.weight": torch.zeros(4096, 8),
                                       "layers.0.w": torch.zeros(8)}, cfg)
    with pytest.raises(ConfigError, match=r"it has no layers.1.w \(and 1 more\) of this one"):
        check_model_matches(path, md, {"tok_embeddings.weight": torch.zeros(2048, 8),
                                       "layers.0.w": torch.zeros(8), "layers.1.w": torch.zeros(8),
                                       "layers.2.w": torch.zeros(8)}, cfg)
    with pytest.raises(ConfigError, match=r"it holds layers.0.w, which this one .*"
                       r"benchmark.n_layers=1\) has not"):
        check_model_matches(path, md, {"tok_embeddings.weight": torch.zeros(2048, 8)},
                            _config("--benchmark.n_layers=1"))


def test_an_incomplete_checkpoint_names_the_file(tmp_path):
    from torchtitan_upipe.titan.resume import read_metadata

    path = _model_checkpoint(tmp_path, w=torch.ones(1000))
    read_metadata(path)
    shard = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[0]
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ConfigError, match=rf"the checkpoint {path} is incomplete: {shard} has "
                       r"100 bytes of the \d+ it should.*checkpoint.load_step"):
        read_metadata(path)
    os.remove(os.path.join(path, shard))
    with pytest.raises(ConfigError, match=rf"incomplete: {shard} is missing"):
        read_metadata(path)
    os.remove(os.path.join(path, ".metadata"))
    with pytest.raises(ConfigError, match=rf"cannot read the checkpoint {path}: "):
        read_metadata(path)


def test_resume_and_initial_load_check_the_model(tmp_path):
    ok = {"w": torch.zeros(1000)}
    bigger = {"w": torch.zeros(2000)}
    cfg = _config("--checkpoint.enable")
    _model_checkpoint(tmp_path / "ckpt", w=torch.ones(1000))
    ckpt = _checkpointer(tmp_path / "ckpt")
    check_resume(ckpt, cfg, RunRecord(cfg, lambda: 0), lambda: ok)
    with pytest.raises(ConfigError, match=r"w is \[1000\] there and \[2000\] here"):
        check_resume(ckpt, cfg, RunRecord(cfg, lambda: 0), lambda: bigger)
    # a new run (no checkpoint folder yet) that starts from checkpoint.initial_load_path
    seed = _config("--checkpoint.enable", f"--checkpoint.initial_load_path={tmp_path / 'ckpt' / 'step-3'}")
    fresh = _checkpointer(tmp_path / "new")
    check_resume(fresh, seed, RunRecord(seed, lambda: 0), lambda: ok)
    with pytest.raises(ConfigError, match=r"w is \[1000\] there and \[2000\] here"):
        check_resume(fresh, seed, RunRecord(seed, lambda: 0), lambda: bigger)
