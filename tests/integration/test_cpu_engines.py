"""The two CPU engines side by side: onnxruntime and OpenVINO, picked by config.pbtxt,
by setting or by measurement, each serving a variant only in the precision it declares.

Every test runs on any x86 CPU: where the CPU computes bf16 (AMX-BF16, AVX512-BF16) a
bf16 variant must load and say bf16; where it does not (AVX2 machines) the same test
checks that the load is refused and the message names the missing capability.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from prometheus_client.samples import Sample
from tritonclient.utils import InferenceServerException

from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models
from tests.scrape import scrape, value, values

pytestmark = pytest.mark.integration

MANIFEST = "family: {family}\nvariant: {variant}\n"


def series(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    """The samples called `name` whose labels include `labels`."""
    return [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def cpu_has_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def config(backend: str = "", platform: str = "", **parameters: str) -> str:
    """config.pbtxt text: a backend and/or platform line and string parameters."""
    lines = [f'backend: "{backend}"'] if backend else []
    lines += [f'platform: "{platform}"'] if platform else []
    lines += [
        f'parameters: {{ key: "{key}" value: {{ string_value: "{text}" }} }}'
        for key, text in parameters.items()
    ]
    return "\n".join(lines) + "\n"


def add_model(
    root: Path, name: str, config_text: str | None = None, manifest: str | None = None
) -> Path:
    """The test MLP (64 -> 256 -> 256 -> 10) as model `name`."""
    path = onnx_models.mlp(root / name / "1" / "model.onnx")
    if config_text is not None:
        (root / name / "config.pbtxt").write_text(config_text)
    if manifest is not None:
        (root / name / "sparseserve.yaml").write_text(manifest)
    return path


def rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 64)).astype(np.float32)


def infer(client: triton.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor]).as_numpy("output")
    assert result is not None
    return result


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime in this process, as the answer every engine must give at fp32."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["output"], {"input": x})[0])


def parameters(client: triton.InferenceServerClient, model: str) -> dict[str, str]:
    config = client.get_model_config(model).config
    return {key: p.string_value for key, p in config.parameters.items()}


def reason(client: triton.InferenceServerClient, model: str) -> str:
    (found,) = [m.reason for m in client.get_model_repository_index().models if m.name == model]
    return str(found)


@pytest.fixture(scope="module")
def engines_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engines")
    add_model(root, "by_onnxruntime", config(backend="onnxruntime"))
    add_model(root, "by_openvino", config(backend="openvino"))
    add_model(root, "by_platform", config(platform="openvino"))
    add_model(root, "plain")
    add_model(root, "unknown_backend", config(backend="tensorflow"))
    add_model(root, "unknown_platform", config(platform="tensorrt_plan"))
    add_model(root, "bad_streams", config(backend="openvino", NUM_STREAMS="many"))
    add_model(
        root,
        "sparse_rate",
        config(backend="openvino", CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE="0.5"),
    )
    # bf16 declared three ways: the manifest (pinned to onnxruntime by the server's
    # default engine, or by config), Triton's OpenVINO parameter.
    add_model(root, "bf16_manifest", manifest=MANIFEST.format(family="m", variant="bf16") +
              "precision: bf16\n")  # fmt: skip
    add_model(root, "bf16_hint", config(backend="openvino", HINT_BF16="YES"))
    add_model(
        root,
        "bf16_on_onnxruntime",
        config(backend="onnxruntime"),
        MANIFEST.format(family="n", variant="bf16") + "precision: bf16\n",
    )
    # Triton's OpenVINO-backend layout: the IR pair, no model.onnx.
    import openvino

    ir = root / "ir" / "1"
    ir.mkdir(parents=True)
    # compress_to_fp16 (save_model's default) would store fp16 weights: another variant.
    openvino.save_model(
        openvino.convert_model(str(root / "plain" / "1" / "model.onnx")),
        str(ir / "model.xml"),
        compress_to_fp16=False,
    )
    (root / "ir" / "config.pbtxt").write_text(config(backend="openvino"))
    return root


@pytest.fixture(scope="module")
def engines_server(engines_root: Path) -> Iterator[ServerProcess]:
    with ServerProcess(engines_root) as process:
        yield process
    assert process.returncode == 0, process.log()


@pytest.fixture
def engines(engines_server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(engines_server.grpc_url) as client:
        yield client


@pytest.mark.parametrize(
    ("model", "engine", "platform"),
    [
        ("by_onnxruntime", "onnxruntime", "onnxruntime_onnx"),
        ("by_openvino", "openvino", "openvino"),
        ("by_platform", "openvino", "openvino"),
        ("plain", "onnxruntime", "onnxruntime_onnx"),
        ("ir", "openvino", "openvino"),
    ],
)
def test_config_pbtxt_picks_the_engine_and_every_engine_answers_the_same_at_fp32(
    engines_root: Path,
    engines_server: ServerProcess,
    engines: triton.InferenceServerClient,
    model: str,
    engine: str,
    platform: str,
) -> None:
    """`backend: "openvino"` (or `platform: "openvino"`, or a model.xml) is served by
    OpenVINO, not silently by onnxruntime; ModelMetadata, ModelConfig and the metrics say
    which engine serves, in fp32, with answers within 1e-5 of onnxruntime's."""
    x = rows(5, seed=len(model))
    expected = reference(engines_root / "plain" / "1" / "model.onnx", x)
    np.testing.assert_allclose(infer(engines, model, x), expected, rtol=1e-5, atol=1e-6)
    assert engines.get_model_metadata(model).platform == platform
    config = engines.get_model_config(model).config
    assert (config.backend, config.platform) == (engine, platform)
    assert parameters(engines, model)["precision"] == "fp32"
    samples = scrape(engines_server)
    info = series(samples, "sparseserve_model_info", model=model)
    assert [(s.labels["backend"], s.labels["precision"]) for s in info] == [(engine, "fp32")]


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("unknown_backend", ["'tensorflow'", "onnxruntime, openvino"]),
        ("unknown_platform", ["'tensorrt_plan'", "onnxruntime_onnx, openvino"]),
        ("bad_streams", ["NUM_STREAMS", "'many'", "positive integer"]),
    ],
)
def test_a_config_no_engine_can_honour_is_a_load_error_that_says_why(
    engines: triton.InferenceServerClient, model: str, words: list[str]
) -> None:
    """Never served by some other engine than the one asked for: UNAVAILABLE, and the
    reason names what was asked and what is known."""
    why = reason(engines, model)
    assert all(word in why for word in words), why
    with pytest.raises(InferenceServerException) as info:
        infer(engines, model, rows(1))
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert why in (info.value.message() or "")
    np.testing.assert_equal(infer(engines, "plain", rows(1)).shape, (1, 10))


@pytest.mark.parametrize("model", ["bf16_manifest", "bf16_hint"])
def test_a_bf16_variant_is_served_in_bf16_or_not_at_all(
    engines_server: ServerProcess, engines: triton.InferenceServerClient, model: str
) -> None:
    """A bf16 variant (manifest `precision: bf16`, or Triton's HINT_BF16) goes to
    OpenVINO in bf16 where the CPU computes it, and is refused where it does not, naming
    the capability: OpenVINO would otherwise compile it in f32 without a word."""
    if cpu_has_bf16():
        assert parameters(engines, model)["precision"] == "bf16"
        assert engines.get_model_config(model).config.backend == "openvino"
        x = rows(3)
        bf16 = infer(engines, model, x)
        fp32 = infer(engines, "plain", x)
        assert not np.array_equal(bf16, fp32)  # bf16 changes the numbers ...
        np.testing.assert_allclose(bf16, fp32, rtol=0.1, atol=0.05)  # ... a little
    else:
        why = reason(engines, model)
        assert "bf16" in why and "BF16" in why and "OPTIMIZATION_CAPABILITIES" in why, why
        with pytest.raises(InferenceServerException) as info:
            infer(engines, model, rows(1))
        assert info.value.status() == "StatusCode.UNAVAILABLE"


def test_onnxruntime_refuses_a_bf16_variant(engines: triton.InferenceServerClient) -> None:
    why = reason(engines, "bf16_on_onnxruntime")
    assert "bf16 variant" in why and "onnxruntime computes only fp32" in why, why
    assert "openvino" in why


def test_a_bf16_load_is_refused_with_failed_precondition_where_the_cpu_has_no_bf16(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """RepositoryModelLoad answers FAILED_PRECONDITION (the CPU, not the request, is what
    is missing), and the server goes on serving the others."""
    if cpu_has_bf16():
        pytest.skip("this CPU computes bf16: the refusal cannot happen here")
    add_model(tmp_path, "plain")
    add_model(tmp_path, "bf16", config(backend="openvino", HINT_BF16="YES"))
    server = start_server(tmp_path, "--model-control", "explicit", "--load-model", "plain")
    with triton.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.load_model("bf16")
        assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "BF16" in (info.value.message() or "")
        assert infer(client, "plain", rows(1)).shape == (1, 10)


def test_sparse_kernel_layers_are_read_from_the_compiled_model(
    engines_server: ServerProcess, engines: triton.InferenceServerClient
) -> None:
    """CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE reaches OpenVINO (the model loads with it)
    and the layers on its sparse kernel are counted: 0 for this fp32 model on any CPU
    (the kernel is int8 and AMX only), and 0 for onnxruntime."""
    assert parameters(engines, "sparse_rate")["sparse_kernel_layers"] == "0"
    assert parameters(engines, "plain")["sparse_kernel_layers"] == "0"
    samples = scrape(engines_server)
    for model, backend in (("sparse_rate", "openvino"), ("plain", "onnxruntime")):
        assert (
            value(samples, "sparseserve_model_sparse_kernel_layers", model=model, backend=backend)
            == 0
        )


def test_concurrent_requests_on_openvino_each_get_their_own_answer(
    engines_root: Path, engines: triton.InferenceServerClient, engines_server: ServerProcess
) -> None:
    """Executions run side by side on infer requests of their own: 64 requests from 8
    threads, each with its own rows, each answered with exactly its rows' outputs."""
    path = engines_root / "plain" / "1" / "model.onnx"

    def one(seed: int) -> None:
        x = rows(1 + seed % 4, seed)
        with triton.InferenceServerClient(engines_server.grpc_url) as client:
            got = infer(client, "by_openvino", x)
        np.testing.assert_allclose(got, reference(path, x), rtol=1e-5, atol=1e-6)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(64)))


@pytest.fixture(scope="module")
def pinned_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pinned")
    add_model(root, "mlp")
    add_model(root, "mlp_pinned", config(backend="onnxruntime"))
    return root


def test_auto_measures_both_engines_and_keeps_onnxruntime_within_the_margin(
    pinned_root: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """cpu_engine auto times the warm-up on both engines and exports both figures. On
    this small MLP OpenVINO's fixed cost per call (~60 us) makes it the slower one on
    any CPU, so onnxruntime serves; config.pbtxt's `backend:` pins without measuring."""
    server = start_server(pinned_root, "--cpu-engine", "auto")
    samples = scrape(server)
    latency = {
        s.labels["engine"]: s.value
        for s in series(samples, "sparseserve_engine_candidate_latency_seconds", model="mlp")
    }
    assert set(latency) == {"onnxruntime", "openvino"}
    assert all(0 < seconds < 1 for seconds in latency.values())
    (info,) = series(samples, "sparseserve_model_info", model="mlp")
    assert info.labels["backend"] == "onnxruntime"
    assert not values(samples, "sparseserve_engine_candidate_latency_seconds", model="mlp_pinned")
    with triton.InferenceServerClient(server.grpc_url) as client:
        params = parameters(client, "mlp")
        assert float(params["engine_latency_seconds.openvino"]) == pytest.approx(
            latency["openvino"], rel=1e-4
        )
    assert "serving with onnxruntime" in server.log()


def test_auto_times_a_batched_model_at_its_batch_too(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A model with dynamic batching is timed at one row and at the 32 rows its batcher
    aims for, and the choice (logged with both figures) is made on both; a model without
    batching at one row only. The exported candidate latencies stay the one-row medians."""
    add_model(tmp_path, "batched", "max_batch_size: 32\ndynamic_batching { }\n")
    add_model(tmp_path, "single")
    server = start_server(tmp_path, "--cpu-engine", "auto")
    log = server.log()
    (batched,) = [line for line in log.splitlines() if "model batched version 1: median" in line]
    assert "1 row(s) onnxruntime" in batched and "; 32 row(s) onnxruntime" in batched, batched
    assert "serving with" in batched
    (single,) = [line for line in log.splitlines() if "model single version 1: median" in line]
    assert "1 row(s)" in single and "32 row(s)" not in single, single
    samples = scrape(server)
    engines = {
        s.labels["engine"]
        for s in series(samples, "sparseserve_engine_candidate_latency_seconds", model="batched")
    }
    assert engines == {"onnxruntime", "openvino"}
    with triton.InferenceServerClient(server.grpc_url) as client:
        x = rows(4)
        np.testing.assert_allclose(infer(client, "batched", x), infer(client, "single", x),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.slow  # two servers
def test_engine_pinning_and_the_measurement_switch(
    pinned_root: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """cpu_engine_overrides pins an engine per model (over config.pbtxt too); with
    measure_engines off, auto measures nothing and serves with onnxruntime."""
    env = {"SPARSESERVE_CPU_ENGINE_OVERRIDES": '{"mlp": "openvino", "mlp_pinned": "openvino"}'}
    server = start_server(pinned_root, env=env)
    samples = scrape(server)
    for model in ("mlp", "mlp_pinned"):
        (info,) = series(samples, "sparseserve_model_info", model=model)
        assert info.labels["backend"] == "openvino"
    unmeasured = start_server(pinned_root, "--cpu-engine", "auto", "--no-measure-engines")
    samples = scrape(unmeasured)
    assert not values(samples, "sparseserve_engine_candidate_latency_seconds")
    (info,) = series(samples, "sparseserve_model_info", model="mlp")
    assert info.labels["backend"] == "onnxruntime"


def test_unload_and_reload_on_openvino(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Explicit unload releases the model (NOT ready, requests refused) and a load
    compiles it again, still on OpenVINO."""
    add_model(tmp_path, "mlp", config(backend="openvino"))
    server = start_server(tmp_path, "--model-control", "explicit")
    with triton.InferenceServerClient(server.grpc_url) as client:
        x = rows(2)
        before = infer(client, "mlp", x)
        client.unload_model("mlp")
        assert not client.is_model_ready("mlp")
        with pytest.raises(InferenceServerException):
            infer(client, "mlp", x)
        client.load_model("mlp")
        np.testing.assert_array_equal(infer(client, "mlp", x), before)
        assert client.get_model_config("mlp").config.backend == "openvino"


def test_openvino_batches_concurrent_requests_and_measures_its_memory(
    pinned_root: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Dynamic batching works the same on OpenVINO (its signature has the dynamic
    leading dimension): 48 concurrent requests run in fewer executions, each answered
    with its own rows; the memory the load cost is measured."""
    env = {"SPARSESERVE_BATCHING__ENABLED": "true", "SPARSESERVE_ONNXRUNTIME__INLINE_MAX_US": "0"}
    server = start_server(pinned_root, "--cpu-engine", "openvino", env=env)
    path = pinned_root / "mlp" / "1" / "model.onnx"
    arrays = [rows(1 + i % 3, seed=i) for i in range(48)]

    async def gather() -> list[object]:
        async with triton_aio.InferenceServerClient(server.grpc_url) as client:
            requests = []
            for x in arrays:
                tensor = triton_aio.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                requests.append(client.infer("mlp", [tensor]))
            return await asyncio.gather(*requests, return_exceptions=True)

    results = asyncio.run(gather())
    for x, result in zip(arrays, results, strict=True):
        assert not isinstance(result, BaseException), result
        got = result.as_numpy("output")  # type: ignore[attr-defined]
        np.testing.assert_allclose(got, reference(path, x), rtol=1e-5, atol=1e-6)
    with triton.InferenceServerClient(server.grpc_url) as client:
        (stats,) = client.get_inference_statistics("mlp").model_stats
    assert stats.inference_count == sum(len(x) for x in arrays)
    assert 1 <= stats.execution_count < len(arrays)
    samples = scrape(server)
    assert value(samples, "sparseserve_model_memory_bytes", model="mlp", backend="openvino") > 0
