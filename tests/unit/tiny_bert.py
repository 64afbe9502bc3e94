"""A tiny randomly initialised BertModel for the transformer tests: 2 layers, hidden 32,
4 heads of 8, FFN 96. Importing this module needs transformers (the [sparsify] extra)."""

from __future__ import annotations

import torch
import transformers

VOCAB, HEADS, HEAD_SIZE, FFN, LAYERS = 100, 4, 8, 96, 2
HIDDEN = HEADS * HEAD_SIZE


def tiny_bert(seed: int = 0, layers: int = LAYERS) -> torch.nn.Module:
    """The BERT with random weights, eval mode, eager attention (as MiniLM is loaded);
    `layers` deep (depth pruning needs more than two)."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # BERT's init gives near-zero biases; make every path count
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model
