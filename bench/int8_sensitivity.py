"""Where does dynamic int8 lose a MiniLM variant's fidelity, and what does keeping a part
of it in float cost in speed?

Takes a built variant's fp32 file (default `minilm.structured`), quantizes it as the
recipe's `quantize: {mode: dynamic, per_channel: true}` does (7-bit weights, see
`quantize.REDUCE_RANGE`), and again with parts left in float: the embedding tables, one
kind of MatMul in every layer, or every MatMul of one layer. Each arm's cosine to the
dense model on held-out chunks and on the never-trained literature, beside the fp32
file's, and its onnxruntime latency (batch 1, 128 tokens, 1 thread) in one interleaved
run.

    .venv/bin/python -m bench.int8_sensitivity --repository /work/minilm-models

Writes bench/results/int8_sensitivity.{json,md}. The issue's bar: an int8 variant within
0.005 of its fp32 variant's cosine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.minilm_setup import recipe_data
from bench.report import environment, machine_lines, markdown_table, progress, write_results
from sparseserve.sparsify.export import onnx_session, run_onnx, run_torch
from sparseserve.sparsify.quality import fidelity
from sparseserve.sparsify.quantize import REDUCE_RANGE

RESULTS = Path(__file__).resolve().parent / "results"
# The six weight MatMuls of a BERT layer, by the end of their ONNX node names.
KINDS = {
    "Q, K, V": ("query/MatMul", "key/MatMul", "value/MatMul"),
    "attention output": ("attention/output/dense/MatMul",),
    "FFN in": ("intermediate/dense/MatMul",),
    "FFN out": ("/output/dense/MatMul",),
}


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    initializers = {i.name for i in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and any(name in initializers for name in node.input)
    ]


def arms(names: list[str], layers: int) -> dict[str, dict[str, Any]]:
    """Each arm: the nodes kept in float and the op types quantized."""
    result: dict[str, dict[str, Any]] = {
        "int8, as the recipe (embedding tables too)": {"exclude": [], "ops": None},
        "MatMuls only (embedding tables float)": {"exclude": [], "ops": ["MatMul"]},
    }
    for kind, ends in KINDS.items():
        if kind == "FFN out":
            chosen = [n for n in names if n.endswith(ends) and "attention" not in n]
        else:
            chosen = [n for n in names if n.endswith(ends)]
        result[f"MatMuls only, {kind} float in every layer"] = {
            "exclude": chosen,
            "ops": ["MatMul"],
        }
    for layer in range(layers):
        result[f"MatMuls only, layer {layer} float"] = {
            "exclude": [n for n in names if f"/layer.{layer}/" in n],
            "ops": ["MatMul"],
        }
    return result


def quantize(source: Path, target: Path, exclude: list[str], ops: list[str] | None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        target,
        per_channel=True,
        reduce_range=REDUCE_RANGE,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        op_types_to_quantize=ops,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--variant", default="minilm.structured")
    parser.add_argument("--test-samples", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per arm per round")
    parser.add_argument("--name", default="int8_sensitivity", help="results file stem")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    source = args.repository / args.variant / "1" / "model.onnx"
    if not source.is_file():
        raise SystemExit(f"no {source}: build the family first (make minilm)")
    teacher, data = recipe_data(args.test_samples)
    tests = {"chunks": data.x_test, "literature": data.x_test_source}
    dense = {name: run_torch(teacher, rows) for name, rows in tests.items()}
    float_model = onnx.load(source)
    names = weight_matmuls(float_model)
    layers = 1 + max(int(n.split("/layer.")[1].split("/")[0]) for n in names)
    timing_feed = {
        "input_ids": np.full((1, 128), 1000, dtype=np.int64),
        "attention_mask": np.ones((1, 128), dtype=np.int64),
    }

    rows: dict[str, dict[str, Any]] = {}
    files: dict[str, bytes] = {"fp32": source.read_bytes()}
    with tempfile.TemporaryDirectory(prefix="sparseserve-int8-") as tmp:
        for arm, settings in {"fp32": None, **arms(names, layers)}.items():
            if settings is not None:
                target = Path(tmp) / "int8.onnx"
                quantize(source, target, settings["exclude"], settings["ops"])
                files[arm] = target.read_bytes()
            measured = {
                name: fidelity(dense[name], run_onnx(files[arm], rows_))
                for name, rows_ in tests.items()
            }
            rows[arm] = {
                "float_nodes": [] if settings is None else settings["exclude"],
                "fidelity": {name: asdict(f) for name, f in measured.items()},
                "file_bytes": len(files[arm]),
            }
            progress(
                f"{arm}: cosine {measured['chunks'].cosine_mean:.4f} / "
                f"{measured['literature'].cosine_mean:.4f}"
            )
        sessions = {arm: onnx_session(model, threads=1) for arm, model in files.items()}
    times: dict[str, list[float]] = {arm: [] for arm in sessions}
    for index in range(args.rounds):
        order = list(sessions)
        order = order[index % len(order) :] + order[: index % len(order)]
        for arm in order:
            session = sessions[arm]
            session.run(None, timing_feed)
            started = time.perf_counter()
            for _ in range(args.runs):
                session.run(None, timing_feed)
            times[arm].append((time.perf_counter() - started) / args.runs)
        progress(f"timing round {index + 1}/{args.rounds}")
    for arm, values in times.items():
        rows[arm]["ms"] = 1000 * statistics.median(values)
        rows[arm]["speedup_vs_fp32"] = statistics.median(
            f / v for f, v in zip(times["fp32"], values, strict=True)
        )

    base = rows["fp32"]["fidelity"]
    table = []
    for arm, row in rows.items():
        c, lit = row["fidelity"]["chunks"], row["fidelity"]["literature"]
        table.append(
            (
                arm,
                f"{c['cosine_mean']:.4f} / {lit['cosine_mean']:.4f}",
                f"{c['cosine_mean'] - base['chunks']['cosine_mean']:+.4f} / "
                f"{lit['cosine_mean'] - base['literature']['cosine_mean']:+.4f}",
                f"{c['cosine_min']:.3f} / {lit['cosine_min']:.3f}",
                f"{row['ms']:.2f}",
                f"{row['speedup_vs_fp32']:.2f}x",
                f"{row['file_bytes'] / 2**20:.1f}",
            )
        )
    report = {
        "environment": environment(),
        "variant": args.variant,
        "test_samples": args.test_samples,
        "rounds": args.rounds,
        "runs": args.runs,
        "rows": rows,
    }
    markdown = "\n".join(
        [
            f"# Dynamic int8 on `{args.variant}`: what each part costs",
            "",
            "onnxruntime dynamic int8, per-channel 7-bit weights, with the parts named left "
            "in float. Cosine to the dense model (torch) on "
            f"{args.test_samples} held-out chunks / the never-trained literature; the "
            "change is against the fp32 file. Latency: batch 1, 128 tokens, 1 thread, "
            f"median of {args.rounds} interleaved rounds of {args.runs} runs.",
            "",
            *markdown_table(
                ("arm", "cosine mean", "vs fp32", "cosine min", "ms", "vs fp32 speed", "MiB"),
                table,
            ),
            "",
            *machine_lines(report["environment"]),
            "",
        ]
    )
    write_results(args.output_dir, args.name, report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
