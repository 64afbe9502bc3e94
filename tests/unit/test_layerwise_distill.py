"""Layer-wise distillation, gradual and depth pruning, resumable and bf16-aware training,
in miniature on the tiny BERT: each mechanism does what its recipe step promises."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("transformers", reason="needs the [sparsify] extra")

import torch
from pydantic import ValidationError

from sparseserve.backends.hardware import cpu_has_bf16
from sparseserve.sparsify.distill import (
    DistillConfig,
    DistillLoss,
    Precision,
    ProgressBar,
    distill,
    format_duration,
    resolve_precision,
)
from sparseserve.sparsify.encoder import encoder_layers, teacher_layers, uniform_layer_map
from sparseserve.sparsify.encoder_gradual import EncoderGradualPruneConfig
from sparseserve.sparsify.layerwise import (
    LayerwiseConfig,
    capture_layers,
    layerwise_loss,
    resolve_layer_map,
)
from sparseserve.sparsify.minilm import SentenceEmbedder
from sparseserve.sparsify.prune import bake
from sparseserve.sparsify.recipe import TrainingData, apply
from sparseserve.sparsify.transformer import (
    EncoderDropLayersConfig,
    EncoderPruneConfig,
    LayerShape,
    drop_layers,
    layer_shapes,
    prune_encoder,
)
from tests.unit.tiny_bert import FFN, HEADS, LAYERS, VOCAB, tiny_bert

LAYERWISE = LayerwiseConfig(relation_heads=8)  # the tiny BERT's heads are 8 wide


def feeds(count: int, seed: int, rows: int = 8, tokens: int = 12) -> list[dict[str, np.ndarray]]:
    """Token batches with padding in every batch (the masks must be honoured)."""
    generator = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        mask = np.ones((rows, tokens), dtype=np.int64)
        for row in range(rows):
            mask[row, generator.integers(4, tokens + 1) :] = 0
        ids = generator.integers(1, VOCAB, (rows, tokens)).astype(np.int64) * mask
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def tensors(batches: list[dict[str, np.ndarray]]) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]


def embedder(seed: int = 0, layers: int = LAYERS) -> SentenceEmbedder:
    return SentenceEmbedder(tiny_bert(seed, layers=layers)).eval()


def data() -> TrainingData:
    train = feeds(6, seed=1)
    return TrainingData(
        x_train=train, y_train=None, x_calibration=train[:2], x_heldout=feeds(2, seed=9)
    )


def layer_loss(teacher: torch.nn.Module, student: torch.nn.Module, batch: dict) -> float:
    mapping = resolve_layer_map(student, len(encoder_layers(teacher)), LAYERWISE)
    with torch.no_grad():
        with capture_layers(teacher) as t:
            teacher(*batch.values())
        with capture_layers(student) as s:
            student(*batch.values())
        return float(layerwise_loss(s, t, batch["attention_mask"], mapping, LAYERWISE))


# Layer-wise distillation


def test_layerwise_loss_is_zero_for_the_teacher_itself_and_not_for_a_pruned_copy() -> None:
    teacher = embedder()
    batch = tensors(feeds(1, seed=3))[0]
    assert layer_loss(teacher, copy.deepcopy(teacher), batch) < 1e-10
    pruned = copy.deepcopy(teacher)
    prune_encoder(pruned.bert, EncoderPruneConfig(ffn_fraction=0.5, head_fraction=0.25))
    assert layer_loss(teacher, pruned, batch) > 1e-3


def test_padding_does_not_count_in_the_layerwise_loss() -> None:
    """What a student computes at padded positions is never compared."""
    teacher, student = embedder(), embedder(seed=1)
    batch = tensors(feeds(1, seed=4))[0]
    mapping = [0, 1]
    with torch.no_grad():
        with capture_layers(teacher) as t:
            teacher(*batch.values())
        with capture_layers(student) as s:
            student(*batch.values())
        before = float(layerwise_loss(s, t, batch["attention_mask"], mapping, LAYERWISE))
        padded = batch["attention_mask"] == 0
        for states in (s.hidden, s.values):
            for tensor in states:
                tensor[padded] = 1e3  # garbage where there is no token
        after = float(layerwise_loss(s, t, batch["attention_mask"], mapping, LAYERWISE))
    assert after == pytest.approx(before, rel=1e-5)


@pytest.mark.slow  # a few training runs of the tiny BERT: 5-20 s on 2 busy cores
def test_layerwise_distillation_brings_every_layer_closer() -> None:
    teacher = embedder()
    student = copy.deepcopy(teacher)
    prune_encoder(student.bert, EncoderPruneConfig(ffn_fraction=0.5, head_fraction=0.5))
    heldout = tensors(feeds(2, seed=9))
    before = sum(layer_loss(teacher, student, b) for b in heldout)
    config = DistillConfig(
        steps=40, learning_rate=3e-3, warmup_fraction=0.0, layerwise=LAYERWISE, log_every=40
    )
    result = distill(teacher, student, tensors(feeds(6, seed=1)), config)
    assert result.mean_loss(first=False, window=5) < 0.7 * result.mean_loss(first=True, window=5)
    assert sum(layer_loss(teacher, student, b) for b in heldout) < 0.7 * before


def test_layer_maps_follow_dropped_layers_or_spread_evenly() -> None:
    assert uniform_layer_map(4, 6) == [1, 2, 4, 5]
    assert uniform_layer_map(6, 6) == list(range(6))
    assert uniform_layer_map(1, 6) == [5]
    with pytest.raises(ValueError, match="needs between 1 and 6 layers"):
        uniform_layer_map(7, 6)
    student = embedder(layers=4)
    assert resolve_layer_map(student, 4, LAYERWISE) == [0, 1, 2, 3]
    assert resolve_layer_map(student, 6, LAYERWISE) == [1, 2, 4, 5]
    drop_layers(student, [0, 3])
    assert teacher_layers(student) == [0, 3]
    assert resolve_layer_map(student, 4, LAYERWISE) == [0, 3]
    explicit = LayerwiseConfig(relation_heads=8, layer_map=(1, 2))
    assert resolve_layer_map(student, 4, explicit) == [1, 2]
    with pytest.raises(ValueError, match="has 3 entries; the student has 2 layers"):
        resolve_layer_map(student, 4, LayerwiseConfig(layer_map=(0, 1, 2)))
    with pytest.raises(ValueError, match="names a teacher layer >= 4"):
        resolve_layer_map(student, 4, LayerwiseConfig(layer_map=(0, 4)))


def test_relation_heads_must_divide_the_value_width() -> None:
    teacher = embedder()
    batch = tensors(feeds(1, seed=3))[0]
    config = DistillConfig(steps=1, layerwise=LayerwiseConfig(relation_heads=5))
    with pytest.raises(ValueError, match="relation_heads 5 must divide the value width 32"):
        distill(teacher, copy.deepcopy(teacher), [batch], config)


def test_layerwise_needs_a_bert_style_encoder() -> None:
    linear = torch.nn.Linear(4, 4)
    config = DistillConfig(steps=1, layerwise=LAYERWISE)
    with pytest.raises(ValueError, match="layer-wise distillation needs a BERT-style encoder"):
        distill(linear, copy.deepcopy(linear), [{"x": torch.zeros(2, 4)}], config)


# Gradual structured pruning


@pytest.mark.slow  # a few training runs of the tiny BERT: 5-20 s on 2 busy cores
def test_gradual_rounds_end_at_the_one_shot_sizes_and_shrink_every_round() -> None:
    teacher = embedder()
    student = copy.deepcopy(teacher)
    config = EncoderPruneConfig(
        ffn_fraction=0.5,
        head_fraction=0.5,
        importance="activation",
        rounds=3,
        distill=DistillConfig(steps=4, learning_rate=1e-3, log_every=4, layerwise=LAYERWISE),
    )
    lines: list[str] = []
    report = apply(student, config, data=data(), teacher=teacher, progress=lines.append)

    assert layer_shapes(student.bert) == [LayerShape(i, FFN // 2, HEADS // 2) for i in range(2)]
    rounds = report["rounds"]
    assert [(r["ffn_neurons"], r["heads"]) for r in rounds] == [(80, 3), (64, 3), (48, 2)]
    assert all(r["distill"]["loss_window_steps"] == 2 for r in rounds)
    assert sum("encoder_prune round" in line for line in lines) == 3
    # The distillation moved the student between the cuts.
    assert rounds[0]["distill"]["heldout_after"] != rounds[0]["distill"]["heldout_before"]


def test_pruning_in_rounds_needs_a_distillation_between_them() -> None:
    with pytest.raises(ValidationError, match="needs a distill step between them"):
        EncoderPruneConfig(rounds=4)
    with pytest.raises(ValidationError, match="rounds"):
        EncoderPruneConfig(rounds=0, distill=DistillConfig())


# Depth pruning


def make_layer_an_identity(model: SentenceEmbedder, index: int) -> None:
    """Layer `index` adds nothing to its input, and its input is already normalised
    with unit scale: dropping it cannot change what the model computes."""
    layers = encoder_layers(model)
    layer = layers[index]
    before = layers[index - 1].output.LayerNorm if index else model.bert.embeddings.LayerNorm
    with torch.no_grad():
        for linear in (layer.attention.output.dense, layer.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
        for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm, before):
            norm.weight.fill_(1.0)
            norm.bias.zero_()


def test_dropping_identity_like_layers_keeps_the_outputs() -> None:
    model = embedder(layers=4)
    make_layer_an_identity(model, 1)
    make_layer_an_identity(model, 3)
    batch = tensors(feeds(1, seed=5))[0]
    with torch.no_grad():
        expected = model(*batch.values())
    report = apply(model, EncoderDropLayersConfig(keep=(0, 2)))
    assert report["kept"] == [0, 2] and report["layers_before"] == 4
    assert len(encoder_layers(model)) == 2 and model.bert.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(model(*batch.values()), expected, rtol=0, atol=1e-5)


def test_dropping_live_layers_changes_the_outputs_and_counts_from_the_teacher() -> None:
    model = embedder(layers=4)
    batch = tensors(feeds(1, seed=5))[0]
    with torch.no_grad():
        expected = model(*batch.values())
    report = apply(model, EncoderDropLayersConfig(layers=3))
    assert report["kept"] == [1, 2, 3]
    apply(model, EncoderDropLayersConfig(keep=(0, 2)))  # indices of what is left
    assert teacher_layers(model) == [1, 3]
    with torch.no_grad():
        assert (model(*batch.values()) - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({}, "either keep"),
        ({"keep": [0], "layers": 1}, "either keep"),
        ({"keep": [2, 1]}, "increasing and distinct"),
        ({"keep": []}, "keep"),
        ({"layers": 0}, "layers"),
        ({"drop": [1]}, "drop"),
    ],
)
def test_drop_layers_config_is_strict(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        EncoderDropLayersConfig.model_validate(fields)


def test_keeping_a_layer_that_is_not_there_is_refused() -> None:
    with pytest.raises(ValueError, match=r"increasing, distinct and in \[0, 2\)"):
        drop_layers(embedder(), [0, 2])


# Unstructured gradual pruning


@pytest.mark.slow  # a few training runs of the tiny BERT: 5-20 s on 2 busy cores
def test_encoder_gradual_prune_reaches_the_target_sparsity_in_the_encoder_only() -> None:
    teacher = embedder()
    student = copy.deepcopy(teacher)
    embeddings = student.bert.embeddings.word_embeddings.weight.detach().clone()
    config = EncoderGradualPruneConfig(
        final_sparsity=0.85,
        frequency_steps=2,
        ramp_fraction=0.5,
        distill=DistillConfig(steps=12, learning_rate=1e-3, freeze=("bert.embeddings",)),
    )
    report = apply(student, config, data=data(), teacher=teacher)
    assert report["encoder_sparsity"] == pytest.approx(0.85, abs=0.002)
    assert report["ramp_steps"] == 6
    # The report goes into the manifest as it is: nothing YAML would read back differently.
    assert yaml.safe_load(yaml.safe_dump(report)) == report
    schedule = [sparsity for _, sparsity in report["schedule"]]
    assert schedule[0] == 0.0 and schedule[-1] == pytest.approx(0.85)
    assert schedule == sorted(schedule)
    bake(student)
    for layer in encoder_layers(student):
        weight = layer.intermediate.dense.weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.85, abs=0.01)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, embeddings)


@pytest.mark.slow  # a training run of the tiny BERT: 5-20 s on 2 busy cores
def test_encoder_gradual_prune_by_activation_per_row() -> None:
    """Wanda's scores (|w| times the input's norm on the calibration batches), with every
    output row losing the same fraction: the masks differ from magnitude's and each row of
    every encoder linear layer ends exactly at the target."""
    teacher = embedder()
    fields = {
        "final_sparsity": 0.75,
        "frequency_steps": 2,
        "ramp_fraction": 0.5,
        "scope": "per_row",
        "distill": {"steps": 6, "learning_rate": 1e-3, "freeze": ["bert.embeddings"]},
    }
    masks = {}
    for importance in ("magnitude", "activation"):
        student = copy.deepcopy(teacher)
        config = EncoderGradualPruneConfig.model_validate({**fields, "importance": importance})
        assert importance in config.label()
        report = apply(student, config, data=data(), teacher=teacher)
        assert report["encoder_sparsity"] == pytest.approx(0.75, abs=0.002)
        bake(student)
        for layer in encoder_layers(student):
            zeros = (layer.output.dense.weight == 0).sum(dim=1)
            assert zeros.tolist() == [round(0.75 * FFN)] * len(zeros)
        masks[importance] = encoder_layers(student)[0].output.dense.weight == 0
    assert not torch.equal(masks["magnitude"], masks["activation"])
    with pytest.raises(Exception, match="calibration"):
        apply(
            copy.deepcopy(teacher),
            EncoderGradualPruneConfig.model_validate({**fields, "importance": "activation"}),
            teacher=teacher,
        )


# Resume, precision, progress


@pytest.mark.slow  # a few training runs of the tiny BERT: 5-20 s on 2 busy cores
def test_an_interrupted_distillation_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    teacher = embedder()
    start = copy.deepcopy(teacher)
    prune_encoder(start.bert, EncoderPruneConfig(ffn_fraction=0.5))
    batches = tensors(feeds(3, seed=1))
    config = DistillConfig(steps=10, learning_rate=1e-3, checkpoint_every=4, layerwise=LAYERWISE)

    straight = copy.deepcopy(start)
    expected = distill(teacher, straight, batches, config)

    class Interrupted(Exception):
        pass

    def stop_at_six(step: int) -> None:
        if step == 6:
            raise Interrupted

    checkpoint = tmp_path / "distill.pt"
    interrupted = copy.deepcopy(start)
    with pytest.raises(Interrupted):
        distill(
            teacher, interrupted, batches, config, checkpoint=checkpoint, after_step=stop_at_six
        )
    assert checkpoint.exists()

    lines: list[str] = []
    resumed = copy.deepcopy(start)  # a fresh process starts from the same point
    result = distill(teacher, resumed, batches, config, lines.append, checkpoint=checkpoint)
    assert result.resumed_at == 4
    assert any("resumed at step 4/10" in line for line in lines)
    assert result.losses == pytest.approx(expected.losses, rel=1e-5)
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6)

    # A finished checkpoint: the rerun trains no more.
    again = copy.deepcopy(start)
    assert distill(teacher, again, batches, config, checkpoint=checkpoint).resumed_at == 10
    # Another starting point (or config) never resumes a checkpoint that is not its own.
    other = copy.deepcopy(config.model_copy(update={"learning_rate": 2e-3}))
    assert (
        distill(teacher, copy.deepcopy(start), batches, other, checkpoint=checkpoint).resumed_at
        == 0
    )


def test_a_resumable_run_needs_a_sequence_of_batches(tmp_path: Path) -> None:
    teacher = embedder()
    with pytest.raises(ValueError, match="needs its batches as a Sequence"):
        distill(
            teacher,
            copy.deepcopy(teacher),
            iter(tensors(feeds(1, seed=1))),
            DistillConfig(steps=1),
            checkpoint=tmp_path / "c.pt",
        )


def test_bf16_is_chosen_only_where_the_cpu_has_it(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert not cpu_has_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_has_bf16(cpuinfo)
    assert resolve_precision(Precision.auto, has_bf16=False) is Precision.fp32
    assert resolve_precision(Precision.auto, has_bf16=True) is Precision.bf16
    assert resolve_precision(Precision.fp32, has_bf16=True) is Precision.fp32
    assert resolve_precision(Precision.bf16, has_bf16=False) is Precision.bf16


@pytest.mark.slow  # a few training runs of the tiny BERT: 5-20 s on 2 busy cores
def test_forced_bf16_trains_and_fp32_is_the_default_here_without_bf16() -> None:
    teacher = embedder()
    student = copy.deepcopy(teacher)
    prune_encoder(student.bert, EncoderPruneConfig(ffn_fraction=0.5))
    batches = tensors(feeds(2, seed=1))
    config = DistillConfig(steps=6, learning_rate=3e-3, loss=DistillLoss.cosine_mse)
    forced = distill(teacher, copy.deepcopy(student), batches, config.model_copy(
        update={"precision": Precision.bf16, "layerwise": LAYERWISE}))  # fmt: skip
    assert forced.precision is Precision.bf16
    assert all(np.isfinite(forced.losses))
    auto = distill(teacher, student, batches, config)
    assert auto.precision is (Precision.bf16 if cpu_has_bf16() else Precision.fp32)
    assert student.bert.encoder.layer[0].output.dense.weight.dtype == torch.float32


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_loss_and_eta_on_a_terminal_only() -> None:
    terminal = Terminal()
    bar = ProgressBar(100, "round1", terminal)
    bar.update(25, 0.0625, 2.0)
    bar.close()
    assert "round1 [######------------------] 25/100 loss 0.06250" in terminal.getvalue()
    assert "ETA 2 min 30 s" in terminal.getvalue()
    assert terminal.getvalue().endswith("\n")
    log = io.StringIO()
    quiet = ProgressBar(100, "round1", log)
    quiet.update(25, 0.0625, 2.0)
    quiet.close()
    assert log.getvalue() == ""
    assert [format_duration(s) for s in (5, 65, 3725)] == ["5 s", "1 min 05 s", "1 h 02 min"]


def test_progress_lines_carry_an_eta() -> None:
    teacher = embedder()
    lines: list[str] = []
    distill(teacher, copy.deepcopy(teacher), tensors(feeds(1, seed=1)),
            DistillConfig(steps=4, log_every=2), lines.append)  # fmt: skip
    assert len(lines) == 3 and all("s/step, ETA" in line for line in lines)
