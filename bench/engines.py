"""CPU engines side by side: onnxruntime and OpenVINO on the same ONNX files.

    .venv/bin/python -m bench.engines                       # in-process, about 10 min
    .venv/bin/python -m bench.engines --server              # and through a real server
    .venv/bin/python -m bench.engines --quick               # a smoke test, about 1 min

Writes bench/results/engines.{json,md}. One interleaved run: every round runs every
case of a group (the same model family and batch size) in an order rotated between
rounds, so drift on a shared machine hits all alike; a case's speed-up is the
reference's time / the case's time within a round, then the median over rounds.

1. In process, one thread (`--threads`), for each model and batch size:
   - onnxruntime fp32 (as the server configures it: ORT_ENABLE_ALL, sequential);
   - OpenVINO fp32, with the input shape left dynamic and fixed (`reshape`) to the
     batch's;
   - OpenVINO bf16 (static and dynamic) where the CPU has it. OpenVINO compiles f32
     without a word when asked for bf16 on a CPU without AVX512_BF16/AMX, so the
     precision is read back from the compiled model and such a row says "not available
     on this CPU" instead of timing f32 under a bf16 label.
   Models: the MiniLM variants in `--repository` (every `minilm.*` directory; the six
   of recipes/minilm.yaml that are absent are noted and skipped) at batch 1 and 8, 128
   tokens of real text (stdlib docstrings), with the cosine of each embedding to
   onnxruntime fp32 on minilm.dense; and two MLPs with
   random weights (64-256-256-10 and 1024-4096-4096-1000) at batch 1 and 32, with the
   relative error to onnxruntime fp32 on the same model.
2. `--server`: the same models through a real sparseserve (tritonclient, batch-1
   requests, c=1 and c=32, dynamic batching), one model directory per engine,
   selected by config.pbtxt's `backend:`. A model configured `backend: "openvino"`
   but served by another backend (the `backend` label of `sparseserve_model_ready`)
   is reported as "openvino backend not available", not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints
import openvino.properties.streams as streams
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferenceServerClient, InferInput

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.measure import LatencySummary, check_errors, drive_unary, metric_samples
from bench.report import (
    REPO_ROOT,
    environment,
    machine_lines,
    markdown_table,
    package_version,
    progress,
    rotated,
    write_results,
)
from sparseserve.client.server_process import ServerProcess
from sparseserve.codec import datatype_of
from sparseserve.testing import onnx_models

PACKAGES = ("sparseserve", "onnxruntime", "openvino", "numpy", "tritonclient", "grpcio",
            "transformers")  # fmt: skip
MINILM_VARIANTS = ("dense", "int8", "structured", "structured-int8", "shallow", "sparse")
MINILM_REFERENCE = "minilm.dense"
SEQUENCE = 128
DEFAULT_MLPS = ("64-256-256-10", "1024-4096-4096-1000")
# The /proc/cpuinfo flags that decide what OpenVINO (and onnxruntime) can use.
CPU_FLAGS = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX-BF16": ("amx_bf16",),
    "AMX-INT8": ("amx_int8",),
}


# --- engines -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Engine:
    """One way to run an ONNX file: the engine, the precision it computes in and whether
    the input shape is fixed to the batch's before compiling (OpenVINO only)."""

    engine: str  # "onnxruntime" or "openvino"
    precision: str  # "fp32" or "bf16"
    static: bool = False

    @property
    def label(self) -> str:
        if self.engine == "onnxruntime":
            return f"onnxruntime {self.precision}"
        return f"openvino {self.precision} {'static' if self.static else 'dynamic'}"


ONNXRUNTIME_FP32 = Engine("onnxruntime", "fp32")
ENGINES = (
    ONNXRUNTIME_FP32,
    Engine("openvino", "fp32", static=True),
    Engine("openvino", "fp32", static=False),
    Engine("openvino", "bf16", static=True),
    Engine("openvino", "bf16", static=False),
)

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], np.ndarray]  # one inference, returning the first output


class EngineUnavailable(Exception):
    """This engine cannot run this model here (the message says why)."""


def cpu_flags() -> dict[str, bool]:
    """Which of CPU_FLAGS this machine's /proc/cpuinfo lists."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return {name: any(f in flags for f in names) for name, names in CPU_FLAGS.items()}


def onnxruntime_runner(path: Path, threads: int) -> Runner:
    """A session configured as the server's onnxruntime backend configures it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name
    return lambda feed: session.run([output], feed)[0]


def first_line(error: Exception) -> str:
    """The first informative line of an engine's (often very long) error message, for a
    table cell: OpenVINO's begins with a line per source file it passed through."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith("Exception from src/")]
    return (informative or lines or [type(error).__name__])[0][:200]


def openvino_compile(
    path: Path, engine: Engine, threads: int, shapes: dict[str, tuple[int, ...]]
) -> tuple[Runner, dict[str, str]]:
    """A compiled model and its one infer request, and the properties it compiled with.

    The precision is always set, never left to OpenVINO (whose default on AMX CPUs is
    bf16), and read back: a bf16 request that compiled f32 raises EngineUnavailable.
    """
    from sparseserve.backends.openvino import read_model  # sparse initializers: densified

    core = ov.Core()
    try:
        model = read_model(core, path)
        if engine.static:
            model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        config = {
            hints.inference_precision: ov.Type.bf16 if engine.precision == "bf16" else ov.Type.f32,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.inference_num_threads: threads,
            streams.num: 1,
        }
        compiled = core.compile_model(model, "CPU", config)
    except RuntimeError as exc:  # OpenVINO reports unsupported operators this way
        raise EngineUnavailable(f"OpenVINO cannot compile it: {first_line(exc)}") from exc
    precision = compiled.get_property(hints.inference_precision).to_string()  # "f32", "bf16"
    if precision != engine.precision.replace("fp", "f"):
        raise EngineUnavailable(
            f"not available on this CPU (asked for {engine.precision}, OpenVINO compiled "
            f"{precision})"
        )
    compiled_with = {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": str(compiled.get_property(props.inference_num_threads)),
        "NUM_STREAMS": str(compiled.get_property(streams.num)),
        "PERFORMANCE_HINT": str(compiled.get_property(hints.performance_mode)),
    }
    request = compiled.create_infer_request()
    # Inputs shared (no copy, as onnxruntime takes numpy arrays); the output is copied,
    # as onnxruntime returns a fresh array.
    return (
        lambda feed: request.infer(feed, share_inputs=True)[0],
        compiled_with,
    )


def bf16_support(threads: int) -> str | None:
    """None if OpenVINO compiles bf16 on this CPU, else why not (from a tiny model)."""
    with tempfile.TemporaryDirectory(prefix="engines-probe-") as tmp:
        probe = onnx_models.mlp(Path(tmp) / "probe.onnx", sizes=(16, 16))
        try:
            openvino_compile(probe, Engine("openvino", "bf16"), 1, {})
        except EngineUnavailable as exc:
            return str(exc)
    return None


# --- workloads ---------------------------------------------------------------------------


@dataclass(slots=True)
class Case:
    """One model at one batch size on one engine, and what was measured of it."""

    model: str
    path: Path  # the ONNX file
    batch: int
    engine: Engine
    runner: Runner | None = None
    unavailable: str | None = None
    compiled_with: dict[str, str] = field(default_factory=dict)
    median_ms: list[float] = field(default_factory=list)  # per round
    cpu_ms: list[float] = field(default_factory=list)  # process CPU per run, per round
    quality: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Group:
    """Cases timed together, in one rotated order per round: one family, one batch."""

    name: str
    batch: int
    feed: Feed  # the timed input
    cases: list[Case]


def time_case(case: Case, feed: Feed, warmup: int, runs: int) -> None:
    """Append this round's median wall ms and CPU ms per run (all threads) to `case`."""
    assert case.runner is not None
    for _ in range(warmup):
        case.runner(feed)
    wall = []
    cpu_started = time.process_time()
    for _ in range(runs):
        started = time.perf_counter()
        case.runner(feed)
        wall.append((time.perf_counter() - started) * 1000.0)
    case.cpu_ms.append((time.process_time() - cpu_started) * 1000.0 / runs)
    case.median_ms.append(statistics.median(wall))


def build_case(
    model: str, path: Path, batch: int, engine: Engine, threads: int, feed: Feed, bf16: str | None
) -> Case:
    """A Case ready to time, or one saying why this engine cannot run it."""
    case = Case(model, path, batch, engine)
    try:
        if engine.engine == "onnxruntime":
            case.runner = onnxruntime_runner(path, threads)
        elif engine.precision == "bf16" and bf16 is not None:
            raise EngineUnavailable("not available on this CPU")  # why: report["bf16"]
        else:
            shapes = {name: array.shape for name, array in feed.items()}
            case.runner, case.compiled_with = openvino_compile(path, engine, threads, shapes)
            try:
                case.runner(feed)
            except RuntimeError as exc:  # compiled, but an operator fails when it runs
                raise EngineUnavailable(f"OpenVINO cannot run it: {first_line(exc)}") from exc
    except EngineUnavailable as exc:
        case.runner, case.unavailable = None, str(exc)
    return case


def minilm_texts(count: int) -> list[str]:
    """`count` chunks of real English (stdlib docstrings) long enough to fill 128 tokens."""
    # Imported here: sparsify's modules import torch, needed only to tokenize for MiniLM.
    from sparseserve.sparsify.corpus import chunks, sentences, stdlib_directory

    # One stdlib package is enough text and much faster to parse than the whole stdlib.
    texts = chunks(sentences(stdlib_directory() / "asyncio"), max_words=120)
    if len(texts) < count:
        texts = chunks(sentences(), max_words=120)
    return texts[:count]


def minilm_feeds(tokenizer: Any, texts: Sequence[str], batch: int) -> list[Feed]:
    """The texts as [batch, 128] inputs (the last batch dropped if short)."""
    from sparseserve.sparsify.minilm import INPUT_NAMES

    feeds = []
    for start in range(0, len(texts) - batch + 1, batch):
        encoded = tokenizer(
            list(texts[start : start + batch]),
            padding="max_length",
            truncation=True,
            max_length=SEQUENCE,
            return_tensors="np",
        )
        feeds.append({name: encoded[name].astype(np.int64) for name in INPUT_NAMES})
    return feeds


def cosine_to(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Mean and min cosine of each candidate embedding to the reference's."""

    def unit(x: np.ndarray) -> np.ndarray:
        wide = x.astype(np.float64)
        norm = np.maximum(np.linalg.norm(wide, axis=1, keepdims=True), 1e-12)
        unit_rows: np.ndarray = wide / norm
        return unit_rows

    cosines = (unit(reference) * unit(candidate)).sum(axis=1)
    return {"cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min())}


def latest_model_file(directory: Path) -> Path | None:
    """The model.onnx of the highest numeric version under `directory`, if any."""
    versions = [p for p in directory.glob("*/model.onnx") if p.parent.name.isdigit()]
    return max(versions, key=lambda p: int(p.parent.name), default=None)


def minilm_groups(
    repository: Path, batches: Sequence[int], cosine_texts: int, threads: int, bf16: str | None
) -> tuple[list[Group], list[str]]:
    """The MiniLM groups (one per batch size), and a note per variant not found."""
    found: dict[str, Path] = {}
    notes: list[str] = []
    others = sorted(path.name for path in repository.glob("minilm.*") if path.is_dir())
    for model in [*(f"minilm.{v}" for v in MINILM_VARIANTS), *others]:
        path = latest_model_file(repository / model)
        if path is not None:
            found.setdefault(model, path)
        elif model not in others:
            notes.append(f"{model}: not in {repository} (skipped)")
    if not found:
        return [], notes
    if MINILM_REFERENCE not in found:
        notes.append(f"{MINILM_REFERENCE} is missing: no cosine and no speed-up vs dense")
    from sparseserve.sparsify.minilm import load_tokenizer

    tokenizer = load_tokenizer()
    texts = minilm_texts(max(cosine_texts, *batches))
    groups = []
    for batch in batches:
        feeds = minilm_feeds(tokenizer, texts, batch)
        progress(f"minilm batch {batch}: compiling {len(found)} models x {len(ENGINES)} engines")
        cases = [
            build_case(model, path, batch, engine, threads, feeds[0], bf16)
            for model, path in found.items()
            for engine in ENGINES
        ]
        reference = next(
            (c for c in cases if (c.model, c.engine) == (MINILM_REFERENCE, ONNXRUNTIME_FP32)),
            None,
        )
        if reference is not None and reference.runner is not None:
            expected = np.concatenate([reference.runner(feed) for feed in feeds])
            for case in cases:
                if case.runner is not None:
                    got = np.concatenate([case.runner(feed) for feed in feeds])
                    case.quality = cosine_to(expected, got)
        groups.append(Group(f"minilm batch {batch}", batch, feeds[0], cases))
    return groups, notes


def mlp_groups(
    specs: Sequence[str], batches: Sequence[int], threads: int, bf16: str | None, workdir: Path
) -> list[Group]:
    """One group per MLP and batch size, random weights, random inputs."""
    groups = []
    for spec in specs:
        sizes = tuple(int(width) for width in spec.split("-"))
        name = f"mlp {spec}"
        path = onnx_models.mlp(workdir / f"mlp-{spec}.onnx", sizes=sizes)
        rng = np.random.default_rng(0)
        for batch in batches:
            feed = {"input": rng.standard_normal((batch, sizes[0])).astype(np.float32)}
            cases = [build_case(name, path, batch, e, threads, feed, bf16) for e in ENGINES]
            expected = cases[0].runner(feed) if cases[0].runner is not None else None
            for case in cases:
                if case.runner is not None and expected is not None:
                    error = np.abs(case.runner(feed) - expected).max()
                    case.quality = {"relative_error": float(error / np.abs(expected).max())}
            groups.append(Group(name + f" batch {batch}", batch, feed, cases))
    return groups


def run_rounds(groups: Sequence[Group], rounds: int, warmup: int, runs: int) -> None:
    """Time every runnable case of every group once per round, in a rotated order."""
    for index in range(rounds):
        for group in groups:
            runnable = [case for case in group.cases if case.runner is not None]
            for case in rotated(runnable, index):
                time_case(case, group.feed, warmup, runs)
            progress(
                f"round {index + 1}/{rounds} {group.name}: "
                + ", ".join(f"{c.model} {c.engine.label} {c.median_ms[-1]:.3f}" for c in runnable)
            )


def ratio_over_rounds(
    reference: Case | None, case: Case, cpu: bool = False
) -> dict[str, float] | None:
    """Median, min and max over rounds of reference ms / case ms (a speed-up): wall time,
    or with `cpu` the CPU time per call, which other processes on the cores disturb less."""
    if reference is None or not reference.median_ms or not case.median_ms:
        return None
    pairs = zip(
        reference.cpu_ms if cpu else reference.median_ms,
        case.cpu_ms if cpu else case.median_ms,
        strict=True,
    )
    ratios = [r / c for r, c in pairs]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def summarise(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per case: medians over rounds and speed-ups against onnxruntime fp32 on the
    same model (and, for MiniLM, on minilm.dense)."""
    rows = []
    for group in groups:
        by_key = {(c.model, c.engine): c for c in group.cases}
        for case in group.cases:
            row: dict[str, Any] = {
                "group": group.name,
                "model": case.model,
                "batch": case.batch,
                "engine": case.engine.engine,
                "precision": case.engine.precision,
                "shape": "static" if case.engine.static else "dynamic",
                "label": case.engine.label,
                "unavailable": case.unavailable,
                "compiled_with": case.compiled_with,
                **case.quality,
            }
            if case.median_ms:
                reference = by_key.get((case.model, ONNXRUNTIME_FP32))
                row |= {
                    "median_ms": statistics.median(case.median_ms),
                    "round_ms": case.median_ms,
                    "cpu_ms_per_run": statistics.median(case.cpu_ms),
                    "round_cpu_ms": case.cpu_ms,
                    "vs_onnxruntime_fp32": ratio_over_rounds(reference, case),
                    "vs_onnxruntime_fp32_cpu": ratio_over_rounds(reference, case, cpu=True),
                }
                if case.model.startswith("minilm."):
                    dense = by_key.get((MINILM_REFERENCE, ONNXRUNTIME_FP32))
                    row["vs_onnxruntime_fp32_dense"] = ratio_over_rounds(dense, case)
            rows.append(row)
    return rows


# --- through the server ------------------------------------------------------------------


SERVER_ENGINES = ("onnxruntime", "openvino")
# Both engines at fp32 give the same answers within this (relative to the largest value);
# a bf16 engine would not, and would be a mislabelled row.
SERVER_FP32_TOLERANCE = 1e-4
SERVER_BATCHING = (
    "max_batch_size: 32\n"
    "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
    "instance_group [{ count: 1 kind: KIND_CPU }]\n"
)


def server_model_name(model: str, engine: str) -> str:
    """The server's model name for `model` on `engine` ("mlp-64-256-256-10-openvino")."""
    return f"{model.replace(' ', '-')}-{engine}"


def link_model(root: Path, name: str, path: Path, config: str | None = None) -> None:
    """Model directory `root/name`: version 1 links `path`; `config` its config.pbtxt."""
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.onnx").symlink_to(path.resolve())
    if config is not None:
        (root / name / "config.pbtxt").write_text(config)


def build_server_repository(root: Path, models: dict[str, Path]) -> None:
    """One directory per model and engine: the same model.onnx (linked), a config.pbtxt
    selecting the engine with `backend:` and batching up to 32 rows."""
    for model, path in models.items():
        for engine in SERVER_ENGINES:
            config = f'backend: "{engine}"\n' + SERVER_BATCHING
            link_model(root, server_model_name(model, engine), path, config)


def served_backends(metrics_url: str) -> dict[str, str]:
    """Model name -> the backend serving it, from `sparseserve_model_ready`'s labels."""
    return {
        labels["model"]: labels["backend"]
        for name, labels, value in metric_samples(metrics_url)
        if name == "sparseserve_model_ready" and value == 1.0
    }


def load_failures(url: str) -> dict[str, str]:
    """Model name -> why it is not ready, from the server's RepositoryIndex."""
    client = InferenceServerClient(url)
    try:
        index = client.get_model_repository_index(as_json=True)
    finally:
        client.close()
    return {
        model["name"]: first_line(RuntimeError(model.get("reason") or model.get("state", "")))
        for model in index.get("models", [])
        if model.get("state") != "READY"
    }


def server_inputs(feed: Feed) -> list[Any]:
    """tritonclient inputs for every row of `feed`, one batch-1 request each."""
    rows = next(iter(feed.values())).shape[0]
    requests = []
    for row in range(rows):
        tensors = []
        for name, array in feed.items():
            one = np.ascontiguousarray(array[row : row + 1])
            tensor = InferInput(name, list(one.shape), datatype_of(one).name)
            tensor.set_data_from_numpy(one)
            tensors.append(tensor)
        requests.append(tensors)
    return requests


@dataclass(slots=True)
class ServerCase:
    """One model on one engine at one concurrency, through the server."""

    model: str
    engine: str
    concurrency: int
    unavailable: str | None = None
    requests_per_second: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)


async def answer_differences(
    url: str, cases: list[ServerCase], requests: dict[str, list[Any]]
) -> dict[tuple[str, str], float]:
    """(model, engine) -> max |answer - onnxruntime's| / max |onnxruntime's| over each
    model's first request, for every engine that serves it: fp32 engines must agree
    (the check before timing that the engines compute the same thing)."""
    served = {(case.model, case.engine) for case in cases if case.unavailable is None}
    differences: dict[tuple[str, str], float] = {}
    async with triton_aio.InferenceServerClient(url) as client:
        for model in {model for model, _ in served}:
            answers = {}
            for engine in SERVER_ENGINES:
                if (model, engine) in served:
                    result = await client.infer(
                        server_model_name(model, engine), requests[model][0]
                    )
                    answers[engine] = result.as_numpy(result.get_response().outputs[0].name)
            reference = answers.get("onnxruntime")
            if reference is None:
                continue
            scale = max(float(np.abs(reference).max()), 1e-30)
            for engine, answer in answers.items():
                error = float(np.abs(answer - reference).max()) / scale
                differences[(model, engine)] = error
                if error > SERVER_FP32_TOLERANCE:
                    raise RuntimeError(
                        f"{server_model_name(model, engine)} answers differently from "
                        f"onnxruntime (relative difference {error:.2e})"
                    )
    return differences


async def drive_server(
    url: str, cases: list[ServerCase], requests: dict[str, list[Any]], args: argparse.Namespace
) -> None:
    """Every round: each (model, concurrency) group's engines in a rotated order."""
    groups: dict[tuple[str, int], list[ServerCase]] = {}
    for case in cases:
        if case.unavailable is None:
            groups.setdefault((case.model, case.concurrency), []).append(case)
    async with triton_aio.InferenceServerClient(url) as client:
        for index in range(args.rounds):
            for (model, concurrency), members in groups.items():
                for case in rotated(members, index):
                    name = server_model_name(case.model, case.engine)
                    inputs = requests[model]
                    # Warm-up: two batches' worth (a MiniLM batch of 32 takes seconds).
                    await drive_unary(client, inputs, concurrency, concurrency * 2, 30.0,
                                      model=name)  # fmt: skip
                    started = time.perf_counter()
                    latencies, errors = await drive_unary(
                        client, inputs, concurrency, args.server_requests * concurrency,
                        args.server_seconds, model=name,
                    )  # fmt: skip
                    elapsed = time.perf_counter() - started
                    check_errors(errors, len(latencies) + len(errors), f"{name} c={concurrency}")
                    case.requests_per_second.append(len(latencies) / elapsed)
                    case.p50_ms.append(LatencySummary.of(latencies).p50)
                progress(
                    f"server round {index + 1}/{args.rounds} {model} c={concurrency}: "
                    + ", ".join(f"{c.engine} {c.requests_per_second[-1]:.1f}/s" for c in members)
                )


def server_models(groups: Sequence[Group]) -> dict[str, tuple[Path, Feed]]:
    """Each model's file, with the input of its largest batch: the rows the server's
    batch-1 requests take turns with."""
    models: dict[str, tuple[Path, Feed]] = {}
    for group in sorted(groups, key=lambda group: group.batch):
        for case in group.cases:
            models[case.model] = (case.path, group.feed)
    return models


def server_report(
    models: dict[str, tuple[Path, Feed]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Each model through a real server on each engine, c=1 and c=32, batch-1 requests."""
    cases = [
        ServerCase(model, engine, concurrency)
        for model in models
        for concurrency in args.concurrency
        for engine in SERVER_ENGINES
    ]
    with tempfile.TemporaryDirectory(prefix="engines-server-") as tmp:
        root = Path(tmp) / "models"
        build_server_repository(root, {model: path for model, (path, _) in models.items()})
        server_args = ["--intra-op-threads", str(args.threads), "--inference-threads", "1",
                       "--dispatch", "cpu", "--log-level", "WARNING"]  # fmt: skip
        with ServerProcess(root, *server_args, startup_timeout=600.0) as server:
            served = served_backends(server.metrics_url)
            progress(f"server: served backends {served}")
            reasons = load_failures(server.grpc_url)
            for case in cases:
                name = server_model_name(case.model, case.engine)
                backend = served.get(name)
                if backend is None:
                    case.unavailable = f"did not load: {reasons.get(name, 'no reason given')}"
                elif backend != case.engine:
                    case.unavailable = (
                        f"{case.engine} backend not available (config.pbtxt backend: "
                        f'"{case.engine}" was served by {backend})'
                    )
            requests = {model: server_inputs(feed) for model, (_, feed) in models.items()}
            differences = asyncio.run(answer_differences(server.grpc_url, cases, requests))
            asyncio.run(drive_server(server.grpc_url, cases, requests, args))
    rows = []
    for case in cases:
        row: dict[str, Any] = {
            "model": case.model,
            "engine": case.engine,
            "concurrency": case.concurrency,
            "unavailable": case.unavailable,
            "relative_difference_to_onnxruntime": differences.get((case.model, case.engine)),
        }
        if case.requests_per_second:
            reference = next(
                c for c in cases
                if (c.model, c.concurrency, c.engine) == (case.model, case.concurrency,
                                                          "onnxruntime")
            )  # fmt: skip
            ratios = [
                mine / theirs
                for mine, theirs in zip(
                    case.requests_per_second, reference.requests_per_second, strict=False
                )
            ]  # none where onnxruntime did not serve the model
            row |= {
                "requests_per_second": statistics.median(case.requests_per_second),
                "p50_ms": statistics.median(case.p50_ms),
                "round_requests_per_second": case.requests_per_second,
                "vs_onnxruntime": {
                    "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)
                } if ratios else None,
            }  # fmt: skip
        rows.append(row)
    return rows


# --- report ------------------------------------------------------------------------------


def fmt_ratio(ratio: dict[str, float] | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def fmt_ms(ms: float) -> str:
    return f"{ms * 1000:.0f} µs" if ms < 1 else f"{ms:.2f} ms"


def summary_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per model and batch, one column per engine: time and speed-up over
    onnxruntime fp32 (the issue's tables, side by side)."""
    labels = list(dict.fromkeys(row["label"] for row in rows))
    table: dict[tuple[str, int], dict[str, str]] = {}
    for row in rows:
        cells = table.setdefault((row["model"], row["batch"]), {})
        if "median_ms" in row:
            ratio = row["vs_onnxruntime_fp32"]
            cells[row["label"]] = f"{fmt_ms(row['median_ms'])} ({ratio['median']:.2f}x)"
        else:
            cells[row["label"]] = "n/a"
    return markdown_table(
        ["model", "batch", *labels],
        ([model, batch, *(cells.get(label, "-") for label in labels)]
         for (model, batch), cells in table.items()),
        2,
    )  # fmt: skip


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    flags = ", ".join(
        f"{name} {'yes' if has else 'no'}" for name, has in report["cpu_flags"].items()
    )
    settings = [
        f"- CPU flags: {flags}",
        f"- OpenVINO bf16: {report['bf16'] or 'available (AMX or AVX512_BF16)'}",
        f"- {report['threads']} thread(s) per engine; {report['rounds']} rounds x "
        f"{report['runs']} timed runs (after {report['warmup']} warm-up) per case; "
        f"load average at start {report['load_average'][0]:.2f} "
        f"(at end {report['load_average_end'][0]:.2f})",
    ]
    lines = ["# CPU engines: onnxruntime and OpenVINO on the same ONNX files", "",
             "## Machine", "", *machine_lines(env, settings), ""]  # fmt: skip
    lines += [
        "The precision is the engine's floating-point precision: an int8 variant's "
        "quantized layers run in int8 on every engine. "
        "Speed-up: onnxruntime fp32 ms / this case's ms on the same model and batch, within "
        "each round; the median over rounds (min-max). CPU ms: process CPU time per run "
        '(all threads); "by CPU ms": the same ratio of CPU times, which other processes '
        "on the cores disturb less than wall time. MiniLM: 128 tokens of stdlib docstring "
        "text per row, cosine of each "
        f"embedding to onnxruntime fp32 on {MINILM_REFERENCE} over "
        f"{report['sentences']} texts. MLPs: random weights and inputs, error = max |diff| "
        "/ max |onnxruntime fp32|.",
        "",
    ]
    for note in report["notes"]:
        lines.append(f"- {note}")
    if report["notes"]:
        lines.append("")
    lines += ["## Summary", "", "Median time per call, and the speed-up over onnxruntime fp32 "
              "on the same model and batch (n/a: the engine cannot run it here; the "
              "sections below say why).", "", *summary_lines(report["in_process"]), ""]  # fmt: skip
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in report["in_process"]:
        groups.setdefault(row["group"], []).append(row)
    for name, rows in groups.items():
        minilm = name.startswith("minilm")
        header = ["model", "engine", "ms", "CPU ms", "vs onnxruntime fp32", "by CPU ms"]
        header += ["vs ort fp32 dense", "cos mean", "cos min"] if minilm else ["error"]
        table = []
        for row in rows:
            if "median_ms" not in row:
                note = row["unavailable"] or "-"
                table.append([row["model"], row["label"], note, *["-"] * (len(header) - 3)])
                continue
            cells = [
                row["model"],
                row["label"],
                fmt_ms(row["median_ms"]),
                f"{row['cpu_ms_per_run']:.3f}",
                fmt_ratio(row["vs_onnxruntime_fp32"]),
                fmt_ratio(row["vs_onnxruntime_fp32_cpu"]),
            ]
            if minilm:
                cells += [
                    fmt_ratio(row.get("vs_onnxruntime_fp32_dense")),
                    f"{row['cosine_mean']:.5f}" if "cosine_mean" in row else "-",
                    f"{row['cosine_min']:.5f}" if "cosine_min" in row else "-",
                ]
            else:
                error = row.get("relative_error")
                cells.append("-" if error is None else f"{error:.1e}" if error else "0")
            table.append(cells)
        lines += [f"## {name}", "", *markdown_table(header, table, 2), ""]
    if report.get("server") is not None:
        lines += [
            "## Through the server",
            "",
            "A real `sparseserve serve` (1 inference thread, `--intra-op-threads "
            f"{report['threads']}`, `--dispatch cpu`), one model directory per engine "
            "selected by config.pbtxt `backend:`, dynamic batching up to 32 rows; "
            "tritonclient gRPC, batch-1 requests; engines alternate within each round.",
            "",
        ]
        table = []
        for row in report["server"]:
            if "requests_per_second" in row:
                cells = [f"{row['requests_per_second']:.1f}", f"{row['p50_ms']:.2f}",
                         fmt_ratio(row["vs_onnxruntime"])]  # fmt: skip
            else:
                cells = [row["unavailable"], "-", "-"]
            table.append([row["model"], row["engine"], row["concurrency"], *cells])
        lines += markdown_table(["model", "engine", "c", "req/s", "p50 ms", "vs onnxruntime"],
                                table, 2)  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("/work/minilm-models"),
        help="a repository holding minilm.* variants (absent ones are skipped)",
    )
    parser.add_argument("--threads", type=int, default=1, help="threads per engine")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per case per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before them")
    parser.add_argument("--sentences", type=int, default=32, help="texts for the cosine")
    parser.add_argument("--minilm-batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--mlp",
        nargs="*",
        default=list(DEFAULT_MLPS),
        help="MLP widths, e.g. 64-256-256-10 (none: no MLPs)",
    )
    parser.add_argument("--mlp-batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--server", action="store_true", help="also through a real server")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--server-requests", type=int, default=100, help="requests per client per case per round"
    )
    parser.add_argument(
        "--server-seconds", type=float, default=10.0, help="at most this long per case per round"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 1 round of 3 runs, 8 texts, few requests",
    )
    parser.add_argument(
        "--note", action="append", default=[], help="a line for the report (e.g. how the "
        "repository was made); repeatable",
    )  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--name", default="engines", help="file name of the results")
    args = parser.parse_args(argv)  # fmt: skip
    if args.quick:
        args.rounds, args.runs, args.warmup, args.sentences = 1, 3, 1, 8
        args.server_requests, args.server_seconds = 10, 2.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    env["packages"] = {name: package_version(name) for name in PACKAGES}
    load_at_start = os.getloadavg()
    bf16 = bf16_support(args.threads)
    groups, notes = minilm_groups(
        args.repository, args.minilm_batch, args.sentences, args.threads, bf16
    )
    with tempfile.TemporaryDirectory(prefix="engines-mlp-") as tmp:
        groups += mlp_groups(args.mlp, args.mlp_batch, args.threads, bf16, Path(tmp))
        run_rounds(groups, args.rounds, args.warmup, args.runs)
        server = server_report(server_models(groups), args) if args.server else None
    report = {
        "environment": env,
        "cpu_flags": cpu_flags(),
        "bf16": bf16,
        "threads": args.threads,
        "rounds": args.rounds,
        "runs": args.runs,
        "warmup": args.warmup,
        "sentences": args.sentences,
        "sequence": SEQUENCE,
        "load_average": load_at_start,
        "load_average_end": os.getloadavg(),
        "notes": [*args.note, *notes],
        "in_process": summarise(groups),
        "server": server,
    }
    write_results(args.output_dir, args.name, report, render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
