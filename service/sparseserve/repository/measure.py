"""`sparseserve manifest MODEL_DIR`: a manifest for a model made outside sparseserve.

A model pruned or quantized elsewhere (SparseML, NNCF, llm-compressor, torch) arrives
as a bare ONNX file. This measures what its manifest records — parameters, zeros,
per-layer sparsity, the 2:4 pattern, quantization, file and gzip size — from the file,
and, given data, its quality against the family's baseline, both run on onnxruntime
as the server will run them:

- top-1 agreement with the baseline (outputs with more than one column, one row per
  sample: the classes of a classifier);
- mean and worst cosine of each output row to the baseline's (any numeric output:
  embeddings, logits, regressions);
- accuracy, when the data holds `labels`, beside the baseline's accuracy.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sparseserve.backends.base import ModelFiles, ModelSignature
from sparseserve.backends.onnxruntime import session_signature
from sparseserve.repository.eval_data import LABELS_KEY, PLAIN_LABELS_KEY
from sparseserve.repository.inspect import model_files
from sparseserve.repository.manifest import MANIFEST_FILENAME, Quality, Task, VariantManifest
from sparseserve.repository.weights import OnnxWeights, weights_of

BATCH_ROWS = 256  # rows per onnxruntime run: bounds memory on large data files


class MeasureError(ValueError):
    """The manifest cannot be measured as asked (no model file, data that does not fit)."""


def gzip_size(data: bytes) -> int:
    """Bytes after gzip at its default level (6, what `gzip model.onnx` gives): what zeros
    save when a file is shipped compressed. Level 9 took 5x as long on a sparse MiniLM
    (19 s against 3.6 s) for 0.07% fewer bytes."""
    return len(gzip.compress(data, compresslevel=6, mtime=0))


def newest_model_file(directory: Path) -> Path:
    """The .onnx file of the highest version of a model directory."""
    if not directory.is_dir():
        raise MeasureError(f"{directory} is not a model directory (<dir>/<version>/model.onnx)")
    files = model_files(directory)
    if not files:
        raise MeasureError(f"{directory} holds no <version>/*.onnx file")
    return files[-1]


def measure_manifest(
    directory: Path,
    family: str,
    variant: str,
    *,
    baseline: str | None = None,
    data: Path | None = None,
    method: str | None = None,
    task: Task | None = None,
    description: str = "",
) -> VariantManifest:
    """The manifest of the model in `directory`, measured from its newest model file.

    `baseline` is the model name of the family's dense baseline, a sibling directory in
    the same repository (None: this model is the baseline). `data` is an .npz file with
    one array per model input (or a single array for a one-input model), and optionally
    `labels`.
    """
    path = newest_model_file(directory)
    weights = weights_of(path)
    baseline_path = None
    if baseline is not None:
        if not (directory.parent / baseline).is_dir():
            siblings = sorted(
                d.name for d in directory.parent.iterdir() if d.is_dir() and d != directory
            )
            likely = [name for name in siblings if name.endswith(f".{baseline}")]
            raise MeasureError(
                f"--baseline {baseline!r}: no model directory {directory.parent / baseline}; "
                "it names the baseline's model directory beside this one"
                + (f", e.g. {likely[0]!r}" if likely else "")
                + (f" (there: {', '.join(siblings)})" if siblings and not likely else "")
            )
        baseline_path = newest_model_file(directory.parent / baseline)
    quality: list[Quality] = []
    if data is not None:
        quality = measure_quality(path, baseline_path, data)
    labelled = any(q.metric == "accuracy" for q in quality)
    return VariantManifest(
        family=family,
        variant=variant,
        baseline=baseline,
        task=task or (Task.classification if labelled else Task.other),
        description=description,
        method=method or _method(weights, baseline),
        created=datetime.now(UTC),
        parameters=weights.parameters,
        nonzero_parameters=weights.nonzero_parameters,
        sparsity=weights.sparsity,
        layers=[layer.as_layer() for layer in weights.layers],
        quantization=weights.quantization,
        file_bytes=weights.file_bytes,
        gzip_bytes=gzip_size(path.read_bytes()),
        notes=_notes(weights, path.relative_to(directory)),
        quality=quality,
    )


def write_manifest(directory: Path, manifest: VariantManifest, force: bool = False) -> Path:
    """Write `manifest` as the directory's sparseserve.yaml; refuse to replace one
    unless `force` (a manifest written by sparsify holds numbers this cannot measure)."""
    path = directory / MANIFEST_FILENAME
    if path.exists() and not force:
        raise MeasureError(f"{path} exists (--force replaces it)")
    manifest.write(path)
    return path


def _method(weights: OnnxWeights, baseline: str | None) -> str:
    """What the file shows of how it was made (--method says more)."""
    if baseline is None:
        return "dense"
    if weights.follows_2_4:
        return "2:4 (measured: at most 2 non-zeros in every 4 weights)"
    if weights.sparsity > 0:
        return f"external pruning ({weights.sparsity:.0%} zeros measured)"
    return "external"


def _notes(weights: OnnxWeights, file: Path) -> list[str]:
    notes = [f"measured from {file} by `sparseserve manifest`, not built by sparsify"]
    if weights.sparsity > 0 and not weights.sparse_initializers:
        notes.append(
            "the zeros are stored densely: the file is no smaller than dense (gzip_bytes "
            "shows what they save compressed), and onnxruntime's CPU kernels run them as "
            "dense weights"
        )
    return notes


def load_data(
    data: Path, signature: ModelSignature
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The model's inputs and the optional labels from an .npz file, converted to the
    datatypes the model takes (float64 data for a float32 model, say)."""
    try:
        archive = dict(np.load(data, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise MeasureError(f"--data {data}: not a readable .npz file ({exc})") from exc
    # The layout `sparsify` writes as eval.npz too: labels as `__labels__`, and other
    # `__`-keys (its description) that are not inputs.
    labels = archive.pop(PLAIN_LABELS_KEY, None)
    if labels is None:
        labels = archive.pop(LABELS_KEY, None)
    archive = {name: array for name, array in archive.items() if not name.startswith("__")}
    names = [spec.name for spec in signature.inputs]
    if len(names) == 1 and names[0] not in archive and len(archive) == 1:
        archive = {names[0]: next(iter(archive.values()))}
    missing = [name for name in names if name not in archive]
    if missing:
        raise MeasureError(
            f"--data {data} has arrays {sorted(archive)}; the model's inputs are {names} "
            f"(one array per input, by name, plus optional {PLAIN_LABELS_KEY!r} or {LABELS_KEY!r})"
        )
    feeds = {spec.name: archive[spec.name].astype(spec.datatype.numpy) for spec in signature.inputs}
    rows = {len(array) for array in feeds.values()}
    if len(rows) != 1 or (labels is not None and len(labels) not in rows):
        raise MeasureError(f"--data {data}: inputs and labels must have the same number of rows")
    return feeds, labels


def run_model(path: Path, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The model's first output on `feeds`, on onnxruntime's CPU provider, in batches."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = len(next(iter(feeds.values())))
    try:
        batches = [
            session.run(None, {n: array[i : i + BATCH_ROWS] for n, array in feeds.items()})[0]
            for i in range(0, rows, BATCH_ROWS)
        ]
    except Exception as exc:  # onnxruntime's own types: the data does not fit the model
        expected = ", ".join(f"{i.name} {i.type}{i.shape}" for i in session.get_inputs())
        given = ", ".join(
            f"{name} {array.dtype}{list(array.shape)}" for name, array in feeds.items()
        )
        reason = str(exc).strip().splitlines()[0].split(" : ")[-1] if str(exc).strip() else ""
        raise MeasureError(
            f"--data does not fit {path}: it takes {expected}; the data gives {given} ({reason})"
        ) from exc
    return np.concatenate(batches)


def measure_quality(path: Path, baseline: Path | None, data: Path) -> list[Quality]:
    """Quality rows of the model at `path` on `data`, against `baseline` if given."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    signature = session_signature(session, ModelFiles(path.parent.parent.name, 1, path))
    feeds, labels = load_data(data, signature)
    dataset = data.name
    ours = run_model(path, feeds)
    samples = len(ours)
    rows: list[Quality] = []
    theirs = run_model(baseline, feeds) if baseline is not None else None
    if theirs is not None and theirs.shape != ours.shape:
        raise MeasureError(
            f"the model's output has shape {list(ours.shape)}, the baseline's "
            f"{list(theirs.shape)}: they cannot be compared"
        )
    classes = ours.ndim == 2 and ours.shape[1] > 1
    if labels is not None and classes:
        rows.append(
            Quality(
                metric="accuracy",
                value=_accuracy(ours, labels),
                dataset=dataset,
                samples=samples,
                baseline_value=None if theirs is None else _accuracy(theirs, labels),
            )
        )
    if theirs is not None:
        if classes:
            agreement = float((ours.argmax(axis=1) == theirs.argmax(axis=1)).mean())
            rows.append(Quality(metric="top1_agreement", value=agreement, dataset=dataset,
                                samples=samples))  # fmt: skip
        cosines = _row_cosines(ours, theirs)
        for metric, value in (("cosine_mean", cosines.mean()), ("cosine_min", cosines.min())):
            rows.append(Quality(metric=metric, value=float(value), dataset=dataset,
                                samples=samples, baseline_value=1.0))  # fmt: skip
    return rows


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(axis=1) == labels.reshape(-1)).mean())


def _row_cosines(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Cosine of each sample's output to the baseline's (rows flattened; two zero rows
    count as identical)."""
    a = ours.reshape(len(ours), -1).astype(np.float64)
    b = theirs.reshape(len(theirs), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)
