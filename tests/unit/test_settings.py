"""Server settings: defaults < YAML file < SPARSESERVE_* environment < explicit values,
bounds checked, and the command line that reports a bad configuration clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from sparseserve import __version__
from sparseserve.settings import GraphOptimization, ModelControl, Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SPARSESERVE_* variable of the machine running the tests leaks in."""
    for key in list(os.environ):
        if key.startswith("SPARSESERVE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "sparseserve.yaml"
    path.write_text(
        "grpc_port: 9000\n"
        "metrics_port: 9100\n"
        "model_control: poll\n"
        "poll_interval_seconds: 2.5\n"
        "onnxruntime:\n"
        "  intra_op_threads: 3\n"
        "  inter_op_threads: 2\n"
    )
    return path


def test_defaults() -> None:
    settings = Settings.load()
    assert settings.grpc_port == 8001
    assert settings.metrics_port == 8002
    assert settings.model_control is ModelControl.explicit
    assert settings.startup_models == ["*"]
    assert settings.onnxruntime.intra_op_threads == 1
    assert settings.onnxruntime.graph_optimization is GraphOptimization.all


def test_yaml_file_overrides_defaults(config_file: Path) -> None:
    settings = Settings.load(config_file)
    assert settings.grpc_port == 9000
    assert settings.model_control is ModelControl.poll
    assert settings.poll_interval_seconds == 2.5
    assert settings.onnxruntime.intra_op_threads == 3
    assert settings.host == "0.0.0.0"  # not in the file: default


def test_environment_overrides_yaml(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSESERVE_GRPC_PORT", "9001")
    monkeypatch.setenv("SPARSESERVE_MODEL_CONTROL", "none")
    settings = Settings.load(config_file)
    assert settings.grpc_port == 9001
    assert settings.model_control is ModelControl.none
    assert settings.metrics_port == 9100  # only in the file


def test_nested_environment_variable_overrides_one_nested_field(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPARSESERVE_ONNXRUNTIME__INTRA_OP_THREADS changes that field only; the file's
    other onnxruntime settings stay."""
    monkeypatch.setenv("SPARSESERVE_ONNXRUNTIME__INTRA_OP_THREADS", "4")
    settings = Settings.load(config_file)
    assert settings.onnxruntime.intra_op_threads == 4
    assert settings.onnxruntime.inter_op_threads == 2


def test_explicit_overrides_beat_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Command-line flags win; a flag not given (None) does not erase lower sources."""
    monkeypatch.setenv("SPARSESERVE_GRPC_PORT", "9001")
    monkeypatch.setenv("SPARSESERVE_METRICS_PORT", "9101")
    settings = Settings.load(config_file, grpc_port=9002, metrics_port=None)
    assert settings.grpc_port == 9002
    assert settings.metrics_port == 9101


def test_environment_alone_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSESERVE_STARTUP_MODELS", '["mlp", "multi_io"]')
    monkeypatch.setenv("SPARSESERVE_SHUTDOWN_GRACE_SECONDS", "0.5")
    settings = Settings.load()
    assert settings.startup_models == ["mlp", "multi_io"]
    assert settings.shutdown_grace_seconds == 0.5


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("grpc_prot: 9000\n", "grpc_prot"),
        ("onnxruntime:\n  intra_threads: 2\n", "intra_threads"),
    ],
    ids=["top-level", "nested"],
)
def test_unknown_yaml_key_is_rejected(tmp_path: Path, yaml_text: str, field: str) -> None:
    """A misspelt key is an error, not silently ignored."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValidationError, match=field):
        Settings.load(path)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"grpc_port": -1}, "grpc_port"),
        ({"grpc_port": 65536}, "grpc_port"),
        ({"metrics_port": -5}, "metrics_port"),
        ({"max_message_bytes": 100}, "max_message_bytes"),
        ({"max_message_bytes": 2**31}, "max_message_bytes"),
        ({"poll_interval_seconds": 0}, "poll_interval_seconds"),
        ({"max_inflight_per_model": 0}, "max_inflight_per_model"),
        ({"shutdown_grace_seconds": -1}, "shutdown_grace_seconds"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"model_control": "sometimes"}, "model_control"),
    ],
)
def test_out_of_bounds_values_are_rejected(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings.load(**overrides)


def test_out_of_bounds_value_from_environment_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPARSESERVE_ONNXRUNTIME__INTRA_OP_THREADS", "-2")
    with pytest.raises(ValidationError, match="intra_op_threads"):
        Settings.load()


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.yaml"):
        Settings.load(tmp_path / "nowhere.yaml")


# -- the command line -----------------------------------------------------------------


def sparseserve(*args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """Run the real command in a fresh interpreter (without SPARSESERVE_* variables);
    fail the test if it is still running after `timeout` (it accepted its arguments and
    went on serving)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSESERVE_")}
    try:
        return subprocess.run(
            [sys.executable, "-m", "sparseserve", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        pytest.fail(f"`sparseserve {' '.join(args)}` still running after {timeout}s:\n{output}")


def serve_args(tmp_path: Path, *args: str) -> list[str]:
    """`serve` on free ports of an empty repository (a wrongly accepted configuration
    starts a server, which `sparseserve` stops after its timeout)."""
    (tmp_path / "repo").mkdir(exist_ok=True)
    return ["serve", "--repository", str(tmp_path / "repo"), "--host", "127.0.0.1",
            "--grpc-port", "0", "--metrics-port", "0", *args]  # fmt: skip


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("grpc_prot: 9000\n", "grpc_prot"),
        ("max_message_bytes: 10\n", "max_message_bytes"),
        ("grpc_port: [1, 2\n", "bad.yaml"),  # not YAML at all
        ("- grpc_port\n- 9000\n", "bad.yaml"),  # YAML, but not a mapping
    ],
    ids=["unknown-key", "out-of-bounds", "yaml-syntax", "not-a-mapping"],
)
def test_cli_bad_config_file_exits_2_with_a_clear_message(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    """A configuration mistake is exit status 2 and one message naming the problem,
    not a Python traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    result = sparseserve(*serve_args(tmp_path, "--config", str(path)))
    assert result.returncode == 2, result.stderr
    assert "invalid configuration" in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = sparseserve(*serve_args(tmp_path, "--config", str(tmp_path / "nowhere.yaml")))
    assert result.returncode == 2, result.stderr
    assert "nowhere.yaml does not exist" in result.stderr


@pytest.mark.parametrize(
    "flags",
    [["--grpc-port", "-5"], ["--intra-op-threads", "-1"], ["--max-message-bytes", "10"]],
    ids=["grpc-port", "intra-op-threads", "max-message-bytes"],
)
def test_cli_out_of_bounds_flag_exits_2(tmp_path: Path, flags: list[str]) -> None:
    """Flags go through the same bounds as the file and the environment."""
    result = sparseserve(*serve_args(tmp_path, *flags), timeout=5)
    assert result.returncode == 2, result.stderr
    assert "invalid configuration" in result.stderr
    assert flags[0].removeprefix("--").replace("-", "_") in result.stderr


def test_cli_version() -> None:
    result = sparseserve("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"sparseserve {__version__}"


def test_misspelt_environment_variables_are_named_with_what_was_meant() -> None:
    """A config file refuses an unknown key; the environment may hold anything, so an
    unknown SPARSESERVE_ name gets a warning with the closest setting instead of being
    ignored without a word. Settings, section keys, mapping keys and the variables that
    are not settings (the CLI's, the compose file's, Kubernetes' service links) pass."""
    from sparseserve.settings import unknown_environment

    links = {"SPARSESERVE_PORT": "tcp://10.0.0.7:8001", "SPARSESERVE_TRITON_PORT": "tcp://x:1"}
    fine = links | {
        name: "1"
        for name in (
            "SPARSESERVE_GRPC_PORT", "sparseserve_http_port", "SPARSESERVE_BATCHING__ENABLED",
            "SPARSESERVE_CPU_ENGINE_OVERRIDES__minilm.bf16", "SPARSESERVE_DEBUG",
            "SPARSESERVE_IMAGE", "SPARSESERVE_REQUIRE_PROMETHEUS",
            "SPARSESERVE_SERVICE_HOST", "SPARSESERVE_SERVICE_PORT_GRPC",
            "SPARSESERVE_PORT_8001_TCP_ADDR", "HOME",
            # Kubernetes' service links of the chart's sparseserve-triton Service, and of
            # another release's sparseserve-sparse.
            "SPARSESERVE_TRITON_SERVICE_HOST", "SPARSESERVE_TRITON_SERVICE_PORT_GRPC",
            "SPARSESERVE_TRITON_PORT_8001_TCP_PROTO",
            "SPARSESERVE_SPARSE_SERVICE_PORT",
        )
    }  # fmt: skip
    assert unknown_environment(fine) == []
    wrong = {
        "SPARSESERVE_SHUTDOWN_GRACE": "30",
        "SPARSESERVE_BATCHING__ENABLD": "1",
        "SPARSESERVE_METRIC_PORT": "9000",  # not a service link: no tcp:// value
        "SPARSESERVE_TRITON__SERVICE_HOST": "x",  # a section's key: no service link
    }
    assert unknown_environment({**fine, **wrong}) == [
        "environment variable SPARSESERVE_BATCHING__ENABLD sets no setting and is ignored; "
        "did you mean SPARSESERVE_BATCHING__ENABLED?",
        "environment variable SPARSESERVE_METRIC_PORT sets no setting and is ignored; "
        "did you mean SPARSESERVE_METRICS_PORT?",
        "environment variable SPARSESERVE_SHUTDOWN_GRACE sets no setting and is ignored; "
        "did you mean SPARSESERVE_SHUTDOWN_GRACE_SECONDS?",
        "environment variable SPARSESERVE_TRITON__SERVICE_HOST sets no setting and is "
        "ignored; did you mean SPARSESERVE_TRITON__SSL?",
    ]
