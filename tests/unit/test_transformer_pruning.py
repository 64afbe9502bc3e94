"""Structured pruning of BERT encoders, on a tiny randomly initialised BertModel: the
matrices shrink, units that contribute nothing can go without changing an output, and
the exported ONNX graph has the smaller shapes."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("transformers", reason="needs the [sparsify] extra")
pytest.importorskip("onnx", reason="needs the [sparsify] extra")

import onnx
import torch
from pydantic import ValidationError

from sparseserve.sparsify.export import export_onnx, run_onnx, run_torch
from sparseserve.sparsify.minilm import SentenceEmbedder
from sparseserve.sparsify.transformer import (
    EncoderPruneConfig,
    Importance,
    LayerShape,
    activation_scores,
    dead_ffn_neurons,
    dead_heads,
    encoder_layers,
    keep_most_important,
    layer_shapes,
    magnitude_scores,
    prune_attention_heads,
    prune_encoder,
    prune_ffn_neurons,
    remove_dead_units,
)
from tests.unit.tiny_bert import FFN, HEAD_SIZE, HEADS, LAYERS, tiny_bert


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two sequences, the second padded: masks must be honoured everywhere."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 100, (2, 12), generator=generator)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_removing_zero_ffn_neurons_leaves_outputs_unchanged() -> None:
    model = tiny_bert()
    inputs = batch()
    first, second = encoder_layers(model)
    with torch.no_grad():
        # Layer 0: three neurons whose input row and bias are zero (GELU(0) = 0).
        first.intermediate.dense.weight[[3, 10, 40]] = 0
        first.intermediate.dense.bias[[3, 10, 40]] = 0
        # Layer 1: two neurons whose output column is zero.
        second.output.dense.weight[:, [0, FFN - 1]] = 0
    assert dead_ffn_neurons(first) == [3, 10, 40]
    assert dead_ffn_neurons(second) == [0, FFN - 1]
    before = hidden(model, inputs)

    shapes = remove_dead_units(model)

    assert shapes == [LayerShape(0, FFN - 3, HEADS), LayerShape(1, FFN - 2, HEADS)]
    assert tuple(first.intermediate.dense.weight.shape) == (FFN - 3, HEADS * HEAD_SIZE)
    assert tuple(first.output.dense.weight.shape) == (HEADS * HEAD_SIZE, FFN - 3)
    torch.testing.assert_close(hidden(model, inputs), before, rtol=0, atol=1e-6)


def test_removing_zero_heads_leaves_outputs_unchanged() -> None:
    model = tiny_bert()
    inputs = batch()
    first, second = encoder_layers(model)
    with torch.no_grad():
        # Layer 0, head 1: its columns of the attention output are zero.
        first.attention.output.dense.weight[:, HEAD_SIZE : 2 * HEAD_SIZE] = 0
        # Layer 1, heads 0 and 3: value rows and bias zero, so their context is zero.
        for head in (0, 3):
            rows = slice(head * HEAD_SIZE, (head + 1) * HEAD_SIZE)
            second.attention.self.value.weight[rows] = 0
            second.attention.self.value.bias[rows] = 0
    assert dead_heads(first) == [1]
    assert dead_heads(second) == [0, 3]
    before = hidden(model, inputs)

    shapes = remove_dead_units(model)

    assert shapes == [LayerShape(0, FFN, 3), LayerShape(1, FFN, 2)]
    attention = second.attention.self
    assert (attention.num_attention_heads, attention.all_head_size) == (2, 2 * HEAD_SIZE)
    for name in ("query", "key", "value"):
        assert tuple(getattr(attention, name).weight.shape) == (2 * HEAD_SIZE, HEADS * HEAD_SIZE)
    assert tuple(second.attention.output.dense.weight.shape) == (HEADS * HEAD_SIZE, 2 * HEAD_SIZE)
    torch.testing.assert_close(hidden(model, inputs), before, rtol=0, atol=1e-6)


def test_removing_live_units_changes_outputs() -> None:
    """The invariant tests above could pass by removing nothing that matters; removing
    units that do contribute must show."""
    model = tiny_bert()
    inputs = batch()
    before = hidden(model, inputs)
    assert remove_dead_units(model) == [LayerShape(i, FFN, HEADS) for i in range(LAYERS)]
    torch.testing.assert_close(hidden(model, inputs), before, rtol=0, atol=0)
    first = encoder_layers(model)[0]
    prune_ffn_neurons(first, range(FFN - 1))
    after_ffn = hidden(model, inputs)
    assert (after_ffn - before).abs().max() > 1e-4
    prune_attention_heads(first, [0, 1, 2])
    assert (hidden(model, inputs) - after_ffn).abs().max() > 1e-4


def test_pruned_model_keeps_the_chosen_units_exactly() -> None:
    """Keeping heads [0, 2] computes what the full model computes with heads 1 and 3
    zeroed: the right rows and columns were kept, in the right order."""
    reference, pruned = tiny_bert(), tiny_bert()
    layer = encoder_layers(reference)[1]
    with torch.no_grad():
        for head in (1, 3):
            layer.attention.output.dense.weight[:, head * HEAD_SIZE : (head + 1) * HEAD_SIZE] = 0
        layer.output.dense.weight[:, 1::2] = 0
    prune_attention_heads(encoder_layers(pruned)[1], [2, 0])  # order does not matter
    prune_ffn_neurons(encoder_layers(pruned)[1], torch.arange(0, FFN, 2))
    inputs = batch()
    torch.testing.assert_close(hidden(pruned, inputs), hidden(reference, inputs), rtol=0, atol=1e-6)


def test_prune_encoder_shrinks_every_layer_by_the_fractions() -> None:
    model = tiny_bert()
    config = EncoderPruneConfig(ffn_fraction=0.5, head_fraction=0.25)
    shapes = prune_encoder(model, config)
    assert shapes == [LayerShape(i, FFN // 2, HEADS - 1) for i in range(LAYERS)]
    assert hidden(model, batch()).shape == (2, 12, HEADS * HEAD_SIZE)
    assert layer_shapes(model) == shapes


def test_magnitude_pruning_removes_the_smallest_units() -> None:
    model = tiny_bert()
    layer = encoder_layers(model)[0]
    with torch.no_grad():
        layer.intermediate.dense.weight[5] *= 1e-3  # neuron 5: tiny input weights
        layer.attention.self.value.weight[3 * HEAD_SIZE :] *= 1e-3  # head 3: tiny values
    scores = magnitude_scores(model)
    assert int(scores.ffn[0].argmin()) == 5
    assert int(scores.heads[0].argmin()) == 3
    prune_encoder(model, EncoderPruneConfig(ffn_fraction=1 / FFN, head_fraction=0.25))
    assert layer.intermediate.dense.out_features == FFN - 1
    assert layer.attention.self.num_attention_heads == HEADS - 1
    assert dead_heads(layer) == [] and dead_ffn_neurons(layer) == []


def test_activation_scores_see_only_real_tokens() -> None:
    """Padding must not count: the scores of a padded batch equal those of the same
    sequences run one by one without padding."""
    model = tiny_bert()
    padded = batch()
    length = int(padded["attention_mask"][1].sum())
    separate = [
        {k: v[:1] for k, v in padded.items()},
        {k: v[1:, :length] for k, v in padded.items()},
    ]
    together = activation_scores(model, [padded])
    one_by_one = activation_scores(model, separate)
    for a, b in zip(together.ffn + together.heads, one_by_one.ffn + one_by_one.heads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # A neuron whose output column is zero contributes nothing, whatever it computes.
    with torch.no_grad():
        encoder_layers(model)[0].output.dense.weight[:, 7] = 0
    assert float(activation_scores(model, [padded]).ffn[0][7]) == 0.0


def test_activation_importance_needs_calibration_batches() -> None:
    config = EncoderPruneConfig(importance=Importance.activation)
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune_encoder(tiny_bert(), config)
    with pytest.raises(ValueError, match="at least one batch"):
        activation_scores(tiny_bert(), [])
    shapes = prune_encoder(tiny_bert(), config, [batch()])
    assert [shape.ffn_neurons for shape in shapes] == [FFN // 2] * LAYERS


def test_keep_most_important_keeps_the_top_scores_and_never_empties_a_layer() -> None:
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    assert keep_most_important(scores, 0.4).tolist() == [0, 2, 4]
    assert keep_most_important(scores, 0.0).tolist() == [0, 1, 2, 3, 4]
    assert keep_most_important(scores, 0.99).tolist() == [2]
    # Ties fall the same way every time: the lower index stays.
    assert keep_most_important(torch.ones(4), 0.5).tolist() == [0, 1]


def test_bad_keep_lists_are_refused_with_what_was_expected() -> None:
    layer = encoder_layers(tiny_bert())[0]
    with pytest.raises(ValueError, match="at least one attention head must remain"):
        prune_attention_heads(layer, [])
    with pytest.raises(ValueError, match=rf"FFN neuron indices must be in \[0, {FFN}\)"):
        prune_ffn_neurons(layer, [0, FFN])
    with pytest.raises(ValueError, match="must be distinct"):
        prune_attention_heads(layer, [1, 1])
    with pytest.raises(TypeError, match="not a BERT-style encoder"):
        encoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"ffn_fraction": 1.0}, "ffn_fraction"),
        ({"head_fraction": -0.1}, "head_fraction"),
        ({"importance": "gradient"}, "importance"),
        ({"ffn_sparsity": 0.5}, "ffn_sparsity"),
    ],
)
def test_prune_config_is_bounded_and_strict(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        EncoderPruneConfig.model_validate(fields)


def test_exported_onnx_has_the_smaller_shapes_and_matches_torch() -> None:
    embedder = SentenceEmbedder(tiny_bert())
    prune_encoder(embedder.bert, EncoderPruneConfig(ffn_fraction=0.5, head_fraction=0.5))
    example = {k: v[:1, :6] for k, v in batch().items()}
    axes = {name: {0: "batch", 1: "sequence"} for name in example}
    onnx_model = export_onnx(embedder, example, "sentence_embedding", dynamic_axes=axes)

    graph = onnx.load_from_string(onnx_model).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    matrices = sorted(dims for dims in shapes.values() if len(dims) == 2)
    hidden_size = HEADS * HEAD_SIZE
    # Per layer: Q, K, V [hidden, 2 heads] and the attention output [2 heads, hidden]
    # (as MatMul weights, transposed), FFN in [hidden, 48] and out [48, hidden].
    assert matrices.count([hidden_size, FFN // 2]) == LAYERS
    assert matrices.count([FFN // 2, hidden_size]) == LAYERS
    assert matrices.count([hidden_size, 2 * HEAD_SIZE]) == 3 * LAYERS
    assert matrices.count([2 * HEAD_SIZE, hidden_size]) == LAYERS
    assert [hidden_size, FFN] not in matrices
    # A different batch and sequence length than the export example, with padding.
    inputs = {name: value.numpy() for name, value in batch(seed=5).items()}
    got = run_onnx(onnx_model, inputs)
    np.testing.assert_allclose(got, run_torch(embedder, inputs), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
