"""Distillation for recovery: train a pruned student to reproduce the dense teacher.

After structured pruning there are usually no labels to fine-tune on (a sentence
embedder was trained on a billion pairs nobody ships), but the dense model itself is a
perfect label source: the student learns to give the teacher's outputs on unlabelled
input. Both models are called the same way, with a batch's tensors as positional
arguments in its order (as the ONNX export calls them), and must return one tensor:
embeddings (loss: cosine and/or MSE) or logits (loss: KL divergence at a temperature, as
in Hinton et al. 2015). For BERT-style encoders, `layerwise` adds each layer's hidden
states and value relations to the loss (`layerwise.py`).

In a recipe this is the ``distill`` step; the teacher is the family's base model and the
batches are the recipe's training data::

    - distill: {steps: 250, learning_rate: 0.0002, loss: cosine_mse, freeze: [bert.embeddings],
                layerwise: {hidden_weight: 1.0, relation_weight: 1.0}}

Long runs are resumable: given a checkpoint path, the student, the optimizer, the
schedule and the losses so far are saved every `checkpoint_every` steps, and a run that
finds a checkpoint of the same start (same config, same starting weights, same batches)
continues from it, to the same result as a run that was never interrupted.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sparseserve.backends.hardware import cpu_has_bf16
from sparseserve.sparsify.export import device_of, run_torch
from sparseserve.sparsify.layerwise import (
    LayerStates,
    LayerwiseConfig,
    capture_layers,
    layerwise_loss,
    resolve_layer_map,
)
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
# Called after every optimizer step with the number of steps done (gradual pruning).
AfterStep = Callable[[int], None]


class DistillLoss(StrEnum):
    """What the student is trained to match.

    ``cosine``: direction of embeddings (1 - cosine similarity); ``mse``: the raw output
    values; ``cosine_mse``: both, summed; ``kl``: the teacher's softmax over logits.
    """

    cosine = "cosine"
    mse = "mse"
    cosine_mse = "cosine_mse"
    kl = "kl"


class Precision(StrEnum):
    """The arithmetic of both models' forward passes while distilling.

    ``auto``: bf16 autocast where the CPU multiplies bf16 natively (AVX512-BF16 or AMX,
    from /proc/cpuinfo), fp32 elsewhere, where bf16 is emulated and slower. ``fp32`` and
    ``bf16`` force one. Weights, gradients and the optimizer stay fp32 either way.
    """

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def resolve_precision(
    precision: Precision, has_bf16: bool | None = None, device: str = "cpu"
) -> Precision:
    """`precision` with ``auto`` decided for `device` (`has_bf16` overrides the probe):
    on a CPU, bf16 where it multiplies bf16 natively; on a CUDA GPU, bf16 where torch says
    the GPU supports it (Ampere and later)."""
    if precision is not Precision.auto:
        return precision
    if has_bf16 is not None:
        native = has_bf16
    elif device == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = cpu_has_bf16()
    return Precision.bf16 if native else Precision.fp32


class TrainDevice(StrEnum):
    """Where both models run while distilling.

    ``auto``: the first CUDA GPU when torch sees one, else the CPU. ``cpu`` and ``cuda``
    force one; ``cuda`` without a GPU is an error, never a silent fall-back. The models are
    moved there for the training and back afterwards; nothing else changes.
    """

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def resolve_device(device: TrainDevice, cuda_available: bool | None = None) -> str:
    """``cpu`` or ``cuda``: `device` with ``auto`` decided (`cuda_available` overrides
    torch's probe)."""
    device = TrainDevice(device)  # a model_copy(update=...) passes the plain string
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if device is TrainDevice.cuda and not available:
        raise RecipeError(
            f"distill.device is cuda, but torch {torch.__version__} sees no CUDA GPU "
            "(set device: cpu or auto)"
        )
    if device is TrainDevice.auto:
        return "cuda" if available else "cpu"
    return device.value


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
    teacher_cache_mb: int = Field(
        2048,
        ge=0,
        le=1_000_000,
        description="Memory for cached teacher outputs and (layerwise) per-layer states, "
        "kept in fp16; batches beyond it are recomputed each time.",
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
    layerwise: LayerwiseConfig | None = Field(
        None, description="Also match each layer's hidden states and value relations."
    )
    precision: Precision = Precision.auto
    device: TrainDevice = TrainDevice.auto
    checkpoint_every: int = Field(
        50, ge=1, le=1_000_000, description="Steps between resumable checkpoints."
    )

    def label(self) -> str:
        layers = " + layer-wise" if self.layerwise is not None else ""
        return f"distill {self.steps} steps ({self.loss.value}{layers})"


@dataclass(frozen=True)
class DistillResult:
    """The loss of every step, and how the training ran."""

    losses: list[float]
    seconds: float
    precision: Precision = Precision.fp32
    resumed_at: int = 0  # steps that came from a checkpoint
    cached_batches: int = 0  # teacher outputs held in memory
    device: str = "cpu"  # where it trained: cpu or cuda

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
    student, teacher = student.float(), teacher.detach().float()
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


class ProgressBar:
    """A one-line bar with the loss, the time per step and an ETA, redrawn in place on a
    terminal (`stream`); a stream that is not a terminal gets nothing (logs get the
    progress lines instead)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = False

    def update(self, step: int, loss: float, seconds_per_step: float) -> None:
        """Redraw for `step` of `total` done."""
        if not self.enabled:
            return
        filled = self.width * step // max(1, self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        eta = format_duration(seconds_per_step * (self.total - step))
        self.stream.write(
            f"\r{self.label} [{bar}] {step}/{self.total} loss {loss:.5f} "
            f"{seconds_per_step:.2f} s/step ETA {eta} "
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the line, so what is printed next starts on its own."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``1 h 02 min``: an ETA a person reads at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def distill(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Batch],
    config: DistillConfig,
    progress: Callable[[str], None] | None = None,
    *,
    after_step: AfterStep | None = None,
    checkpoint: Path | None = None,
    bar: ProgressBar | None = None,
) -> DistillResult:
    """Train `student` (in place) for `config.steps` steps to match `teacher` on
    `batches`, cycling through them as often as needed.

    A one-shot iterator is read once: training then ends when it runs out. The teacher is
    never changed, nor are the student's `config.freeze` submodules. `progress`, if
    given, receives a line every `config.log_every` steps; `after_step(step)` runs after
    each optimizer step. `checkpoint` (a file; needs `batches` to be a Sequence) makes
    the run resumable, see the module docstring.
    """
    if checkpoint is not None and not isinstance(batches, Sequence):
        raise ValueError("a resumable distillation needs its batches as a Sequence")
    device = resolve_device(config.device)
    homes = [device_of(model) for model in (teacher, student)]
    with _frozen(student, config.freeze):
        try:
            teacher.to(device)
            student.to(device)
            return _train(
                teacher, student, batches, config, progress, after_step, checkpoint, bar, device
            )
        finally:
            teacher.to(homes[0])
            student.to(homes[1])


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


@dataclass
class _Target:
    """The teacher's answer to one batch: its output and, for layer-wise, its layers."""

    output: torch.Tensor
    layers: LayerStates | None

    def nbytes(self) -> int:
        layers = self.layers.nbytes() if self.layers is not None else 0
        return self.output.numel() * self.output.element_size() + layers


def _forward(
    model: nn.Module, batch: Batch, layerwise: bool, bf16: bool, device: str = "cpu"
) -> tuple[torch.Tensor, LayerStates | None]:
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        if not layerwise:
            return model(*batch.values()), None
        with capture_layers(model) as states:
            output = model(*batch.values())
        return output, states


def _fingerprint(
    config: DistillConfig,
    student: nn.Module,
    batches: Sequence[Batch],
    device: str,
    precision: Precision,
) -> str:
    """What a checkpoint must have started from to be resumed: the same config (its
    logging aside), trained on the same kind of device at the same precision (``auto``
    decided: a GPU run does not resume on a CPU, nor bf16 at fp32), the same starting
    weights and the same batches."""
    digest = hashlib.sha256(
        config.model_dump_json(
            exclude={"log_every", "checkpoint_every", "device", "precision"}
        ).encode()
    )
    digest.update(f"{device}/{precision.value}".encode())
    tensors = [*student.state_dict().items()]
    tensors += [(f"batch{i}.{k}", v) for i, b in enumerate(batches) for k, v in b.items()]
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # an interruption never leaves half a checkpoint


def _load_checkpoint(path: Path | None, fingerprint: str | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError):
        return None  # unreadable: start over rather than fail the build
    return state if state.get("fingerprint") == fingerprint else None


def _train(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Batch],
    config: DistillConfig,
    progress: Callable[[str], None] | None,
    after_step: AfterStep | None,
    checkpoint: Path | None,
    bar: ProgressBar | None,
    device: str,
) -> DistillResult:
    precision = resolve_precision(config.precision, device=device)
    bf16 = precision is Precision.bf16
    layerwise = config.layerwise
    layer_map = resolve_layer_map(student, teacher, layerwise) if layerwise is not None else []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    sequence = batches if isinstance(batches, Sequence) else None
    fingerprint = (
        _fingerprint(config, student, sequence, device, precision)
        if checkpoint and sequence
        else None
    )
    losses: list[float] = []
    resumed = _load_checkpoint(checkpoint, fingerprint)
    if resumed is not None:
        student.load_state_dict(resumed["student"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        torch.random.set_rng_state(resumed["rng"])
        if device == "cuda" and "cuda_rng" in resumed:  # the student's dropout there
            torch.cuda.set_rng_state_all(resumed["cuda_rng"])
        losses = list(resumed["losses"])
        if progress is not None:
            progress(f"distill: resumed at step {len(losses)}/{config.steps} from {checkpoint}")
    resumed_at = len(losses)

    cache: dict[int, _Target] = {}
    cache_budget = config.teacher_cache_mb * 2**20
    cacheable = config.cache_teacher and sequence is not None

    def target_for(index: int | None, batch: Batch) -> _Target:
        nonlocal cache_budget
        if index is not None and index in cache:
            return cache[index]
        with torch.no_grad():
            output, layers = _forward(teacher, batch, layerwise is not None, bf16, device)
        target = _Target(output.float(), layers.to(torch.float16) if layers else None)
        if cacheable and index is not None and target.nbytes() <= cache_budget:
            cache[index] = target
            cache_budget -= target.nbytes()
        return target

    if sequence is not None:
        if not sequence:
            raise ValueError("distill needs at least one batch, got none")
        indexed: Iterator[tuple[int | None, Batch]] = (
            (step % len(sequence), sequence[step % len(sequence)])
            for step in range(resumed_at, config.steps)
        )
    else:
        indexed = ((None, batch) for batch in batches)

    teacher_was_training, student_was_training = teacher.training, student.training
    teacher.eval()
    student.train(config.student_dropout)
    started = time.perf_counter()
    try:
        for index, batch in indexed:
            if len(losses) >= config.steps:
                break
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            target = target_for(index, batch)
            output, layers = _forward(student, batch, layerwise is not None, bf16, device)
            loss = distillation_loss(output, target.output, config)
            if layerwise is not None and layers is not None and target.layers is not None:
                mask = batch.get("attention_mask")
                loss = loss + layerwise_loss(layers, target.layers, mask, layer_map, layerwise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            if config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step = len(losses)
            if after_step is not None:
                after_step(step)
            elapsed = time.perf_counter() - started
            per_step = elapsed / (step - resumed_at)
            recent = losses[-config.log_every :]
            if bar is not None:
                bar.update(step, sum(recent) / len(recent), per_step)
            if progress is not None and (step % config.log_every == 0 or step == 1):
                eta = format_duration(per_step * (config.steps - step))
                progress(
                    f"distill step {step}/{config.steps}: loss {sum(recent) / len(recent):.5f}"
                    f" ({elapsed:.0f} s, {per_step:.2f} s/step, ETA {eta})"
                )
            due = step % config.checkpoint_every == 0 or step == config.steps
            if due and fingerprint is not None and checkpoint is not None:
                _save_checkpoint(
                    checkpoint,
                    {
                        "fingerprint": fingerprint,
                        "losses": losses,
                        "student": student.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": torch.random.get_rng_state(),
                        **(
                            {"cuda_rng": torch.cuda.get_rng_state_all()} if device == "cuda" else {}
                        ),
                    },
                )
        if not losses:
            raise ValueError("distill needs at least one batch, got none")
    finally:
        if bar is not None:
            bar.close()
        teacher.train(teacher_was_training)
        student.train(student_was_training)
        torch.random.set_rng_state(generator_state)
    seconds = time.perf_counter() - started
    return DistillResult(losses, seconds, precision, resumed_at, len(cache), device)


def _closeness(teacher: np.ndarray, student: np.ndarray, loss: DistillLoss) -> dict[str, float]:
    """How close the student's outputs are to the teacher's: embedding fidelity, or for
    logits the fraction of rows with the same top class."""
    if loss is DistillLoss.kl:
        same = teacher.argmax(axis=1) == student.argmax(axis=1)
        return {"top1_agreement": round(float(same.mean()), 6)}
    return fidelity(teacher, student).rounded()


def distill_with_context(
    model: nn.Module,
    config: DistillConfig,
    context: StepContext,
    *,
    name: str = "distill",
    after_step: AfterStep | None = None,
) -> StepReport:
    """Run a distill step on the recipe's data towards its teacher, measuring the
    held-out fidelity before and after; the report of the ``distill`` step.

    Other steps that distil (gradual pruning) call this too; `name` tells their
    checkpoints apart within one step's checkpoint folder.
    """
    if context.teacher is None:
        raise RecipeError(
            "distill trains towards a teacher: in a recipe, the family's base model; "
            "from Python, pass apply(..., teacher=model)"
        )
    if context.data is None:
        raise RecipeError("distill needs input to run both models on (pass data=TrainingData(...))")
    if context.distill_precision is not None:
        config = config.model_copy(update={"precision": Precision(context.distill_precision)})
    data, teacher = context.data, context.teacher
    batches = [
        {key: torch.from_numpy(value) for key, value in feed.items()}
        for feed in feeds(data.x_train, context.input_name, config.batch_size)
    ]
    heldout = feeds(data.x_heldout, context.input_name) if data.x_heldout is not None else None
    report: dict[str, Any] = {"train_batches": len(batches)}
    if heldout:
        target = run_torch(teacher, heldout)
        report["heldout_before"] = _closeness(target, run_torch(model, heldout), config.loss)
    checkpoint = context.checkpoint_dir / f"{name}.pt" if context.checkpoint_dir else None
    bar = ProgressBar(config.steps, name) if context.progress_bar else None
    result = distill(
        teacher,
        model,
        batches,
        config,
        progress=context.progress,
        after_step=after_step,
        checkpoint=checkpoint,
        bar=bar,
    )
    # Mean losses over windows that never overlap: single steps are noisy.
    window = max(1, min(20, result.steps // 2))
    report["loss_window_steps"] = window
    report["loss_first"] = round(result.mean_loss(first=True, window=window), 6)
    report["loss_last"] = round(result.mean_loss(first=False, window=window), 6)
    report["distill_seconds"] = round(result.seconds, 1)
    report["precision"] = result.precision.value
    report["device"] = result.device
    if result.resumed_at:
        report["resumed_at_step"] = result.resumed_at
    if heldout:
        report["heldout_after"] = _closeness(target, run_torch(model, heldout), config.loss)
        context.progress(
            f"{name}: held-out {report['heldout_before']} -> {report['heldout_after']}"
        )
    return report


@register_step(DistillConfig)
def _distill(model: nn.Module, config: DistillConfig, context: StepContext) -> StepReport:
    return distill_with_context(model, config, context)
