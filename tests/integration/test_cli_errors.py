"""A new user's mistakes on the command line: each ends in one line on stderr,
`sparseserve: error: ...`, naming what was expected, and a non-zero exit code, never a
traceback (unless --debug asks for one). The CLI runs as a real child process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton

from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

pytestmark = pytest.mark.integration


def sparseserve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sparseserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed (its log lines, if any, come before it)."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sparseserve: error: "), result.stderr
    return last


def only_line(result: subprocess.CompletedProcess[str]) -> str:
    """As `error_line`, for a failure that prints nothing else at all."""
    line = error_line(result)
    assert result.stderr.strip() == line, result.stderr
    return line


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else is listening on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def serve_args(repository: Path, *args: str) -> list[str]:
    return ["serve", "--repository", str(repository), "--host", "127.0.0.1", *args]


# -- a path that is not there ---------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--repository", "{missing}", "--grpc-port", "0", "--metrics-port", "0"],
        ["export-triton", "--repository", "{missing}"],
        ["inspect", "{missing}"],
        ["compare", "--family", "f", "--repository", "{missing}"],
    ],
    ids=["serve", "export-triton", "inspect", "compare"],
)
def test_a_missing_repository_is_one_line(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "no-such-models"
    result = sparseserve(*(arg.format(missing=missing) for arg in command))
    line = only_line(result)
    assert str(missing) in line and "does not exist" in line
    assert not missing.exists()  # nothing created it either


def test_an_empty_repository_starts_with_a_warning(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    (tmp_path / "empty").mkdir()
    server = start_server(tmp_path / "empty")
    with triton.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready()
    assert "holds no models" in server.log()


# -- --load-model that is not there ---------------------------------------------------


def test_an_unknown_load_model_stops_the_start(repository: Path) -> None:
    result = sparseserve(
        *serve_args(repository, "--grpc-port", "0", "--metrics-port", "0", "--load-model", "mpl")
    )
    line = error_line(result)
    assert "--load-model mpl: no such model" in line
    assert "mlp" in line  # what the repository does have
    assert "--no-exit-on-error" in line


def test_a_load_model_that_fails_to_load_stops_the_start(repository: Path) -> None:
    result = sparseserve(
        *serve_args(repository, "--grpc-port", "0", "--metrics-port", "0"),
        "--load-model", "mlp", "--load-model", "corrupt",
    )  # fmt: skip
    line = error_line(result)
    assert line.startswith("sparseserve: error: --load-model corrupt: ")


def test_no_exit_on_error_starts_without_the_unknown_model(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(repository, "--load-model", "mlp", "--load-model", "mpl",
                          "--no-exit-on-error")  # fmt: skip
    with triton.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready() and client.is_model_ready("mlp")
    assert "model mpl not loaded" in server.log()


# -- ports and addresses --------------------------------------------------------------


def test_a_taken_grpc_port_is_one_line(repository: Path, taken_port: int) -> None:
    result = sparseserve(
        *serve_args(repository, "--grpc-port", str(taken_port), "--metrics-port", "0")
    )
    line = only_line(result)
    assert f"cannot listen for gRPC on 127.0.0.1:{taken_port}" in line
    assert "--grpc-port" in line


def test_a_taken_metrics_port_is_one_line(repository: Path, taken_port: int) -> None:
    result = sparseserve(
        *serve_args(repository, "--grpc-port", "0", "--metrics-port", str(taken_port))
    )
    line = only_line(result)
    assert f"cannot listen for metrics on 127.0.0.1:{taken_port}" in line
    assert "--no-metrics" in line


def test_compare_with_a_dead_url_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on once this closes
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = sparseserve(
        "compare", "--family", "mlp", "--url", f"127.0.0.1:{port}",
        "--metrics-url", f"http://127.0.0.1:{port}/metrics",
        "--output", str(tmp_path), "--no-progress",
    )  # fmt: skip
    line = only_line(result)
    assert f"no Open Inference Protocol server answers at --url 127.0.0.1:{port}" in line


def test_compare_with_the_grpc_port_as_metrics_url_is_one_line(
    server: ServerProcess, tmp_path: Path
) -> None:
    result = sparseserve(
        "compare", "--family", "mlp", "--url", server.grpc_url,
        "--metrics-url", f"http://{server.grpc_url}/metrics",
        "--output", str(tmp_path), "--no-progress",
    )  # fmt: skip
    line = only_line(result)
    assert "does not answer with Prometheus metrics" in line and "gRPC port" in line
    assert line.isprintable()  # none of the HTTP/2 bytes it got back


# -- output cut short, and the traceback on request -----------------------------------


def test_inspect_into_a_closed_pipe_ends_quietly(repository: Path) -> None:
    """`sparseserve inspect DIR | head -1`: the reader is gone before the report is
    written; the command stops as a Unix tool does, with nothing on stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sparseserve", "inspect", str(repository / "mlp")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the child (still importing) writes anything
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=60) == 141, stderr  # 128 + SIGPIPE, as `yes | head` gives
    assert stderr == ""


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(tmp_path: Path, how: str) -> None:
    args = ["inspect", str(tmp_path / "missing")]
    env = {"SPARSESERVE_DEBUG": "1"} if how == "environment" else None
    result = sparseserve(*args, *(["--debug"] if how == "flag" else []), env=env)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "FileNotFoundError" in result.stderr


def test_a_misspelt_environment_variable_is_warned_of_at_start(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """SPARSESERVE_SHUTDOWN_GRACE (the flag is --shutdown-grace) set no setting: the drain
    stayed at its default without a word."""
    onnx_models.add_constant(tmp_path / "models" / "m" / "1" / "model.onnx", 1)
    server = start_server(tmp_path / "models", env={"SPARSESERVE_SHUTDOWN_GRACE": "30"})
    assert (
        "WARNING sparseserve.server.app: environment variable SPARSESERVE_SHUTDOWN_GRACE sets no "
        "setting and is ignored; did you mean SPARSESERVE_SHUTDOWN_GRACE_SECONDS?"
    ) in server.log()


def test_overrides_naming_no_model_are_warned_of_at_start(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A typo in a model name, or a family where a model is meant, pinned nothing."""
    onnx_models.add_constant(tmp_path / "models" / "fam.dense" / "1" / "model.onnx", 1)
    overrides = '{"fam": "openvino", "fam.dnse": "onnxruntime", "fam.dense": "onnxruntime"}'
    server = start_server(tmp_path / "models", env={"SPARSESERVE_CPU_ENGINE_OVERRIDES": overrides})
    log = server.log()
    assert "cpu_engine_overrides names 'fam', which is no model in the repository" in log
    assert "(a family? name its variants, e.g. fam.dense)" in log
    assert "cpu_engine_overrides names 'fam.dnse', which is no model" in log
    assert "names 'fam.dense'" not in log


def test_serving_a_model_folder_says_to_pass_its_parent(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """`serve --repository` on the folder `sparsify` just printed (a model's): its
    version was taken for a model, and the only hint was to nest the files deeper."""
    onnx_models.add_constant(tmp_path / "models" / "m.dense" / "1" / "model.onnx", 1)
    server = start_server(tmp_path / "models" / "m.dense")
    assert (
        f"it looks like a model's folder, not a model repository "
        f"(<repository>/<model>/<version>/model.onnx); pass --repository {tmp_path / 'models'}"
    ) in server.log()
    version = start_server(tmp_path / "models" / "m.dense" / "1")
    assert "it looks like a version folder" in version.log()
    assert f"pass --repository {tmp_path / 'models'}" in version.log()


def test_invalid_settings_are_one_line_naming_each_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("grpc_prot: 9000\nmax_message_bytes: 10\n")
    result = sparseserve(*serve_args(tmp_path, "--config", str(config)))
    assert result.returncode == 2
    line = only_line(result)
    assert "grpc_prot: Extra inputs are not permitted" in line
    assert "max_message_bytes: Input should be greater than or equal to 1024" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["serve", "--model-control", "pol"], "invalid choice: 'pol' (choose from 'none', "),
        (["serve", "--grpc-port", "abc"], "argument --grpc-port: invalid int value: 'abc'"),
        (["serve", "--grpc_port", "1"], "--grpc_port: did you mean --grpc-port?"),
        (["serve", "--repo", "x"], "--repo: did you mean --repository?"),
        (["inspect"], "the following arguments are required"),
        (["servee"], "invalid choice: 'servee'"),
    ],
)
def test_a_wrong_argument_is_one_line_naming_the_right_one(args: list[str], says: str) -> None:
    """argparse printed its whole usage first (32 lines for `serve`); a misspelt flag of a
    command was reported against the top-level usage, which lists none of its flags; a
    prefix of a flag (`--repo`) was taken for the flag. Exit code 2, as documented."""
    result = sparseserve(*args)
    line = only_line(result)
    assert says in line and "--help)" in line, line
    assert result.returncode == 2
