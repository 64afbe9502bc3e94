"""`sparseserve inspect PATH`: what a model is, for any ONNX file or model directory.

The numbers about weights (per-layer parameters, zeros, sparsity, the 2:4 pattern,
quantized operators, bytes on disk) are measured in the file itself
(`sparseserve.repository.weights`), so a model made anywhere gets the same report. A
manifest, where there is one, adds what only its maker knew: family, variant, method,
measured quality. No torch: it works wherever the server does.
"""

from __future__ import annotations

from pathlib import Path

from sparseserve.errors import SparseServeError
from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest
from sparseserve.repository.store import HINT_BF16, ModelRepository
from sparseserve.repository.weights import OnnxWeights, weights_of


def _kib(value: int | None) -> str:
    return "?" if value is None else f"{value / 1024:,.1f} KiB"


def model_files(directory: Path) -> list[Path]:
    """The .onnx files of a model directory's numeric version folders, oldest first
    (an OpenVINO IR model.xml is not measured: its weights are in OpenVINO's format)."""
    versions = sorted(
        (p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    return [file for version in versions for file in sorted(version.glob("*.onnx"))]


def describe_model(path: Path) -> str:
    """The report `sparseserve inspect` prints for a model directory or an ONNX file.
    Raise `FileNotFoundError` or `ValueError` (naming what was expected) otherwise."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (expected a model directory such as "
            "./models/digits-mlp.pruned90, or an .onnx file)"
        )
    if path.is_file():
        return _describe_weights(weights_of(path), path.name)
    files = model_files(path)
    manifest_path = path / MANIFEST_FILENAME
    manifest = VariantManifest.read(manifest_path) if manifest_path.is_file() else None
    if not files and manifest is None and (inside := sorted(path.glob("*.onnx"))):
        # A version folder (./models/x/1): its files, as if each were named.
        return "\n\n".join(_describe_weights(weights_of(f), str(f)) for f in inside)
    if not files and manifest is None:
        raise FileNotFoundError(
            f"{path} holds neither <version>/*.onnx files nor a {MANIFEST_FILENAME}: "
            "expected a model directory such as ./models/digits-mlp.pruned90, or an .onnx file"
        )
    lines = _describe_manifest(path, manifest)
    lines.extend(describe_serving(path))
    for file in files:
        lines.append(f"  on disk:      {file.relative_to(path)} {_kib(file.stat().st_size)}")
    if files:
        newest = files[-1]
        weights = weights_of(newest)
        lines.append("")
        lines.append(_describe_weights(weights, str(newest.relative_to(path))))
        if manifest is not None and manifest.parameters not in (None, weights.parameters):
            lines.append(
                f"  note: the manifest counts {manifest.parameters:,} parameters, the file "
                f"{weights.parameters:,}: the manifest's are the torch model's, and export "
                "folds some into others (batch norm into the convolution before it) or "
                "stores them another way (int8 weights with their scales)"
            )
    elif manifest is not None and manifest.layers:
        lines.extend(_manifest_layers(manifest))
    if manifest is not None:
        lines.extend(_manifest_measurements(manifest))
    return "\n".join(line for line in lines if line is not None)


def _describe_manifest(directory: Path, m: VariantManifest | None) -> list[str]:
    if m is None:
        return [
            f"{directory.name}: no {MANIFEST_FILENAME}, so it serves as family "
            f"{directory.name}, variant default",
            "  `sparseserve manifest` writes one with the numbers below (and quality, "
            "given data and a baseline)",
        ]
    lines = [
        f"{directory.name}: family {m.family}, variant {m.variant}"
        + (f", baseline {m.baseline}" if m.baseline else " (the baseline)"),
        f"  {m.description}" if m.description else "",
        f"  method:       {m.method}",
        f"  quantization: {m.quantization or 'none (float32)'}",
    ]
    if m.parameters is not None:
        nonzero = m.nonzero_parameters if m.nonzero_parameters is not None else m.parameters
        lines.append(f"  parameters:   {m.parameters:,} ({nonzero:,} non-zero, manifest)")
    if m.sparsity is not None:
        lines.append(f"  sparsity:     {m.sparsity:.2%} of layer weights are zero (manifest)")
    lines.append(f"  file:         {_kib(m.file_bytes)}, gzip {_kib(m.gzip_bytes)} (manifest)")
    return [line for line in lines if line]


def describe_serving(directory: Path) -> list[str]:
    """What the repository says about how the model is served: its precision (and who
    says so) and the CPU engine its config.pbtxt pins, if any."""
    try:
        source = ModelRepository(directory.parent).read(directory.name)
    except SparseServeError as exc:
        return [f"  serving:      cannot be loaded as it is: {exc}"]
    config = source.config
    if config is not None and HINT_BF16 in config.parameters:
        said = f"config.pbtxt {HINT_BF16}"
    elif source.manifest is not None and "precision" in source.manifest.model_fields_set:
        said = "manifest"
    else:
        said = "the default"
    named = [
        f"config.pbtxt {field} {value!r}"
        for field, value in (
            ("backend", config.backend if config else ""),
            ("platform", config.platform if config else ""),
        )
        if value
    ]
    engine = ", ".join(named) if named else "the server's cpu_engine (config.pbtxt names none)"
    return [f"  precision:    {source.precision.value} ({said})", f"  engine:       {engine}"]


def _manifest_layers(m: VariantManifest) -> list[str]:
    lines = ["  layers (manifest):"]
    width = max(len(layer.name) for layer in m.layers)
    for layer in m.layers:
        shape = "x".join(str(d) for d in layer.shape)
        counts = f"{layer.nonzero:>8,}/{layer.parameters:<8,}"
        lines.append(
            f"    {layer.name:<{width}}  {shape:>12}  {counts} non-zero"
            f"  sparsity {layer.sparsity:7.2%}"
        )
    return lines


def _manifest_measurements(m: VariantManifest) -> list[str]:
    lines = []
    if m.activation_sparsity:
        lines.append("  zero activations (test data):")
        for activation in m.activation_sparsity:
            lines.append(f"    {activation.name:<{12}}  {activation.zero_fraction:7.2%}")
    if m.quality:
        lines.append("  quality:")
        for q in m.quality:
            baseline = f" (baseline {q.baseline_value:.4f})" if q.baseline_value is not None else ""
            lines.append(f"    {q.metric}: {q.value:.4f}{baseline} on {q.samples} of {q.dataset}")
    for note in m.notes:
        lines.append(f"  note: {note}")
    return lines


def _describe_weights(w: OnnxWeights, label: str) -> str:
    """The measured part: what the file holds."""
    opsets = ", ".join(f"{domain} {version}" for domain, version in sorted(w.opsets.items()))
    lines = [
        f"{label}: {_kib(w.file_bytes)} on disk"
        + (f", made by {w.producer}" if w.producer else "")
        + (f", opsets {opsets}" if opsets else ""),
        f"  parameters:   {w.parameters:,} ({w.nonzero_parameters:,} non-zero)",
        f"  sparsity:     {w.sparsity:.2%} of the {w.layer_parameters:,} layer weights are zero",
        f"  2:4 pattern:  {_pattern_summary(w)}",
        f"  quantization: {w.quantization or 'none'}",
    ]
    if w.sparse_initializers:
        lines.append(
            f"  storage:      {w.sparse_initializers} sparse initializers (smaller file; "
            "onnxruntime makes them dense at load)"
        )
    if w.layers:
        lines.append("  layers (rank >= 2 initializers):")
        width = max(len(layer.name) for layer in w.layers)
        for layer in w.layers:
            shape = "x".join(str(d) for d in layer.shape)
            counts = f"{layer.nonzero:>10,}/{layer.parameters:<10,}"
            pattern = "2:4" if layer.follows_2_4 else "   "
            lines.append(
                f"    {layer.name:<{width}}  {shape:>14}  {layer.dtype:<7}  {counts} non-zero"
                f"  sparsity {layer.sparsity:7.2%}  {pattern}  {','.join(layer.consumers)}"
            )
    return "\n".join(lines)


def _pattern_summary(w: OnnxWeights) -> str:
    """Which float layers keep at most 2 non-zeros in every 4 weights."""
    floats = [layer for layer in w.layers if not layer.integer]
    following = [layer for layer in floats if layer.follows_2_4]
    if w.follows_2_4:
        return "yes, every float layer"
    if not following:
        return "no"
    names = ", ".join(layer.name for layer in following)
    return f"{len(following)} of {len(floats)} float layers ({names})"
