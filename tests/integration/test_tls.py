"""TLS and mutual TLS on the gRPC port, with Triton's flags, against a real server and
tritonclient: what works, what is refused, certificate rotation without a restart, and
the one-line errors for TLS files the server cannot use. The REST port serves TLS from
the same files, and follows their rotation too."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from sparseserve.client.health_check import SERVING, ClientTls, HealthCheckError, check_health
from sparseserve.client.server_process import ServerProcess
from sparseserve.compare.loadgen import LoadGenerator, LoadSettings
from sparseserve.testing import onnx_models
from tests.tls_certs import TestCA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls-models")
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def tls_args(cert: Path, key: Path, root: Path | None = None) -> list[str]:
    args = ["--grpc-use-ssl", "--grpc-server-cert", str(cert), "--grpc-server-key", str(key)]
    if root is not None:
        args += ["--grpc-use-ssl-mutual", "--grpc-root-cert", str(root)]
    return args


@pytest.fixture(scope="module")
def tls_server(
    small_repository: Path, ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    """A TLS server, and the file of the CA its certificate chains to."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = ca.server().write(directory, "server")
    with ServerProcess(small_repository, *tls_args(cert, key)) as server:
        yield server, ca.write(directory / "ca.crt")
    assert server.returncode == 0, server.log()


@pytest.fixture(scope="module")
def mtls_server(
    small_repository: Path, ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    """A mutual-TLS server whose clients need a certificate from `ca`."""
    directory = tmp_path_factory.mktemp("mtls")
    cert, key = ca.server().write(directory, "server")
    root = ca.write(directory / "ca.crt")
    with ServerProcess(small_repository, *tls_args(cert, key, root)) as server:
        yield server, root
    assert server.returncode == 0, server.log()


def infer_once(client: triton.InferenceServerClient) -> np.ndarray:
    pixels = np.ones((2, 64), dtype=np.float32)
    tensor = triton.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = client.infer("mlp", [tensor], client_timeout=10)
    return result.as_numpy("output")


def test_tls_serves_tritonclient_with_ssl(tls_server: tuple[ServerProcess, Path]) -> None:
    """tritonclient with ssl=True and the CA: inference and metadata work as in plaintext."""
    server, ca_file = tls_server
    with triton.InferenceServerClient(
        server.grpc_url, ssl=True, root_certificates=str(ca_file)
    ) as client:
        assert client.is_server_ready(client_timeout=10)
        assert infer_once(client).shape[0] == 2
    assert "(TLS)" in server.log()


def test_tls_refuses_a_plaintext_client(tls_server: tuple[ServerProcess, Path]) -> None:
    server, _ = tls_server
    with (
        triton.InferenceServerClient(server.grpc_url) as client,
        pytest.raises(InferenceServerException) as refused,
    ):
        client.is_server_live(client_timeout=5)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


def test_tls_refuses_a_client_that_does_not_trust_the_certificate(
    tls_server: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    server, _ = tls_server
    stranger = TestCA("another CA").write(tmp_path / "other-ca.crt")
    with (
        triton.InferenceServerClient(
            server.grpc_url, ssl=True, root_certificates=str(stranger)
        ) as client,
        pytest.raises(InferenceServerException) as refused,
    ):
        client.is_server_live(client_timeout=5)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


def test_health_check_speaks_tls(tls_server: tuple[ServerProcess, Path]) -> None:
    """The check the container's HEALTHCHECK (and the chart's TLS probes) run."""
    server, ca_file = tls_server
    assert check_health(server.grpc_url, tls=ClientTls(root_cert=ca_file)) == SERVING
    # Dialled by another name than the address: the name the certificate carries.
    tls = ClientTls(root_cert=ca_file, server_name="localhost")
    assert check_health(server.grpc_url, "inference.GRPCInferenceService", tls=tls) == SERVING
    with pytest.raises(HealthCheckError, match="UNAVAILABLE"):
        check_health(server.grpc_url)  # plaintext


def test_health_command_derives_tls_from_the_settings(
    tls_server: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    """`sparseserve health --config` of a TLS server connects over TLS by itself."""
    server, ca_file = tls_server
    config = tmp_path / "config.yaml"
    config.write_text(
        f"grpc_port: {server.grpc_port}\n"
        "grpc_tls: {enabled: true, server_cert: "
        f"'{ca_file.parent / 'server.crt'}', server_key: '{ca_file.parent / 'server.key'}'}}\n"
    )
    command = [sys.executable, "-m", "sparseserve", "health", "--config", str(config)]
    run = subprocess.run(
        [*command, "--root-cert", str(ca_file)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "SERVING" in run.stdout


def test_health_command_takes_a_ca_as_asking_for_tls(
    tls_server: tuple[ServerProcess, Path],
) -> None:
    """`--root-cert` alone connects over TLS (as for compare); a plaintext attempt on a
    TLS port says to try TLS instead of only gRPC's "Socket closed"."""
    server, ca_file = tls_server
    command = [sys.executable, "-m", "sparseserve", "health", "--address", server.grpc_url]
    run = subprocess.run(
        [*command, "--root-cert", str(ca_file)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    plain = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1
    assert "(the server may serve TLS on that port: --ssl, with --root-cert CA)" in plain.stderr


def test_mutual_tls_serves_a_client_with_a_certificate(
    mtls_server: tuple[ServerProcess, Path], ca: TestCA, tmp_path: Path
) -> None:
    server, ca_file = mtls_server
    cert, key = ca.client().write(tmp_path, "client")
    with triton.InferenceServerClient(
        server.grpc_url,
        ssl=True,
        root_certificates=str(ca_file),
        private_key=str(key),
        certificate_chain=str(cert),
    ) as client:
        assert infer_once(client).shape[0] == 2
    assert "(mutual TLS)" in server.log()


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    mtls_server: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    server, ca_file = mtls_server
    foreign_cert, foreign_key = TestCA("another CA").client().write(tmp_path, "foreign")
    attempts = {
        "no certificate": {},
        "certificate of another CA": {
            "private_key": str(foreign_key),
            "certificate_chain": str(foreign_cert),
        },
    }
    for what, identity in attempts.items():
        with (
            triton.InferenceServerClient(
                server.grpc_url, ssl=True, root_certificates=str(ca_file), **identity
            ) as client,
            pytest.raises(InferenceServerException) as refused,
        ):
            client.is_server_live(client_timeout=5)
        assert refused.value.status() == "StatusCode.UNAVAILABLE", what


def trusts(url: str, ca_file: Path) -> bool:
    """Whether a new connection that trusts only `ca_file` gets an answer."""
    with triton.InferenceServerClient(url, ssl=True, root_certificates=str(ca_file)) as client:
        try:
            return client.is_server_live(client_timeout=5)
        except InferenceServerException:
            return False


def rest_get(url: str, path: str, ca_file: Path, client: tuple[Path, Path] | None = None) -> int:
    """The status of a GET over HTTPS that trusts only `ca_file` (presenting `client`)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(*client)
    with urllib.request.urlopen(f"https://{url}{path}", context=context, timeout=5) as answer:
        return int(answer.status)


def rest_trusts(url: str, ca_file: Path) -> bool:
    try:
        return rest_get(url, "/v2/health/live", ca_file) == 200
    except (urllib.error.URLError, ssl.SSLError, ConnectionError):
        return False


def test_rest_serves_tls_from_the_same_files(tls_server: tuple[ServerProcess, Path]) -> None:
    """With --grpc-use-ssl the REST port is HTTPS too: a plaintext request is refused."""
    server, ca_file = tls_server
    assert rest_get(server.http_url, "/v2/health/ready", ca_file) == 200
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5)


def test_rest_under_mutual_tls_needs_a_client_certificate(
    mtls_server: tuple[ServerProcess, Path], ca: TestCA, tmp_path: Path
) -> None:
    server, ca_file = mtls_server
    client = ca.client().write(tmp_path, "client")
    assert rest_get(server.http_url, "/v2/models/mlp", ca_file, client) == 200
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        rest_get(server.http_url, "/v2/models/mlp", ca_file)


def eventually(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_rotated_certificate_files_serve_new_connections(
    small_repository: Path, start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """cert-manager rewrites the files: the next handshake uses the new certificate,
    with no restart; a rewrite caught half-way (new key, old certificate) is skipped
    and the old certificate keeps serving until both agree."""
    old_ca, new_ca = TestCA("old CA"), TestCA("new CA")
    old_ca_file, new_ca_file = (
        old_ca.write(tmp_path / "old.crt"),
        new_ca.write(tmp_path / "new.crt"),
    )
    cert, key = old_ca.server().write(tmp_path / "secret", "tls")
    server = start_server(small_repository, *tls_args(cert, key))
    assert trusts(server.grpc_url, old_ca_file)
    assert not trusts(server.grpc_url, new_ca_file)
    with triton.InferenceServerClient(
        server.grpc_url, ssl=True, root_certificates=str(old_ca_file)
    ) as open_before:
        assert open_before.is_server_live(client_timeout=5)

        rotated = new_ca.server()
        key.write_bytes(rotated.key)  # half-way: the key no longer fits the certificate
        assert trusts(server.grpc_url, old_ca_file)
        cert.write_bytes(rotated.cert)
        assert eventually(lambda: trusts(server.grpc_url, new_ca_file))
        assert not trusts(server.grpc_url, old_ca_file)
        assert eventually(lambda: rest_trusts(server.http_url, new_ca_file))
        assert not rest_trusts(server.http_url, old_ca_file)
        # A connection made before the rotation carries on.
        assert open_before.is_server_live(client_timeout=5)
    log = server.log()
    assert "cannot be used yet" in log
    assert "TLS certificate files changed" in log


def serve_exit(repository: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`sparseserve serve` that is expected to refuse to start."""
    command = [sys.executable, "-m", "sparseserve", "serve", "--repository", str(repository)]
    command += ["--host", "127.0.0.1", "--grpc-port", "0", "--no-metrics", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # seven short-lived processes
def test_unusable_tls_files_are_a_one_line_start_error(
    small_repository: Path, ca: TestCA, tmp_path: Path
) -> None:
    cert, key = ca.server().write(tmp_path, "server")
    other_cert, other_key = ca.server().write(tmp_path, "other")
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello\n")
    unreadable = tmp_path / "unreadable.key"
    unreadable.write_bytes(key.read_bytes())
    unreadable.chmod(0)
    cases = {
        "no such file": (tls_args(tmp_path / "missing.crt", key), "missing.crt: no such file"),
        "not PEM": (tls_args(not_pem, key), "notes.txt: not a PEM certificate"),
        "mismatched": (tls_args(cert, other_key), "does not fit --grpc-server-cert"),
        "no key": (
            ["--grpc-use-ssl", "--grpc-server-cert", str(cert)],
            "TLS on the gRPC port needs --grpc-server-key",
        ),
        "mutual without CA": (
            ["--grpc-use-ssl-mutual", *tls_args(cert, key)[1:]],
            "mutual TLS needs --grpc-root-cert",
        ),
        "root not PEM": (tls_args(cert, key, not_pem), "--grpc-root-cert"),
    }
    if os.geteuid() != 0:  # root reads any file
        cases["unreadable"] = (tls_args(cert, unreadable), "unreadable.key: permission denied")
    del other_cert
    for what, (args, expected) in cases.items():
        run = serve_exit(small_repository, *args)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2, (what, run.stderr)
        assert len(lines) == 1, (what, run.stderr)
        assert lines[0].startswith("sparseserve: error: invalid configuration:"), (what, lines)
        assert expected in lines[0], (what, lines)


def test_compare_load_runs_over_mutual_tls(
    mtls_server: tuple[ServerProcess, Path], ca: TestCA, tmp_path: Path
) -> None:
    """`sparseserve compare --url ... --root-cert --client-cert --client-key`'s load."""
    server, ca_file = mtls_server
    cert, key = ca.client().write(tmp_path, "client")
    tls = ClientTls(root_cert=ca_file, client_cert=cert, client_key=key, server_name="localhost")
    settings = LoadSettings(concurrency=2, duration_seconds=0.3, rounds=1, warmup_requests=1)
    loads = asyncio.run(LoadGenerator(server.grpc_url, settings, tls=tls).run(["mlp"]))
    assert loads["mlp"].ok > 0 and not loads["mlp"].errors
