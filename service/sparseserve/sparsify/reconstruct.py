"""Least-squares reconstruction after structured pruning: refit what a cut layer writes
back to the residual stream, so that it matches the dense model before any training.

A BERT layer adds two sublayer outputs to its residual stream, each through one linear
map: the attention's ``attention.output.dense`` (fed the kept heads' context vectors)
and the FFN's ``output.dense`` (fed the kept neurons' activations). Removing heads or
neurons removes inputs of those maps; the weights on the inputs that remain were trained
to sum with the removed ones, so they are no longer the best weights. The best ones, for
given inputs, are a linear least-squares problem with a closed-form answer.

For each encoder layer in order, first its attention and then its FFN:

- the *student's* inputs to the map (its context vectors or activations, on real tokens
  of the calibration batches, with every earlier layer already refitted) are the
  features, plus a constant 1 for the bias;
- the target is what the *teacher* (the dense model) has at the same point before its
  LayerNorm, ``dense(x_t) + residual_t``, minus the student's own residual there: the
  refitted map writes what makes the student's sum equal the teacher's, so it also
  absorbs the drift earlier layers left in the residual stream;
- ``W = (XᵀX + λI)⁻¹ XᵀY`` (ridge `ridge` times the mean diagonal of XᵀX, in float64),
  from XᵀX and XᵀY summed batch by batch (the features are never all held at once).

This is the weight compensation of post-training structured pruning (Kwon et al. 2022,
"A Fast Post-Training Pruning Framework for Transformers"; ZipLM; FLAP), done layer by
layer on the student's own inputs. Distillation afterwards starts from a model much
closer to the teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparseserve.sparsify.encoder import StopForward, encoder_layers, run_batches, standing_layers
from sparseserve.sparsify.recipe import RecipeError

Batch = Mapping[str, torch.Tensor]
SITES = ("attention", "ffn")
# Fewer calibration tokens than this per input of a map, and its least-squares fit learns
# the noise of those tokens: on MiniLM, dropping two layers and refitting on 2,800 tokens
# (1,537 FFN inputs) left a cosine of 0.17 to the dense model, on 23,000 tokens 0.86.
TOKENS_PER_INPUT = 4


@dataclass(frozen=True, slots=True)
class SiteFit:
    """One refitted map: the relative squared error on the calibration tokens, before and
    after (the error over the target's variance: 0 is exact, 1 is no better than its mean)."""

    layer: int
    site: str  # "attention" or "ffn"
    inputs: int  # the map's input width (kept heads * head size, or kept neurons)
    error_before: float
    error_after: float


def _sublayer_output(layer: Any, site: str) -> Any:
    """The module that takes (features, residual) and returns LayerNorm(dense(features) +
    residual): BertSelfOutput for the attention, BertOutput for the FFN."""
    return layer.attention.output if site == "attention" else layer.output


def _real(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, tokens, width] -> [real tokens, width], in float32."""
    return tensor[mask].float()


def teacher_targets(
    teacher: nn.Module, batches: Sequence[Batch]
) -> list[dict[str, list[torch.Tensor]]]:
    """Per layer and site, per batch: the teacher's pre-LayerNorm sum on real tokens."""
    layers = encoder_layers(teacher)
    targets: list[dict[str, list[torch.Tensor]]] = [{site: [] for site in SITES} for _ in layers]
    state: dict[str, torch.Tensor] = {}

    def capture(index: int, site: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            features, residual = args[0], args[1]
            total = module.dense(features) + residual
            targets[index][site].append(_real(total, state["mask"]))

        return hook

    handles = [
        _sublayer_output(layer, site).register_forward_pre_hook(capture(index, site))
        for index, layer in enumerate(layers)
        for site in SITES
    ]
    try:
        run_batches(teacher, batches, state)
    finally:
        for handle in handles:
            handle.remove()
    return targets


@dataclass
class Normal:
    """The sums a least-squares fit of one map needs, over the calibration tokens: XᵀX
    and XᵀY (the features with a trailing constant 1), YᵀY, the column sums of Y and
    the token count; float64."""

    xtx: torch.Tensor
    xty: torch.Tensor
    yty: torch.Tensor
    y_sum: torch.Tensor
    tokens: int

    def squared_error(self, w: torch.Tensor, features: torch.Tensor | None = None) -> float:
        """||XW - Y||² from the sums (`features`: the rows of X's columns `w` uses)."""
        xtx, xty = self.xtx, self.xty
        if features is not None:
            xtx, xty = xtx[features][:, features], xty[features]
        return float(self.yty - 2 * (w * xty).sum() + (w * (xtx @ w)).sum())

    @property
    def variance(self) -> float:
        return float(self.yty - (self.y_sum * self.y_sum).sum() / self.tokens)

    def regularized(self, ridge: float, features: torch.Tensor | None = None) -> torch.Tensor:
        """XᵀX (of `features`, the last one being the bias's 1) plus the ridge penalty
        on every weight but the bias's."""
        xtx = self.xtx if features is None else self.xtx[features][:, features]
        penalty = ridge * float(torch.diagonal(self.xtx)[:-1].mean())
        diagonal = torch.full((len(xtx),), penalty, dtype=torch.float64)
        diagonal[-1] = 0.0
        return xtx + torch.diag(diagonal)


def collect(
    student: nn.Module,
    index: int,
    site: str,
    batches: Sequence[Batch],
    targets: Sequence[torch.Tensor],
) -> Normal:
    """The sums for layer `index`'s `site` map of `student`, its inputs as the student
    has them now, its targets `targets` (one tensor per batch, as `teacher_targets`
    gives them) minus the student's residual."""
    module = _sublayer_output(encoder_layers(student)[index], site)
    dense: nn.Linear = module.dense
    width = dense.in_features + 1
    normal = Normal(
        xtx=torch.zeros(width, width, dtype=torch.float64),
        xty=torch.zeros(width, dense.out_features, dtype=torch.float64),
        yty=torch.zeros((), dtype=torch.float64),
        y_sum=torch.zeros(dense.out_features, dtype=torch.float64),
        tokens=0,
    )
    state: dict[str, torch.Tensor] = {}
    seen = 0

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal seen
        features = _real(args[0], state["mask"]).double()
        residual = _real(args[1], state["mask"]).double()
        x = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
        y = targets[seen].double() - residual
        normal.xtx.add_(x.T @ x)
        normal.xty.add_(x.T @ y)
        normal.yty.add_((y * y).sum())
        normal.y_sum.add_(y.sum(dim=0))
        normal.tokens += len(features)
        seen += 1
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        run_batches(student, batches, state)
    finally:
        handle.remove()
    if normal.tokens < TOKENS_PER_INPUT * width:
        raise RecipeError(
            f"reconstruction of layer {index}'s {site} map: {normal.tokens} calibration tokens "
            f"for {width} inputs; a least-squares fit needs at least {TOKENS_PER_INPUT} tokens "
            f"per input ({TOKENS_PER_INPUT * width}) or it fits noise: raise "
            "data.calibration_samples"
        )
    if seen != len(targets):
        raise ValueError(f"{len(targets)} teacher batches but {seen} student batches")
    return normal


def removal_order(
    normal: Normal, group: int, remove: int, ridge: float
) -> tuple[list[int], list[float]]:
    """The map's input groups (heads: `group` = head size; neurons: 1) in the order greedy
    least squares removes them, `remove` of them, with what each removal adds to the
    squared error once the remaining groups are refitted: at each step the group whose
    loss the others make up for best (the Optimal Brain Surgeon step for a group, as in
    ZipLM: the error grows by tr(W_Gᵀ [H⁻¹]_GG⁻¹ W_G), after which W and H⁻¹ are updated
    exactly)."""
    inputs = len(normal.xtx) - 1
    if inputs % group:
        raise ValueError(f"{inputs} inputs do not split into groups of {group}")
    groups = inputs // group
    if not 0 <= remove < groups:
        raise ValueError(f"cannot remove {remove} of {groups} groups")
    inverse = torch.linalg.inv(normal.regularized(ridge))
    weights = inverse @ normal.xty
    # The rows of `inverse` and `weights` are the groups still in play, in their original
    # order, then the bias. A removed group's rows are zero after its update; they are
    # dropped once an eighth of the rows are such (the updates touch every row, so a
    # smaller matrix is a faster step: MiniLM's FFN cut removes 768 of 1,536 one by one).
    groups_at = torch.arange(groups)
    alive = torch.ones(groups, dtype=torch.bool)
    order: list[int] = []
    costs: list[float] = []
    for _ in range(remove):
        if group == 1:
            scores = (weights[:-1] ** 2).sum(dim=1) / torch.diagonal(inverse)[:-1]
        else:
            scores = torch.full((len(alive),), float("inf"), dtype=torch.float64)
            for position in torch.nonzero(alive).flatten().tolist():
                span = slice(position * group, (position + 1) * group)
                solved = torch.linalg.solve(inverse[span, span], weights[span])
                scores[position] = (weights[span] * solved).sum()
        scores[~alive] = float("inf")
        best = int(torch.argmin(scores))
        span = slice(best * group, (best + 1) * group)
        columns = inverse[:, span].clone()
        block = columns[span]
        weights.sub_(columns @ torch.linalg.solve(block, weights[span]))
        if group == 1:  # a rank-1 update in place
            inverse.addr_(columns[:, 0], columns[:, 0], alpha=-1.0 / float(block))
        else:
            inverse.sub_(columns @ torch.linalg.solve(block, columns.T))
        alive[best] = False
        order.append(int(groups_at[best]))
        costs.append(float(scores[best]))
        if int((~alive).sum()) * 8 >= len(alive):
            kept = torch.nonzero(alive).flatten()
            rows = torch.cat(
                [(kept[:, None] * group + torch.arange(group)).flatten(), torch.tensor([-1])]
            ) % len(inverse)
            inverse = inverse[rows][:, rows]
            weights = weights[rows]
            groups_at, alive = groups_at[kept], alive[kept]
    return order, costs


def select_groups(normal: Normal, group: int, keep: int, ridge: float) -> torch.Tensor:
    """Which of the map's input groups to keep, `keep` of them, chosen greedily by least
    squares (`removal_order`). Returns the kept groups' indices, ascending."""
    groups = (len(normal.xtx) - 1) // group
    if not 1 <= keep <= groups:
        raise ValueError(f"cannot keep {keep} of {groups} groups")
    removed, _ = removal_order(normal, group, groups - keep, ridge)
    alive = torch.ones(groups, dtype=torch.bool)
    alive[removed] = False
    return torch.nonzero(alive).flatten()


def refit(
    dense: nn.Linear, normal: Normal, ridge: float, kept_inputs: torch.Tensor | None = None
) -> tuple[float, float]:
    """Set `dense` (already cut to `kept_inputs` of the inputs `normal` was collected on,
    or to all of them) to the least-squares answer; returns the relative squared error
    before (the weights as they were) and after."""
    features = None
    if kept_inputs is not None:
        features = torch.cat([kept_inputs, torch.tensor([len(normal.xtx) - 1])])
    old = torch.cat([dense.weight.detach().T, dense.bias.detach()[None]], dim=0).double()
    xty = normal.xty if features is None else normal.xty[features]
    new = torch.linalg.solve(normal.regularized(ridge, features), xty)
    with torch.no_grad():
        dense.weight.copy_(new[:-1].T.to(dense.weight.dtype))
        dense.bias.copy_(new[-1].to(dense.bias.dtype))
    variance = normal.variance
    return (
        normal.squared_error(old, features) / variance,
        normal.squared_error(new, features) / variance,
    )


def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Batch],
    ridge: float = 1e-3,
    progress: Callable[[str], Any] | None = None,
) -> list[SiteFit]:
    """Refit every layer's two output maps of `student` (in place), layer by layer, to
    match `teacher` on `batches` (tokenizer outputs with an ``attention_mask``)."""
    targets = teacher_targets(teacher, batches)
    # A student with dropped layers matches, at each layer, the teacher layer it stood at
    # (its refit absorbs what the dropped layers before it added).
    layer_map = standing_layers(student)
    if len(layer_map) != len(encoder_layers(student)) or max(layer_map) >= len(targets):
        raise ValueError(
            f"the student's layers map to teacher layers {layer_map}, but the teacher has "
            f"{len(targets)}"
        )
    fits = []
    for index, source in enumerate(layer_map):
        for site in SITES:
            normal = collect(student, index, site, batches, targets[source][site])
            dense = _sublayer_output(encoder_layers(student)[index], site).dense
            before, after = refit(dense, normal, ridge)
            fit = SiteFit(index, site, dense.in_features, before, after)
            fits.append(fit)
            if progress is not None:
                progress(
                    f"reconstruct layer {index} {site}: relative error "
                    f"{fit.error_before:.4f} -> {fit.error_after:.4f}"
                )
    return fits
