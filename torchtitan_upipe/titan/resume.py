"""Resuming the obvious way: check the checkpoint a run is about to resume from, before loading it.

TorchTitan resumes from the newest ``step-N`` under ``job.dump_folder/checkpoint.folder`` when
``checkpoint.enable`` is on (or from ``checkpoint.load_step``). Two things go wrong there, one
with an error from inside DCP and one silently:

1. **A weights-only last save.** With ``checkpoint.last_save_model_only = true``
   (TorchTitan's default) the final checkpoint holds the model only, and resuming from it
   fails deep in DCP (``Missing key in checkpoint state_dict: dataloader.dp_rank_0``). The
   plugin's configs set it to false; for any other, :func:`check_resume` names the option.
2. **A changed LR schedule.** The LR scheduler is rebuilt from the current config, but its
   saved state (``last_epoch``, ``base_lrs``) and the optimizer's saved ``lr`` are loaded
   into it: a run extended from ``training.steps = 3`` to 6 trains step 4 at the old
   schedule's last LR (0 after a decay to 0), then jumps onto the new curve; a changed
   ``optimizer.lr`` is ignored. Every checkpoint therefore carries a :class:`RunRecord`
   (``upipe_run``): the options that define the schedule (:data:`SCHEDULE`, the total steps
   being ``lr_scheduler.total_steps`` or else ``training.steps``) and the tokens trained on.
   On resume a difference is a :class:`~.config.ConfigError` that lists it and says what to
   do, unless ``checkpoint.on_schedule_change = "rebuild"``: then the schedule is the current
   config's from the saved step on (:func:`rebuild_schedule`: base LR and the next step's LR
   from the new schedule at the saved step).

A plan to stop early and continue later needs neither: set ``lr_scheduler.total_steps`` to
the final length and ``training.steps`` to where to stop; a later run with more
``training.steps`` has the same schedule and continues exactly.

A checkpoint without the record (plain TorchTitan's) is resumed without the schedule check,
with a log line.

Two checks come first, for a resume and for a new run's ``checkpoint.initial_load_path``: the
checkpoint must be whole (every shard file its metadata names, at its length) and of this
model (the same tensor names and shapes). A truncated copy or another flavor's checkpoint is
then a one-line error naming the file or the first tensor that differs, not a traceback from
inside DCP. All checks read the checkpoint's metadata and the record only: nothing is loaded
before they pass.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from torch.distributed.checkpoint.stateful import Stateful

from .config import ConfigError

RECORD = "upipe_run"
"""The checkpoint key of :class:`RunRecord`."""

SCHEDULE: dict[str, tuple[str, str]] = {
    "total_steps": ("lr_scheduler", "total_steps"),
    "warmup_steps": ("lr_scheduler", "warmup_steps"),
    "decay_ratio": ("lr_scheduler", "decay_ratio"),
    "decay_type": ("lr_scheduler", "decay_type"),
    "min_lr_factor": ("lr_scheduler", "min_lr_factor"),
    "lr": ("optimizer", "lr"),
}
"""The record's schedule fields and the options they come from (``total_steps``:
``lr_scheduler.total_steps``, or ``training.steps`` when that is unset, as TorchTitan builds it)."""

ON_SCHEDULE_CHANGE = ("error", "rebuild")


def schedule_of(job_config) -> dict[str, Any]:
    """The options that define the LR schedule, as :data:`SCHEDULE` names them."""
    out = {name: getattr(getattr(job_config, section), key)
           for name, (section, key) in SCHEDULE.items()}
    if out["total_steps"] is None:
        out["total_steps"] = job_config.training.steps
    return out


def _option(name: str, job_config) -> str:
    if name == "total_steps" and job_config.lr_scheduler.total_steps is None:
        return "training.steps"
    section, key = SCHEDULE[name]
    return f"{section}.{key}"


class RunRecord(Stateful):
    """What a resume is checked against, saved with every checkpoint under :data:`RECORD`:
    ``{"schedule": schedule_of(job_config), "tokens_seen": tokens_seen()}``.

    ``tokens_seen`` counts each token of the global batch once (not once per CP rank as
    TorchTitan's summed ``ntokens_seen`` does), so it does not change with the layout.
    After a load, :attr:`saved` holds the loaded values and :attr:`tokens_base` the count."""

    def __init__(self, job_config, tokens_seen: Callable[[], int]) -> None:
        self.job_config = job_config
        self.tokens_seen = tokens_seen
        self.saved: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": schedule_of(self.job_config), "tokens_seen": int(self.tokens_seen())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = {"schedule": dict(state_dict["schedule"]),
                      "tokens_seen": int(state_dict["tokens_seen"])}


def checkpoint_to_resume(checkpointer, job_config) -> tuple[int, str] | None:
    """``(step, path)`` of the checkpoint TorchTitan's ``checkpointer.load()`` will resume a run
    from, or None when it will start one (no folder yet, no step, or the step-0 seed
    checkpoint, which holds weights by design)."""
    if not checkpointer.enable or not os.path.isdir(checkpointer.folder):
        return None
    step = job_config.checkpoint.load_step
    step = checkpointer._find_load_step() if step == -1 else step
    if step <= 0:
        return None
    path = checkpointer._create_checkpoint_id(step)
    return (step, path) if os.path.isdir(path) else None  # else TorchTitan's own error


_STATE_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.", f"{RECORD}.")
"""What a TorchTitan checkpoint holds besides the model's tensors (top-level FQNs)."""


def read_metadata(path: str):
    """The DCP metadata of the checkpoint at ``path``, after checking that every shard file it
    names is there and long enough (a truncated or partly copied checkpoint fails here, with
    the file, not inside DCP's load)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # a missing or unreadable .metadata
        raise ConfigError(f"cannot read the checkpoint {path}: {type(e).__name__}: {e}") from None
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size is None or size < end:
            state = "is missing" if size is None else f"has {size} bytes of the {end} it should"
            raise ConfigError(f"the checkpoint {path} is incomplete: {name} {state} (a save that "
                              f"did not finish, or a partial copy); resume from another step "
                              f"with checkpoint.load_step")
    return metadata


def check_model_matches(path: str, metadata, model_state: dict, job_config) -> None:
    """The model tensors of the checkpoint (``metadata``) are this model's, by name and
    shape; else a :class:`~.config.ConfigError` naming the first difference."""
    saved = {k: tuple(m.size) for k, m in metadata.state_dict_metadata.items()
             if not k.startswith(_STATE_PREFIXES) and hasattr(m, "size")}
    now = {k: tuple(v.shape) for k, v in model_state.items() if hasattr(v, "shape")}
    model = f"model.name={job_config.model.name!r}, model.flavor={job_config.model.flavor!r}"
    if job_config.benchmark.n_layers:
        model += f", benchmark.n_layers={job_config.benchmark.n_layers}"
    advice = "; use the model options it was saved with"

    def first(keys) -> str:
        keys = sorted(keys)
        return keys[0] + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")

    if missing := set(now) - set(saved):
        raise ConfigError(f"the checkpoint {path} is of another model: it has no {first(missing)} "
                          f"of this one ({model}){advice}")
    if extra := set(saved) - set(now):
        raise ConfigError(f"the checkpoint {path} is of another model: it holds {first(extra)}, "
                          f"which this one ({model}) has not{advice}")
    for k in sorted(now):
        if saved[k] != now[k]:
            raise ConfigError(f"the checkpoint {path} is of another model: {k} is "
                              f"{list(saved[k])} there and {list(now[k])} here ({model}){advice}")


def _read_record(path: str, keys: set[str]) -> dict[str, Any]:
    """The saved :class:`RunRecord` (only the fields the checkpoint has)."""
    import torch.distributed.checkpoint as dcp

    prefix = f"{RECORD}.schedule."
    template = {"schedule": {k[len(prefix):]: None for k in keys if k.startswith(prefix)},
                "tokens_seen": 0}
    holder = {RECORD: template}
    dcp.load(holder, checkpoint_id=path)
    return holder[RECORD]


def differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, now)}`` for every schedule field that differs."""
    return {k: (saved.get(k), now[k]) for k in now if saved.get(k, now[k]) != now[k]}


def mismatch_message(step: int, path: str, diffs: dict[str, tuple[Any, Any]], job_config) -> str:
    changed = ", ".join(f"{_option(k, job_config)}: {a!r} then, {b!r} now"
                        for k, (a, b) in diffs.items())
    return (
        f"the checkpoint to resume from ({path}, step {step}) was trained on another LR schedule "
        f"({changed}). Resumed as is, its saved scheduler state and LR would be mixed with the "
        f"new schedule. To continue on the new schedule from step {step + 1}, set "
        f"checkpoint.on_schedule_change='rebuild' (valid: {list(ON_SCHEDULE_CHANGE)}); to "
        f"resume the saved run exactly, use its options. To stop a run early and extend it "
        f"later, set lr_scheduler.total_steps to the final length from the start"
    )


def _check_initial_load(checkpointer, job_config, model_state) -> None:
    """A new run's ``checkpoint.initial_load_path`` (DCP, not HF): readable, this model's."""
    ckpt = job_config.checkpoint
    path = ckpt.initial_load_path
    if (not checkpointer.enable or not path or ckpt.initial_load_in_hf or model_state is None
            or os.path.isdir(checkpointer.folder) or not os.path.isdir(path)):
        return  # nothing to load, or TorchTitan's own message for a path that is not there
    check_model_matches(path, read_metadata(path), model_state(), job_config)


def check_resume(checkpointer, job_config, record: RunRecord,
                 model_state: Callable[[], dict] | None = None) -> dict[str, tuple[Any, Any]]:
    """Check the checkpoint a run will resume from (module doc); return the schedule
    differences to rebuild after the load (empty when none, or nothing is resumed).

    Raises :class:`~.config.ConfigError` for a checkpoint that is incomplete, of another
    model (``model_state()``: this model's state dict, as it is saved; names and shapes are
    compared), weights only, or of a changed schedule unless
    ``checkpoint.on_schedule_change = "rebuild"``. For a checkpoint without the record,
    leaves the record out of the load. A new run's ``checkpoint.initial_load_path`` is checked
    for the first two."""
    from torchtitan.tools.logging import logger

    found = checkpoint_to_resume(checkpointer, job_config)
    if found is None:
        _check_initial_load(checkpointer, job_config, model_state)
        return {}
    step, path = found
    metadata = read_metadata(path)
    if model_state is not None:
        check_model_matches(path, metadata, model_state(), job_config)
    keys = set(metadata.state_dict_metadata)
    if not any(k.startswith("optimizer.") for k in keys):
        raise ConfigError(
            f"the checkpoint to resume from ({path}, step {step}) holds the model weights only: "
            f"it was a last save with checkpoint.last_save_model_only=true (TorchTitan's "
            f"default), and a run cannot resume from it. Train with "
            f"--checkpoint.no_last_save_model_only (the plugin's configs set it) to resume later; "
            f"to start a new run from these weights, point checkpoint.initial_load_path at it "
            f"with checkpoint.initial_load_model_only=true and an empty checkpoint.folder"
        )
    if not any(k.startswith(f"{RECORD}.") for k in keys):
        checkpointer.exclude_from_loading = [*checkpointer.exclude_from_loading, RECORD]
        logger.info(f"Resuming from {path}, which has no {RECORD} record (plain TorchTitan's): "
                    f"its LR schedule is not checked against this run's")
        return {}
    saved = _read_record(path, keys)
    diffs = differences(saved["schedule"], schedule_of(job_config))
    if diffs and job_config.checkpoint.on_schedule_change != "rebuild":
        raise ConfigError(mismatch_message(step, path, diffs, job_config))
    if diffs:
        logger.info(f"checkpoint.on_schedule_change='rebuild': from step {step + 1} the LR "
                    f"follows this run's schedule "
                    f"({', '.join(_option(k, job_config) for k in diffs)} changed)")
    return diffs


def rebuild_schedule(lr_schedulers, job_config) -> None:
    """After loading: the current config's schedule from the saved step on. Each scheduler's
    base LR becomes ``optimizer.lr`` and each param group's LR the new schedule's value for
    the next step (``LambdaLR``: ``base * lambda(last_epoch)``)."""
    lr = job_config.optimizer.lr
    for sched in lr_schedulers.schedulers:
        sched.base_lrs = [lr for _ in sched.optimizer.param_groups]
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


__all__ = ["ON_SCHEDULE_CHANGE", "RECORD", "SCHEDULE", "RunRecord", "check_model_matches",
           "check_resume", "checkpoint_to_resume", "differences", "mismatch_message",
           "read_metadata", "rebuild_schedule", "schedule_of"]
