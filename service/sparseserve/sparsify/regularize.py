"""Sparsity-inducing penalties for training, and the report that shows they worked.

- L1 (``strength * sum |w|``) pulls individual weights to zero: unstructured sparsity.
- Group lasso (``strength * sum_g ||w_g||_2`` over output rows / output channels) pulls
  whole neurons to zero together, which is what structured pruning can then remove.

Neither makes exact zeros with a gradient optimizer; weights end *near* zero, so the
report counts the fraction below a threshold, before and after training.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseserve.sparsify.prune import prunable_layers
from sparseserve.sparsify.recipe import FilterFn


def l1_penalty(model: nn.Module, filter_fn: FilterFn | None = None) -> torch.Tensor:
    """Sum of |w| over the weights of Linear and Conv2d layers."""
    layers = prunable_layers(model, filter_fn).values()
    return torch.stack([layer.weight.abs().sum() for layer in layers]).sum()


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """One row per output neuron / output channel."""
    return weight.reshape(weight.shape[0], -1)


def group_lasso_penalty(model: nn.Module, filter_fn: FilterFn | None = None) -> torch.Tensor:
    """Sum over output neurons (channels) of the L2 norm of their weights, each group
    scaled by sqrt(group size) as in Yuan & Lin (2006), so wide and narrow layers weigh alike."""
    terms = []
    for layer in prunable_layers(model, filter_fn).values():
        rows = _rows(layer.weight)
        terms.append(rows.norm(dim=1).sum() * rows.shape[1] ** 0.5)
    return torch.stack(terms).sum()


def near_zero_fraction(
    model: nn.Module, threshold: float, filter_fn: FilterFn | None = None
) -> dict[str, float]:
    """Per layer, the fraction of weights with |w| < threshold."""
    return {
        name: float((layer.weight.detach().abs() < threshold).float().mean())
        for name, layer in prunable_layers(model, filter_fn).items()
    }


def near_zero_rows(
    model: nn.Module, threshold: float, filter_fn: FilterFn | None = None
) -> dict[str, float]:
    """Per layer, the fraction of output neurons whose root-mean-square weight < threshold."""
    result = {}
    for name, layer in prunable_layers(model, filter_fn).items():
        rows = _rows(layer.weight.detach())
        rms = rows.pow(2).mean(dim=1).sqrt()
        result[name] = float((rms < threshold).float().mean())
    return result


def overall(fractions: dict[str, float], model: nn.Module) -> float:
    """Weight-count-weighted mean of per-layer fractions."""
    layers = prunable_layers(model)  # the fractions are of these layers
    sizes = {name: layers[name].weight.numel() for name in fractions}
    return sum(fractions[n] * sizes[n] for n in fractions) / max(1, sum(sizes.values()))
