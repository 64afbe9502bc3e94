"""Run a recipe: train the base, build every variant, measure it, write it to a repository.

Every variant is measured the way it will be served: the quality in its manifest
(accuracy, or cosine to the baseline's embeddings) is computed on onnxruntime's outputs of
the exported file, not torch's; a bf16 variant (a `precision` step) on OpenVINO's at bf16.
Manifests are written last, once the baseline's numbers are known, each model file
appearing after its manifest.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from sparseserve.repository.eval_data import EVAL_DATA_FILENAME, write_eval_data
from sparseserve.repository.manifest import ActivationSparsity, Quality, Task, VariantManifest
from sparseserve.repository.measure import gzip_size
from sparseserve.sparsify.activations import activation_sparsity
from sparseserve.sparsify.catalog import (
    Architecture,
    LabelledData,
    architecture,
    import_catalog,
    load_data,
)
from sparseserve.sparsify.distill import DistillConfig, resolve_device
from sparseserve.sparsify.export import (
    export_onnx,
    max_relative_difference,
    run_onnx,
    run_torch,
    sparse_storage,
    weight_sparsity,
    write_variant,
)
from sparseserve.sparsify.precision import (
    PrecisionConfig,
    PrecisionUnavailable,
    bf16_unavailable,
    run_openvino,
)
from sparseserve.sparsify.prune import bake
from sparseserve.sparsify.quality import (
    accuracy,
    classification_quality,
    embedding_quality,
    summary,
)
from sparseserve.sparsify.recipe import (
    Feed,
    Progress,
    Recipe,
    RecipeError,
    Rows,
    Stage,
    StepConfig,
    StepContext,
    TrainingData,
    VariantSpec,
    dump_step,
    feeds,
    handler_for,
    head,
    load_recipe,
)

log = logging.getLogger(__name__)

# A correct export differs from torch only by float32 summation order (and BatchNorm
# folded into the convolution): relative for outputs above 1 in magnitude, absolute below.
EXPORT_TOLERANCE = 1e-4


@dataclass
class BuiltVariant:
    """A variant written to the repository."""

    name: str
    manifest: VariantManifest
    directory: Path


@dataclass
class _Variant:
    spec: VariantSpec
    model: nn.Module  # baked: masks applied, parametrizations gone
    onnx_model: bytes
    outputs: np.ndarray  # onnxruntime's, on the test inputs
    torch_outputs: np.ndarray  # torch's, of the exported model, on the same inputs
    source_outputs: np.ndarray | None = None  # onnxruntime's on the held-out source
    source_torch_outputs: np.ndarray | None = None
    torch_steps: list[dict[str, Any]] = field(default_factory=list)  # lineage, with reports
    steps: list[dict[str, Any]] = field(default_factory=list)  # torch_steps + own ONNX steps
    labels: list[str] = field(default_factory=list)
    quantization: str | None = None
    precision: Literal["fp32", "bf16"] = "fp32"  # what `outputs` were computed at
    sparse_tensors: list[str] = field(default_factory=list)
    export_difference: float = 0.0
    seconds: float = 0.0
    # Why the variant is not written (an optional precision this CPU cannot run).
    skipped: str | None = None


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int = 1) -> Iterator[None]:
    """Seeded, deterministic torch; the caller's RNG and thread settings come back after
    (this also runs inside test processes). `threads` 0 keeps torch's setting.

    One thread by default: the digits models are tiny, and on a shared 2-core machine two
    torch threads spin against each other (a CNN epoch took 0.29 s on one thread, 11.6 s
    on two).
    """
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if threads > 0:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(threads_before)
            torch.use_deterministic_algorithms(deterministic_before)


def _run_torch_steps(
    model: nn.Module, steps: Sequence[StepConfig], context: StepContext
) -> list[dict[str, Any]]:
    done = []
    for index, config in enumerate(steps):
        if config.stage is not Stage.torch:
            continue
        started = time.perf_counter()
        # Each step its own checkpoint folder: a resumed build finds its place by it.
        folder = context.checkpoint_dir
        step_context = replace(
            context, checkpoint_dir=folder / f"{index}-{config.step}" if folder else None
        )
        report = handler_for(config, Stage.torch)(model, config, step_context)
        report["seconds"] = round(time.perf_counter() - started, 3)
        done.append({**dump_step(config), "report": report})
    return done


class FamilyBuilder:
    """Builds the variants of one recipe; `build()` then `write(repository)`."""

    def __init__(
        self,
        recipe: Recipe,
        progress: Progress = print,
        source: str | None = None,
        threads: int | None = None,
        *,
        checkpoints: Path | None = None,
        progress_bar: bool = False,
        distill_precision: str | None = None,
    ):
        self.recipe = recipe
        self.checkpoints = checkpoints
        self.progress_bar = progress_bar
        self.distill_precision = distill_precision
        self.progress = progress
        self.source = source
        self.architecture: Architecture = architecture(recipe.base.architecture)
        self.threads = self.architecture.torch_threads if threads is None else threads
        self.labelled: LabelledData = load_data(recipe.data, self.architecture)
        x_train = self._shaped(self.labelled.x_train)
        # Rows go through the models in one batch; text comes in the source's batches.
        self.test_feeds: list[Feed] = feeds(
            self._shaped(self.labelled.x_test), self.architecture.input_name
        )
        # Text of a source never trained on, measured on its own (english-mix).
        self.source_feeds: list[Feed] | None = None
        if self.labelled.x_test_source is not None:
            self.source_feeds = feeds(
                self._shaped(self.labelled.x_test_source), self.architecture.input_name
            )
        self.data = TrainingData(
            x_train=x_train,
            y_train=self.labelled.y_train,
            x_calibration=head(x_train, recipe.data.calibration_samples),
            seed=recipe.data.seed,
            x_heldout=self._shaped(self.labelled.x_test),
        )
        self.variants: dict[str, _Variant] = {}
        # Variants this machine cannot measure at their precision, and why (optional ones).
        self.unavailable: dict[str, str] = self._check_precisions()
        self._torch_models: dict[str, nn.Module] = {}
        self._base_steps: list[dict[str, Any]] = []
        self._base: nn.Module | None = None

    def _check_precisions(self) -> dict[str, str]:
        """Check, before anything is trained, that this CPU can run every variant at its
        precision: a required one stops the build now (not after hours of distillation);
        an optional one is skipped, with a warning. Returns the skipped ones, with why."""
        unavailable: dict[str, str] = {}
        reason: str | None = None
        checked = False
        for spec in self.recipe.variants:
            for config in spec.steps:
                if not isinstance(config, PrecisionConfig):
                    continue
                if not checked:
                    reason, checked = bf16_unavailable(), True
                if reason is None:
                    continue
                name = f"{self.recipe.family}.{spec.name}"
                if not config.optional:
                    raise PrecisionUnavailable(
                        f"{name}: cannot build a {config.dtype} variant here: {reason}. Build "
                        f"it on a CPU that computes {config.dtype}, or mark its step "
                        f"`precision: {{dtype: {config.dtype}, optional: true}}` to skip it "
                        "on CPUs that do not"
                    )
                unavailable[spec.name] = reason
                warning = f"skipped, its precision step is optional: {reason}"
                log.warning("%s: %s", name, warning)
                self.progress(f"[{name}] WARNING: {warning}")
        return unavailable

    def _shaped(self, rows: Rows) -> Rows:
        """A one-input model's rows in its declared sample shape (digits' 64 pixels as
        1x8x8 for the CNN). The values per row must be the shape's: reshaping 30 values
        to 15 would silently make two rows of each."""
        inputs = self.architecture.inputs
        if not isinstance(rows, np.ndarray) or len(inputs) != 1:
            return rows
        spec = inputs[0]
        per_row = math.prod(rows.shape[1:])
        fixed = [d for d in spec.sample_shape if d is not None]
        if len(fixed) == len(spec.sample_shape) and per_row != math.prod(fixed):
            raise RecipeError(
                f"base.architecture {self.architecture.name!r} declares input {spec.name!r} "
                f"of shape {fixed} ({math.prod(fixed)} values a "
                f"sample), but the data source {self.recipe.data.source!r} gives rows of "
                f"shape {list(rows.shape[1:])} ({per_row} values): make ModelInput's "
                "sample_shape the shape of one row, without the batch dimension"
            )
        return np.ascontiguousarray(rows.reshape(-1, *spec.sample_shape))

    def _context(self, prefix: str, variant: str | None = None) -> StepContext:
        folder = None
        if self.checkpoints is not None:
            folder = self.checkpoints / self.recipe.family / (variant or "base")
        return StepContext(
            data=self.data,
            progress=lambda line: self.progress(f"[{prefix}] {line}"),
            input_name=self.architecture.input_name,
            teacher=self._base,
            checkpoint_dir=folder,
            progress_bar=self.progress_bar,
            distill_precision=self.distill_precision,
        )

    def build(self) -> FamilyBuilder:
        """Train the base and build every variant in memory."""
        recipe = self.recipe
        with deterministic_torch(recipe.data.seed, self.threads):
            started = time.perf_counter()
            base = self.architecture.build()
            self._check_forward(base)
            self._base_steps = _run_torch_steps(
                base, recipe.base.steps, self._context(f"{recipe.family} base")
            )
            self.progress(f"[{recipe.family} base] ready in {time.perf_counter() - started:.1f} s")
            self._base = base.eval()  # the teacher of every distillation
            for spec in recipe.variants:
                self._build_variant(spec, base)
        return self

    def _check_forward(self, model: nn.Module) -> None:
        """One test batch through the untrained model, so that a model the pipeline
        cannot drive fails now, saying what it must do, not minutes later in torch's
        words: forward takes the architecture's inputs positionally, in their order, and
        returns one tensor (its `output_name`)."""
        architecture = self.architecture
        feed = {name: array[:2] for name, array in self.test_feeds[0].items()}
        declared = ", ".join(f"{i.name} {list(i.sample_shape)}" for i in architecture.inputs)
        what = f"base.architecture {architecture.name!r}"
        shapes = ", ".join(f"{name} {list(array.shape)}" for name, array in feed.items())
        was_training = model.training
        try:
            with torch.no_grad():
                output = model.eval()(*(torch.from_numpy(value) for value in feed.values()))
        except (TypeError, RuntimeError, ValueError, IndexError) as exc:
            raise RecipeError(
                f"{what}: its forward cannot take one batch of the data source "
                f"{self.recipe.data.source!r} ({shapes}): {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. forward "
                "takes the architecture's "
                f"inputs ({declared}) positionally, in that order, each with a batch "
                "dimension first"
            ) from exc
        finally:
            model.train(was_training)
        if not isinstance(output, torch.Tensor):
            raise RecipeError(
                f"{what}: its forward returned a {type(output).__name__}; it must return one "
                f"tensor, the output {architecture.output_name!r} (the logits of a "
                "classifier, the embedding of an encoder): wrap the model to pick it"
            )
        rows = len(next(iter(feed.values())))
        labels = self.labelled.y_train
        classes = int(labels.max()) + 1 if labels is not None and len(labels) else 0
        if (
            architecture.task is Task.classification
            and output.ndim == 2
            and (output.shape[1] < classes)
        ):
            raise RecipeError(
                f"{what}: its forward returns {output.shape[1]} logits a sample, but the data "
                f"source {self.recipe.data.source!r} has {classes} classes (labels 0 to "
                f"{classes - 1}): its last layer needs {classes} outputs"
            )
        if output.ndim != 2 or output.shape[0] != rows:
            per = "classes" if architecture.task is Task.classification else "features"
            raise RecipeError(
                f"{what}: its forward returned shape {list(output.shape)} for {rows} samples "
                f"({shapes}); it must return [samples, {per}]"
                + (
                    " (is the batch dimension in ModelInput's sample_shape?)"
                    if output.ndim > 2
                    else ""
                )
            )

    def _build_variant(self, spec: VariantSpec, base: nn.Module) -> None:
        started = time.perf_counter()
        name = f"{self.recipe.family}.{spec.name}"
        parent = self.variants.get(spec.parent) if spec.parent else None
        model = copy.deepcopy(self._torch_models[spec.parent] if spec.parent else base)
        # Each variant its own seed: its numbers do not depend on which variants came before.
        torch.manual_seed(self.recipe.data.seed + zlib.crc32(spec.name.encode()))
        context = self._context(name, spec.name)
        # A child starts from its parent's torch model: it inherits the parent's torch steps,
        # not its quantization (ONNX steps act on the parent's export only).
        torch_steps = [
            *(parent.torch_steps if parent else []),
            *_run_torch_steps(model, spec.steps, context),
        ]
        steps = list(torch_steps)
        self._torch_models[spec.name] = model

        exported = copy.deepcopy(model)
        bake(exported)
        exported.eval()
        arch = self.architecture
        onnx_model = export_onnx(
            exported,
            {key: value[:2] for key, value in self.test_feeds[0].items()},
            arch.output_name,
            dynamic_axes=arch.dynamic_axes(),
            exporter=self.recipe.export.exporter,
            opset=self.recipe.export.opset,
        )
        # Checked on every test batch: other batch sizes (and sequence lengths) than the
        # two rows it was traced with.
        expected = run_torch(exported, self.test_feeds)
        outputs = run_onnx(onnx_model, self.test_feeds)
        difference = max_relative_difference(outputs, expected)
        if difference > EXPORT_TOLERANCE:
            raise RuntimeError(f"{name}: onnxruntime differs from torch by {difference:.2e}")

        skipped = self.unavailable.get(spec.name)
        quantization = None
        precision: Literal["fp32", "bf16"] = "fp32"
        for config in spec.steps:
            if config.stage is Stage.onnx and skipped is None:
                onnx_model, report = handler_for(config, Stage.onnx)(onnx_model, config, context)
                steps.append({**dump_step(config), "report": report})
                if isinstance(config, PrecisionConfig):
                    precision = config.dtype  # the file is unchanged
                    continue
                quantization = config.label()
                outputs = run_onnx(onnx_model, self.test_feeds)
        sparse_tensors: list[str] = []
        if self.recipe.export.sparse_storage:
            compact, sparse_tensors = sparse_storage(onnx_model)
            if sparse_tensors:
                if not np.array_equal(run_onnx(compact, self.test_feeds), outputs):
                    raise RuntimeError(f"{name}: sparse storage changed the outputs")
                onnx_model = compact
        if precision != "fp32":  # measured as served: on OpenVINO, at that precision
            outputs = run_openvino(onnx_model, self.test_feeds, precision)
        source_outputs = source_torch = None
        if self.source_feeds:
            source_outputs = (
                run_onnx(onnx_model, self.source_feeds)
                if precision == "fp32"
                else run_openvino(onnx_model, self.source_feeds, precision)
            )
            if spec.name == self.recipe.baseline:  # its rows say how exact the export is
                source_torch = run_torch(exported, self.source_feeds)
        self.variants[spec.name] = _Variant(
            spec=spec,
            source_outputs=source_outputs,
            source_torch_outputs=source_torch,
            model=exported,
            onnx_model=onnx_model,
            outputs=outputs,
            torch_outputs=expected,
            torch_steps=torch_steps,
            steps=steps,
            labels=[c.label() for c in self._lineage_configs(spec)],
            quantization=quantization,
            precision=precision,
            sparse_tensors=sparse_tensors,
            export_difference=difference,
            seconds=time.perf_counter() - started,
            skipped=skipped,
        )
        if skipped is not None:
            self.progress(f"[{name}] not measured and not written: {skipped}")
            return
        self.progress(
            f"[{name}] built in {time.perf_counter() - started:.1f} s, {len(onnx_model):,} "
            f"bytes, {summary(arch.task, outputs, self.labelled.y_test)}"
        )

    def _lineage_configs(self, spec: VariantSpec) -> list[StepConfig]:
        chain: list[VariantSpec] = []
        current: VariantSpec | None = spec
        by_name = {v.name: v for v in self.recipe.variants}
        while current is not None:
            chain.append(current)
            current = by_name[current.parent] if current.parent else None
        ancestors = [c for v in reversed(chain[1:]) for c in v.steps if c.stage is Stage.torch]
        return [*ancestors, *spec.steps]

    def _quality(self, variant: _Variant, baseline: _Variant) -> list[Quality]:
        dataset = self.labelled.test_description
        is_baseline = variant is baseline
        if self.architecture.task is Task.embedding:
            if is_baseline:  # its fidelity to itself is 1: say how exact the export is
                dataset = f"{dataset}; the ONNX export against torch"
            reference = variant.torch_outputs if is_baseline else baseline.outputs
            rows = embedding_quality(variant.outputs, reference, dataset)
            if variant.source_outputs is not None:
                source = self.labelled.test_source_description
                if is_baseline:
                    source = f"{source}; the ONNX export against torch"
                against = variant.source_torch_outputs if is_baseline else baseline.source_outputs
                assert against is not None  # every variant ran on the same feeds
                rows += embedding_quality(variant.source_outputs, against, source)
            return rows
        labels = self.labelled.y_test
        baseline_result: tuple[np.ndarray, float] | None = None
        if not is_baseline and labels is not None:
            baseline_result = (baseline.outputs, accuracy(baseline.outputs, labels))
        return classification_quality(variant.outputs, labels, dataset, baseline_result)

    def manifest(self, variant: _Variant) -> VariantManifest:
        """The manifest of a built variant, measured against the recipe's baseline."""
        recipe, arch = self.recipe, self.architecture
        baseline = self.variants[recipe.baseline]
        is_baseline = variant is baseline
        layers = weight_sparsity(variant.model)
        weights = sum(layer.parameters for layer in layers)
        sparsity = 1.0 - sum(layer.nonzero for layer in layers) / weights
        activations = activation_sparsity(variant.model, self.test_feeds)
        return VariantManifest(
            family=recipe.family,
            variant=variant.spec.name,
            baseline=None if is_baseline else f"{recipe.family}.{recipe.baseline}",
            task=arch.task,
            description=variant.spec.description or self.recipe.description or arch.description,
            method=" + ".join(variant.labels) or "dense",
            created=datetime.now(UTC),
            parameters=sum(p.numel() for p in variant.model.parameters()),
            nonzero_parameters=sum(int(p.count_nonzero()) for p in variant.model.parameters()),
            sparsity=sparsity,
            layers=layers,
            quantization=variant.quantization,
            precision=variant.precision,
            file_bytes=len(variant.onnx_model),
            gzip_bytes=gzip_size(variant.onnx_model),
            activation_sparsity=[
                ActivationSparsity(name=name, zero_fraction=value)
                for name, value in activations.items()
            ],
            quality=self._quality(variant, baseline),
            notes=self._notes(variant, sparsity),
            recipe={
                "source": self.source,
                "architecture": recipe.base.architecture,
                "base_steps": self._base_steps,
                "data": recipe.data.model_dump(mode="json"),
                "from": variant.spec.parent,
                "steps": variant.steps,
                "export": {
                    **recipe.export.model_dump(mode="json"),
                    "sparse_initializers": variant.sparse_tensors,
                    "max_difference_to_torch": variant.export_difference,
                },
                "build_seconds": round(variant.seconds, 2),
            },
        )

    def _notes(self, variant: _Variant, sparsity: float) -> list[str]:
        notes = []
        if variant.sparse_tensors:
            notes.append(
                f"{len(variant.sparse_tensors)} weight tensor(s) stored as ONNX sparse "
                "initializers (values + int64 indices): a smaller file; onnxruntime makes "
                "them dense when it loads the model, so memory and latency are as dense"
            )
        elif sparsity > 0.01:
            notes.append(
                f"{sparsity:.0%} of the weights are zero but stored densely (sparse storage "
                "would be larger at this sparsity): the file only shrinks under gzip"
            )
        if sparsity > 0.01:
            notes.append(
                "onnxruntime's CPU kernels multiply the zeros like any other number: "
                "unstructured and 2:4 sparsity do not change CPU latency"
            )
        if variant.quantization and variant.quantization != "fp16":
            notes.append("per-layer sparsity is of the float weights before quantization")
        if variant.precision != "fp32":
            notes.append(
                f"runs at {variant.precision} on OpenVINO (the precision step leaves the file "
                f"unchanged): its quality was measured there, at {variant.precision}; "
                f"onnxruntime has no {variant.precision} CPU kernels and would run it at fp32"
            )
        return notes

    def write(self, repository: Path) -> list[BuiltVariant]:
        """Write every built variant's model and manifest into `repository`."""
        repository.mkdir(parents=True, exist_ok=True)
        built = []
        for variant in self.variants.values():
            if variant.skipped is not None:
                continue
            manifest = self.manifest(variant)
            name = f"{manifest.family}.{manifest.variant}"
            directory = write_variant(repository, name, variant.onnx_model, manifest)
            built.append(BuiltVariant(name, manifest, directory))
            if variant.spec.name == self.recipe.baseline:
                self._write_eval_data(directory / EVAL_DATA_FILENAME)
        return built

    def _write_eval_data(self, path: Path) -> None:
        """A sample of the test rows beside the baseline's manifest, for `sparseserve
        compare`. Only for one-input models fed from one array: text comes as batches
        of differing sequence lengths, which one array per input cannot hold."""
        rows = self._shaped(self.labelled.x_test)
        if not isinstance(rows, np.ndarray):
            return
        write_eval_data(
            path,
            {self.architecture.input_name: rows},
            self.labelled.test_description,
            self.labelled.y_test,
        )


def build_family(
    recipe: Recipe | Path,
    repository: Path,
    *,
    progress: Progress = print,
    seed: int | None = None,
    threads: int | None = None,
    checkpoints: Path | None = None,
    progress_bar: bool = False,
    distill_precision: str | None = None,
) -> list[BuiltVariant]:
    """Build every variant of a recipe (a `Recipe` or a YAML path) into `repository`.

    `threads`: torch threads while building (0: torch's default; None: what the
    architecture asks for). `checkpoints`: a folder where training steps keep resumable
    checkpoints (a rerun of an interrupted build continues from them; removed once the
    build is written). `progress_bar`: live bars on a terminal's stderr.
    `distill_precision` ("auto", "fp32", "bf16") overrides every distill step's.
    """
    source, directory = None, Path.cwd()
    if isinstance(recipe, Path):
        source, directory = recipe.name, recipe.resolve().parent
        recipe = load_recipe(recipe)
    import_catalog(recipe.catalog, directory)
    if seed is not None:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"seed": seed})})
    for config in _distill_configs(recipe):
        resolve_device(config.device)  # `device: cuda` without a GPU fails now, not at minute 20
    builder = FamilyBuilder(
        recipe,
        progress,
        source,
        threads,
        checkpoints=checkpoints,
        progress_bar=progress_bar,
        distill_precision=distill_precision,
    )
    built = builder.build().write(repository)
    if checkpoints is not None:
        # Written: the checkpoints of this family have served their purpose.
        shutil.rmtree(checkpoints / recipe.family, ignore_errors=True)
    return built


def _distill_configs(value: object) -> Iterator[DistillConfig]:
    """Every distill config in a recipe, the ones nested in other steps too."""
    if isinstance(value, DistillConfig):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _distill_configs(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _distill_configs(item)
