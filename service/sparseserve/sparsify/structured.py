"""Structured pruning that physically shrinks the model.

Two steps, so that fine-tuning can sit between them:

- ``structured_prune`` masks whole output neurons (rows of a Linear, output channels of
  a Conv2d, with their bias and the following BatchNorm's scale and shift), the
  smallest by norm, in every layer that feeds another prunable layer. The masks hold
  through training, so these neurons output exactly zero.
- ``shrink`` removes every neuron whose output is identically zero: the producer loses
  the row (channel), its BatchNorm the channel, and the consumer the matching input
  column(s). The exported ONNX has the smaller shapes, and outputs do not change.

Chains are found in `nn.Sequential` models: a Linear/Conv2d, optionally a BatchNorm2d,
then only operations that map zero to zero (ReLU, pooling, Flatten, Dropout...), then
the next Linear/Conv2d. (Transformer FFNs and heads are another module's steps.)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TypeAlias

import torch
from torch import nn

from sparseserve.sparsify.prune import bake, set_mask
from sparseserve.sparsify.recipe import (
    FilterFn,
    RecipeError,
    Sparsity,
    StepConfig,
    StepContext,
    StepReport,
    register_step,
)

# Modules between producer and consumer through which a zero channel stays zero.
ZERO_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.Tanh,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Flatten,
    nn.Identity,
)
LAYERS = (nn.Linear, nn.Conv2d)
Layer: TypeAlias = nn.Linear | nn.Conv2d


@dataclass
class Link:
    """A producer whose output neurons feed, one to one (or one to a block of `spatial`
    flattened columns), the inputs of a consumer."""

    producer: str
    norm: str | None
    consumer: str
    spatial: int = 1


def find_links(model: nn.Module) -> list[Link]:
    """The prunable chains of a Sequential model, in order."""
    if not isinstance(model, nn.Sequential):
        raise RecipeError("structured pruning needs an nn.Sequential model")
    links: list[Link] = []
    producer: str | None = None
    norm: str | None = None
    for name, module in model.named_children():
        if isinstance(module, LAYERS) and getattr(module, "groups", 1) == 1:
            if producer is not None:
                links.append(Link(producer, norm, name, _spatial(model, producer, module)))
            producer, norm = name, None
        elif isinstance(module, nn.BatchNorm2d) and producer is not None and norm is None:
            norm = name
        elif not isinstance(module, ZERO_PRESERVING):
            producer, norm = None, None  # a zero channel may not stay zero through this
    return links


def _width(module: Layer) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _spatial(model: nn.Sequential, producer: str, consumer: Layer) -> int:
    width = _width(getattr(model, producer))
    inputs = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
    if inputs % width:
        raise RecipeError(f"{producer}: {width} outputs cannot feed {inputs} inputs one to one")
    return inputs // width


def neuron_norms(module: Layer) -> torch.Tensor:
    """L2 norm of each output neuron's (channel's) weights."""
    # (torch leaves Tensor.norm unannotated.)
    norms: torch.Tensor = module.weight.detach().reshape(_width(module), -1).norm(dim=1)
    return norms


def prune_neurons(
    model: nn.Module, sparsity: float, filter_fn: FilterFn | None = None
) -> dict[str, int]:
    """Mask the `sparsity` fraction of lowest-norm neurons of every producer; return, per
    producer, how many neurons are now masked."""
    result = {}
    with torch.no_grad():
        for link in find_links(model):
            producer = getattr(model, link.producer)
            if filter_fn is not None and not filter_fn(producer, link.producer):
                continue
            width = _width(producer)
            drop = round(sparsity * width)
            keep = torch.ones(width)
            keep[neuron_norms(producer).topk(drop, largest=False).indices] = 0.0
            shape = (width,) + (1,) * (producer.weight.dim() - 1)
            set_mask(producer, keep.view(shape).expand_as(producer.weight).clone())
            if producer.bias is not None:
                set_mask(producer, keep.clone(), "bias")
            if link.norm is not None:
                norm = getattr(model, link.norm)
                set_mask(norm, keep.clone(), "weight")
                set_mask(norm, keep.clone(), "bias")
            result[link.producer] = drop
    return result


def dead_neurons(model: nn.Module, link: Link) -> torch.Tensor:
    """Indices of the producer's neurons whose output is identically zero."""
    if link.norm is not None:
        norm = getattr(model, link.norm)
        # gamma = beta = 0: the normalized output is 0 whatever the convolution computed.
        dead: torch.Tensor = (norm.weight.detach() == 0) & (norm.bias.detach() == 0)
    else:
        producer = getattr(model, link.producer)
        dead = neuron_norms(producer) == 0
        if producer.bias is not None:
            dead &= producer.bias.detach() == 0
    return dead.nonzero().flatten()


def _subset(module: Layer | nn.BatchNorm2d, keep: torch.Tensor, dim: int) -> nn.Module:
    """A copy of a Linear/Conv2d/BatchNorm2d keeping only `keep` along weight dim `dim`."""
    weight = module.weight.detach().index_select(dim, keep)
    smaller: Layer | nn.BatchNorm2d
    if isinstance(module, nn.BatchNorm2d):
        smaller = nn.BatchNorm2d(len(keep), module.eps, module.momentum, module.affine)
        _copy_running_stats(module, smaller, keep)
    elif isinstance(module, nn.Linear):
        smaller = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    else:
        smaller = nn.Conv2d(
            weight.shape[1] * module.groups,
            weight.shape[0],
            _pair(module.kernel_size),
            _pair(module.stride),
            module.padding if isinstance(module.padding, str) else _pair(module.padding),
            _pair(module.dilation),
            module.groups,
            module.bias is not None,
            module.padding_mode,
        )
    smaller.weight.data.copy_(weight)
    if module.bias is not None and smaller.bias is not None:  # both or neither have one
        bias = module.bias.detach()
        smaller.bias.data.copy_(bias[keep] if dim == 0 else bias)
    return smaller.train(module.training)


def _copy_running_stats(norm: nn.BatchNorm2d, into: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    """Copy the running statistics of `norm`'s channels `keep` into `into`."""
    # torch types them as Optional: a norm made with track_running_stats=False has none.
    # `into` is made with them; `norm` is BatchNorm2d's default too, or cannot shrink.
    mean, var, batches = norm.running_mean, norm.running_var, norm.num_batches_tracked
    if mean is None or var is None or batches is None:
        raise RecipeError("shrink needs BatchNorm2d layers that track running statistics")
    assert into.running_mean is not None and into.running_var is not None
    assert into.num_batches_tracked is not None
    into.running_mean.copy_(mean[keep])
    into.running_var.copy_(var[keep])
    into.num_batches_tracked.copy_(batches)


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    # A Conv2d keeps its 2-D hyperparameters as pairs; torch types them as tuple[int, ...].
    first, second = values
    return first, second


def remove_neurons(model: nn.Module, link: Link, drop: torch.Tensor) -> None:
    """Physically remove the producer's neurons `drop` along `link`."""
    producer = getattr(model, link.producer)
    alive = torch.ones(_width(producer), dtype=torch.bool)
    alive[drop] = False
    keep = alive.nonzero().flatten()
    setattr(model, link.producer, _subset(producer, keep, 0))
    if link.norm is not None:
        setattr(model, link.norm, _subset(getattr(model, link.norm), keep, 0))
    # Each producer neuron feeds `spatial` consecutive consumer inputs (a flattened channel).
    columns = (keep[:, None] * link.spatial + torch.arange(link.spatial)).flatten()
    consumer = getattr(model, link.consumer)
    setattr(model, link.consumer, _subset(consumer, columns, 1))


def shrink(model: nn.Module) -> dict[str, list[int]]:
    """Bake the masks and remove every dead neuron; return {producer: [before, after]}."""
    bake(model)
    result = {}
    for link in find_links(model):
        drop = dead_neurons(model, link)
        width = _width(getattr(model, link.producer))
        if 0 < len(drop) < width:  # never remove a whole layer
            remove_neurons(model, link, drop)
        result[link.producer] = [width, _width(getattr(model, link.producer))]
    return result


class Criterion(StrEnum):
    l2 = "l2"


class StructuredPruneConfig(StepConfig):
    """Mask the lowest-norm `sparsity` fraction of neurons (channels) of each prunable
    layer; `shrink` then removes them."""

    step = "structured_prune"
    sparsity: Sparsity
    criterion: Criterion = Criterion.l2

    def label(self) -> str:
        return f"structured {self.sparsity:.0%} of neurons ({self.criterion.value} norm)"


@register_step(StructuredPruneConfig)
def _structured(
    model: nn.Module, config: StructuredPruneConfig, context: StepContext
) -> StepReport:
    masked = prune_neurons(model, config.sparsity, context.filter_fn)
    context.progress(f"structured_prune: masked {masked}")
    return {"masked_neurons": masked}


class ShrinkConfig(StepConfig):
    """Remove the neurons whose output is identically zero (masked or trained to zero)."""

    step = "shrink"

    def label(self) -> str:
        return "shrink"


@register_step(ShrinkConfig)
def _shrink(model: nn.Module, config: ShrinkConfig, context: StepContext) -> StepReport:
    widths = shrink(model)
    context.progress(f"shrink: {widths}")
    return {"widths": widths}
