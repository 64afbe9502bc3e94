"""`make demo`: build the digits families (dense, pruned, structured, int8, 2:4 variants),
serve them, query them through a real v2 client, and compare sparse with dense.

Needs the `[demo]` extra: torch and scikit-learn build the models, tritonclient queries
them, matplotlib plots the comparison.

The models take the 8x8 digits as 64 float32 pixels scaled to [0, 1]: scikit-learn ships
them as integers 0..16, so they are divided by 16, in training and in every request
below. A client of these models sends pixels / 16 too.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tritonclient.grpc as triton

from sparseserve.client.server_process import ServerProcess
from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest

if TYPE_CHECKING:  # the [sparsify] extra, imported only where the models are built
    from sparseserve.sparsify.digits import DigitsSplit

LATENCY_REQUESTS = 300


@dataclass
class VariantReport:
    name: str
    manifest: VariantManifest
    accuracy: float
    predictions: np.ndarray
    samples: np.ndarray  # test digits shaped for the model's input
    input_name: str
    latencies_ms: list[float]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[int(0.99 * (len(ordered) - 1))]


# The families the demo builds and compares (recipes/digits-*.yaml); a repository may hold
# other models too (your own, built into ./models as the README shows): they are served,
# and left out of the comparison, which sends every model 8x8 digits.
DEMO_FAMILIES = ("digits-mlp", "digits-cnn")


def _family(directory: Path) -> str | None:
    manifest = directory / MANIFEST_FILENAME
    return VariantManifest.read(manifest).family if manifest.is_file() else None


def _ensure_models(repository: Path, rebuild: bool) -> None:
    present = {_family(d) for d in repository.iterdir()} if repository.is_dir() else set()
    if set(DEMO_FAMILIES) <= present and not rebuild:
        print(f"using the demo models in {repository} (--rebuild to train them again)")
        return
    from sparseserve.sparsify.demo_models import build_demo_repository

    print(f"training the demo models on scikit-learn's digits into {repository} ...")
    build_demo_repository(repository)


def _images_for(metadata: Any, pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """Shape the digits (N, 64) the way the model's one input wants them."""
    spec = metadata.inputs[0]
    rest = [int(d) for d in spec.shape[1:]]
    return spec.name, pixels.reshape(len(pixels), *rest).astype(np.float32)


def _infer(
    client: triton.InferenceServerClient, model: str, name: str, x: np.ndarray
) -> triton.InferResult:
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor])


def _evaluate(
    client: triton.InferenceServerClient,
    repository: Path,
    model: str,
    pixels: np.ndarray,
    labels: np.ndarray,
) -> VariantReport:
    metadata = client.get_model_metadata(model)
    input_name, x = _images_for(metadata, pixels)
    output = metadata.outputs[0].name
    # One request with every test digit, as the build measured them: an int8 variant
    # with dynamic quantization scales its activations per batch, so other batches can
    # flip a borderline digit (digits-mlp.int8 scored 96.39% in batches of 64 against
    # the 96.67% its manifest records for one batch).
    logits = _infer(client, model, input_name, x).as_numpy(output)
    predictions = logits.argmax(axis=1)
    return VariantReport(
        name=model,
        manifest=VariantManifest.read(repository / model / MANIFEST_FILENAME),
        accuracy=float((predictions == labels).mean()),
        predictions=predictions,
        samples=x,
        input_name=input_name,
        latencies_ms=[],
    )


def _measure_latency(
    client: triton.InferenceServerClient, reports: Sequence[VariantReport]
) -> None:
    """Batch-1 latency of every model, taking turns request by request, so that whatever
    else the machine is doing slows all of them alike."""
    for i in range(LATENCY_REQUESTS):
        for report in reports:
            sample = report.samples[i % len(report.samples)][None]
            started = time.perf_counter()
            _infer(client, report.name, report.input_name, sample)
            report.latencies_ms.append((time.perf_counter() - started) * 1000)


def _print_table(reports: Sequence[VariantReport]) -> None:
    by_name = {r.name: r for r in reports}
    header = (
        f"{'model':<30}{'sparsity':>9}{'non-zero':>10}{'file KiB':>10}"
        f"{'accuracy':>10}{'manifest':>10}{'agree':>10}{'p50 ms':>9}{'p99 ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in reports:
        m = r.manifest
        baseline = by_name.get(m.baseline) if m.baseline else None
        agree = f"{(r.predictions == baseline.predictions).mean():.1%}" if baseline else "baseline"
        manifest_accuracy = next((q.value for q in m.quality if q.metric == "accuracy"), None)
        print(
            f"{r.name:<30}{m.sparsity or 0:>9.1%}{m.nonzero_parameters or 0:>10,}"
            f"{(m.file_bytes or 0) / 1024:>10.1f}{r.accuracy:>10.2%}"
            f"{manifest_accuracy if manifest_accuracy is not None else float('nan'):>10.2%}"
            f"{agree:>10}{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}"
        )


def run(repository: Path, rebuild: bool = False) -> int:
    from sparseserve.sparsify.demo_models import load_digits_split

    repository = repository.resolve()
    _ensure_models(repository, rebuild)
    split = load_digits_split()
    print("starting sparseserve (CPU onnxruntime backend, local repository) ...")
    with ServerProcess(repository, "--log-level", "WARNING") as server:
        print(f"serving on {server.grpc_url} (metrics on {server.metrics_url})")
        with triton.InferenceServerClient(server.grpc_url) as client:
            meta = client.get_server_metadata()
            print(f"server: {meta.name} {meta.version}, extensions {list(meta.extensions)}")
            models = [m.name for m in client.get_model_repository_index().models]
            served = [name for name in models if client.is_model_ready(name)]
            ready = [n for n in served if _family(repository / n) in DEMO_FAMILIES]
            print(f"models ready: {', '.join(ready)}")
            if others := [name for name in served if name not in ready]:
                print(f"also served, not digits models, so left out below: {', '.join(others)}")
            print()

            first = split.x_test[:8]
            print(
                f"inputs: {len(split.y_test)} held-out 8x8 digits, each 64 float32 pixels "
                "scaled to [0, 1] (scikit-learn's 0..16 divided by 16, as in training)"
            )
            print(f"first {len(first)} test digits, true labels: {split.y_test[:8].tolist()}")
            reports = []
            for name in ready:
                report = _evaluate(client, repository, name, split.x_test, split.y_test)
                print(f"  {name:<30} predicts {report.predictions[:8].tolist()}")
                reports.append(report)
            _measure_latency(client, reports)
        print(
            f"\nsparse vs dense, {len(split.y_test)} test digits through the server; "
            f"latency of {LATENCY_REQUESTS} batch-1 requests each, the models taking turns:\n"
        )
        _print_table(reports)
        print(
            "\nnote: onnxruntime on CPU runs pruned weights as dense matrices, so zeros alone "
            "do not change latency (sparse initializers only shrink the file); structured "
            "pruning and int8 shrink the work. `sparseserve inspect DIR` shows what a variant is."
        )
        _compare_families(server, repository, split)
    print(f"\nserver stopped cleanly (exit code {server.returncode})")
    _what_next(repository)
    return 0 if server.returncode == 0 else 1


def _what_next(repository: Path) -> None:
    """A few commands to try after the demo, on the repository it built."""
    here = _shown(repository)
    cli = _cli()
    steps = [
        (
            f"{cli} serve --repository {here}",
            "serve it yourself: gRPC 8001, REST 8000, metrics 8002",
        ),
        (f"{cli} inspect {here}/digits-mlp.pruned90", "per-layer sparsity, 2:4, size"),
        (
            f"{cli} compare --family digits-cnn --repository {here}",
            "a longer comparison (10 s of load on each variant)",
        ),
        (f"{cli} inspect your-model.onnx", "any ONNX model, wherever it was made"),
        (
            f"{cli} manifest {here}/NAME --family F --variant V --baseline B",
            "add your own pruned model to a family",
        ),
    ]
    width = max(len(command) for command, _ in steps)
    print("\nwhat next:")
    for command, why in steps:
        print(f"  {command:<{width}}  # {why}")
    print("  README.md and docs/ (sparsify, traffic, monitoring, deploy) say more")


def _cli() -> str:
    """The CLI as the user can type it: `sparseserve` where that is this environment's
    (its bin folder on PATH), else the path of the one beside this Python."""
    beside = Path(sys.executable).parent / "sparseserve"
    found = shutil.which("sparseserve")
    if not beside.exists() or (found is not None and Path(found).resolve() == beside.resolve()):
        return "sparseserve"
    return _shown(beside)


def _shown(path: Path) -> str:
    """`path` as a user would type it: relative to the working directory when inside it."""
    try:
        return f"./{path.relative_to(Path.cwd())}"
    except ValueError:
        return str(path)


def _compare_families(server: ServerProcess, repository: Path, split: DigitsSplit) -> None:
    """End with `sparseserve compare` of each digits family, the test digits as the
    rows every variant answers (for agreement with the baseline, and as the load)."""
    from sparseserve.compare.loadgen import LoadSettings
    from sparseserve.compare.run import print_comparisons
    from sparseserve.repository.eval_data import EvalData

    families = sorted(
        {VariantManifest.read(p).family for p in repository.glob(f"*/{MANIFEST_FILENAME}")}
        & set(DEMO_FAMILIES)
    )
    digits = EvalData({"pixels": split.x_test}, split.test_dataset, split.y_test)
    print("\nsparseserve compare (load through the server, figures from its metrics):")
    print_comparisons(
        server.grpc_url, server.metrics_url, repository, families,
        repository.with_name(f"{repository.name}-report"),
        LoadSettings(concurrency=2, duration_seconds=1.5, rounds=3), data=digits,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repository", type=Path, default=Path("models"), help="where the models go (./models)"
    )
    parser.add_argument("--rebuild", action="store_true", help="train the models again")
    args = parser.parse_args(argv)
    return run(args.repository, args.rebuild)


if __name__ == "__main__":
    sys.exit(main())
