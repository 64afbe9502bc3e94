"""Build the demo model repository: a digits MLP (dense and 90% pruned) and a digits CNN.

    python -m sparseserve.sparsify.demo_models --repository ./models

Everything trains on CPU in seconds from scikit-learn's bundled digits, so the demo
needs no download. Each model is written in Triton's layout with its manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from sparseserve.repository.manifest import (
    MANIFEST_FILENAME,
    LayerSparsity,
    Quality,
    Task,
    VariantManifest,
)

TEST_FRACTION = 0.2
OPSET = 17
TARGET_SPARSITY = 0.9
BATCH_SIZE = 32
# A correct export differs from torch only by float32 summation order: that stays below 1e-5,
# relative for logits above 1 in magnitude (where 1e-5 absolute is a few ulps), absolute below.
EXPORT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class DigitsSplit:
    """Digits pixels in [0, 1] as float32 rows of 64, labels as int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    seed: int

    @property
    def test_dataset(self) -> str:
        return f"sklearn digits test split (seed {self.seed}, {TEST_FRACTION:.0%})"


@dataclass(frozen=True)
class _Variant:
    family: str
    variant: str
    description: str
    input_name: str
    sample_shape: tuple[int, ...]
    method: str = "dense"
    baseline: str | None = None

    @property
    def name(self) -> str:
        return f"{self.family}.{self.variant}"


@dataclass(frozen=True)
class _Schedule:
    epochs: int
    lr: float


MLP_DENSE = _Variant(
    "digits-mlp", "dense", "MLP 64-128-64-10 (ReLU) on 8x8 digits", "pixels", (64,)
)
MLP_PRUNED = _Variant(
    "digits-mlp",
    "pruned90",
    "digits-mlp.dense with 90% of each Linear weight pruned by magnitude, then fine-tuned",
    "pixels",
    (64,),
    method="magnitude",
    baseline=MLP_DENSE.name,
)
CNN_DENSE = _Variant(
    "digits-cnn",
    "dense",
    "Two 3x3 convolutions, max-pool, Linear on 8x8 digits",
    "image",
    (1, 8, 8),
)
# Chosen on seed 0 so each model lands well above 0.93 in a few CPU seconds.
MLP_SCHEDULE = _Schedule(epochs=60, lr=1e-3)
FINE_TUNE_SCHEDULE = _Schedule(epochs=30, lr=1e-3)
CNN_SCHEDULE = _Schedule(epochs=20, lr=2e-3)


def load_digits_split(seed: int = 0) -> DigitsSplit:
    """Stratified 80/20 split of sklearn's digits, the same for the same seed."""
    digits = load_digits()
    # sklearn ships the pixels as integers 0..16; clients send [0, 1] floats.
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    return DigitsSplit(x_train, y_train, x_test, y_test, seed)


def _mlp() -> nn.Sequential:
    # Named layers: the names become the ONNX initializer names and the manifest's layer names.
    layers = OrderedDict(
        fc1=nn.Linear(64, 128),
        relu1=nn.ReLU(),
        fc2=nn.Linear(128, 64),
        relu2=nn.ReLU(),
        fc3=nn.Linear(64, 10),
    )
    return nn.Sequential(layers)


def _cnn() -> nn.Sequential:
    layers = OrderedDict(
        conv1=nn.Conv2d(1, 16, 3, padding=1),
        relu1=nn.ReLU(),
        conv2=nn.Conv2d(16, 32, 3, padding=1),
        relu2=nn.ReLU(),
        pool=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc=nn.Linear(32 * 4 * 4, 10),
    )
    return nn.Sequential(layers)


@contextlib.contextmanager
def _deterministic_torch(seed: int, threads: int = 2) -> Iterator[None]:
    # Put the caller's RNG and thread settings back: this also runs inside test processes.
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(threads_before)
            torch.use_deterministic_algorithms(deterministic_before)


def _train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    schedule: _Schedule,
    masks: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> None:
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr)
    model.train()
    for _ in range(schedule.epochs):
        for batch in torch.randperm(len(inputs)).split(BATCH_SIZE):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
            # Adam moves pruned weights through their gradient and momentum; zero them again.
            with torch.no_grad():
                for weight, mask in masks:
                    weight.mul_(mask)
    model.eval()


def _prune_by_magnitude(
    model: nn.Module, sparsity: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero the smallest `sparsity` fraction of each Linear weight; return (weight, mask) pairs."""
    masks = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                weight = module.weight
                # topk keeps exactly the intended count even when magnitudes tie.
                keep = weight.numel() - round(sparsity * weight.numel())
                mask = torch.zeros(weight.numel())
                mask[weight.abs().flatten().topk(keep).indices] = 1.0
                mask = mask.view_as(weight)
                weight.mul_(mask)
                masks.append((weight, mask))
    return masks


def _export(model: nn.Module, spec: _Variant) -> bytes:
    buffer = io.BytesIO()
    # The legacy TorchScript exporter: the dynamo one needs onnxscript, which is not a
    # dependency, and these graphs need nothing it adds. torch 2.13 deprecates the legacy
    # path with two DeprecationWarnings we can do nothing about; pytest turns them into errors.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning
        )
        warnings.filterwarnings(
            "ignore", "The feature will be removed. Please remove usage", DeprecationWarning
        )
        torch.onnx.export(
            model,
            (torch.zeros(1, *spec.sample_shape),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[spec.input_name],
            output_names=["logits"],
            dynamic_axes={spec.input_name: {0: "batch"}, "logits": {0: "batch"}},
        )
    return buffer.getvalue()


def _onnx_logits(onnx_bytes: bytes, input_name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {input_name: x})[0]


def _weight_sparsity(model: nn.Module) -> list[LayerSparsity]:
    layers = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            weight = module.weight.detach()
            nonzero = int(weight.count_nonzero())
            layers.append(
                LayerSparsity(
                    name=f"{module_name}.weight",
                    shape=list(weight.shape),
                    parameters=weight.numel(),
                    nonzero=nonzero,
                    sparsity=1.0 - nonzero / weight.numel(),
                )
            )
    return layers


def _publish(
    repository: Path,
    spec: _Variant,
    model: nn.Module,
    split: DigitsSplit,
    recipe: dict[str, object],
    baseline_accuracy: float | None = None,
) -> float:
    """Export, verify against torch, write model and manifest; return the ONNX test accuracy."""
    onnx_bytes = _export(model, spec)
    x_test = split.x_test.reshape(-1, *spec.sample_shape)
    logits = _onnx_logits(onnx_bytes, spec.input_name, x_test)
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test)).numpy()
    difference = float((np.abs(logits - expected) / np.maximum(np.abs(expected), 1.0)).max())
    if difference > EXPORT_TOLERANCE:
        raise RuntimeError(f"{spec.name}: onnxruntime differs from torch by {difference:.2e}")
    accuracy = float((logits.argmax(axis=1) == split.y_test).mean())

    layers = _weight_sparsity(model)
    weights = sum(layer.parameters for layer in layers)
    manifest = VariantManifest(
        family=spec.family,
        variant=spec.variant,
        baseline=spec.baseline,
        task=Task.classification,
        description=spec.description,
        method=spec.method,
        created=datetime.now(UTC),
        parameters=sum(p.numel() for p in model.parameters()),
        nonzero_parameters=sum(int(p.count_nonzero()) for p in model.parameters()),
        sparsity=1.0 - sum(layer.nonzero for layer in layers) / weights,
        layers=layers,
        file_bytes=len(onnx_bytes),
        quality=[
            Quality(
                metric="accuracy",
                value=accuracy,
                dataset=split.test_dataset,
                samples=len(split.y_test),
                baseline_value=baseline_accuracy,
            )
        ],
        recipe=recipe,
    )

    model_dir = repository / spec.name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    # A polling server must never load half a model.onnx, so the file appears by rename
    # and last, after the manifest that describes it.
    partial = version_dir / f".model.onnx.{os.getpid()}.tmp"
    try:
        partial.write_bytes(onnx_bytes)
        manifest.write(model_dir / MANIFEST_FILENAME)
        os.replace(partial, version_dir / "model.onnx")
    finally:
        partial.unlink(missing_ok=True)
    return accuracy


def build_demo_repository(repository: Path, *, seed: int = 0) -> list[str]:
    """Train, export and write the demo models into `repository`; return their model names."""
    split = load_digits_split(seed)
    common = {"optimizer": "adam", "batch_size": BATCH_SIZE, "seed": seed}
    repository.mkdir(parents=True, exist_ok=True)

    def report(spec: _Variant, schedule: _Schedule, started: float, accuracy: float) -> None:
        seconds = time.perf_counter() - started
        print(
            f"{spec.name}: {schedule.epochs} epochs, {seconds:.1f} s, test accuracy {accuracy:.4f}",
            flush=True,
        )

    with _deterministic_torch(seed):
        started = time.perf_counter()
        mlp = _mlp()
        _train(mlp, split.x_train, split.y_train, MLP_SCHEDULE)
        recipe: dict[str, object] = {**asdict(MLP_SCHEDULE), **common}
        dense_accuracy = _publish(repository, MLP_DENSE, mlp, split, recipe)
        report(MLP_DENSE, MLP_SCHEDULE, started, dense_accuracy)

        # Prunes the dense model just published, in place: the pruned variant starts from it.
        started = time.perf_counter()
        masks = _prune_by_magnitude(mlp, TARGET_SPARSITY)
        _train(mlp, split.x_train, split.y_train, FINE_TUNE_SCHEDULE, masks)
        recipe = {
            "start": MLP_DENSE.name,
            "target_sparsity": TARGET_SPARSITY,
            "scope": "each Linear weight, one-shot",
            "fine_tune": {**asdict(FINE_TUNE_SCHEDULE), **common},
        }
        accuracy = _publish(repository, MLP_PRUNED, mlp, split, recipe, dense_accuracy)
        report(MLP_PRUNED, FINE_TUNE_SCHEDULE, started, accuracy)

        started = time.perf_counter()
        cnn = _cnn()
        _train(cnn, split.x_train.reshape(-1, 1, 8, 8), split.y_train, CNN_SCHEDULE)
        recipe = {**asdict(CNN_SCHEDULE), **common}
        accuracy = _publish(repository, CNN_DENSE, cnn, split, recipe)
        report(CNN_DENSE, CNN_SCHEDULE, started, accuracy)
    return [MLP_DENSE.name, MLP_PRUNED.name, CNN_DENSE.name]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the demo repository."""
    parser = argparse.ArgumentParser(
        prog="python -m sparseserve.sparsify.demo_models",
        description="Train the digits demo models and write them into a model repository.",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("models"),
        help="model repository to write into (default: ./models)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    args = parser.parse_args(argv)
    names = build_demo_repository(args.repository, seed=args.seed)
    print(f"wrote {', '.join(names)} to {args.repository}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
