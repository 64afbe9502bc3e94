"""Where the parts of a BERT-style encoder are, for the steps that prune and distil it.

The steps work on the module structure of Hugging Face's ``BertModel``
(``encoder.layer[i].attention.self.query`` ...) by duck typing, so nothing here imports
transformers. A model is either a ``BertModel`` or a module holding one as ``.bert`` (the
`SentenceEmbedder` of `minilm.py`).

When layers are dropped (`encoder_drop_layers`), the encoder remembers which of the
teacher's layers each remaining layer stood at, in `TEACHER_LAYERS_ATTRIBUTE`: layer-wise
distillation then matches layer *i* of the student to the teacher's layer that it
replaced, without the recipe saying so twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from sparseserve.sparsify.recipe import StepContext

# A plain list attribute of the encoder module: it travels with deepcopy, never into ONNX.
TEACHER_LAYERS_ATTRIBUTE = "sparseserve_teacher_layers"


def bert_of(model: nn.Module) -> Any:
    """The ``BertModel`` inside `model` (the model itself, or its ``.bert``)."""
    bert = model if hasattr(model, "encoder") else getattr(model, "bert", None)
    if getattr(getattr(bert, "encoder", None), "layer", None) is None:
        raise TypeError(f"{type(model).__name__} is not a BERT-style encoder (no encoder.layer)")
    return bert


def encoder_layers(model: nn.Module) -> Sequence[Any]:
    """The transformer layers of a ``BertModel`` (or of a module holding one as `.bert`)."""
    return list(bert_of(model).encoder.layer)


def teacher_layers(model: nn.Module) -> list[int] | None:
    """The teacher's layer index each layer of `model` replaced, if layers were dropped."""
    kept = getattr(bert_of(model).encoder, TEACHER_LAYERS_ATTRIBUTE, None)
    return list(kept) if kept is not None else None


def standing_layers(model: nn.Module) -> list[int]:
    """The teacher layer each layer of `model` stands at: `teacher_layers`, or each its
    own index when no layer was dropped."""
    return teacher_layers(model) or list(range(len(encoder_layers(model))))


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer *j* of *m* learns from teacher layer ceil((j + 1) * n / m) - 1 of *n*:
    evenly spread, and the last layer always matches the teacher's last."""
    if not 0 < student_layers <= teacher_layers:
        raise ValueError(
            f"a student of {student_layers} layers cannot be mapped onto a teacher of "
            f"{teacher_layers}: it needs between 1 and {teacher_layers} layers"
        )
    return [math.ceil((j + 1) * teacher_layers / student_layers) - 1 for j in range(student_layers)]


class StopForward(Exception):
    """Raised by a hook to end a forward pass of `run_batches` early (the layer of
    interest has run; the rest of the model is not needed)."""


def run_batches(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    state: dict[str, torch.Tensor],
) -> None:
    """Run `model` on each batch (tokenizer outputs), in eval mode and without gradients,
    for the hooks it carries: before each, ``state["mask"]`` holds the batch's real tokens
    (its ``attention_mask`` as booleans). A hook may raise `StopForward`."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                state["mask"] = batch["attention_mask"].bool()
                with contextlib.suppress(StopForward):
                    model(**batch)
    finally:
        model.train(was_training)


def calibration_batches(context: StepContext, why: str) -> list[dict[str, torch.Tensor]]:
    """The recipe's calibration batches as tensors; `why` ("encoder_prune: activation
    importance needs") starts the error when the step was given no data."""
    from sparseserve.sparsify.recipe import RecipeError, feeds

    if context.data is None:
        raise RecipeError(f"{why} calibration data (pass data=TrainingData(...))")
    return [
        {name: torch.from_numpy(value) for name, value in feed.items()}
        for feed in feeds(context.data.x_calibration, context.input_name)
    ]
