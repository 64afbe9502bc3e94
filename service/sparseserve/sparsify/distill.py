"""Distillation for recovery: train a pruned student to reproduce the dense teacher.

After structured pruning there are usually no labels to fine-tune on (a sentence
embedder was trained on a billion pairs nobody ships), but the dense model itself is a
perfect label source: the student learns to give the teacher's outputs on unlabelled
input. Both models are called the same way, with a batch's tensors as positional
arguments in its order (as the ONNX export calls them), and must return one tensor:
embeddings (loss: cosine and/or MSE) or logits (loss: KL divergence at a temperature, as
in Hinton et al. 2015).

In a recipe this is the ``distill`` step; the teacher is the family's base model and the
batches are the recipe's training data::

    - distill: {steps: 250, learning_rate: 0.0002, loss: cosine_mse, freeze: [bert.embeddings]}
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sparseserve.sparsify.export import run_torch
from sparseserve.sparsify.quality import fidelity
from sparseserve.sparsify.recipe import (
    RecipeError,
    StepConfig,
    StepContext,
    StepReport,
    feeds,
    register_step,
)

Batch = Mapping[str, torch.Tensor]
ModulePath = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")]


class DistillLoss(StrEnum):
    """What the student is trained to match.

    ``cosine``: direction of embeddings (1 - cosine similarity); ``mse``: the raw output
    values; ``cosine_mse``: both, summed; ``kl``: the teacher's softmax over logits.
    """

    cosine = "cosine"
    mse = "mse"
    cosine_mse = "cosine_mse"
    kl = "kl"


class DistillConfig(StepConfig):
    """How long and how hard to train the student; every field bounded."""

    step = "distill"
    steps: int = Field(300, ge=1, le=1_000_000, description="Optimizer steps.")
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    warmup_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Linear warm-up, then linear decay to zero."
    )
    loss: DistillLoss = DistillLoss.cosine
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="Softmax temperature (kl).")
    max_grad_norm: float | None = Field(1.0, gt=0.0, le=1000.0)
    student_dropout: bool = Field(
        False, description="Train with the student's dropout on; off matches the teacher best."
    )
    cache_teacher: bool = Field(
        True, description="Compute teacher outputs once per batch when batches is a Sequence."
    )
    log_every: int = Field(50, ge=1, le=1_000_000, description="Steps between progress lines.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    freeze: tuple[ModulePath, ...] = Field(
        (),
        description="Submodules of the student kept as they are, e.g. bert.embeddings: "
        "pruning did not touch the token table, and not updating it saves an optimizer "
        "pass over most of MiniLM's parameters.",
    )
    batch_size: int = Field(
        32, ge=1, le=4096, description="Rows per batch for row data (text keeps its batches)."
    )

    def label(self) -> str:
        return f"distill {self.steps} steps ({self.loss.value})"


@dataclass(frozen=True)
class DistillResult:
    """The loss of every step, and how long training took."""

    losses: list[float]
    seconds: float

    @property
    def steps(self) -> int:
        return len(self.losses)

    def mean_loss(self, first: bool, window: int = 20) -> float:
        """Mean loss of the first (or last) `window` steps: single steps are noisy."""
        part = self.losses[:window] if first else self.losses[-window:]
        return sum(part) / len(part)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, config: DistillConfig
) -> torch.Tensor:
    """The loss between one batch of student and teacher outputs (teacher detached)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student output shape {tuple(student.shape)} differs from the teacher's "
            f"{tuple(teacher.shape)}"
        )
    teacher = teacher.detach()
    if config.loss is DistillLoss.kl:
        t = config.temperature
        return (
            F.kl_div(
                F.log_softmax(student / t, dim=-1),
                F.log_softmax(teacher / t, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            * t
            * t  # keeps gradient size independent of the temperature
        )
    loss = student.new_zeros(())
    if config.loss in (DistillLoss.cosine, DistillLoss.cosine_mse):
        loss = loss + (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if config.loss in (DistillLoss.mse, DistillLoss.cosine_mse):
        loss = loss + F.mse_loss(student, teacher)
    return loss


def _schedule(config: DistillConfig) -> Callable[[int], float]:
    warmup = math.ceil(config.warmup_fraction * config.steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    return factor


def distill(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Batch],
    config: DistillConfig,
    progress: Callable[[str], None] | None = None,
) -> DistillResult:
    """Train `student` (in place) for `config.steps` steps to match `teacher` on
    `batches`, cycling through them as often as needed.

    A one-shot iterator is read once: training then ends when it runs out. The teacher is
    never changed, nor are the student's `config.freeze` submodules. `progress`, if
    given, receives a line every `config.log_every` steps.
    """
    with _frozen(student, config.freeze):
        return _train(teacher, student, batches, config, progress)


@contextmanager
def _frozen(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """`requires_grad` off for the parameters of the submodules `names`, until exit."""
    parameters = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            children = ", ".join(child for child, _ in model.named_children())
            raise ValueError(
                f"distill.freeze: {type(model).__name__} has no submodule {name!r} "
                f"(its children: {children})"
            ) from None
        parameters += [p for p in module.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def _train(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Batch],
    config: DistillConfig,
    progress: Callable[[str], None] | None,
) -> DistillResult:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    cache: dict[int, torch.Tensor] = {}
    cacheable = config.cache_teacher and isinstance(batches, Sequence)
    teacher_was_training, student_was_training = teacher.training, student.training
    teacher.eval()
    student.train(config.student_dropout)
    losses: list[float] = []
    started = time.perf_counter()
    try:
        while len(losses) < config.steps:
            before = len(losses)
            for index, batch in enumerate(batches):
                if cacheable and index in cache:
                    target = cache[index]
                else:
                    with torch.no_grad():
                        target = teacher(*batch.values())
                    if cacheable:
                        cache[index] = target
                loss = distillation_loss(student(*batch.values()), target, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                step = len(losses)
                if progress is not None and (step % config.log_every == 0 or step == 1):
                    recent = losses[-config.log_every :]
                    progress(
                        f"distill step {step}/{config.steps}: loss {sum(recent) / len(recent):.5f}"
                        f" ({time.perf_counter() - started:.0f} s)"
                    )
                if step >= config.steps:
                    break
            if len(losses) == before:
                if before == 0:
                    raise ValueError("distill needs at least one batch, got none")
                break  # a one-shot iterator ran out
    finally:
        teacher.train(teacher_was_training)
        student.train(student_was_training)
        torch.random.set_rng_state(generator_state)
    return DistillResult(losses, time.perf_counter() - started)


def _closeness(teacher: np.ndarray, student: np.ndarray, loss: DistillLoss) -> dict[str, float]:
    """How close the student's outputs are to the teacher's: embedding fidelity, or for
    logits the fraction of rows with the same top class."""
    if loss is DistillLoss.kl:
        same = teacher.argmax(axis=1) == student.argmax(axis=1)
        return {"top1_agreement": round(float(same.mean()), 6)}
    return fidelity(teacher, student).rounded()


@register_step(DistillConfig)
def _distill(model: nn.Module, config: DistillConfig, context: StepContext) -> StepReport:
    if context.teacher is None:
        raise RecipeError(
            "distill trains towards a teacher: in a recipe, the family's base model; "
            "from Python, pass apply(..., teacher=model)"
        )
    if context.data is None:
        raise RecipeError("distill needs input to run both models on (pass data=TrainingData(...))")
    data, teacher = context.data, context.teacher
    batches = [
        {name: torch.from_numpy(value) for name, value in feed.items()}
        for feed in feeds(data.x_train, context.input_name, config.batch_size)
    ]
    heldout = feeds(data.x_heldout, context.input_name) if data.x_heldout is not None else None
    report: dict[str, Any] = {"train_batches": len(batches)}
    if heldout:
        target = run_torch(teacher, heldout)
        report["heldout_before"] = _closeness(target, run_torch(model, heldout), config.loss)
    result = distill(teacher, model, batches, config, progress=context.progress)
    # Mean losses over windows that never overlap: single steps are noisy.
    window = max(1, min(20, result.steps // 2))
    report["loss_window_steps"] = window
    report["loss_first"] = round(result.mean_loss(first=True, window=window), 6)
    report["loss_last"] = round(result.mean_loss(first=False, window=window), 6)
    report["distill_seconds"] = round(result.seconds, 1)
    if heldout:
        report["heldout_after"] = _closeness(target, run_torch(model, heldout), config.loss)
        context.progress(
            f"distill: held-out {report['heldout_before']} -> {report['heldout_after']}"
        )
    return report
