"""Layer-wise distillation losses for BERT-style encoders: each layer, not only the output.

An embedding loss alone tells a pruned student where to end up, but not how to get
there; TinyBERT and MiniLM reach their fidelity by also matching what each layer
computes. Two signals per layer, both masked to real (unpadded) tokens:

- **hidden states**: the layer's output, by mean squared error relative to the teacher's
  mean square (BERT's hidden states have a few very large dimensions; dividing by their
  scale keeps the loss comparable across layers and models);
- **value relations** (MiniLMv2, Wang et al. 2021): the scaled dot products of a layer's
  value vectors with each other, softmaxed over keys, matched by KL divergence. The
  value vectors are split into `relation_heads` equal parts *independent of the layer's
  attention heads*, so a student with 9 heads left of 12 (value width 288 of 384)
  compares with the teacher directly. Attention probabilities would need the same heads
  on both sides, which head pruning takes away; that is why value relations are used.

Student layer *j* learns from teacher layer ``layer_map[j]``: by default the layer it
replaced (`encoder.teacher_layers`, set when layers are dropped), else the same index
when the depths agree, else an even spread (`encoder.uniform_layer_map`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sparseserve.sparsify.encoder import (
    encoder_layers,
    teacher_layers,
    uniform_layer_map,
)

LayerIndex = Annotated[int, Field(ge=0, le=127)]


class LayerwiseConfig(BaseModel):
    """The per-layer terms of a ``distill`` step, added to its embedding loss."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_weight: float = Field(
        1.0, ge=0.0, le=100.0, description="Weight of the hidden-state term (relative MSE)."
    )
    relation_weight: float = Field(
        1.0, ge=0.0, le=100.0, description="Weight of the value-relation term (KL)."
    )
    relation_heads: int = Field(
        16,
        ge=1,
        le=64,
        description="Parts the value vectors are split into; must divide every layer's "
        "value width. MiniLM's heads are 32 wide, so 16 divides the width whatever "
        "number of heads pruning leaves (384, 352, 320, 288 ...).",
    )
    layer_map: tuple[LayerIndex, ...] | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The teacher layer each student layer learns from; default: the layer "
        "it replaced, or the same index, or an even spread.",
    )


@dataclass
class LayerStates:
    """What every layer of one forward pass computed: outputs and value vectors, each
    ``[batch, tokens, width]``."""

    hidden: list[torch.Tensor]
    values: list[torch.Tensor]

    def to(self, dtype: torch.dtype) -> LayerStates:
        """A detached copy in `dtype` (fp16 for the teacher cache: half the memory)."""
        return LayerStates(
            [t.detach().to(dtype) for t in self.hidden], [t.detach().to(dtype) for t in self.values]
        )

    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(t.numel() * t.element_size() for t in [*self.hidden, *self.values])


def _layers_of(model: nn.Module) -> Sequence[Any]:
    try:
        return encoder_layers(model)
    except TypeError as exc:
        raise ValueError(f"layer-wise distillation needs a BERT-style encoder: {exc}") from None


@contextmanager
def capture_layers(model: nn.Module) -> Iterator[LayerStates]:
    """Record each encoder layer's output and value projection while `model` runs.

    The returned `LayerStates` fills up during the forward passes inside the block (one
    pass expected); the hooks are gone after it.
    """
    layers = _layers_of(model)
    states = LayerStates([], [])

    def on_layer(_module: nn.Module, _inputs: Any, output: Any) -> None:
        # BertLayer returns a tensor in transformers 5, a tuple before.
        states.hidden.append(output[0] if isinstance(output, tuple) else output)

    def on_value(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        states.values.append(output)

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_hook(on_layer))
        handles.append(layer.attention.self.value.register_forward_hook(on_value))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def resolve_layer_map(
    student: nn.Module, teacher: nn.Module | int, config: LayerwiseConfig
) -> list[int]:
    """Which teacher layer each student layer learns from (see the module docstring);
    `teacher` is the teacher model or its number of layers."""
    teacher_depth = teacher if isinstance(teacher, int) else len(_layers_of(teacher))
    depth = len(_layers_of(student))
    mapping = list(config.layer_map) if config.layer_map is not None else teacher_layers(student)
    if mapping is None:
        mapping = list(range(depth)) if depth == teacher_depth else None
    if mapping is None:
        mapping = uniform_layer_map(depth, teacher_depth)
    if len(mapping) != depth:
        raise ValueError(
            f"distill.layerwise.layer_map has {len(mapping)} entries; the student has "
            f"{depth} layers, one entry each"
        )
    if max(mapping) >= teacher_depth:
        raise ValueError(
            f"distill.layerwise.layer_map {mapping} names a teacher layer >= "
            f"{teacher_depth}; the teacher has layers 0..{teacher_depth - 1}"
        )
    return mapping


def _token_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.to(torch.bool)


def hidden_state_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """MSE over real tokens, divided by the teacher's mean square there."""
    real = _token_mask(mask, teacher)
    target = teacher.detach().float()[real]
    return F.mse_loss(student.float()[real], target) / target.pow(2).mean().clamp_min(1e-12)


def _log_relations(values: torch.Tensor, heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    batch, tokens, width = values.shape
    if width % heads:
        raise ValueError(
            f"distill.layerwise.relation_heads {heads} must divide the value width {width}"
        )
    size = width // heads
    split = values.float().view(batch, tokens, heads, size).transpose(1, 2)  # [B, R, T, d]
    scores = split @ split.transpose(-1, -2) / math.sqrt(size)  # [B, R, T, T]
    # Padding keys get no weight; a large finite value keeps p * log p at 0, not NaN.
    scores = scores.masked_fill(~key_mask[:, None, None, :], -1e9)
    return F.log_softmax(scores, dim=-1)


def value_relation_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, heads: int
) -> torch.Tensor:
    """KL(teacher || student) of the value-value relations, per relation head and real
    query token, averaged."""
    real = _token_mask(mask, teacher)
    log_student = _log_relations(student, heads, real)
    log_teacher = _log_relations(teacher.detach(), heads, real)
    per_query = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)  # [B, R, T]
    weights = real[:, None, :].expand_as(per_query).float()
    return (per_query * weights).sum() / weights.sum().clamp_min(1.0)


def layerwise_loss(
    student: LayerStates,
    teacher: LayerStates,
    mask: torch.Tensor | None,
    layer_map: Sequence[int],
    config: LayerwiseConfig,
) -> torch.Tensor:
    """The weighted per-layer terms, each averaged over the student's layers."""
    total = torch.zeros(())
    count = len(layer_map)
    for j, t in enumerate(layer_map):
        if config.hidden_weight > 0:
            term = hidden_state_loss(student.hidden[j], teacher.hidden[t], mask)
            total = total + config.hidden_weight * term / count
        if config.relation_weight > 0:
            term = value_relation_loss(
                student.values[j], teacher.values[t], mask, config.relation_heads
            )
            total = total + config.relation_weight * term / count
    return total
