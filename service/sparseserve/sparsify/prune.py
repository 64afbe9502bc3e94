"""Unstructured and semi-structured pruning: magnitude (per layer or global, one-shot),
gradual (the cubic schedule of Zhu & Gupta 2017) and N:M (2:4).

Masks are torch parametrizations: the module's ``weight`` becomes ``original * mask``
with the mask a buffer. Whatever the optimizer does to ``original`` (Adam's momentum
moves weights whose gradient is zero), a pruned weight stays exactly zero through any
later training; `bake` writes the masked values back before export. Masks only ever
shrink: pruning a pruned layer again keeps every earlier zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import TypeAlias, cast

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import parametrize

from sparseserve.sparsify.recipe import (
    FilterFn,
    Sparsity,
    StepConfig,
    StepContext,
    StepReport,
    register_step,
)

PRUNABLE = (nn.Linear, nn.Conv2d)
PrunableLayer: TypeAlias = nn.Linear | nn.Conv2d


class WeightMask(nn.Module):
    """Parametrization ``tensor -> tensor * mask``; the mask is a saved, untrained buffer."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * self.mask


def prunable_layers(
    model: nn.Module, filter_fn: FilterFn | None = None
) -> dict[str, PrunableLayer]:
    """Linear and Conv2d modules by qualified name, those `filter_fn` accepts."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE) and (filter_fn is None or filter_fn(module, name))
    }


def parametrizations(module: nn.Module) -> Mapping[str, parametrize.ParametrizationList]:
    """A parametrized module's chains of parametrizations, by tensor name."""
    # torch types every module attribute as `Tensor | Module`; `parametrize` makes this
    # one a ModuleDict of ParametrizationLists.
    return cast(Mapping[str, parametrize.ParametrizationList], module.parametrizations)


def mask_of(module: nn.Module, tensor: str = "weight") -> torch.Tensor | None:
    """The combined mask on `module.<tensor>`, or None if it was never pruned."""
    if not parametrize.is_parametrized(module, tensor):
        return None
    masks = [p.mask for p in parametrizations(module)[tensor] if isinstance(p, WeightMask)]
    if not masks:
        return None
    combined = masks[0].clone()
    for mask in masks[1:]:
        combined.mul_(mask)
    return combined


def set_mask(module: nn.Module, mask: torch.Tensor, tensor: str = "weight") -> None:
    """Apply `mask` (1 keeps, 0 prunes) to `module.<tensor>`, on top of any earlier mask."""
    mask = mask.to(dtype=getattr(module, tensor).dtype)
    if parametrize.is_parametrized(module, tensor):
        for existing in parametrizations(module)[tensor]:
            if isinstance(existing, WeightMask):
                existing.mask.mul_(mask)
                return
    parametrize.register_parametrization(module, tensor, WeightMask(mask))


def unparametrize(module: nn.Module, *, keep_values: bool = True) -> None:
    """Drop every parametrization of `module`: its tensors become plain parameters again,
    with the parametrized values (`keep_values`) or the originals.

    torch's `remove_parametrizations` deletes the property from the module's class, a
    class that every deep copy of the module shares, so baking one copy (the export)
    would break the others (the model a later variant starts from). This rebinds the
    module alone.
    """
    if not parametrize.is_parametrized(module):
        return
    values = {}
    for name, chain in parametrizations(module).items():
        value = getattr(module, name) if keep_values else chain.original
        values[name] = nn.Parameter(value.detach().clone(), chain.original.requires_grad)
    module.__class__ = module.__class__.__bases__[0]  # ParametrizedLinear -> Linear
    del module.parametrizations
    for name, value in values.items():
        module.register_parameter(name, value)


def bake(model: nn.Module) -> None:
    """Remove every parametrization, keeping the masked values (call before export)."""
    for module in list(model.modules()):
        unparametrize(module)


def _scores(module: PrunableLayer, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """|weight| (times the norm of the input it reads, if given: Wanda's score), with
    already-pruned positions below every live one, so they stay pruned."""
    weight = module.weight.detach().abs()
    if input_norm is not None:
        shape = (1, -1, *([1] * (weight.dim() - 2)))
        weight = weight * input_norm.to(weight.device, weight.dtype).view(shape)  # GPU training
    mask = mask_of(module)
    return weight if mask is None else torch.where(mask.bool(), weight, torch.full_like(weight, -1))


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    # topk keeps exactly `keep` even when magnitudes tie (a threshold would not).
    mask = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
    mask[scores.flatten().topk(keep).indices] = 1.0
    return mask.view_as(scores)


class PruneScope(StrEnum):
    per_layer = "per_layer"  # every layer loses the same fraction
    global_ = "global"  # one threshold for all layers: big layers lose more
    per_row = "per_row"  # every output (row) of every layer loses the same fraction


def magnitude_masks(
    layers: Mapping[str, PrunableLayer],
    sparsity: float,
    scope: PruneScope,
    input_norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks that zero the smallest `sparsity` fraction of weights, per layer, per row
    or overall; scored by |weight|, or by |weight| times the norm of its input where
    `input_norms` has the layer's (activation-aware, as Wanda: Sun et al. 2023)."""
    norms = input_norms or {}
    scores = {name: _scores(module, norms.get(name)) for name, module in layers.items()}
    if scope is PruneScope.per_layer:
        return {
            name: _keep_top(score, score.numel() - round(sparsity * score.numel()))
            for name, score in scores.items()
        }
    if scope is PruneScope.per_row:
        masks = {}
        for name, score in scores.items():
            rows = score.reshape(score.shape[0], -1)
            kept = rows.shape[1] - round(sparsity * rows.shape[1])
            mask = torch.zeros_like(rows)
            mask.scatter_(1, rows.topk(kept, dim=1).indices, 1.0)
            masks[name] = mask.view_as(score)
        return masks
    flat = torch.cat([score.flatten() for score in scores.values()])
    keep = _keep_top(flat, flat.numel() - round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = keep[start : start + score.numel()].view_as(score)
        start += score.numel()
    return masks


def prune_by_magnitude(
    model: nn.Module,
    sparsity: float,
    scope: PruneScope = PruneScope.per_layer,
    filter_fn: FilterFn | None = None,
) -> dict[str, float]:
    """Mask the smallest weights; return the sparsity each layer now has."""
    layers = prunable_layers(model, filter_fn)
    with torch.no_grad():
        for name, mask in magnitude_masks(layers, sparsity, scope).items():
            set_mask(layers[name], mask)
    return {name: layer_sparsity(module) for name, module in layers.items()}


def layer_sparsity(module: PrunableLayer) -> float:
    """Fraction of exact zeros in the (masked) weight."""
    weight = module.weight.detach()
    return 1.0 - int(weight.count_nonzero()) / weight.numel()


class MagnitudePruneConfig(StepConfig):
    """One-shot magnitude pruning of Linear and Conv2d weights."""

    step = "magnitude_prune"
    sparsity: Sparsity
    scope: PruneScope = PruneScope.per_layer

    def label(self) -> str:
        return f"magnitude {self.sparsity:.0%} {self.scope.value}"


@register_step(MagnitudePruneConfig)
def _magnitude(model: nn.Module, config: MagnitudePruneConfig, context: StepContext) -> StepReport:
    layers = prune_by_magnitude(model, config.sparsity, config.scope, context.filter_fn)
    context.progress(f"magnitude_prune: {config.sparsity:.0%} {config.scope.value}")
    return {"layer_sparsity": layers}


def cubic_sparsity(step: int, total_steps: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - t / n)^3, for t in [0, n].

    Prunes fast early, while there are many redundant weights, and slowly at the end.
    """
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualPruneConfig(StepConfig):
    """Train while raising sparsity from `initial_sparsity` to `final_sparsity` on the cubic
    schedule, re-pruning every `frequency_steps` optimizer steps; the last step reaches
    `final_sparsity` exactly. Follow it with a `train` step to recover."""

    step = "gradual_prune"
    initial_sparsity: Sparsity = 0.0
    final_sparsity: Sparsity
    scope: PruneScope = PruneScope.per_layer
    epochs: int = Field(ge=1, le=1000)
    frequency_steps: int = Field(10, ge=1, le=100_000)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(32, ge=1, le=65_536)

    @model_validator(mode="after")
    def _rising(self) -> GradualPruneConfig:
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError("final_sparsity must be at least initial_sparsity")
        return self

    def label(self) -> str:
        return f"gradual magnitude {self.initial_sparsity:.0%}->{self.final_sparsity:.0%} (cubic)"


@register_step(GradualPruneConfig)
def _gradual(model: nn.Module, config: GradualPruneConfig, context: StepContext) -> StepReport:
    from sparseserve.sparsify.train import TrainConfig, fit, require_data

    data = require_data(context, config.step)
    train = TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size)
    total = config.epochs * math.ceil(len(data.x_train) / config.batch_size)
    layers = prunable_layers(model, context.filter_fn)
    schedule: list[tuple[int, float]] = []

    def prune_at(step: int) -> None:
        target = cubic_sparsity(step, total, config.initial_sparsity, config.final_sparsity)
        with torch.no_grad():
            for name, mask in magnitude_masks(layers, target, config.scope).items():
                set_mask(layers[name], mask)
        schedule.append((step, round(target, 4)))

    prune_at(0)

    def after_step(step: int) -> None:
        if step % config.frequency_steps == 0 or step == total:
            prune_at(step)

    fit(model, data, train, after_step=after_step, progress=context.progress, label=config.step)
    return {
        "optimizer_steps": total,
        "pruning_events": len(schedule),
        "schedule": _thin(schedule, 10),
        "layer_sparsity": {name: layer_sparsity(m) for name, m in layers.items()},
    }


def _thin(schedule: list[tuple[int, float]], points: int) -> list[tuple[int, float]]:
    """About `points` evenly spaced entries, always ending with the last."""
    kept = schedule[:: max(1, len(schedule) // points)]
    return kept if kept[-1] == schedule[-1] else [*kept, schedule[-1]]


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` largest of every `m` consecutive weights along the input dimension
    (input channels for a convolution, as sparse tensor cores group them)."""
    scores = weight.detach().abs()
    # Move the input dimension last: (out, in) stays, (out, in, kh, kw) -> (out, kh, kw, in).
    moved = scores.movedim(1, -1) if scores.dim() > 2 else scores
    if moved.shape[-1] % m:
        raise ValueError(f"input dimension {moved.shape[-1]} is not a multiple of {m}")
    groups = moved.reshape(-1, m)
    mask = torch.zeros_like(groups)
    mask.scatter_(1, groups.topk(n, dim=1).indices, 1.0)
    mask = mask.reshape(moved.shape)
    return mask.movedim(-1, 1) if scores.dim() > 2 else mask


class NMPruneConfig(StepConfig):
    """N:M semi-structured pruning: exactly `n` non-zeros in every `m` consecutive weights.

    Layers whose input dimension is not a multiple of `m` are left dense and reported."""

    step = "nm_prune"
    n: int = Field(2, ge=1, le=15)
    m: int = Field(4, ge=2, le=16)

    @model_validator(mode="after")
    def _n_below_m(self) -> NMPruneConfig:
        if self.n >= self.m:
            raise ValueError(f"n must be smaller than m (got {self.n}:{self.m})")
        return self

    def label(self) -> str:
        return f"{self.n}:{self.m} semi-structured"


@register_step(NMPruneConfig)
def _nm(model: nn.Module, config: NMPruneConfig, context: StepContext) -> StepReport:
    pruned, skipped = {}, {}
    with torch.no_grad():
        for name, module in prunable_layers(model, context.filter_fn).items():
            if module.weight.shape[1] % config.m:
                skipped[name] = f"input dimension {module.weight.shape[1]} % {config.m} != 0"
                continue
            # Score the masked weight, so earlier zeros count as the smallest.
            set_mask(module, nm_mask(module.weight, config.n, config.m))
            pruned[name] = layer_sparsity(module)
    context.progress(f"nm_prune {config.n}:{config.m}: {len(pruned)} layers, {len(skipped)} left")
    return {"layer_sparsity": pruned, "skipped": skipped}
