"""One clean console for a torchrun job: one rank's log, no inapplicable warnings, one-line errors.

``train.py`` runs TorchTitan's ``main`` inside :func:`clean_console` and :func:`user_errors`.

* **One rank logs.** TorchTitan's convention is ``LOG_RANK`` (its ``run_train.sh`` passes it to
  ``torchrun --local-ranks-filter``): a comma-separated list of local ranks whose log is shown,
  default ``0``; here ``LOG_RANK=all`` also shows every rank. It is applied inside the process, so
  the plain ``torchrun --nproc_per_node N train.py`` prints each line once. The other ranks
  still print their errors (``ERROR`` and above, and any Python traceback).
* **No warnings that do not apply.** :data:`INAPPLICABLE` lists the TorchTitan and torch
  messages dropped, each with the condition under which it says nothing about this job and
  why; the trainer says what matters instead (e.g. that MFU is not shown without a known peak).
* **User errors in one line.** A :class:`~.config.ConfigError` (an invalid option, found at
  config time or when a checkpoint is checked before loading) is printed once, as
  ``train.py: error: <message>``, by the logging ranks (the others wait for them to print
  first), and the process exits with code 2.
  ``UPIPE_TRACEBACK=1`` shows the traceback instead. torchrun then adds its own summary of the
  failed processes, which this process cannot change. :func:`parse_args` turns TorchTitan's
  TOML errors (an unknown section or key, a bad value) into such errors.

Everything installed is removed when the context managers exit (tests run them in-process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import sys
import time
import warnings
from typing import Any, Callable, Iterator

from .config import ConfigError

LOG_RANK = "LOG_RANK"
TRACEBACK = "UPIPE_TRACEBACK"


def log_ranks(env=None) -> set[int] | None:
    """The local ranks whose log is shown (``LOG_RANK``, default ``"0"``); None: all of them."""
    env = os.environ if env is None else env
    value = env.get(LOG_RANK, "0").strip()
    if value.lower() == "all":
        return None
    try:
        return {int(part) for part in value.split(",") if part.strip()}
    except ValueError:
        raise ConfigError(
            f"{LOG_RANK}={value!r} must be a comma-separated list of local ranks (e.g. 0 or 0,1) "
            f"or 'all'") from None


def is_log_rank(env=None) -> bool:
    env = os.environ if env is None else env
    ranks = log_ranks(env)
    return ranks is None or int(env.get("LOCAL_RANK", "0")) in ranks


def _cuda(job=None) -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu(job) -> bool:
    return _cuda(job)  # looked up at each call (tests take the CPU's answer on a GPU machine)


def _saves_hf(job) -> bool:
    return job is not None and bool(job.checkpoint.last_save_in_hf)


def _needs_assets(job) -> bool:
    """The dataset reads a tokenizer from ``model.hf_assets_path`` that the plugin does not
    generate (the debug dataset's is generated there on first use; synthetic needs none)."""
    from .train_spec import DEBUG_DATASET, SYNTHETIC_DATASET

    return job is not None and job.training.dataset not in (DEBUG_DATASET, SYNTHETIC_DATASET)


@dataclasses.dataclass(frozen=True)
class Inapplicable:
    """A log record or Python warning (``pattern``, searched in its message) that is dropped
    unless ``applies(job_config)`` (``None`` while the config is being parsed); ``why`` says why
    it does not apply."""

    pattern: str
    why: str
    applies: Callable[[Any], bool] = lambda job: False
    warning: bool = False  # a Python warning (``warnings.warn``), not a log record

    def drops(self, message: str, job=None) -> bool:
        return re.search(self.pattern, message) is not None and not self.applies(job)


INAPPLICABLE: tuple[Inapplicable, ...] = (
    Inapplicable(r"ENV\[TORCH_NCCL_\w+\] = .* will be overridden",
                 "NCCL environment variables, on a job without NCCL (gloo on CPU)", _gpu),
    Inapplicable(r"Error running lspci",
                 "TorchTitan's probe of the GPU model for its peak FLOP/s, on CPU", _gpu),
    Inapplicable(r"Peak flops undefined for: .*, fallback to A100",
                 "an A100's peak taken for the CPU; the trainer shows no MFU there", _gpu),
    Inapplicable(r"Peak FLOPS used for computing MFU",
                 "that A100 peak, on CPU (the trainer logs that MFU is not shown)", _gpu),
    Inapplicable(r"model\.safetensors\.index\.json not found at hf_assets_path",
                 "how a checkpoint would be saved in HF format, which this job does not do "
                 "(checkpoint.last_save_in_hf = false)", _saves_hf),
    Inapplicable(r"HF assets path .* does not exist",
                 "the debug dataset's tokenizer is generated there on first use (train.py does it "
                 "right after parsing), and the synthetic dataset needs none", _needs_assets),
    Inapplicable(r"Set timeout is now only supported for either nccl or gloo",
                 "torch could not set the timeout of a process group without a gloo/NCCL backend "
                 "of its own, on CPU (the gloo groups get it)", _gpu, warning=True),
    Inapplicable(r"DTensor (random operators|manual_seed\(\)) may not have complete support "
                 r"on cpu device mesh",
                 "on CPU each rank initializes its own shards, so initial weights depend on the "
                 "world size: the trainer says so once, with the remedy (a seed checkpoint)",
                 warning=True),
    Inapplicable(r"'set_vital' is deprecated", "torchdata calling a deprecated torch API",
                 warning=True),
)


class _Filter(logging.Filter):
    """Drops records of non-logging ranks below ERROR, and the inapplicable ones."""

    def __init__(self, log_rank: bool) -> None:
        super().__init__()
        self.log_rank = log_rank
        self.job_config = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if not self.log_rank:
            return False
        message = record.getMessage()
        return not any(i.drops(message, self.job_config) for i in INAPPLICABLE if not i.warning)


class Console:
    """What :func:`clean_console` yields: whether this rank logs, and :meth:`set_job`."""

    def __init__(self, flt: _Filter) -> None:
        self._filter = flt

    @property
    def log_rank(self) -> bool:
        return self._filter.log_rank

    def set_job(self, job_config) -> None:
        """The parsed config, which decides the messages that depend on it."""
        self._filter.job_config = job_config


@contextlib.contextmanager
def clean_console(env=None) -> Iterator[Console]:
    """Show this rank's log only if it is a logging rank (``LOG_RANK``) and drop the
    :data:`INAPPLICABLE` messages while active. The filter sits on the root logger, which
    TorchTitan logs to (its ``init_logger`` replaces handlers, not filters)."""
    log_rank = is_log_rank(env)
    root = logging.getLogger()
    flt = _Filter(log_rank)
    root.addFilter(flt)
    try:
        with warnings.catch_warnings():
            if not log_rank:
                warnings.simplefilter("ignore")
            for i in INAPPLICABLE:
                if i.warning and not i.applies(None):
                    warnings.filterwarnings("ignore", message=f".*{i.pattern}")
            yield Console(flt)
    finally:
        root.removeFilter(flt)


def parse_args(argv: list[str] | None = None, *, quiet: bool = False, quiet_wait_s: float = 5.0):
    """TorchTitan's ``ConfigManager().parse_args(argv)``, with its TOML errors as
    :class:`~.config.ConfigError`: an unknown section or key names the valid ones (and the
    closest), and a bad value keeps the option's own message. ``quiet``: the command line's
    error box (an unknown option, a bad value) is not printed, only the exit code kept, after
    ``quiet_wait_s`` (the logging ranks print it, as :func:`user_errors` explains)."""
    from torchtitan.config import ConfigManager

    argv = sys.argv[1:] if argv is None else list(argv)
    manager = ConfigManager()
    toml_values = manager._maybe_load_toml(argv)
    if toml_values:
        _check_toml_keys(manager._maybe_add_custom_config(argv, toml_values), toml_values,
                         config_file(argv))
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            return manager.parse_args(argv)
    except ValueError as e:  # raised building the TOML's sections (a value's own check)
        raise ConfigError(f"{config_file(argv)}: {e}") from None
    except SystemExit:
        if quiet:  # let the logging rank print its box before torchrun stops every rank
            time.sleep(quiet_wait_s)
        raise


def config_file(argv: list[str]) -> str:
    """The value of ``--job.config_file`` (or ``--job.config-file``) in ``argv``; "" if absent."""
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in ("--job.config_file", "--job.config-file"):
            return value or (argv[i + 1] if i + 1 < len(argv) else "")
    return ""


def _check_toml_keys(config_cls, values: dict, path: str) -> None:
    """Every section and key of the TOML is one of ``config_cls``'s (TorchTitan's JobConfig
    merged with this plugin's sections)."""
    import difflib
    from dataclasses import fields, is_dataclass

    sections = {f.name: f.type for f in fields(config_cls)}

    def unknown(what: str, name: str, valid) -> ConfigError:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"{path}: {what}{hint}; valid: {sorted(valid)}")

    for section, body in values.items():
        if section not in sections:
            raise unknown(f"there is no section [{section}]", section, list(sections))
        cls = sections[section]
        if is_dataclass(cls) and isinstance(body, dict):
            keys = [f.name for f in fields(cls)]
            for key in body:
                if key not in keys:
                    raise unknown(f"[{section}] has no option {key!r}", key, keys)


def wants_traceback(env=None) -> bool:
    env = os.environ if env is None else env
    return env.get(TRACEBACK, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def user_errors(prog: str = "train.py", env=None, wait_s: float = 5.0) -> Iterator[None]:
    """A :class:`~.config.ConfigError` raised inside becomes ``prog: error: <message>`` on
    stderr and ``SystemExit(2)``; with ``UPIPE_TRACEBACK=1`` it propagates. Anything else (a
    bug) propagates with its traceback.

    A logging rank prints at once. Another rank first waits ``wait_s``: torchrun stops every
    rank as soon as one exits, so a rank that exited first would cut the logging rank off
    before it printed. When the logging rank has printed and exited, torchrun ends this one
    during the wait. If this rank is still alive after it, the error was its own, and it prints
    it with its rank."""
    try:
        yield
    except ConfigError as e:
        if wants_traceback(env):
            raise
        if is_log_rank(env):
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(wait_s)
            rank = (os.environ if env is None else env).get("LOCAL_RANK", "?")
            print(f"{prog}: error (local rank {rank}): {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


__all__ = ["INAPPLICABLE", "LOG_RANK", "TRACEBACK", "Console", "Inapplicable", "clean_console",
           "is_log_rank", "log_ranks", "parse_args", "user_errors", "wants_traceback"]
