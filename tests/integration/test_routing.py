"""Families, the traffic policy and shadow traffic, on a real server called with
tritonclient (v2) and with a gRPC client of sparseserve.v1.

One server serves the module; each test writes the policy it needs into the policy file
and waits until GetTrafficPolicy reports it applied (the hot reload itself is tested
below). Counters are compared before and after, since the server is shared.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from tritonclient.utils import InferenceServerException

from sparseserve.api import service_pb2 as v1
from sparseserve.api import service_pb2_grpc as v1_grpc
from sparseserve.client.server_process import ServerProcess
from sparseserve.routing.traffic import TrafficPolicy
from tests import routing_repository
from tests.routing_repository import FAMILY, pixels
from tests.scrape import scrape, value

pytestmark = pytest.mark.integration

SHADOW_QUEUE = 2


class Served:
    """The server, its policy file and clients of both APIs."""

    def __init__(self, server: ServerProcess, policy_file: Path):
        self.server = server
        self.policy_file = policy_file
        self.v2 = triton.InferenceServerClient(server.grpc_url)
        self._channel = grpc.insecure_channel(server.grpc_url)
        self.v1 = v1_grpc.SparseServeStub(self._channel)

    def close(self) -> None:
        self.v2.close()
        self._channel.close()

    def write_policy(self, text: str) -> None:
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.policy_file)  # atomically, as a ConfigMap update does

    def apply_policy(self, text: str) -> None:
        """Write a valid policy and wait until the server has it in force."""
        expected = TrafficPolicy.model_validate(yaml.safe_load(text) or {}).to_yaml()
        self.write_policy(text)
        wait_for(
            lambda: self.policy().policy_yaml == expected and not self.policy().error,
            "the policy to be applied",
        )

    def policy(self, family: str = "") -> v1.GetTrafficPolicyResponse:
        return self.v1.GetTrafficPolicy(v1.GetTrafficPolicyRequest(family=family), timeout=10)

    def infer(self, name: str, data: np.ndarray, version: str = "") -> tuple[str, np.ndarray]:
        """(model_name of the answer, its output) of a v2 ModelInfer."""
        tensor = triton.InferInput("input", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        result = self.v2.infer(name, [tensor], model_version=version, client_timeout=30)
        return result.get_response().model_name, result.as_numpy("output")

    def predict(self, name: str, data: np.ndarray, **fields: object) -> v1.PredictResponse:
        request = v1.PredictRequest(name=name, **fields)  # type: ignore[arg-type]
        request.inputs["input"].CopyFrom(
            v1.Tensor(datatype="FP32", shape=data.shape, data=data.tobytes())
        )
        return self.v1.Predict(request, timeout=30)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def shadow_runs(served: Served, variant: str, outcome: str) -> float:
    return value(
        scrape(served.server),
        "sparseserve_shadow_runs_total",
        family=FAMILY,
        variant=variant,
        baseline="dense",
        outcome=outcome,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = routing_repository.build(tmp_path_factory.mktemp("routing-repository"))
    policy_file = tmp_path_factory.mktemp("policy") / "traffic.yaml"
    policy_file.write_text("families: {}\n")
    env = {
        "SPARSESERVE_TRAFFIC__RELOAD_INTERVAL_SECONDS": "0.05",
        "SPARSESERVE_TRAFFIC__SHADOW_QUEUE_SIZE": str(SHADOW_QUEUE),
    }
    with ServerProcess(root, "--traffic-policy", str(policy_file), env=env) as server:
        result = Served(server, policy_file)
        try:
            yield result
        finally:
            result.close()
    assert server.returncode == 0, server.log()


# -- routing ------------------------------------------------------------------------------


def test_a_family_without_policy_goes_to_its_baseline(served: Served) -> None:
    served.apply_policy("families: {}")
    data = pixels(4)
    name, output = served.infer(FAMILY, data)
    assert name == "fam.dense"
    np.testing.assert_array_equal(output, served.infer("fam.dense", data)[1])
    # A model without a manifest is its own family: its name works either way.
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
    assert served.v2.infer("solo", [tensor]).get_response().model_name == "solo"


def test_a_variant_name_is_served_by_that_variant_whatever_the_policy(served: Served) -> None:
    served.apply_policy("families: {fam: {default: pruned50}}")
    assert served.infer(FAMILY, pixels(2))[0] == "fam.pruned50"
    assert served.infer("fam.dense", pixels(2))[0] == "fam.dense"


def test_version_applies_to_the_chosen_variant(served: Served) -> None:
    served.apply_policy("families: {fam: {default: dense}}")
    assert served.infer(FAMILY, pixels(1), version="1")[0] == "fam.dense"
    with pytest.raises(InferenceServerException) as info:
        served.infer(FAMILY, pixels(1), version="7")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "fam.dense" in info.value.message() and "no version '7'" in info.value.message()


def test_split_proportions_are_binomially_bounded(served: Served) -> None:
    """600 family requests split 0.7 / 0.3: each count within 6 sigma of its mean."""
    served.apply_policy("families: {fam: {split: {dense: 7, pruned50: 3}}}")
    requests, share = 600, 0.7
    data = pixels(1)
    with ThreadPoolExecutor(4) as pool:
        names = Counter(pool.map(lambda _: served.infer(FAMILY, data)[0], range(requests)))
    assert set(names) == {"fam.dense", "fam.pruned50"}
    sigma = math.sqrt(requests * share * (1 - share))
    assert abs(names["fam.dense"] - requests * share) <= 6 * sigma, names


def test_v2_metadata_ready_and_statistics_accept_a_family(served: Served) -> None:
    served.apply_policy("families: {fam: {split: {dense: 1, pruned50: 3}}}")
    metadata = served.v2.get_model_metadata(FAMILY)
    assert metadata.name == "fam.pruned50"  # the heaviest variant of the split
    assert [i.name for i in metadata.inputs] == ["input"]
    assert served.v2.is_model_ready(FAMILY)
    assert not served.v2.is_model_ready("no-such-family")
    assert served.v2.get_model_config(FAMILY).config.name == "fam.pruned50"
    stats = served.v2.get_inference_statistics(FAMILY).model_stats
    assert {s.name for s in stats} == {"fam.dense", "fam.pruned50", "fam.broken", "fam.heavy"}


def test_unknown_name_is_not_found_naming_the_families(served: Served) -> None:
    with pytest.raises(InferenceServerException) as info:
        served.infer("no-such-thing", pixels(1))
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'no-such-thing'" in info.value.message()
    assert "fam" in info.value.message() and "solo" in info.value.message()


def test_a_default_variant_that_is_not_loaded_is_unavailable(served: Served) -> None:
    served.apply_policy("families: {fam: {default: pruned99}}")
    with pytest.raises(InferenceServerException) as info:
        served.infer(FAMILY, pixels(1))
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "'pruned99' is not loaded" in info.value.message()
    assert "dense" in info.value.message()  # what is loaded
    route = served.policy(FAMILY).families[0]
    assert route.problems == ["variant 'pruned99' in default is not loaded"]
    assert served.infer("fam.dense", pixels(1))[0] == "fam.dense"  # still serving
    # Applied with a warning in the log, not only an INFO "applied".
    assert "traffic policy, family fam: variant 'pruned99' in default is not loaded" in (
        served.server.log()
    )


def test_a_policy_naming_a_model_for_a_variant_or_an_unknown_family_says_so(
    served: Served,
) -> None:
    """The usual slip: the model's name (fam.pruned50) where the variant's (pruned50)
    goes; and a family no loaded model belongs to."""
    served.apply_policy("families: {fam: {default: fam.pruned50}, famm: {default: dense}}")
    with pytest.raises(InferenceServerException) as info:  # the client is told too
        served.infer(FAMILY, pixels(1))
    assert "(the traffic policy names models; it takes variant names, without 'fam.')" in (
        info.value.message()
    )
    (route,) = served.policy(FAMILY).families
    assert route.problems == [
        "variant 'fam.pruned50' in default is not loaded (a policy names variants: 'pruned50')"
    ]
    (other,) = served.policy("famm").families
    assert other.problems[0] == "no model of family 'famm' is loaded"
    log = served.server.log()
    assert "traffic policy, family famm: no model of family 'famm' is loaded" in log
    assert "(a policy names variants: 'pruned50')" in log
    served.apply_policy("families: {}")


# -- hot reload ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("families: {fam: {default: dense, split: {dense: 1}}}", "not both"),
        ("families: {fam: {defualt: dense}}", "defualt"),
        ("families: {fam: {shadow: {variants: [dense], fraction: 1.5}}}", "fraction"),
        ("families: [unclosed", "cannot read"),
        ("- a list", "mapping"),
    ],
    ids=["default-and-split", "unknown-key", "fraction-above-1", "not-yaml", "not-a-mapping"],
)
def test_a_bad_policy_file_keeps_the_previous_policy(served: Served, bad: str, says: str) -> None:
    served.apply_policy("families: {fam: {default: pruned50}}")
    served.write_policy(bad)
    wait_for(lambda: served.policy().error != "", "the bad file to be reported")
    state = served.policy()
    assert str(served.policy_file) in state.error and says in state.error
    assert "default: pruned50" in state.policy_yaml
    assert served.infer(FAMILY, pixels(1))[0] == "fam.pruned50"
    served.apply_policy("families: {fam: {default: dense}}")  # fixed: applied again
    assert served.infer(FAMILY, pixels(1))[0] == "fam.dense"


# -- shadow -------------------------------------------------------------------------------


def test_shadow_compares_without_changing_the_answer(served: Served) -> None:
    served.apply_policy(
        "families: {fam: {default: dense, shadow: {variants: [pruned50], fraction: 1}}}"
    )
    before = scrape(served.server)
    labels = {"family": FAMILY, "variant": "pruned50", "baseline": "dense"}

    def count(samples: list, name: str, **extra: str) -> float:
        return value(samples, name, **labels, **extra)

    rows, requests = 8, 5
    for seed in range(requests):
        data = pixels(rows, seed)
        name, output = served.infer(FAMILY, data)
        assert name == "fam.dense"
        reference = served.v2.infer("fam.dense", [_tensor(data)], client_timeout=30).as_numpy(
            "output"
        )
        np.testing.assert_array_equal(output, reference)
    # A variant called by name is shadowed too (here the baseline itself, by Predict).
    answer = served.predict("fam.dense", pixels(rows, 99))
    assert answer.model == "fam.dense"
    compared = count(before, "sparseserve_shadow_runs_total", outcome="compared")
    wait_for(
        lambda: shadow_runs(served, "pruned50", "compared") == compared + requests * 2 + 1,
        "the shadow runs to be compared",
    )
    after = scrape(served.server)
    shadowed_rows = rows * (requests * 2 + 1)  # the direct fam.dense calls too
    new = {
        name: count(after, name) - count(before, name)
        for name in (
            "sparseserve_shadow_compared_rows_total",
            "sparseserve_shadow_top1_agreements_total",
            "sparseserve_shadow_cosine_count",
            "sparseserve_shadow_max_abs_diff_count",
        )
    }
    assert new["sparseserve_shadow_compared_rows_total"] == shadowed_rows
    assert new["sparseserve_shadow_cosine_count"] == shadowed_rows
    assert new["sparseserve_shadow_max_abs_diff_count"] == shadowed_rows
    # Half the weights gone by magnitude: most rows still agree, and not trivially all.
    assert 0.5 * shadowed_rows <= new["sparseserve_shadow_top1_agreements_total"]
    assert new["sparseserve_shadow_top1_agreements_total"] <= shadowed_rows
    assert count(after, "sparseserve_shadow_cosine_sum") > count(
        before, "sparseserve_shadow_cosine_sum"
    )
    # Shadow runs are no requests of the shadow variant.
    assert value(after, "sparseserve_requests_total", model="fam.pruned50", code="OK") == value(
        before, "sparseserve_requests_total", model="fam.pruned50", code="OK"
    )


def test_a_failing_shadow_variant_is_counted_and_changes_nothing(served: Served) -> None:
    served.apply_policy(
        "families: {fam: {default: dense, shadow: {variants: [broken, pruned50], fraction: 1}}}"
    )
    errors = shadow_runs(served, "broken", "error")
    compared = shadow_runs(served, "pruned50", "compared")
    requests = 6
    for seed in range(requests):
        name, _ = served.infer(FAMILY, pixels(4, seed))
        assert name == "fam.dense"
    wait_for(
        lambda: (
            shadow_runs(served, "broken", "error") == errors + requests
            and shadow_runs(served, "pruned50", "compared") == compared + requests
        ),
        "the shadow runs to finish",
    )
    with pytest.raises(InferenceServerException) as info:
        served.infer("fam.broken", pixels(1))  # it really fails when asked directly
    assert "model 'fam.broken' rejected the inputs" in info.value.message()


def test_shadow_runs_after_the_answer_and_within_the_latency_budget(served: Served) -> None:
    """fam.heavy takes far longer than fam.dense. Shadowed by it, every request still
    answers at fam.dense speed (a shadow that ran before answering would add a heavy
    run to each), and a full shadow queue drops rather than waits."""
    served.apply_policy("families: {fam: {default: dense}}")
    data = pixels(256)

    def timed(name: str) -> float:
        started = time.perf_counter()
        served.infer(name, data)
        return time.perf_counter() - started

    heavy = sorted(timed("fam.heavy") for _ in range(3))[1]
    unshadowed = sorted(timed(FAMILY) for _ in range(9))[4]
    served.apply_policy(
        "families: {fam: {default: dense, shadow: {variants: [heavy], fraction: 1}}}"
    )
    before = {o: shadow_runs(served, "heavy", o) for o in ("compared", "dropped", "error")}
    requests = 12
    latencies = sorted(timed(FAMILY) for _ in range(requests))
    shadowed = latencies[requests // 2]
    assert shadowed < heavy / 2, (
        f"median with shadows {shadowed * 1e3:.1f} ms, without {unshadowed * 1e3:.1f} ms, "
        f"one heavy run {heavy * 1e3:.1f} ms"
    )

    def settled() -> bool:
        return sum(shadow_runs(served, "heavy", o) - before[o] for o in before) == requests

    wait_for(settled, "every shadow run to be compared or dropped", timeout=60)
    dropped = shadow_runs(served, "heavy", "dropped") - before["dropped"]
    assert shadow_runs(served, "heavy", "error") == before["error"]
    # Heavy runs take longer than requests arrive and at most SHADOW_QUEUE wait.
    assert dropped >= 1


def test_a_stream_answer_is_shadowed_too(served: Served) -> None:
    served.apply_policy(
        "families: {fam: {default: dense, shadow: {variants: [pruned50], fraction: 1}}}"
    )
    compared = shadow_runs(served, "pruned50", "compared")
    answers: list[object] = []
    served.v2.start_stream(callback=lambda result, error: answers.append(error or result))
    try:
        for seed in range(3):
            served.v2.async_stream_infer(FAMILY, [_tensor(pixels(2, seed))])
        wait_for(lambda: len(answers) == 3, "the stream's answers")
    finally:
        served.v2.stop_stream()
    assert all(a.get_response().model_name == "fam.dense" for a in answers)  # type: ignore[attr-defined]
    wait_for(
        lambda: shadow_runs(served, "pruned50", "compared") == compared + 3,
        "the stream's shadow runs",
    )


def test_fraction_zero_shadows_nothing(served: Served) -> None:
    served.apply_policy(
        "families: {fam: {default: dense, shadow: {variants: [pruned50], fraction: 0}}}"
    )
    compared = shadow_runs(served, "pruned50", "compared")
    for seed in range(5):
        served.infer(FAMILY, pixels(2, seed))
    served.apply_policy(  # a marker run: once it is counted, earlier ones would be too
        "families: {fam: {default: dense, shadow: {variants: [pruned50], fraction: 1}}}"
    )
    served.infer(FAMILY, pixels(2))
    wait_for(lambda: shadow_runs(served, "pruned50", "compared") >= compared + 1, "the marker")
    assert shadow_runs(served, "pruned50", "compared") == compared + 1


def _tensor(data: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


# -- sparseserve.v1 -----------------------------------------------------------------------


def test_predict_names_the_variant_that_answered(served: Served) -> None:
    served.apply_policy("families: {fam: {default: pruned50}}")
    data = pixels(3)
    answer = served.predict(FAMILY, data, id="req-1", outputs=["output"])
    assert (answer.model, answer.version, answer.family, answer.variant, answer.id) == (
        "fam.pruned50", "1", FAMILY, "pruned50", "req-1",
    )  # fmt: skip
    tensor = answer.outputs["output"]
    assert (tensor.datatype, list(tensor.shape)) == ("FP32", [3, 10])
    output = np.frombuffer(tensor.data, dtype=np.float32).reshape(3, 10)
    np.testing.assert_array_equal(output, served.infer("fam.pruned50", data)[1])


@pytest.mark.parametrize(
    ("request_fields", "code", "says"),
    [
        ({"name": "no-such-family"}, grpc.StatusCode.NOT_FOUND, "families served: fam"),
        ({"name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "not a valid model name"),
        ({"name": FAMILY, "version": "9"}, grpc.StatusCode.NOT_FOUND, "no version '9'"),
        ({"name": FAMILY, "outputs": ["nope"]}, grpc.StatusCode.INVALID_ARGUMENT, "no output"),
    ],
    ids=["unknown-family", "empty-name", "unknown-version", "unknown-output"],
)
def test_predict_errors(
    served: Served, request_fields: dict[str, object], code: grpc.StatusCode, says: str
) -> None:
    served.apply_policy("families: {}")
    with pytest.raises(grpc.RpcError) as info:
        served.predict(data=pixels(1), **request_fields)  # type: ignore[arg-type]
    assert info.value.code() == code
    assert says in info.value.details()


@pytest.mark.parametrize(
    ("tensor", "says"),
    [
        (v1.Tensor(datatype="FP32", shape=[1, 64], data=b"\0" * 10), "raw"),
        (v1.Tensor(datatype="FLOAT", shape=[1, 64], data=b"\0" * 256), "FLOAT"),
        (v1.Tensor(datatype="FP32", shape=[1, 32], data=b"\0" * 128), "expects shape"),
    ],
    ids=["wrong-length", "unknown-datatype", "wrong-shape"],
)
def test_predict_bad_tensors_are_invalid_argument(
    served: Served, tensor: v1.Tensor, says: str
) -> None:
    request = v1.PredictRequest(name=FAMILY)
    request.inputs["input"].CopyFrom(tensor)
    with pytest.raises(grpc.RpcError) as info:
        served.v1.Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in info.value.details()
    assert served.predict(FAMILY, pixels(1)).family == FAMILY  # still serving


def test_list_variants_shows_manifests_and_live_status(served: Served) -> None:
    variants = {v.model: v for v in served.v1.ListVariants(v1.ListVariantsRequest()).variants}
    assert set(variants) == {"fam.dense", "fam.pruned50", "fam.broken", "fam.heavy", "solo"}
    pruned = variants["fam.pruned50"]
    weights = routing_repository.parameters(routing_repository.SIZES)
    assert (pruned.family, pruned.variant, pruned.baseline, pruned.is_baseline) == (
        FAMILY, "pruned50", "fam.dense", False,
    )  # fmt: skip
    assert (pruned.parameters, pruned.nonzero_parameters, pruned.sparsity) == (
        weights, weights // 2, 0.5,
    )  # fmt: skip
    assert (pruned.task, pruned.method, pruned.state, list(pruned.ready_versions)) == (
        "classification", "magnitude", "READY", ["1"],
    )  # fmt: skip
    assert pruned.backend == "onnxruntime" and pruned.file_bytes > 4 * weights // 2
    assert pruned.memory_bytes >= 0 and pruned.quality[0].metric == "accuracy"
    assert variants["fam.dense"].is_baseline and variants["fam.dense"].baseline == ""
    solo = variants["solo"]
    assert (solo.family, solo.variant, solo.has_manifest, solo.is_baseline) == (
        "solo", "default", False, True,
    )  # fmt: skip
    assert not solo.HasField("parameters")
    only = served.v1.ListVariants(v1.ListVariantsRequest(family="solo")).variants
    assert [v.model for v in only] == ["solo"]
    with pytest.raises(grpc.RpcError) as info:
        served.v1.ListVariants(v1.ListVariantsRequest(family="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "families: fam, solo" in info.value.details()


def test_get_traffic_policy_reports_the_policy_and_what_it_resolves_to(served: Served) -> None:
    served.apply_policy(
        "families:\n"
        "  fam:\n"
        "    split: {dense: 1, pruned50: 2}\n"
        "    shadow: {variants: [dense, missing], fraction: 0.25}\n"
    )
    state = served.policy()
    assert state.source == str(served.policy_file) and state.loaded_at > 0 and not state.error
    routes = {r.family: r for r in state.families}
    assert set(routes) == {FAMILY, "solo"}
    fam = routes[FAMILY]
    assert dict(fam.split) == {"dense": 1.0, "pruned50": 2.0}
    assert (list(fam.shadow.variants), fam.shadow.fraction) == (["dense", "missing"], 0.25)
    assert (fam.resolves_to, fam.model, fam.baseline) == ("pruned50", "fam.pruned50", "dense")
    assert list(fam.loaded_variants) == ["broken", "dense", "heavy", "pruned50"]
    assert list(fam.problems) == ["variant 'missing' in shadow is not loaded"]
    solo = routes["solo"]
    assert (solo.resolves_to, solo.model, solo.default) == ("default", "solo", "")
    with pytest.raises(grpc.RpcError) as info:
        served.policy("nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "families: fam, solo" in info.value.details()
