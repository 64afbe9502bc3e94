"""Unstructured gradual pruning of a BERT encoder's linear layers, while distilling.

One cut to 80-90% zeros destroys an encoder; oBERT and Prune Once for All keep BERT
within about 1% of dense by raising sparsity step by step while the model is trained
to match the dense teacher. This step does that with the cubic schedule of `prune.py`
(Zhu & Gupta 2017): the weights of every linear layer inside ``encoder.layer`` (Q, K,
V, attention output, FFN in and out; never the embeddings) are masked by magnitude,
and the masks are tightened every `frequency_steps` distillation steps until
`ramp_fraction` of the steps are done; the rest recover at `final_sparsity`.

The masks are parametrizations (`prune.WeightMask`): the pipeline bakes them before
export, and the exported file stores the weights as ONNX sparse initializers
(`export.sparse_storage`). In a recipe::

    - encoder_gradual_prune:
        final_sparsity: 0.85
        distill: {steps: 1000, learning_rate: 0.0002, loss: cosine_mse}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from sparseserve.sparsify.distill import DistillConfig, distill_with_context
from sparseserve.sparsify.encoder import calibration_batches, run_batches
from sparseserve.sparsify.prune import (
    PruneScope,
    cubic_sparsity,
    layer_sparsity,
    magnitude_masks,
    prunable_layers,
    set_mask,
)
from sparseserve.sparsify.recipe import (
    Sparsity,
    StepConfig,
    StepContext,
    StepReport,
    register_step,
)

GradualImportance = Literal["magnitude", "activation"]


class EncoderGradualPruneConfig(StepConfig):
    """Zero `final_sparsity` of every encoder linear layer's weights, gradually, while
    distilling with `distill`'s settings."""

    step = "encoder_gradual_prune"
    initial_sparsity: Sparsity = 0.0
    final_sparsity: Sparsity
    scope: PruneScope = PruneScope.per_layer
    importance: GradualImportance = Field(
        "magnitude",
        description="magnitude: |w|; activation: |w| times the norm of the input it reads "
        "on the calibration batches (Wanda), which keeps small weights on the few large "
        "hidden dimensions BERT has.",
    )
    frequency_steps: int = Field(
        10, ge=1, le=100_000, description="Distillation steps between tightenings."
    )
    ramp_fraction: float = Field(
        0.75,
        gt=0.0,
        le=1.0,
        description="Fraction of the distillation over which sparsity rises; the rest "
        "recovers at final_sparsity.",
    )
    distill: DistillConfig

    @model_validator(mode="after")
    def _rising(self) -> EncoderGradualPruneConfig:
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError("final_sparsity must be at least initial_sparsity")
        return self

    def label(self) -> str:
        return (
            f"encoder gradual {self.importance} {self.initial_sparsity:.0%}->"
            f"{self.final_sparsity:.0%} (cubic) while distilling {self.distill.steps} steps"
        )


def encoder_linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the encoder's layers, by qualified name."""
    return {
        name: module
        for name, module in prunable_layers(model).items()
        if isinstance(module, nn.Linear) and "encoder.layer." in name
    }


def ramp_steps(config: EncoderGradualPruneConfig) -> int:
    """The distillation step at which `final_sparsity` is reached."""
    return max(1, round(config.ramp_fraction * config.distill.steps))


def sparsity_at(config: EncoderGradualPruneConfig, step: int) -> float:
    """The schedule's target sparsity after `step` distillation steps."""
    return cubic_sparsity(step, ramp_steps(config), config.initial_sparsity, config.final_sparsity)


def input_norms(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    batches: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Per layer, the L2 norm of each input feature over the real (unpadded) tokens of
    `batches` (tokenizer outputs with an ``attention_mask``)."""
    sums = {
        name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in layers.items()
    }
    state: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def on_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            real = args[0][state["mask"]].double()
            sums[name] += (real * real).sum(dim=0)

        return on_input

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        run_batches(model, batches, state)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt().float() for name, total in sums.items()}


@register_step(EncoderGradualPruneConfig)
def _encoder_gradual_prune(
    model: nn.Module, config: EncoderGradualPruneConfig, context: StepContext
) -> StepReport:
    layers = {
        name: module
        for name, module in encoder_linear_layers(model).items()
        if context.filter_fn is None or context.filter_fn(module, name)
    }
    if not layers:
        raise ValueError("encoder_gradual_prune: the model has no linear layers in encoder.layer")
    ramp = ramp_steps(config)
    norms = None
    if config.importance == "activation":
        calibration = calibration_batches(
            context, "encoder_gradual_prune: activation importance needs"
        )
        norms = input_norms(model, layers, calibration)

    def prune_to(step: int) -> None:
        with torch.no_grad():
            masks = magnitude_masks(layers, sparsity_at(config, step), config.scope, norms)
            for name, mask in masks.items():
                set_mask(layers[name], mask)

    # Masks exist before the optimizer does: it then trains the unmasked originals.
    prune_to(0)

    def after_step(step: int) -> None:
        if step <= ramp and (step % config.frequency_steps == 0 or step == ramp):
            prune_to(step)

    report: dict[str, Any] = {
        "ramp_steps": ramp,
        # Lists, not tuples: the manifest must equal what its YAML reads back as.
        "schedule": [
            [step, round(sparsity_at(config, step), 4)]
            for step in sorted({*range(0, ramp + 1, max(1, ramp // 8)), ramp})
        ],
    }
    report["distill"] = distill_with_context(
        model, config.distill, context, name="gradual", after_step=after_step
    )
    sparsities = {name: layer_sparsity(module) for name, module in layers.items()}
    weights = sum(module.weight.numel() for module in layers.values())
    zeros = sum(sparsities[name] * layers[name].weight.numel() for name in layers)
    report["encoder_sparsity"] = round(zeros / weights, 4)
    report["layer_sparsity"] = {name: round(value, 4) for name, value in sparsities.items()}
    context.progress(f"encoder_gradual_prune: encoder weights {zeros / weights:.1%} zero")
    return report
