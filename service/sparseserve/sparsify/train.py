"""The `train` step: supervised training (from scratch or fine-tuning), optionally with
L1 / group-lasso penalties, activation dropout and DropConnect.

Masks set by pruning steps are parametrizations, so they hold through this training
without the loop knowing about them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from pydantic import Field
from torch import nn

from sparseserve.sparsify.activations import training_regularizers
from sparseserve.sparsify.recipe import (
    Progress,
    RecipeError,
    StepConfig,
    StepContext,
    StepReport,
    TrainingData,
    register_step,
    silent,
)
from sparseserve.sparsify.regularize import (
    group_lasso_penalty,
    l1_penalty,
    near_zero_fraction,
    near_zero_rows,
    overall,
)

DropRate = Field(0.0, ge=0.0, lt=1.0)


class TrainConfig(StepConfig):
    """Adam on cross-entropy, with optional sparsity-inducing regularizers."""

    step = "train"
    epochs: int = Field(ge=1, le=1000)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(32, ge=1, le=65_536)
    l1: float = Field(0.0, ge=0.0, le=1.0, description="L1 penalty strength")
    group_lasso: float = Field(0.0, ge=0.0, le=1.0, description="group-lasso strength")
    dropout: float = DropRate
    dropconnect: float = DropRate
    near_zero_threshold: float = Field(
        1e-3, gt=0.0, le=1.0, description="|w| below this counts as near zero in the report"
    )

    def label(self) -> str:
        extras = [
            f"{name} {value:g}"
            for name, value in (
                ("l1", self.l1),
                ("group_lasso", self.group_lasso),
                ("dropout", self.dropout),
                ("dropconnect", self.dropconnect),
            )
            if value
        ]
        return f"train {self.epochs} epochs" + (f" ({', '.join(extras)})" if extras else "")


def require_data(context: StepContext, step: str) -> TrainingData:
    if context.data is None:
        raise RecipeError(f"step {step!r} trains, so it needs data (pass data=TrainingData(...))")
    return context.data


def fit(
    model: nn.Module,
    data: TrainingData,
    config: TrainConfig,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    after_step: Callable[[int], None] | None = None,
    progress: Progress = silent,
    label: str = "train",
) -> float:
    """Train `model` in place; call `after_step(n)` after optimizer step n (1-based).
    Returns the last epoch's mean loss."""
    inputs = torch.from_numpy(data.x_train)
    labels = torch.from_numpy(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step, mean_loss = 0, float("nan")
    started = time.perf_counter()
    with training_regularizers(model, config.dropout, config.dropconnect, filter_fn):
        model.train()
        for epoch in range(1, config.epochs + 1):
            total = 0.0
            # torch leaves Tensor.split and Tensor.backward unannotated.
            batches = torch.randperm(len(inputs)).split(config.batch_size)  # type: ignore[no-untyped-call]
            for batch in batches:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
                total += float(loss.detach())
                if config.l1:
                    loss = loss + config.l1 * l1_penalty(model, filter_fn)
                if config.group_lasso:
                    loss = loss + config.group_lasso * group_lasso_penalty(model, filter_fn)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                step += 1
                if after_step is not None:
                    after_step(step)
            mean_loss = total / len(batches)
            if epoch == config.epochs or epoch % max(1, config.epochs // 4) == 0:
                progress(
                    f"{label}: epoch {epoch}/{config.epochs}, loss {mean_loss:.4f}, "
                    f"{time.perf_counter() - started:.1f} s"
                )
    model.eval()
    return mean_loss


@register_step(TrainConfig)
def _train(model: nn.Module, config: TrainConfig, context: StepContext) -> StepReport:
    data = require_data(context, config.step)
    threshold = config.near_zero_threshold
    before = near_zero_fraction(model, threshold, context.filter_fn)
    rows_before = near_zero_rows(model, threshold, context.filter_fn)
    loss = fit(model, data, config, filter_fn=context.filter_fn, progress=context.progress)
    after = near_zero_fraction(model, threshold, context.filter_fn)
    rows_after = near_zero_rows(model, threshold, context.filter_fn)
    return {
        "final_loss": round(loss, 6),
        "near_zero_threshold": threshold,
        "near_zero_weights": {
            "before": round(overall(before, model), 6),
            "after": round(overall(after, model), 6),
        },
        "near_zero_neurons": {
            "before": {name: round(v, 6) for name, v in rows_before.items()},
            "after": {name: round(v, 6) for name, v in rows_after.items()},
        },
    }
