"""The console: one logging rank, inapplicable messages dropped, user errors in one line."""

import logging
import re
import warnings

import pytest

from torchtitan_upipe.titan.config import ConfigError
from torchtitan_upipe.titan.console import (
    INAPPLICABLE,
    clean_console,
    is_log_rank,
    log_ranks,
    parse_args,
    user_errors,
)


def test_log_rank_follows_torchtitans_convention():
    assert log_ranks({}) == {0}
    assert log_ranks({"LOG_RANK": "0,3"}) == {0, 3}
    assert log_ranks({"LOG_RANK": "all"}) is None
    assert is_log_rank({"LOCAL_RANK": "0"}) and not is_log_rank({"LOCAL_RANK": "1"})
    assert is_log_rank({"LOCAL_RANK": "1", "LOG_RANK": "all"})
    with pytest.raises(ConfigError, match=r"LOG_RANK='first' must be a comma-separated list"):
        log_ranks({"LOG_RANK": "first"})


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    root = logging.getLogger()
    handler, level = _Records(), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler.messages
    root.removeHandler(handler)
    root.setLevel(level)


# one message of each log-record entry, as TorchTitan words it
LOGGED = [
    "ENV[TORCH_NCCL_ASYNC_ERROR_HANDLING] = 1 will be overridden to 3 based on job config",
    "Error running lspci: [Errno 2] No such file or directory: 'lspci', fallback to use device_name",
    "Peak flops undefined for: x86_64, fallback to A100",
    "Peak FLOPS used for computing MFU: 3.120e+14",
    "model.safetensors.index.json not found at hf_assets_path: ./x/model.safetensors.index.json.",
    "HF assets path ./outputs/assets/upipe_debug_tokenizer does not exist!",
]


@pytest.fixture
def cpu(monkeypatch):
    """The console as on a machine without CUDA."""
    from torchtitan_upipe.titan import console

    monkeypatch.setattr(console, "_cuda", lambda job=None: False)
    return console


def test_every_log_entry_has_an_example_and_the_examples_are_dropped_on_cpu(cpu, records):
    entries = [i for i in INAPPLICABLE if not i.warning]
    assert all(any(i.drops(m) for m in LOGGED) for i in entries)  # no entry without a test
    root = logging.getLogger()
    filters = list(root.filters)
    with clean_console({"LOCAL_RANK": "0"}) as console:
        assert console.log_rank
        for m in LOGGED:
            root.warning(m)
        root.warning("a warning that applies")
        root.info("Training starts at step 1")
    assert records == ["a warning that applies", "Training starts at step 1"]
    assert root.filters == filters  # removed on exit
    root.warning(LOGGED[0])
    assert records[-1] == LOGGED[0]


def test_with_cuda_the_gpu_messages_are_kept(monkeypatch, records):
    from torchtitan_upipe.titan import console

    monkeypatch.setattr(console, "_cuda", lambda job=None: True)
    with clean_console({"LOCAL_RANK": "0"}):
        for m in LOGGED[:4]:
            logging.getLogger().warning(m)
    assert records == LOGGED[:4]


def test_messages_that_depend_on_the_job_are_kept_when_they_apply(records):
    from types import SimpleNamespace as NS

    hf_assets = LOGGED[-1]
    with clean_console({"LOCAL_RANK": "0"}) as console:
        logging.getLogger().warning(hf_assets)  # while parsing: the job is not known yet
        console.set_job(NS(training=NS(dataset="c4"), checkpoint=NS(last_save_in_hf=True)))
        logging.getLogger().warning(hf_assets)  # c4 needs a tokenizer there
        logging.getLogger().warning(LOGGED[-2])  # it saves in HF format
        console.set_job(NS(training=NS(dataset="upipe_debug_text"),
                           checkpoint=NS(last_save_in_hf=False)))
        logging.getLogger().warning(hf_assets)
        logging.getLogger().warning(LOGGED[-2])
    assert records == [hf_assets, LOGGED[-2]]


def test_other_ranks_print_errors_only(records):
    with clean_console({"LOCAL_RANK": "1"}) as console:
        assert not console.log_rank
        logging.getLogger().info("Training starts at step 1")
        logging.getLogger().warning("a warning")
        logging.getLogger().error("rank 1 failed")
    assert records == ["rank 1 failed"]


def test_inapplicable_python_warnings_are_dropped(cpu, recwarn):
    with clean_console({"LOCAL_RANK": "0"}):
        warnings.warn("DTensor random operators may not have complete support on cpu device mesh")
        warnings.warn("DTensor manual_seed() may not have complete support on cpu device mesh")
        warnings.warn("'set_vital' is deprecated, please do not call")
        warnings.warn("Set timeout is now only supported for either nccl or gloo.")
        warnings.warn("a warning that applies")
    assert [str(w.message) for w in recwarn] == ["a warning that applies"]


def test_a_user_error_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as e, user_errors("train.py", env={"LOCAL_RANK": "0"}):
        raise ConfigError("training.seq_len=511 is not divisible by 2")
    assert e.value.code == 2
    assert capsys.readouterr().err == "train.py: error: training.seq_len=511 is not divisible by 2\n"
    # another rank waits for the logging rank to print (torchrun then ends it); still alive
    # after the wait, the error is its own and it says so with its rank
    with pytest.raises(SystemExit) as e, user_errors("train.py", env={"LOCAL_RANK": "1"},
                                                     wait_s=0.01):
        raise ConfigError("x")
    assert e.value.code == 2
    assert capsys.readouterr().err == "train.py: error (local rank 1): x\n"


def test_the_traceback_on_request_and_for_bugs():
    with pytest.raises(ConfigError), user_errors(env={"UPIPE_TRACEBACK": "1"}):
        raise ConfigError("x")
    with pytest.raises(KeyError), user_errors(env={}):
        raise KeyError("a bug")


def test_parse_args_quiet_keeps_the_exit_code_and_drops_the_box(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--nonsense.key", "3"], quiet=True, quiet_wait_s=0.01)
    assert e.value.code != 0 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        parse_args(["--nonsense.key", "3"])
    assert "nonsense" in capsys.readouterr().err


@pytest.mark.parametrize("toml, message", [
    ('[context_parallel]\nstyle = "upipe"\nchunk_heads = 4\n',
     r"\[context_parallel\] has no option 'chunk_heads' \(did you mean 'upipe_chunk_heads'\?\); "
     r"valid: \['kernel', 'pad_seq_len', 'style', 'time_attention', 'ulysses_degree', "
     r"'upipe_chunk_heads'\]"),
    ('[contex_parallel]\nstyle = "upipe"\n',
     r"there is no section \[contex_parallel\] \(did you mean 'context_parallel'\?\); valid: \["),
    ('[memory]\noffload_keep_layers = -1\n',
     r"memory.offload_keep_layers=-1 must be an integer >= 0"),
])
def test_toml_mistakes_are_user_errors_that_name_the_option(tmp_path, toml, message):
    path = tmp_path / "job.toml"
    path.write_text('[job]\ncustom_config_module = "torchtitan_upipe.config"\n' + toml)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        parse_args(["--job.config_file", str(path)])
