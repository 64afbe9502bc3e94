"""Structured pruning of BERT-style encoders: remove FFN neurons and attention heads.

Unlike zeroing weights, this makes the matrices smaller, so the exported ONNX graph has
smaller shapes and onnxruntime does less work. Two kinds of unit are removed, per layer:

- an FFN intermediate neuron *i*: row *i* of ``intermediate.dense`` and column *i* of
  ``output.dense``;
- an attention head *h*: its rows of the query, key and value projections and its
  columns of ``attention.output.dense``; the layer's head count shrinks with it.

Which units go is decided by an importance score (`Importance`). The code works on the
module structure of Hugging Face's ``BertModel`` (``encoder.layer[i].attention.self.query``
...) by duck typing, so it imports neither transformers nor anything it does not need.
A layer always keeps at least one neuron and one head: an empty matrix has no ONNX shape.

In a recipe this is the ``encoder_prune`` step::

    - encoder_prune: {ffn_fraction: 0.5, head_fraction: 0.25, importance: activation}

Activation importance is measured on the recipe's calibration batches.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from sparseserve.sparsify.distill import DistillConfig, distill_with_context
from sparseserve.sparsify.encoder import (
    TEACHER_LAYERS_ATTRIBUTE,
    bert_of,
    calibration_batches,
    encoder_layers,
    run_batches,
    standing_layers,
    uniform_layer_map,
)
from sparseserve.sparsify.recipe import (
    RecipeError,
    StepConfig,
    StepContext,
    StepReport,
    register_step,
)
from sparseserve.sparsify.reconstruct import (
    collect,
    reconstruct,
    refit,
    select_groups,
    teacher_targets,
)


class Importance(StrEnum):
    """How a unit's importance is scored.

    ``magnitude``: the weights alone. A neuron scores ``|W_in[i]| * |W_out[:, i]|`` and a
    head ``|W_v[h]| * |W_o[:, h]|`` (Frobenius norms of the path its output takes).
    ``activation``: what the unit contributes on calibration text, averaged over real
    (unpadded) tokens: ``mean |act_i| * |W_out[:, i]|`` for a neuron and the mean norm of
    the head's share of the attention output for a head.
    """

    magnitude = "magnitude"
    activation = "activation"
    reconstruction = "reconstruction"


class ReconstructConfig(BaseModel):
    """Refit each cut layer's output maps by least squares to the dense model's sums on
    the calibration batches (`sparsify/reconstruct.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ridge: float = Field(
        1e-3,
        gt=0.0,
        le=1.0,
        description="Ridge penalty, as a fraction of the mean diagonal of XᵀX.",
    )


class EncoderPruneConfig(StepConfig):
    """Remove `ffn_fraction` of each layer's FFN neurons and `head_fraction` of its heads,
    in `rounds` equal rounds, distilling with `distill`'s settings after each one."""

    step = "encoder_prune"
    ffn_fraction: float = Field(0.5, ge=0.0, lt=1.0)
    head_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    importance: Importance = Importance.magnitude
    rounds: int = Field(
        1,
        ge=1,
        le=64,
        description="Cut in this many rounds, importance measured afresh before each, so "
        "the model adapts between cuts instead of losing everything at once.",
    )
    reconstruct: ReconstructConfig | None = Field(
        None,
        description="After every cut, refit each layer's attention and FFN output maps by "
        "least squares to the dense model (the teacher) on the calibration batches.",
    )
    distill: DistillConfig | None = Field(
        None, description="The distillation after every round (the teacher: the base)."
    )

    @model_validator(mode="after")
    def _rounds_need_distillation(self) -> EncoderPruneConfig:
        if self.rounds > 1 and self.distill is None:
            raise ValueError(
                "distill: pruning in several rounds needs a distill step between them "
                "(e.g. distill: {steps: 100}); with none, one round cuts the same units"
            )
        return self

    def label(self) -> str:
        rounds = f" in {self.rounds} rounds" if self.rounds > 1 else ""
        refit = ", least-squares reconstruction" if self.reconstruct else ""
        distilled = f", each then distilled {self.distill.steps} steps" if self.distill else ""
        return (
            f"encoder prune {self.ffn_fraction:.0%} FFN neurons, {self.head_fraction:.0%} "
            f"heads ({self.importance.value} importance){rounds}{refit}{distilled}"
        )


class EncoderDropLayersConfig(StepConfig):
    """Drop whole encoder layers: keep the layers `keep`, or `layers` of them evenly
    spread (layer *j* of *m* is the old layer ceil((j + 1) * n / m) - 1; the last stays)."""

    step = "encoder_drop_layers"
    keep: tuple[Annotated[int, Field(ge=0, le=127)], ...] | None = Field(
        None, min_length=1, max_length=128, description="Indices of the layers to keep."
    )
    layers: int | None = Field(None, ge=1, le=128, description="How many layers to keep.")
    reconstruct: ReconstructConfig | None = Field(
        None,
        description="Then refit each kept layer's attention and FFN output maps by least "
        "squares to the teacher layer it stood at, on the calibration batches.",
    )

    @model_validator(mode="after")
    def _one_way_to_say_it(self) -> EncoderDropLayersConfig:
        if (self.keep is None) == (self.layers is None):
            raise ValueError("give either keep (layer indices) or layers (a count), not both")
        if self.keep is not None and list(self.keep) != sorted(set(self.keep)):
            raise ValueError(f"keep: layer indices must be increasing and distinct: {self.keep}")
        return self

    def label(self) -> str:
        kept = list(self.keep) if self.keep is not None else f"{self.layers} evenly spread"
        return f"encoder layers kept: {kept}"


@dataclass(frozen=True)
class UnitScores:
    """Importance per layer: `ffn[l]` has one score per neuron, `heads[l]` one per head."""

    ffn: list[torch.Tensor]
    heads: list[torch.Tensor]


@dataclass(frozen=True)
class LayerShape:
    """What one encoder layer has after pruning."""

    layer: int
    ffn_neurons: int
    heads: int


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    """FFN width and head count of every layer, as they are now."""
    return [
        LayerShape(
            index,
            layer.intermediate.dense.out_features,
            layer.attention.self.num_attention_heads,
        )
        for index, layer in enumerate(encoder_layers(model))
    ]


def _head_rows(head_size: int, heads: Sequence[int]) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in heads])


def _sliced_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim 0: outputs) or columns (dim 1: inputs) `index`."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    has_bias = linear.bias is not None
    out_features, in_features = weight.shape
    sliced = nn.Linear(
        in_features, out_features, bias=has_bias, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if has_bias:
            bias = linear.bias.detach()
            # Removing inputs leaves every output, and so the bias, as it was.
            sliced.bias.copy_(bias.index_select(0, index) if dim == 0 else bias)
    sliced.train(linear.training)
    return sliced


def _checked_keep(keep: Sequence[int] | torch.Tensor, total: int, what: str) -> torch.Tensor:
    index = torch.as_tensor(keep, dtype=torch.long).flatten()
    if index.numel() == 0:
        raise ValueError(f"at least one {what} must remain in a layer, got none to keep")
    if int(index.min()) < 0 or int(index.max()) >= total:
        raise ValueError(f"{what} indices must be in [0, {total}), got {index.tolist()}")
    # torch leaves Tensor.unique unannotated.
    if index.unique().numel() != index.numel():  # type: ignore[no-untyped-call]
        raise ValueError(f"{what} indices to keep must be distinct, got {index.tolist()}")
    return index.sort().values


def prune_ffn_neurons(layer: Any, keep: Sequence[int] | torch.Tensor) -> None:
    """Keep only FFN neurons `keep` of one encoder layer (in place)."""
    index = _checked_keep(keep, layer.intermediate.dense.out_features, "FFN neuron")
    layer.intermediate.dense = _sliced_linear(layer.intermediate.dense, index, 0)
    layer.output.dense = _sliced_linear(layer.output.dense, index, 1)


def prune_attention_heads(layer: Any, keep: Sequence[int] | torch.Tensor) -> None:
    """Keep only attention heads `keep` of one encoder layer (in place)."""
    attention = layer.attention.self
    heads = _checked_keep(keep, attention.num_attention_heads, "attention head")
    rows = _head_rows(attention.attention_head_size, heads.tolist())
    for name in ("query", "key", "value"):
        setattr(attention, name, _sliced_linear(getattr(attention, name), rows, 0))
    layer.attention.output.dense = _sliced_linear(layer.attention.output.dense, rows, 1)
    # The forward pass reshapes with -1 heads, but these two describe the layer to others.
    attention.num_attention_heads = heads.numel()
    attention.all_head_size = rows.numel()


def _all_zero(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.detach().eq(0).all(dim=dim)


def dead_ffn_neurons(layer: Any) -> list[int]:
    """Neurons that contribute nothing whatever the input: the output column is all zero,
    or the input row and bias are zero (GELU and ReLU map 0 to 0)."""
    w_in, w_out = layer.intermediate.dense, layer.output.dense
    silent = _all_zero(w_in.weight, 1)
    if w_in.bias is not None:
        silent &= w_in.bias.detach().eq(0)
    dead = silent | _all_zero(w_out.weight, 0)
    return dead.nonzero().flatten().tolist()


def dead_heads(layer: Any) -> list[int]:
    """Heads that contribute nothing whatever the input: their columns of the attention
    output are all zero, or their value rows and bias are (softmax averages zero vectors)."""
    attention = layer.attention.self
    size, count = attention.attention_head_size, attention.num_attention_heads
    value_rows = attention.value.weight.detach().view(count, size, -1).eq(0).all(dim=(1, 2))
    if attention.value.bias is not None:
        value_rows &= attention.value.bias.detach().view(count, size).eq(0).all(dim=1)
    out_columns = layer.attention.output.dense.weight.detach().view(-1, count, size)
    dead = value_rows | out_columns.eq(0).all(dim=(0, 2))
    heads: list[int] = dead.nonzero().flatten().tolist()
    return heads


def remove_dead_units(model: nn.Module) -> list[LayerShape]:
    """Remove every neuron and head that contributes nothing; outputs do not change.
    A layer whose units are all dead keeps one of each (see the module docstring)."""
    for layer in encoder_layers(model):
        neurons = layer.intermediate.dense.out_features
        dead = set(dead_ffn_neurons(layer))
        alive = [i for i in range(neurons) if i not in dead] or [0]
        if len(alive) < neurons:
            prune_ffn_neurons(layer, alive)
        heads = layer.attention.self.num_attention_heads
        dead = set(dead_heads(layer))
        alive = [h for h in range(heads) if h not in dead] or [0]
        if len(alive) < heads:
            prune_attention_heads(layer, alive)
    return layer_shapes(model)


def magnitude_scores(model: nn.Module) -> UnitScores:
    """Importance from the weights alone (see `Importance.magnitude`)."""
    ffn, heads = [], []
    with torch.no_grad():
        for layer in encoder_layers(model):
            w_in = layer.intermediate.dense.weight
            w_out = layer.output.dense.weight
            ffn.append(w_in.norm(dim=1) * w_out.norm(dim=0))
            attention = layer.attention.self
            count, size = attention.num_attention_heads, attention.attention_head_size
            value = attention.value.weight.view(count, size, -1).flatten(1).norm(dim=1)
            out = layer.attention.output.dense.weight.view(-1, count, size)
            heads.append(value * out.permute(1, 0, 2).flatten(1).norm(dim=1))
    return UnitScores(ffn, heads)


def activation_scores(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> UnitScores:
    """Importance from what each unit contributes on `batches` (tokenizer outputs with an
    ``attention_mask``), averaged over unpadded tokens (see `Importance.activation`)."""
    layers = encoder_layers(model)
    ffn_sums = [torch.zeros(layer.intermediate.dense.out_features) for layer in layers]
    head_sums = [torch.zeros(layer.attention.self.num_attention_heads) for layer in layers]
    state: dict[str, torch.Tensor] = {}

    def on_ffn(index: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            real = output[state["mask"]]  # [tokens, neurons]
            ffn_sums[index] += real.abs().sum(dim=0).float().cpu()

        return hook

    def on_context(index: int) -> Any:
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...]) -> None:
            attention = layers[index].attention.self
            count, size = attention.num_attention_heads, attention.attention_head_size
            context = inputs[0][state["mask"]].view(-1, count, size)  # [tokens, heads, size]
            w_out = module.weight.view(-1, count, size)  # [hidden, heads, size]
            # Each head's share of the attention output, before the bias is added.
            share = torch.einsum("thd,ohd->tho", context, w_out)
            head_sums[index] += share.norm(dim=2).sum(dim=0).float().cpu()

        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.intermediate.register_forward_hook(on_ffn(index)))
        handles.append(layer.attention.output.dense.register_forward_pre_hook(on_context(index)))
    batches = list(batches)
    tokens = sum(int(batch["attention_mask"].bool().sum()) for batch in batches)
    try:
        run_batches(model, batches, state)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError("activation scores need at least one batch with real tokens")
    ffn = [
        total / tokens * layer.output.dense.weight.detach().norm(dim=0)
        for total, layer in zip(ffn_sums, layers, strict=True)
    ]
    return UnitScores(ffn, [total / tokens for total in head_sums])


def units_left(total: int, fraction: float, done: int = 1, rounds: int = 1) -> int:
    """How many of `total` units remain after `done` of `rounds` equal rounds that
    together remove `fraction` of them; at least one always stays."""
    return max(1, total - round(fraction * total * done / rounds))


def keep_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the `count` highest scores."""
    # A stable sort, so ties fall the same way on every run.
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:count].sort().values


def keep_most_important(scores: torch.Tensor, remove_fraction: float) -> torch.Tensor:
    """Indices (ascending) of the units to keep when the lowest-scoring
    `remove_fraction` go; at least one unit always stays."""
    return keep_top(scores, units_left(scores.numel(), remove_fraction))


def prune_encoder(
    model: nn.Module,
    config: EncoderPruneConfig,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    *,
    original: Sequence[LayerShape] | None = None,
    done: int = 1,
    teacher: nn.Module | None = None,
) -> list[LayerShape]:
    """Remove the least important FFN neurons and heads of every layer (in place);
    `calibration` batches are required for `Importance.activation`.

    One-shot by default. For round `done` of `config.rounds`, `original` gives the layer
    shapes before the first round: each layer is cut to what `done` rounds leave of it.
    """
    rounds = config.rounds if original is not None else 1
    original = list(original) if original is not None else layer_shapes(model)
    if config.importance is Importance.reconstruction:
        if calibration is None or teacher is None:
            raise ValueError(
                "importance 'reconstruction' needs calibration batches and the teacher"
            )
        ridge = (config.reconstruct or ReconstructConfig()).ridge
        return _prune_by_reconstruction(
            model, teacher, list(calibration), original, config, done, rounds, ridge
        )
    if config.importance is Importance.activation:
        if calibration is None:
            raise ValueError("importance 'activation' needs calibration batches")
        scores = activation_scores(model, calibration)
    else:
        scores = magnitude_scores(model)
    for index, layer in enumerate(encoder_layers(model)):
        first = original[index]
        neurons = units_left(first.ffn_neurons, config.ffn_fraction, done, rounds)
        if neurons < layer.intermediate.dense.out_features:
            prune_ffn_neurons(layer, keep_top(scores.ffn[index], neurons))
        heads = units_left(first.heads, config.head_fraction, done, rounds)
        if heads < layer.attention.self.num_attention_heads:
            prune_attention_heads(layer, keep_top(scores.heads[index], heads))
    return layer_shapes(model)


def _prune_by_reconstruction(
    model: nn.Module,
    teacher: nn.Module,
    calibration: Sequence[Mapping[str, torch.Tensor]],
    original: Sequence[LayerShape],
    config: EncoderPruneConfig,
    done: int,
    rounds: int,
    ridge: float,
) -> list[LayerShape]:
    """Layer by layer: collect the least-squares sums of the attention's output map on
    the model as it is now, choose the heads to keep by them, cut, refit; then the same
    for the FFN's neurons (`Importance.reconstruction`)."""
    targets = teacher_targets(teacher, calibration)
    layer_map = standing_layers(model)
    for index, layer in enumerate(encoder_layers(model)):
        source = layer_map[index]
        first = original[index]
        attention = layer.attention.self
        heads = units_left(first.heads, config.head_fraction, done, rounds)
        normal = collect(model, index, "attention", calibration, targets[source]["attention"])
        size = attention.attention_head_size
        keep = select_groups(normal, size, min(heads, attention.num_attention_heads), ridge)
        if len(keep) < attention.num_attention_heads:
            prune_attention_heads(layer, keep)
        refit(layer.attention.output.dense, normal, ridge, _head_rows(size, keep.tolist()))
        neurons = units_left(first.ffn_neurons, config.ffn_fraction, done, rounds)
        normal = collect(model, index, "ffn", calibration, targets[source]["ffn"])
        width = layer.intermediate.dense.out_features
        keep = select_groups(normal, 1, min(neurons, width), ridge)
        if len(keep) < width:
            prune_ffn_neurons(layer, keep)
        refit(layer.output.dense, normal, ridge, keep)
    return layer_shapes(model)


@register_step(EncoderPruneConfig)
def _encoder_prune(
    model: nn.Module, config: EncoderPruneConfig, context: StepContext
) -> StepReport:
    calibration = None
    refits = config.reconstruct is not None or config.importance is Importance.reconstruction
    if refits and context.teacher is None:
        raise RecipeError(
            "encoder_prune: reconstruct and reconstruction importance need the dense model "
            "to match (the family's base, passed as teacher=)"
        )
    if config.importance is not Importance.magnitude or refits:
        calibration = calibration_batches(
            context, "encoder_prune: activation importance and reconstruct need"
        )
    before = sum(p.numel() for p in model.parameters())
    original = layer_shapes(model)
    rounds: list[dict[str, Any]] = []
    for done in range(1, config.rounds + 1):
        shapes = prune_encoder(
            model, config, calibration, original=original, done=done, teacher=context.teacher
        )
        context.progress(
            f"encoder_prune round {done}/{config.rounds}: FFN {shapes[0].ffn_neurons} "
            f"neurons, {shapes[0].heads} heads per layer"
        )
        entry: dict[str, Any] = {
            "round": done,
            "ffn_neurons": shapes[0].ffn_neurons,
            "heads": shapes[0].heads,
        }
        if config.reconstruct is not None and config.importance is not Importance.reconstruction:
            assert calibration is not None and context.teacher is not None  # checked above
            entry["reconstruct"] = _reconstruct(
                model, config.reconstruct, calibration, context, "encoder_prune"
            )
        if config.distill is not None:
            entry["distill"] = distill_with_context(
                model, config.distill, context, name=f"round{done}"
            )
        rounds.append(entry)
    report: dict[str, Any] = {
        "parameters_before": before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "calibration_batches": len(calibration) if calibration is not None else 0,
        "layers": [
            {"layer": s.layer, "ffn_neurons": s.ffn_neurons, "heads": s.heads} for s in shapes
        ],
    }
    if config.rounds > 1 or config.distill is not None or config.reconstruct is not None:
        report["rounds"] = rounds
    return report


def _reconstruct(
    model: nn.Module,
    config: ReconstructConfig,
    calibration: Sequence[Mapping[str, torch.Tensor]],
    context: StepContext,
    step: str,
) -> dict[str, Any]:
    assert context.teacher is not None
    started = time.perf_counter()
    fits = reconstruct(model, context.teacher, calibration, ridge=config.ridge)
    seconds = time.perf_counter() - started
    worst = max(fits, key=lambda fit: fit.error_after)
    context.progress(
        f"{step}: reconstructed {len(fits)} output maps in {seconds:.0f} s; "
        f"relative error mean {sum(f.error_before for f in fits) / len(fits):.3f} -> "
        f"{sum(f.error_after for f in fits) / len(fits):.3f} (worst after: layer "
        f"{worst.layer} {worst.site}, {worst.error_after:.3f})"
    )
    return {
        "ridge": config.ridge,
        "seconds": round(seconds, 1),
        "fits": [asdict(fit) for fit in fits],
    }


def drop_layers(model: nn.Module, keep: Sequence[int]) -> list[int]:
    """Keep only encoder layers `keep` (in place); return which layer of the original
    teacher each remaining layer stood at (recorded for layer-wise distillation)."""
    bert = bert_of(model)
    layers = list(bert.encoder.layer)
    if not keep or list(keep) != sorted(set(keep)) or keep[-1] >= len(layers):
        raise ValueError(
            f"layers to keep must be increasing, distinct and in [0, {len(layers)}), "
            f"got {list(keep)}"
        )
    earlier = standing_layers(model)
    bert.encoder.layer = nn.ModuleList(layers[i] for i in keep)
    for index, layer in enumerate(bert.encoder.layer):
        # transformers numbers layers for its key/value cache; keep the numbers dense.
        if hasattr(layer.attention.self, "layer_idx"):
            layer.attention.self.layer_idx = index
    if hasattr(bert, "config"):
        bert.config.num_hidden_layers = len(keep)
    kept = [earlier[i] for i in keep]
    setattr(bert.encoder, TEACHER_LAYERS_ATTRIBUTE, kept)
    return kept


@register_step(EncoderDropLayersConfig)
def _encoder_drop_layers(
    model: nn.Module, config: EncoderDropLayersConfig, context: StepContext
) -> StepReport:
    depth = len(encoder_layers(model))
    if config.keep is not None:
        keep = list(config.keep)
    else:
        assert config.layers is not None  # the validator saw to it
        keep = uniform_layer_map(config.layers, depth)
    before = sum(p.numel() for p in model.parameters())
    calibration = None
    if config.reconstruct is not None:
        if context.teacher is None:
            raise RecipeError("encoder_drop_layers: reconstruct needs the dense model (teacher=)")
        calibration = calibration_batches(context, "encoder_drop_layers: reconstruct needs")
    kept = drop_layers(model, keep)
    context.progress(f"encoder_drop_layers: {depth} -> {len(keep)} layers, kept {keep}")
    report: StepReport = {
        "layers_before": depth,
        "kept": keep,
        "teacher_layers": kept,
        "parameters_before": before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
    }
    if config.reconstruct is not None:
        assert calibration is not None
        report["reconstruct"] = _reconstruct(
            model, config.reconstruct, calibration, context, "encoder_drop_layers"
        )
    return report
