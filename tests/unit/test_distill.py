"""Distillation: a student trained on nothing but a teacher's outputs gets closer to it."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("torch", reason="needs the [sparsify] extra")

import torch
from pydantic import ValidationError
from torch import nn

from sparseserve.sparsify import distill as distill_module
from sparseserve.sparsify.distill import (
    DistillConfig,
    DistillLoss,
    TrainDevice,
    distill,
    distillation_loss,
    resolve_device,
)
from sparseserve.sparsify.recipe import RecipeError


class Embedder(nn.Module):
    """x -> normalised embedding, through a hidden layer of `width`."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=-1)


class Classifier(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def batches(count: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(32, 16, generator=generator)} for _ in range(count)]


def models(kind: type[nn.Module]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = kind(64)
    torch.manual_seed(1)  # a different, smaller network: it starts far from the teacher
    return teacher, kind(24)


def mean_loss(teacher: nn.Module, student: nn.Module, data: list, config: DistillConfig) -> float:
    with torch.no_grad():
        losses = [float(distillation_loss(student(**b), teacher(**b), config)) for b in data]
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    ("kind", "loss"),
    [
        (Embedder, DistillLoss.cosine),
        (Embedder, DistillLoss.mse),
        (Embedder, DistillLoss.cosine_mse),
        (Classifier, DistillLoss.kl),
    ],
)
def test_distillation_brings_the_student_to_the_teacher(kind: type, loss: DistillLoss) -> None:
    teacher, student = models(kind)
    config = DistillConfig(steps=150, learning_rate=1e-2, loss=loss, warmup_fraction=0.0)
    held_out = batches(4, seed=99)
    before = mean_loss(teacher, student, held_out, config)
    teacher_state = copy.deepcopy(teacher.state_dict())

    result = distill(teacher, student, batches(), config)

    assert result.steps == 150
    assert result.mean_loss(first=False) < 0.5 * result.mean_loss(first=True)
    # On inputs it never trained on, too.
    assert mean_loss(teacher, student, held_out, config) < 0.5 * before
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[name]), f"the teacher changed: {name}"


def test_teacher_outputs_are_computed_once_per_batch_of_a_sequence() -> None:
    teacher, student = models(Embedder)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    data = batches(4)
    distill(teacher, student, data, DistillConfig(steps=12))
    assert len(calls) == 4  # three epochs, one teacher pass per batch
    calls.clear()
    distill(teacher, student, data, DistillConfig(steps=12, cache_teacher=False))
    assert len(calls) == 12


def test_a_one_shot_iterator_ends_training_when_it_runs_out() -> None:
    teacher, student = models(Embedder)
    result = distill(teacher, student, iter(batches(5)), DistillConfig(steps=100))
    assert result.steps == 5


def test_progress_lines_come_every_log_every_steps() -> None:
    teacher, student = models(Embedder)
    lines: list[str] = []
    distill(teacher, student, batches(), DistillConfig(steps=20, log_every=10), lines.append)
    assert [line.split(":")[0] for line in lines] == [
        "distill step 1/20",
        "distill step 10/20",
        "distill step 20/20",
    ]


def test_training_mode_and_random_state_are_restored() -> None:
    teacher, student = models(Embedder)
    teacher.train()
    student.eval()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    distill(teacher, student, batches(2), DistillConfig(steps=3))
    assert teacher.training and not student.training
    assert torch.equal(torch.rand(3), expected)


def test_bad_inputs_are_refused_with_what_was_expected() -> None:
    teacher, student = models(Embedder)
    with pytest.raises(ValueError, match="at least one batch"):
        distill(teacher, student, [], DistillConfig(steps=3))
    with pytest.raises(ValueError, match=r"student output shape \(2, 3\) differs .* \(2, 4\)"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), DistillConfig())


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"steps": 0}, "steps"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"loss": "l1"}, "loss"),
        ({"temperature": -1.0}, "temperature"),
        ({"epochs": 3}, "epochs"),
    ],
)
def test_config_is_bounded_and_strict(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        DistillConfig.model_validate(fields)


def test_device_auto_is_the_gpu_where_torch_sees_one_and_cuda_without_one_is_refused() -> None:
    """The decision itself, both ways (this machine has no GPU: `cuda_available` stands in
    for the probe; a real GPU run is in docs/minilm.md, not in this suite)."""
    assert resolve_device(TrainDevice.auto, cuda_available=False) == "cpu"
    assert resolve_device(TrainDevice.auto, cuda_available=True) == "cuda"
    assert resolve_device(TrainDevice.cpu, cuda_available=True) == "cpu"
    assert resolve_device(TrainDevice.cuda, cuda_available=True) == "cuda"
    with pytest.raises(RecipeError, match=r"distill\.device is cuda, but torch .* sees no CUDA"):
        resolve_device(TrainDevice.cuda, cuda_available=False)
    with pytest.raises(ValidationError, match="device"):
        DistillConfig(device="tpu")


def test_training_on_the_cpu_reports_it_and_refuses_cuda_without_a_gpu() -> None:
    teacher, student = models(Embedder)
    config = DistillConfig(steps=3, device="cpu")
    result = distill(teacher, student, batches(2), config)
    assert result.device == "cpu"
    assert {p.device.type for p in [*teacher.parameters(), *student.parameters()]} == {"cpu"}
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="sees no CUDA GPU"):
            distill(teacher, student, batches(2), config.model_copy(update={"device": "cuda"}))


def test_the_models_go_back_to_their_device_and_unfrozen_even_when_training_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The moves are recorded, not made (there is no GPU here): `distill` asks for the
    training device, then for each model's own, also when the training raises."""
    teacher, student = models(Embedder)
    moves: list[tuple[str, str]] = []
    for name, model in (("teacher", teacher), ("student", student)):
        monkeypatch.setattr(
            model, "to", lambda target, name=name: moves.append((name, str(target)))
        )
    monkeypatch.setattr(distill_module, "resolve_device", lambda device: "cuda")

    def broken(*args: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(distill_module, "_train", broken)
    config = DistillConfig(steps=3, freeze=("net.0",))
    with pytest.raises(RuntimeError, match="out of memory"):
        distill(teacher, student, batches(2), config)
    assert moves == [
        ("teacher", "cuda"),
        ("student", "cuda"),
        ("teacher", "cpu"),
        ("student", "cpu"),
    ]
    assert all(p.requires_grad for p in student.parameters())
