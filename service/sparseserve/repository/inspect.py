"""`sparseserve inspect MODEL_DIR`: a variant's manifest as a readable report.

Reads only the manifest and file sizes (no torch, no onnx), so it works wherever the
server does.
"""

from __future__ import annotations

from pathlib import Path

from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest


def _kib(value: int | None) -> str:
    return "?" if value is None else f"{value / 1024:,.1f} KiB"


def describe_model(directory: Path) -> str:
    """The report `sparseserve inspect` prints for one model directory."""
    path = directory / MANIFEST_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (is {directory} a model directory?)")
    m = VariantManifest.read(path)
    lines = [
        f"{directory.name}: family {m.family}, variant {m.variant}"
        + (f", baseline {m.baseline}" if m.baseline else " (the baseline)"),
        f"  {m.description}" if m.description else "",
        f"  method:       {m.method}",
        f"  quantization: {m.quantization or 'none (float32)'}",
    ]
    if m.parameters is not None:
        nonzero = m.nonzero_parameters if m.nonzero_parameters is not None else m.parameters
        lines.append(f"  parameters:   {m.parameters:,} ({nonzero:,} non-zero)")
    if m.sparsity is not None:
        lines.append(f"  sparsity:     {m.sparsity:.2%} of layer weights are zero")
    lines.append(f"  file:         {_kib(m.file_bytes)}, gzip {_kib(m.gzip_bytes)}")
    for version in sorted(p for p in directory.iterdir() if p.name.isdigit()):
        for file in sorted(version.glob("*.onnx")):
            size = _kib(file.stat().st_size)
            lines.append(f"  on disk:      {file.relative_to(directory)} {size}")
    if m.layers:
        lines.append("  layers:")
        width = max(len(layer.name) for layer in m.layers)
        for layer in m.layers:
            shape = "x".join(str(d) for d in layer.shape)
            counts = f"{layer.nonzero:>8,}/{layer.parameters:<8,}"
            lines.append(
                f"    {layer.name:<{width}}  {shape:>12}  {counts} non-zero"
                f"  sparsity {layer.sparsity:7.2%}"
            )
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
    return "\n".join(line for line in lines if line)
