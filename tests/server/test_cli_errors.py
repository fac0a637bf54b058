"""A user's mistake ends `solaris` with status 2 and one line on stderr that names the setting
and what it takes: never a traceback. Each case runs the real command in its own process;
`--precompute false` keeps the model out of it, so that it fails (or would serve) at once."""

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from solaris.precompute.export import ExportReport
from tests.conftest import DIM

SERVE = ["serve", "--precompute", "false"]


def solaris(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "solaris.app.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def refused(finished: subprocess.CompletedProcess[str], *wanted: str) -> str:
    """The one line the command wrote, checked: status 2, no traceback, each of `wanted`."""
    assert finished.returncode == 2, finished.stderr
    assert "Traceback" not in finished.stderr
    lines = finished.stderr.splitlines()
    assert len(lines) == 1, finished.stderr
    for text in wanted:
        assert text in lines[0]
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on, for as long as the test runs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def environment(**variables: str) -> dict[str, str]:
    return {**os.environ, **variables}


def test_a_host_that_is_no_address() -> None:
    refused(
        solaris(*SERVE, "--host", "999.1.1.1"), "host", "--host", "an IP address or a host name"
    )


def test_a_log_level_that_is_no_logging_name() -> None:
    refused(solaris("--log-level", "bogus", *SERVE), "log_level", "DEBUG, INFO, WARNING")


def test_a_redis_url_of_another_scheme() -> None:
    line = refused(solaris(*SERVE, "--redis", "http://x"), "redis", "redis://, rediss://")
    assert "http://x" not in line


def test_a_redis_url_with_an_option_redis_py_does_not_take() -> None:
    """Refused at start, not by a traceback at the first connection (a TLS option on a plain
    connection, which would also be printed)."""
    url = "redis://127.0.0.1:1/0?ssl_password=sekret9"
    line = refused(solaris(*SERVE, "--redis", url), "redis", "options")
    assert "sekret9" not in line


def test_the_metrics_port_equal_to_the_port() -> None:
    argv = [*SERVE, "--port", "45123", "--metrics-port", "45123"]
    refused(solaris(*argv), "metrics_port", "must differ from port")


def test_a_port_already_in_use(taken_port: int) -> None:
    line = refused(solaris(*SERVE, "--port", str(taken_port)), "port", str(taken_port))
    assert "in use" in line


def test_a_metrics_port_already_in_use(taken_port: int) -> None:
    argv = [*SERVE, "--port", "0", "--metrics-port", str(taken_port)]
    refused(solaris(*argv), "metrics_port", str(taken_port), "in use")


def test_a_port_out_of_range() -> None:
    refused(solaris(*SERVE, "--port", "70000"), "port", "70000", "0 to 65535")


def test_a_negative_size() -> None:
    refused(solaris(*SERVE, "--cache-bytes", "-5"), "cache_bytes", "at least 1", "256Mi", "Gi")


def test_a_bad_value_in_the_environment() -> None:
    finished = solaris(*SERVE, env=environment(SOLARIS_MAX_ITEMS="many"))
    refused(finished, "max_items", "SOLARIS_MAX_ITEMS", "a whole number")


def test_a_bad_value_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "solaris.toml"
    config.write_text('ttl-seconds = "an hour"\n')
    refused(solaris("--config", str(config), *SERVE), "ttl_seconds", str(config), "a number")


def test_an_unknown_key_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "solaris.toml"
    config.write_text("cache_bites = 1\n")
    finished = solaris(*SERVE, env=environment(SOLARIS_CONFIG=str(config)))
    refused(finished, "unknown setting 'cache_bites'", str(config))


def test_an_unknown_flag() -> None:
    refused(solaris(*SERVE, "--cache-bites", "1"), "unrecognized arguments: --cache-bites")


def test_a_sidecar_flag_given_to_the_daemon() -> None:
    refused(solaris("precompute", "--redis", "redis://h", "--port", "1"), "--port")


def test_the_daemon_without_redis() -> None:
    refused(solaris("precompute"), "redis: must be set")


def test_a_cache_too_small_for_one_entry() -> None:
    line = refused(solaris(*SERVE, "--cache-bytes", "1"), "cache_bytes", "--cache-bytes")
    assert "must hold one entry: at least" in line


def test_a_share_of_the_memory_limit_too_small_for_one_entry() -> None:
    argv = [*SERVE, "--memory-limit", "1000", "--cache-fraction", "0.5"]
    refused(solaris(*argv), "cache_fraction", "memory_limit 1000", "L1 cap of 500 bytes")


def test_messages_larger_than_grpc_takes() -> None:
    line = refused(solaris(*SERVE, "--max-items", "5000000"), "max_items", "--max-items")
    for text in ("max_id_bytes", "max_history", "dim", "less than 2 GiB", "2147483648"):
        assert text in line


@pytest.mark.parametrize(
    ("flag", "value", "accepted"),
    [
        ("--dim", "0", "a whole number of at least 1"),
        ("--dim", "-1", "a whole number of at least 1"),
        ("--seed", "x", "a whole number from 0 to 4294967295"),
        ("--seed", "-1", "a whole number from 0 to 4294967295"),
        ("--seed", str(2**64), "a whole number from 0 to 4294967295"),
    ],
)
def test_export_flags_out_of_range(flag: str, value: str, accepted: str, tmp_path: Path) -> None:
    argv = ["export-model", "--out", str(tmp_path / "m.onnx"), flag, value]
    refused(solaris(*argv), f"argument {flag}", repr(value), accepted)


@pytest.mark.parametrize(
    ("out", "why"),
    [
        ("/etc/passwd/x.onnx", "/etc/passwd is a file, not a folder"),
        ("/proc/x.onnx", "give a path in a folder this user may write"),
        ("{tmp}", "is a folder; give the path of a file"),
    ],
)
def test_an_export_path_that_cannot_be_written(out: str, why: str, tmp_path: Path) -> None:
    out = out.format(tmp=tmp_path)
    refused(solaris("export-model", "--out", out), "out: ", out, why)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["not a checkpoint", "a state_dict of another model"])
def test_a_checkpoint_that_cannot_be_loaded(kind: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pt"
    if kind == "not a checkpoint":
        checkpoint.write_text("root:x:0:0:root:/root:/bin/bash\n")
    else:
        import torch

        torch.save({"weight": torch.zeros(2)}, checkpoint)
    argv = ["export-model", "--out", str(tmp_path / "m.onnx"), "--checkpoint", str(checkpoint)]
    refused(solaris(*argv), "checkpoint: cannot load", str(checkpoint), "state_dict")
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_that_is_not_there(tmp_path: Path) -> None:
    argv = ["export-model", "--out", str(tmp_path / "m.onnx"), "--checkpoint", "/no/such.pt"]
    refused(solaris(*argv), "checkpoint: no file at /no/such.pt")


@pytest.mark.parametrize(
    ("flag", "value", "accepted"),
    [
        ("--users", "0", "a whole number of at least 1"),
        ("--items", "0", "a whole number of at least 1"),
        ("--seed", "-1", "a whole number from 0 to 4294967295"),
        ("--ttl-seconds", "0", "a number above 0"),
        ("--stale-seconds", "-1", "a number of at least 0"),
        ("--stale-seconds", "nan", "a number of at least 0"),
        ("--duration", "0", "a number above 0"),
        ("--decay-seconds", "0", "a number above 0"),
        ("--budgets", "25,inf", "numbers above 0"),
        ("--budgets", "1y", "Nx (N times the traffic's mean pair rate)"),
        ("--budgets", "0x", "numbers above 0"),
        ("--return-min-probability", "2", "a number from 0 to 1"),
        ("--round-pairs", "0", "a whole number of at least 1"),
        ("--jobs", "0", "a whole number of at least 1"),
    ],
)
def test_replay_flags_out_of_range(flag: str, value: str, accepted: str, tmp_path: Path) -> None:
    argv = ["replay", "--plot", str(tmp_path / "plot.png"), flag, value]
    refused(solaris(*argv), f"argument {flag}", repr(value), accepted)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("root:x:0:0:root:/root:/bin/bash\n", "needs a header naming user"),
        ("userId,movieId,timestamp\n1,2,yesterday\n", "line 2: needs a user, an item and"),
        ("userId,movieId,timestamp\n1,2\n", "line 2: needs a user, an item and"),
        ("userId,movieId,timestamp\n", "makes no ranking requests"),
        (None, "cannot read"),
    ],
)
def test_a_log_that_is_no_interaction_log(content: str | None, why: str, tmp_path: Path) -> None:
    log = tmp_path / "ratings.csv"
    if content is not None:
        log.write_text(content)
    argv = ["replay", "--log", str(log), "--plot", str(tmp_path / "plot.png")]
    refused(solaris(*argv), "log: ", str(log), why, "user,item,timestamp")


def test_a_replay_plot_where_no_file_can_be_written(tmp_path: Path) -> None:
    refused(solaris("replay", "--plot", str(tmp_path)), "plot: ", "is a folder")


def test_a_model_dir_where_the_reference_model_cannot_be_written(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.touch()
    argv = ["serve", "--port", "0", "--model-dir", str(not_a_folder / "models")]
    refused(solaris(*argv), "model_dir: ", f"{not_a_folder} is a file, not a folder")


@pytest.mark.parametrize(
    ("flag", "value", "accepted"),
    [
        ("--epochs", "0", "a whole number of at least 1"),
        ("--batch-size", "0", "a whole number of at least 1"),
        ("--learning-rate", "0", "a number above 0"),
        ("--learning-rate", "nan", "a number above 0"),
        ("--negatives", "0", "a whole number of at least 1"),
        ("--held-out-share", "0", "a number above 0"),
        ("--held-out-share", "1", "a number above 0 and below 1"),
        ("--eval-pairs", "0", "a whole number of at least 1"),
        ("--seed", "-1", "a whole number from 0 to 4294967295"),
        ("--dim", "0", "a whole number of at least 1"),
        ("--threads", "0", "a whole number of at least 1"),
    ],
)
def test_train_flags_out_of_range(flag: str, value: str, accepted: str, tmp_path: Path) -> None:
    argv = ["train", "--log", str(tmp_path / "log.csv"), "--out", str(tmp_path / "m.onnx")]
    refused(solaris(*argv, flag, value), f"argument {flag}", repr(value), accepted)


def test_train_without_a_log() -> None:
    refused(solaris("train"), "the following arguments are required: --log")


@pytest.mark.parametrize(
    ("content", "setting", "why"),
    [
        ("root:x:0:0:root:/root:/bin/bash\n", "log: ", "needs a header naming user"),
        ("userId,movieId,timestamp\n1,2,3\n", "held_out_share: ", "1 rows make 0 training"),
        (
            "userId,movieId,timestamp\n1,7,1\n1,7,2\n2,7,3\n2,7,4\n",
            "held_out_share: ",
            "name one item",
        ),
    ],
)
def test_a_log_train_cannot_learn_from(
    content: str, setting: str, why: str, tmp_path: Path
) -> None:
    log = tmp_path / "ratings.csv"
    log.write_text(content)
    argv = ["train", "--log", str(log), "--out", str(tmp_path / "m.onnx")]
    refused(solaris(*argv), setting, str(log), why)
    assert not (tmp_path / "m.onnx").exists()


WITHOUT_MODEL_STACK = """
import sys


class WithoutModelStack:
    '''Imports as where only `pip install ./protos .` was run: no model stack.'''

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "onnx", "onnxruntime", "onnxscript"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, WithoutModelStack())
from solaris.app.cli import main

sys.exit(main())
"""


@pytest.mark.parametrize(
    ("argv", "extra", "also"),
    [
        (["export-model", "--out", "{tmp}/m.onnx"], "model", "model stack"),
        (["replay", "--duration", "1", "--plot", "{tmp}/plot.png"], "replay", "matplotlib"),
        (["train", "--log", "{tmp}/log.csv", "--out", "{tmp}/m.onnx"], "train", "tqdm"),
        (["serve", "--port", "0"], "model", "or serve only with --precompute false"),
    ],
)
def test_a_command_that_needs_the_model_stack_where_it_is_not_installed(
    argv: list[str], extra: str, also: str, tmp_path: Path
) -> None:
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    finished = subprocess.run(
        [sys.executable, "-c", WITHOUT_MODEL_STACK, *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    refused(
        finished,
        "is not installed (",
        also,
        f"pip install 'solaris-embeddings[{extra}]' (from a checkout: pip install './[{extra}]')",
    )


def test_a_cache_larger_than_the_machine() -> None:
    line = refused(solaris(*SERVE, "--cache-bytes", "100000Gi"), "cache_bytes", "--cache-bytes")
    assert "must be below this machine's memory" in line


def test_a_cache_larger_than_the_memory_limit() -> None:
    argv = [*SERVE, "--cache-bytes", "2Gi", "--memory-limit", "1Gi"]
    refused(solaris(*argv), "cache_bytes", "must be below memory_limit (1073741824 bytes)")


def test_a_misspelt_variable_is_refused_by_name() -> None:
    refused(solaris(*SERVE, env=environment(SOLARIS_CACHE_BITES="1")), "SOLARIS_CACHE_BITES")


def test_a_redis_dtype_that_is_no_stored_dtype() -> None:
    refused(solaris(*SERVE, "--redis-dtype", "int8"), "redis_dtype", "float16, float32")


def test_a_pinned_model_version_without_redis() -> None:
    refused(solaris(*SERVE, "--model-version", "v1"), "model_version", "needs --redis")


def test_a_rollout_fraction_out_of_range() -> None:
    refused(solaris(*SERVE, "--rollout-fraction", "0"), "rollout_fraction", "--rollout-fraction")


def test_a_pinned_model_version_other_than_the_daemons(tiny_model: ExportReport) -> None:
    argv = ["serve", "--port", "0", "--redis", "redis://127.0.0.1:1/0", "--dim", str(DIM)]
    argv += ["--model", str(tiny_model.path), "--model-version", "other"]
    finished = solaris(*argv)
    assert finished.returncode == 2, finished.stderr
    assert "Traceback" not in finished.stderr
    line = finished.stderr.splitlines()[-1]  # after the lines of the model's loading
    assert line.startswith("solaris serve: model_version: 'other'")
    assert tiny_model.model_version in line
    assert "--precompute false" in line
