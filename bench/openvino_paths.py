"""The same ONNX file through three ways of calling OpenVINO, on the same inputs: does the
server's way cost more than a bare call?

    .venv/bin/python -m bench.openvino_paths --onnx minilm-models/minilm.int8-static/1/model.onnx

On the AMX Xeon, `bench/engines.py` ran MiniLM's static int8 file in 8.0 ms while the
server, minutes later, timed and served it at 13.6-14.1 ms (bf16 agreed between the two,
docs/engines.md). This bisects the call path, interleaved over rounds, one thread:

- `bare`: `compile_model` with OpenVINO's property objects, `infer(share_inputs=True)`
  (what bench/engines.py does);
- `server-config`: the server's compile properties (`backends/openvino.compile_config`),
  `infer(share_inputs=False, share_outputs=False)` (what the backend's run does);
- `backend`: the server's `OpenVinoBackend`, loaded and warmed as the server loads it,
  timed by its own `run_once`;
- `backend-beside`: the same with `--beside` other files loaded in the same process first
  (the server holds many models; does one slow another?).

Inputs: MiniLM's tokenizer on real text (128 tokens) where the file has MiniLM's inputs,
else random rows. Writes bench/results/openvino_paths.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.engines import Engine, openvino_compile
from bench.openvino_kernels import feeds_for
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
from sparseserve.backends.base import ModelFiles
from sparseserve.backends.openvino import OpenVinoBackend, compile_config, read_model
from sparseserve.settings import OpenVinoSettings

PACKAGES = ("openvino", "numpy")
Feed = dict[str, np.ndarray]


def inputs_for(path: Path) -> Feed:
    """One row: MiniLM's tokenizer on real text if the file takes MiniLM's inputs, else
    random values (dynamic dimensions after the first at 128)."""
    model = read_model(ov.Core(), path)  # sparse initializers too
    names = {port.get_any_name() for port in model.inputs}
    from sparseserve.sparsify.minilm import INPUT_NAMES

    if names == set(INPUT_NAMES):
        from bench.engines import minilm_feeds, minilm_texts
        from sparseserve.sparsify.minilm import load_tokenizer

        (feed,) = minilm_feeds(load_tokenizer(), minilm_texts(1), 1)
        return feed
    return feeds_for(model, 1)


def bare(path: Path, threads: int) -> Callable[[Feed], Any]:
    runner, _ = openvino_compile(path, Engine("openvino", "fp32"), threads, {})
    return runner


def server_config(path: Path, threads: int) -> Callable[[Feed], Any]:
    core = ov.Core()
    config = compile_config(ModelFiles(path.stem, 1, path), OpenVinoSettings(), threads)
    request = core.compile_model(read_model(core, path), "CPU", config).create_infer_request()
    return lambda feed: request.infer(dict(feed), share_inputs=False, share_outputs=False)


def backend(path: Path, threads: int, executor: ThreadPoolExecutor) -> Callable[[Feed], Any]:
    loaded = OpenVinoBackend(ModelFiles(path.stem, 1, path), OpenVinoSettings(), threads, 0.0,
                             executor)  # fmt: skip
    asyncio.run(loaded.load())
    return loaded.run_once


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--beside", type=Path, action="append", default=[],
                        help="another ONNX file loaded first in the same process")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--name", default="openvino_paths", help="file name of the results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    env["packages"] = {name: package_version(name) for name in PACKAGES}
    feed = inputs_for(args.onnx)
    with ThreadPoolExecutor(1) as executor:
        paths: dict[str, Callable[[Feed], Any]] = {
            "bare": bare(args.onnx, args.threads),
            "server-config": server_config(args.onnx, args.threads),
            "backend": backend(args.onnx, args.threads, executor),
        }
        if args.beside:
            others = [backend(path, args.threads, executor) for path in args.beside]
            for path, other in zip(args.beside, others, strict=True):
                other(inputs_for(path))  # warmed, as a server's other models are
            paths["backend-beside"] = backend(args.onnx, args.threads, executor)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for index in range(args.rounds):
            for name in rotated(list(paths), index):
                run = paths[name]
                run(feed)  # untimed: the first run of a round
                for _ in range(args.runs):
                    started = time.perf_counter()
                    run(feed)
                    times[name].append((time.perf_counter() - started) * 1e3)
            progress(f"round {index + 1}/{args.rounds}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    report = {"environment": env, "file": str(args.onnx), "beside": [str(p) for p in args.beside],
              "threads": args.threads, "rounds": args.rounds, "runs": args.runs,
              "notes": args.note, "median_ms": medians, "ms": times}  # fmt: skip
    table = [[name, f"{ms:.3f}", f"{medians['bare'] / ms:.2f}x"] for name, ms in medians.items()]
    lines = ["# One file, three ways of calling OpenVINO", "", "## Machine", "",
             *machine_lines(env, [f"- {n}" for n in args.note]), "",
             f"`{args.onnx}`, {args.threads} thread(s), {args.rounds} rounds x {args.runs} "
             "runs, interleaved; speed: bare's median / this path's.", "",
             *markdown_table(["path", "median ms", "vs bare"], table), ""]  # fmt: skip
    write_results(args.output_dir, args.name, report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
