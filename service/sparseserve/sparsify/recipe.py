"""Recipes: a base model, a data source and, per variant, an ordered list of steps.

A step is a pydantic config (``extra="forbid"``, bounded fields, enums for structure)
tied to a handler by `register_step`, the shape of torchao's ``quantize_(model, config,
filter_fn)``: the config says *what*, the registered handler does it, and `apply` runs
any step on any model from Python without a recipe. Modules add steps by registering
them; `load_recipe` imports the modules named in `STEP_MODULES` first (an explicit
list, not discovery, so a broken module fails loudly).

In YAML a step is a one-key mapping, keyed by the step's name::

    steps:
      - gradual_prune: {final_sparsity: 0.9, epochs: 20}
      - train: {epochs: 10, lr: 0.001}

This module imports neither torch nor onnx: a recipe can be validated anywhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from torch import nn

RECIPE_VERSION: Literal[1] = 1
# Modules whose import registers steps. A module that adds steps appends itself here.
STEP_MODULES = (
    "sparseserve.sparsify.train",
    "sparseserve.sparsify.prune",
    "sparseserve.sparsify.structured",
    "sparseserve.sparsify.quantize",
    "sparseserve.sparsify.transformer",
    "sparseserve.sparsify.distill",
    "sparseserve.sparsify.encoder_gradual",
    "sparseserve.sparsify.precision",
)

Sparsity = Annotated[float, Field(ge=0.0, lt=1.0)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)]


class RecipeError(ValueError):
    """A recipe that does not parse or does not validate; the message names the field."""


class Stage(StrEnum):
    """Where a step runs: on the torch model, or on the exported ONNX file."""

    torch = "torch"
    onnx = "onnx"


class StepConfig(BaseModel):
    """Base of every step's configuration. Subclasses set `step` (the YAML key)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)
    step: ClassVar[str]
    stage: ClassVar[Stage] = Stage.torch
    # The field a plain value stands for in YAML: with "dtype", ``precision: bf16`` is
    # ``precision: {dtype: bf16}``. None: the step takes a mapping only.
    shorthand: ClassVar[str | None] = None

    def label(self) -> str:
        """A short description for the manifest's `method` ("gradual_prune 90%", ...)."""
        return self.step


FilterFn = Callable[["nn.Module", str], bool]
Progress = Callable[[str], None]


def silent(_: str) -> None:
    pass


# One batch of named model inputs, in the model's input order (token ids and masks...).
Feed = dict[str, np.ndarray]
# Model input: rows of the model's one input (shaped for it), or batches of named inputs.
# Text comes as batches because each batch is padded only to its own longest sequence.
Rows = np.ndarray | list[Feed]


def row_count(rows: Rows) -> int:
    """How many samples `rows` holds."""
    if isinstance(rows, np.ndarray):
        return len(rows)
    return sum(len(next(iter(feed.values()))) for feed in rows)


def head(rows: Rows, count: int) -> Rows:
    """The first `count` rows; of batches, the first batches that hold `count` rows."""
    if isinstance(rows, np.ndarray):
        return rows[:count]
    taken: list[Feed] = []
    for feed in rows:
        if row_count(taken) >= count:
            break
        taken.append(feed)
    return taken


def feeds(
    rows: np.ndarray | Sequence[Feed], input_name: str, batch_size: int | None = None
) -> list[Feed]:
    """`rows` as batches of named inputs: rows become ``{input_name: rows[i:i+batch_size]}``
    (one batch if `batch_size` is None); batches stay as they are."""
    if not isinstance(rows, np.ndarray):
        return list(rows)
    size = batch_size or max(1, len(rows))
    return [{input_name: rows[start : start + size]} for start in range(0, len(rows), size)]


@dataclass
class TrainingData:
    """What steps that train or calibrate may use, already shaped for the model.

    `x_heldout` is data a step may measure on (a distillation reports how close it came
    on it) but never train on. Unlabelled data (text for an embedder) has no `y_train`.
    """

    x_train: Rows
    y_train: np.ndarray | None
    x_calibration: Rows
    seed: int = 0
    x_heldout: Rows | None = None


@dataclass
class StepContext:
    """What a handler gets besides the model and its config."""

    data: TrainingData | None = None
    filter_fn: FilterFn | None = None
    progress: Progress = silent
    input_name: str = "input"
    teacher: nn.Module | None = None  # the family's base model, for distillation
    # Where a training step keeps its resumable checkpoints (None: it keeps none).
    checkpoint_dir: Path | None = None
    # A live progress bar on stderr (a terminal only) besides the progress lines.
    progress_bar: bool = False
    # Overrides every distill step's `precision` ("auto", "fp32", "bf16"): the CLI switch.
    distill_precision: str | None = None


StepReport = dict[str, Any]
C = TypeVar("C", bound=StepConfig)
TorchHandler = Callable[["nn.Module", Any, StepContext], StepReport]
OnnxHandler = Callable[[bytes, Any, StepContext], tuple[bytes, StepReport]]


@dataclass
class _Registry:
    types: dict[str, type[StepConfig]] = field(default_factory=dict)
    handlers: dict[type[StepConfig], Callable[..., Any]] = field(default_factory=dict)


_REGISTRY = _Registry()


def register_step(config_type: type[C]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: `config_type`'s steps are run by the decorated handler.

    A torch-stage handler is ``(model, config, context) -> report`` and changes the model
    in place; an ONNX-stage one is ``(onnx_bytes, config, context) -> (bytes, report)``.
    """
    name = config_type.step

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        existing = _REGISTRY.types.get(name)
        if existing is not None and existing is not config_type:
            raise ValueError(f"step {name!r} is already registered by {existing.__qualname__}")
        _REGISTRY.types[name] = config_type
        _REGISTRY.handlers[config_type] = handler
        return handler

    return decorate


def register_builtin_steps() -> None:
    """Import the modules of `STEP_MODULES` (which register their steps)."""
    for module in STEP_MODULES:
        importlib.import_module(module)


def step_types() -> dict[str, type[StepConfig]]:
    """Every registered step, by name."""
    return dict(_REGISTRY.types)


def handler_for(config: StepConfig, stage: Stage) -> Callable[..., Any]:
    """The registered handler of `config`, which must run at `stage`."""
    handler = _REGISTRY.handlers.get(type(config))
    if handler is None:
        raise RecipeError(f"no handler is registered for {type(config).__qualname__}")
    if config.stage is not stage:
        raise RecipeError(f"step {config.step!r} runs on the {config.stage} model, not {stage}")
    return handler


def apply(
    model: nn.Module,
    config: StepConfig,
    filter_fn: FilterFn | None = None,
    *,
    data: TrainingData | None = None,
    progress: Progress = silent,
    input_name: str = "input",
    teacher: nn.Module | None = None,
) -> StepReport:
    """Run one torch step on `model` in place; `filter_fn(module, fqn)` picks the modules.

    ``apply(model, MagnitudePruneConfig(sparsity=0.9))`` is the Python API of the recipe
    step ``magnitude_prune: {sparsity: 0.9}``. Returns what the step measured. `teacher`
    is the model a ``distill`` step trains towards (in a recipe: the family's base).
    """
    context = StepContext(
        data=data, filter_fn=filter_fn, progress=progress, input_name=input_name, teacher=teacher
    )
    report: StepReport = handler_for(config, Stage.torch)(model, config, context)
    return report


def apply_onnx(
    onnx_model: bytes,
    config: StepConfig,
    *,
    data: TrainingData | None = None,
    input_name: str = "input",
) -> tuple[bytes, StepReport]:
    """Run one ONNX-stage step (quantization) on a serialized model; return the new one."""
    context = StepContext(data=data, input_name=input_name)
    result: tuple[bytes, StepReport] = handler_for(config, Stage.onnx)(onnx_model, config, context)
    return result


def parse_step(item: object) -> StepConfig:
    """``{"name": {fields}}`` -> the registered config; errors name the step and field."""
    if isinstance(item, StepConfig):
        return item
    if not isinstance(item, Mapping) or len(item) != 1:
        raise ValueError(f"a step is a mapping with one key, the step's name; got {item!r}")
    ((name, fields),) = item.items()
    config_type = _REGISTRY.types.get(name)
    if config_type is None:
        known = ", ".join(sorted(_REGISTRY.types)) or "none registered"
        raise ValueError(f"unknown step {name!r} (known steps: {known})")
    if config_type.shorthand is not None and not isinstance(fields, Mapping | None):
        fields = {config_type.shorthand: fields}
    try:
        return config_type.model_validate(fields or {})
    except ValidationError as exc:
        raise ValueError(_problems(exc, prefix=name)) from None


def dump_step(config: StepConfig) -> dict[str, dict[str, Any]]:
    """The YAML form of a step: ``{name: {fields}}``."""
    return {config.step: config.model_dump(mode="json")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DataConfig(_Strict):
    """Where training, calibration and test data come from."""

    source: Name = Field(description="A data source of sparseserve.sparsify.catalog.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    calibration_samples: int = Field(256, ge=1, le=100_000)
    batch_size: int = Field(
        32, ge=1, le=4096, description="Rows per batch, for sources that batch (text)."
    )
    train_samples: int | None = Field(
        None, ge=1, description="Use only the first N training samples (default: all)."
    )
    test_samples: int | None = Field(
        None, ge=2, description="Measure on only the first N test samples (default: all)."
    )
    heldout_source: Name | None = Field(
        None,
        description="Text sources that mix several (english-mix): one source never trained "
        "on and measured on its own, e.g. fortunes-literature.",
    )
    sort_window_batches: int = Field(
        1,
        ge=1,
        le=4096,
        description="Text sources: sort the shuffled training chunks by length within "
        "windows of this many batches, so each batch pads less (1: no sorting).",
    )


class Exporter(StrEnum):
    legacy = "legacy"  # torch.onnx.export(dynamo=False), TorchScript tracing
    dynamo = "dynamo"  # torch.onnx.export(dynamo=True), needs onnxscript


class ExportConfig(_Strict):
    exporter: Exporter = Exporter.legacy
    opset: int = Field(17, ge=13, le=21)
    sparse_storage: bool = Field(
        True,
        description="Store weights that are at least half zeros as ONNX sparse initializers "
        "(onnxruntime densifies them at load): smaller files, same outputs.",
    )


class BaseSpec(_Strict):
    """The dense starting point: an architecture of the catalog and how to train it."""

    architecture: str = Field(min_length=1, max_length=64)
    steps: list[StepConfig] = Field(default_factory=list)

    @field_validator("steps", mode="before")
    @classmethod
    def _registered_steps(cls, value: object) -> list[StepConfig]:
        return _parse_steps(value)


class VariantSpec(_Strict):
    """One variant: start from the base (or an earlier variant), run its steps in order."""

    name: Name
    parent: Name | None = Field(
        None, alias="from", description="An earlier variant to start from; default the base."
    )
    description: str = ""
    steps: list[StepConfig] = Field(default_factory=list)

    @field_validator("steps", mode="before")
    @classmethod
    def _registered_steps(cls, value: object) -> list[StepConfig]:
        return _parse_steps(value)

    @model_validator(mode="after")
    def _onnx_steps_last(self) -> VariantSpec:
        stages = [step.stage for step in self.steps]
        if Stage.onnx in stages and Stage.torch in stages[stages.index(Stage.onnx) :]:
            raise ValueError(
                "steps: torch steps must come before ONNX steps (quantize runs on the export)"
            )
        return self


class Recipe(_Strict):
    """A YAML recipe: which family to build, from what, and which variants."""

    version: Literal[1] = RECIPE_VERSION
    family: Name
    description: str = ""
    # Python files (relative to the recipe) or modules that register the architecture and
    # data source this recipe names (your own model: docs/sparsify.md).
    catalog: list[str] = Field(default_factory=list, max_length=16)
    base: BaseSpec
    data: DataConfig
    baseline: Name = Field("dense", description="The variant the others are measured against.")
    export: ExportConfig = ExportConfig()
    variants: list[VariantSpec] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _variants_refer_back(self) -> Recipe:
        seen: set[str] = set()
        for index, variant in enumerate(self.variants):
            if variant.name in seen:
                raise ValueError(f"variants.{index}.name: {variant.name!r} appears twice")
            if variant.parent is not None and variant.parent not in seen:
                raise ValueError(
                    f"variants.{index}.from: {variant.parent!r} is not an earlier variant"
                )
            seen.add(variant.name)
        if self.baseline not in seen:
            raise ValueError(f"baseline: {self.baseline!r} is not one of the variants")
        (baseline,) = [v for v in self.variants if v.name == self.baseline]
        if any(step.step == "precision" for step in baseline.steps):
            raise ValueError(
                f"baseline: {self.baseline!r} has a precision step; the baseline is the "
                "fp32 reference every variant is measured against"
            )
        return self

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        data["base"]["steps"] = [dump_step(s) for s in self.base.steps]
        for variant, spec in zip(data["variants"], self.variants, strict=True):
            variant["steps"] = [dump_step(s) for s in spec.steps]
        return yaml.safe_dump(data, sort_keys=False)


def _parse_steps(value: object) -> list[StepConfig]:
    if not isinstance(value, list):
        raise ValueError(f"steps must be a list, got {type(value).__name__}")
    steps = []
    for index, item in enumerate(value):
        try:
            steps.append(parse_step(item))
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}") from None
    return steps


def _problems(exc: ValidationError, prefix: str = "") -> str:
    """One "field.path: message" per error (checks across fields name their field)."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def parse_recipe(data: object, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; raise `RecipeError` naming each bad field."""
    register_builtin_steps()
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: invalid recipe: {_problems(exc)}") from None


def load_recipe(path: Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from exc
    return parse_recipe(data, str(path))
