"""Sparse activations: how many ReLU outputs are exactly zero on real data, and the two
training-time regularizers that act on activations and connections.

A ReLU network computes many zeros per input; the fraction is a property of the model and
the data, not of the weights, so it is measured by running the data through the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseserve.sparsify.prune import (
    PrunableLayer,
    parametrizations,
    prunable_layers,
    unparametrize,
)
from sparseserve.sparsify.recipe import Feed, FilterFn, feeds

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU)


@torch.no_grad()
def activation_sparsity(
    model: nn.Module, x: np.ndarray | Sequence[Feed], batch_size: int = 512
) -> dict[str, float]:
    """Per activation module (by name), the fraction of its outputs that are exactly zero.

    `x` is rows of the model's one input, or batches of its inputs (passed positionally).
    A model without such modules (BERT's GELU is a function) is not run at all.
    """
    zeros: dict[str, int] = {}
    totals: dict[str, int] = {}
    handles = []

    def counter(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            zeros[name] = zeros.get(name, 0) + int((output == 0).sum())
            totals[name] = totals.get(name, 0) + output.numel()

        return hook

    for name, module in model.named_modules():
        if isinstance(module, ACTIVATIONS):
            handles.append(module.register_forward_hook(counter(name)))
    if not handles:
        return {}
    was_training = model.training
    model.eval()
    try:
        for feed in feeds(x, "input", batch_size):
            model(*(torch.from_numpy(value) for value in feed.values()))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: zeros[name] / totals[name] for name in totals}


class DropConnect(nn.Module):
    """Parametrization: in training, each weight is zeroed with probability `p` per forward
    (Wan et al. 2013), the survivors scaled by 1/(1-p); in eval mode, the identity."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return weight
        keep = torch.bernoulli(torch.full_like(weight, 1.0 - self.p))
        return weight * keep / (1.0 - self.p)


def _remove_dropconnect(module: nn.Module) -> None:
    chain = parametrizations(module)["weight"]
    others = [p for p in chain if not isinstance(p, DropConnect)]
    if not others:
        # DropConnect is the identity outside training: the original is the weight.
        unparametrize(module, keep_values=False)
        return
    for index in reversed(range(len(chain))):
        if isinstance(chain[index], DropConnect):
            del chain[index]


@contextlib.contextmanager
def training_regularizers(
    model: nn.Module,
    dropout: float = 0.0,
    dropconnect: float = 0.0,
    filter_fn: FilterFn | None = None,
) -> Iterator[None]:
    """While inside: dropout on every activation's output, DropConnect on the weights of
    the layers `filter_fn` picks. Both are removed on exit, so nothing reaches the export."""
    handles = []
    connected: list[PrunableLayer] = []
    if dropout > 0:

        def drop(module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(output, dropout, module.training)

        handles = [
            m.register_forward_hook(drop) for m in model.modules() if isinstance(m, ACTIVATIONS)
        ]
    if dropconnect > 0:
        for module in prunable_layers(model, filter_fn).values():
            parametrize.register_parametrization(module, "weight", DropConnect(dropconnect))
            connected.append(module)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in connected:
            _remove_dropconnect(module)
