"""Which kernel OpenVINO's CPU plugin runs each matrix product on, and what its
sparse-weights setting changes.

    .venv/bin/python -m bench.openvino_kernels                       # the sparse int8 MLP
    .venv/bin/python -m bench.openvino_kernels --onnx minilm-models/minilm.int8-static/1/model.onnx

Each ONNX file (by default the 90%-sparse static int8 MLP of bench/served_speedups.py,
made here) is compiled as the server compiles it (fp32, one thread, one stream, latency
hint), with and without `CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE` (`--rate`), its input
shape left dynamic or fixed to the batch's; after one run (OpenVINO names a kernel only
once a shape has run) the report lists the kernels of its FullyConnected layers, how
many the server would count as sparse (`backends/openvino.sparse_kernel_layers`) and the
median of `--runs` runs, interleaved over `--rounds`. The sparse kernel needs int8
weights and AMX (Sapphire Rapids on); elsewhere the count is 0 whatever the setting.
Writes bench/results/openvino_kernels.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints
import openvino.properties.streams as streams

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.report import (
    REPO_ROOT,
    environment,
    machine_lines,
    markdown_table,
    package_version,
    progress,
    rotated,
    write_results,
)
from bench.served_speedups import MLP_SIZES
from sparseserve.backends.openvino import SPARSE_RATE, read_model, sparse_kernel_layers
from sparseserve.testing import onnx_models

PACKAGES = ("openvino", "numpy")


def feeds_for(model: ov.Model, batch: int) -> dict[str, np.ndarray]:
    """Random inputs of `batch` rows; dynamic dimensions after the first at 128; integer
    inputs (token ids, masks) at 1."""
    rng = np.random.default_rng(0)
    feeds = {}
    for port in model.inputs:
        shape = [batch, *(d.get_length() if d.is_static else 128
                          for d in list(port.get_partial_shape())[1:])]  # fmt: skip
        kind = port.get_element_type().to_dtype()
        if np.issubdtype(kind, np.integer):
            feeds[port.get_any_name()] = np.ones(shape, kind)
        else:
            feeds[port.get_any_name()] = rng.standard_normal(shape).astype(kind)
    return feeds


def fully_connected_kernels(compiled: ov.CompiledModel) -> Counter[str]:
    kernels: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "FullyConnected":
            kernels[info["primitiveType"].astype(str)] += 1
    return kernels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", type=Path, action="append", default=[],
                        help="an ONNX file; repeatable (default: the sparse int8 MLP)")  # fmt: skip
    parser.add_argument("--mlp-sparsity", type=float, default=0.9)
    parser.add_argument("--rate", type=float, default=0.8, help=SPARSE_RATE)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--name", default="openvino_kernels", help="file name of the results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    env["packages"] = {name: package_version(name) for name in PACKAGES}
    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="openvino-kernels-") as tmp:
        mlp = Path(tmp) / "mlp-sparse-int8.onnx"
        files = args.onnx or [onnx_models.static_int8_mlp(mlp, MLP_SIZES, args.mlp_sparsity)]
        cases: list[dict[str, Any]] = []
        for path in files:
            for batch in args.batch:
                for static in (False, True):
                    for rate in (None, args.rate):
                        model = read_model(core, path)
                        feeds = feeds_for(model, batch)
                        if static:
                            model.reshape({k: ov.PartialShape(list(v.shape))
                                           for k, v in feeds.items()})  # fmt: skip
                        config: dict[str, Any] = {
                            hints.inference_precision: ov.Type.f32,
                            hints.performance_mode: hints.PerformanceMode.LATENCY,
                            props.inference_num_threads: 1,
                            streams.num: 1,
                        }
                        if rate is not None:
                            config[SPARSE_RATE] = rate
                        compiled = core.compile_model(model, "CPU", config)
                        request = compiled.create_infer_request()
                        request.infer(feeds)
                        cases.append({
                            "file": path.name if args.onnx else f"mlp sparse{args.mlp_sparsity}"
                            " static int8", "batch": batch, "static": static, "rate": rate,
                            "kernels": dict(fully_connected_kernels(compiled)),
                            "sparse_kernel_layers": sparse_kernel_layers(compiled),
                            "request": request, "feeds": feeds, "ms": [],
                        })  # fmt: skip
        progress(f"{len(cases)} cases compiled; timing {args.rounds} rounds x {args.runs} runs")
        for index in range(args.rounds):
            for case in rotated(cases, index):
                for _ in range(args.runs):
                    started = time.perf_counter()
                    case["request"].infer(case["feeds"])
                    case["ms"].append((time.perf_counter() - started) * 1e3)
    rows = [
        {k: v for k, v in case.items() if k not in ("request", "feeds")}
        | {"median_ms": statistics.median(case["ms"])}
        for case in cases
    ]
    report = {"environment": env, "notes": args.note, "rounds": args.rounds,
              "runs": args.runs, "rows": rows}  # fmt: skip
    lines = ["# OpenVINO's kernels for matrix products, with and without sparse weights", "",
             "## Machine", "", *machine_lines(env, [f"- {n}" for n in args.note]), "",
             f"fp32 hint (int8 layers stay int8), 1 thread, 1 stream; {args.rounds} rounds x "
             f"{args.runs} runs, interleaved; FullyConnected kernels after a run.", ""]  # fmt: skip
    table = [
        [row["file"], row["batch"], "fixed" if row["static"] else "dynamic",
         row["rate"] if row["rate"] is not None else "-",
         ", ".join(f"{k} x{n}" for k, n in sorted(row["kernels"].items())),
         row["sparse_kernel_layers"], f"{row['median_ms']:.3f}"]
        for row in rows
    ]  # fmt: skip
    header = ["model", "batch", "shape", SPARSE_RATE, "FullyConnected kernels",
              "sparse (server's count)", "median ms"]  # fmt: skip
    lines += [*markdown_table(header, table, 5), ""]
    write_results(args.output_dir, args.name, report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
