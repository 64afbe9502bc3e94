"""The `sparseserve` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from sparseserve import __version__


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository over the Open Inference Protocol (gRPC)",
        description="Serve a model repository over the Open Inference Protocol (KServe v2 / "
        "Triton gRPC). Flags override SPARSESERVE_* environment variables, which override "
        "the --config YAML file.",
    )
    p.add_argument("--config", type=Path, help="YAML file with any of the settings below")
    p.add_argument("--repository", type=Path, help="model repository (default: ./models)")
    p.add_argument("--host", help="bind address (default: 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, help="gRPC port, 0 = any free (default: 8001)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = any (default: 8002)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve metrics")
    p.add_argument(
        "--model-control", choices=["none", "explicit", "poll"], help="default: explicit"
    )
    p.add_argument(
        "--load-model",
        action="append",
        dest="startup_models",
        metavar="NAME",
        help="in explicit mode, load only these models at start (repeatable; default: all)",
    )
    p.add_argument("--poll-interval", type=float, dest="poll_interval_seconds")
    p.add_argument("--max-message-bytes", type=int, help="default: 268435456 (256 MiB)")
    p.add_argument("--max-inflight-per-model", type=int)
    p.add_argument("--inference-threads", type=int, help="default: one per core")
    p.add_argument("--intra-op-threads", type=int, help="onnxruntime threads per inference")
    p.add_argument("--shutdown-grace", type=float, dest="shutdown_grace_seconds")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument(
        "--dispatch", choices=["auto", "cpu", "triton"], help="where models run (default: auto)"
    )
    p.add_argument("--triton-url", help="host:port of a Triton server (gRPC) for the GPU path")
    p.add_argument(
        "--no-dispatch-fallback",
        action="store_true",
        help="fail with UNAVAILABLE when Triton fails, instead of serving from onnxruntime",
    )
    p.add_argument(
        "--traffic-policy",
        type=Path,
        metavar="PATH",
        help="YAML traffic policy (family defaults, splits, shadow), reloaded when it changes",
    )
    _assume_gpus_argument(p)
    p.add_argument(
        "--ready-file",
        type=Path,
        help="once ready, write {pid, grpc_port, metrics_port} as JSON to this file",
    )


def _serve(args: argparse.Namespace) -> int:
    from sparseserve.observability.logs import configure_logging
    from sparseserve.server.app import serve
    from sparseserve.settings import Settings

    names = (
        "repository", "host", "grpc_port", "metrics_port", "model_control", "startup_models",
        "poll_interval_seconds", "max_message_bytes", "max_inflight_per_model",
        "inference_threads", "shutdown_grace_seconds", "log_level", "log_format",
    )  # fmt: skip
    overrides: dict[str, object] = {name: getattr(args, name) for name in names}
    overrides["dispatch"] = args.dispatch
    overrides["assume_gpus"] = args.assume_gpus
    if args.no_dispatch_fallback:
        overrides["dispatch_fallback"] = False
    if args.triton_url is not None:
        overrides["triton"] = {"url": args.triton_url}
    if args.traffic_policy is not None:
        # Merged with the YAML/environment values of the other traffic settings.
        overrides["traffic"] = {"policy_file": args.traffic_policy}
    if args.intra_op_threads is not None:
        # Merged with the YAML/environment values of the other onnxruntime settings.
        overrides["onnxruntime"] = {"intra_op_threads": args.intra_op_threads}
    try:
        settings = Settings.load(args.config, **overrides)
        if args.no_metrics:
            settings = settings.model_copy(update={"metrics_port": None})
    except (ValueError, OSError, yaml.YAMLError) as exc:  # ValidationError is a ValueError
        print(f"sparseserve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(serve(settings, args.ready_file))


def _assume_gpus_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--assume-gpus",
        type=int,
        metavar="N",
        help="TEST/OVERRIDE: report N GPUs instead of probing the machine",
    )


def _hardware_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "hardware",
        help="print the GPUs, onnxruntime providers and CPU features dispatch decides on",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _assume_gpus_argument(p)


def _hardware(args: argparse.Namespace) -> int:
    import json

    from sparseserve.backends.hardware import probe_hardware

    report = probe_hardware(args.assume_gpus)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    print(f"GPUs ({report.gpu_source}): {report.gpu_count}")
    for gpu in report.gpus:
        memory = f", {gpu.memory_bytes / 2**30:.1f} GiB" if gpu.memory_bytes else ""
        print(f"  {gpu.index}: {gpu.name}{memory}")
    print(f"CPU cores this process may use: {report.cpu_cores} (of {os.cpu_count()} on the host)")
    print(f"CPU features: {' '.join(report.cpu_features) or 'none'}")
    print(f"onnxruntime execution providers: {' '.join(report.execution_providers)}")
    return 0


def _health_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health",
        help="exit 0 if a running server's gRPC health service says SERVING (for HEALTHCHECKs)",
        description="Ask the standard grpc.health.v1.Health service of a running server. "
        "Exit 0 when it answers SERVING, 1 otherwise. The address defaults to 127.0.0.1 "
        "on the gRPC port of the settings (--config, SPARSESERVE_* environment), so the "
        "same command works in any container whatever its port.",
    )
    p.add_argument("--config", type=Path, help="YAML settings file the server was started with")
    p.add_argument("--address", help="host:port to ask (default: 127.0.0.1:<grpc_port>)")
    p.add_argument(
        "--service",
        default="",
        help="service to ask about: '' (default) is the whole server, "
        "'inference.GRPCInferenceService' the inference API",
    )
    p.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")


def _health(args: argparse.Namespace) -> int:
    from sparseserve.server.health_check import SERVING, HealthCheckError, check_health
    from sparseserve.settings import Settings

    address = args.address
    if address is None:
        try:
            address = f"127.0.0.1:{Settings.load(args.config).grpc_port}"
        except (ValueError, OSError, yaml.YAMLError) as exc:
            print(f"sparseserve: invalid configuration: {exc}", file=sys.stderr)
            return 2
    try:
        status = check_health(address, args.service, args.timeout)
    except HealthCheckError as exc:
        print(f"sparseserve health: {exc}", file=sys.stderr)
        return 1
    print(f"{address} {args.service or '(server)'}: {status}")
    return 0 if status == SERVING else 1


def _export_triton_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-triton",
        help="write a Triton config.pbtxt for each model of a repository",
        description="Write config.pbtxt for each model so that the repository can be "
        "mounted into a GPU Triton Inference Server. Existing configs are kept unless "
        "--force (which keeps their version_policy and default_model_filename).",
    )
    p.add_argument("--repository", type=Path, required=True, help="model repository")
    p.add_argument("--force", action="store_true", help="rewrite existing config.pbtxt files")
    p.add_argument("--gpu-instances", type=int, default=1, help="instances per GPU (default 1)")
    p.add_argument(
        "--max-batch-size", type=int, default=64, help="for batchable models (default 64)"
    )


def _export_triton(args: argparse.Namespace) -> int:
    from sparseserve.backends.triton_export import export_repository

    results = export_repository(
        args.repository,
        force=args.force,
        gpu_instances=args.gpu_instances,
        max_batch_size=args.max_batch_size,
    )
    for result in results:
        print(f"{result.model}: {result.action} {result.detail}".rstrip())
    return 1 if any(r.action == "failed" for r in results) else 0


def _sparsify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sparsify",
        help="build a family's variants from a recipe into a model repository (needs torch)",
        description="Train the recipe's base model, build each variant (pruning, structured "
        "pruning, N:M, quantization...), measure it, and write model.onnx and its "
        "sparseserve.yaml manifest into the repository. Needs the [sparsify] extra.",
    )
    p.add_argument("--recipe", type=Path, required=True, help="recipe YAML file")
    p.add_argument("--repository", type=Path, required=True, help="model repository")
    p.add_argument("--seed", type=int, help="override the recipe's data.seed")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads while building (0: torch's default; default: what the "
        "recipe's architecture asks for, 1 for the digits models)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines and no bars")
    p.add_argument(
        "--checkpoints",
        type=Path,
        default=Path("build/sparsify-checkpoints"),
        help="where distillation keeps resumable checkpoints: rerun an interrupted build "
        "with the same recipe to continue it; removed once the build is written "
        "(default: %(default)s)",
    )
    p.add_argument("--no-checkpoints", action="store_true", help="keep no checkpoints (no resume)")
    p.add_argument(
        "--distill-precision",
        choices=("auto", "fp32", "bf16"),
        help="override every distill step's precision (auto: bf16 autocast on CPUs with "
        "AVX512-BF16 or AMX, fp32 elsewhere)",
    )


def _sparsify(args: argparse.Namespace) -> int:
    # torch is imported here, and only here: `serve` must not pay for it.
    try:
        from sparseserve.sparsify.pipeline import build_family
        from sparseserve.sparsify.recipe import RecipeError
    except ImportError as exc:
        print(f"sparseserve sparsify needs the [sparsify] extra: {exc}", file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    try:
        built = build_family(
            args.recipe,
            args.repository,
            progress=progress,
            seed=args.seed,
            threads=args.threads,
            checkpoints=None if args.no_checkpoints else args.checkpoints,
            progress_bar=not args.quiet,
            distill_precision=args.distill_precision,
        )
    except RecipeError as exc:
        print(f"sparseserve: {exc}", file=sys.stderr)
        return 2
    for variant in built:
        print(f"wrote {variant.directory}")
    return 0


def _inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a variant's manifest: per-layer sparsity, size, quality",
        description="Print what a model directory's sparseserve.yaml records, beside the "
        "size of its model files on disk.",
    )
    p.add_argument("model", type=Path, help="a model directory, e.g. ./models/digits-mlp.pruned90")


def _inspect(args: argparse.Namespace) -> int:
    from sparseserve.repository.inspect import describe_model
    from sparseserve.repository.manifest import ManifestError

    try:
        print(describe_model(args.model))
    except (ManifestError, FileNotFoundError) as exc:
        print(f"sparseserve: {exc}", file=sys.stderr)
        return 1
    return 0


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="drive load through each variant of a family and write a comparison report",
        description="Drive load through every ready variant of a family, the variants "
        "taking turns, and write report.md, report.html and PNG plots: latency, throughput, "
        "memory, size, parameters, sparsity and agreement with the baseline, from the load "
        "run and the server's own metrics. Needs the [compare] extra.",
    )
    p.add_argument("--family", required=True, help="the family to compare (e.g. digits-mlp)")
    p.add_argument("--url", help="gRPC host:port of a running server")
    p.add_argument("--metrics-url", help="its metrics endpoint (http://host:8002/metrics)")
    p.add_argument(
        "--repository", type=Path, help="start a server on this repository (or, with --url, "
        "read the accuracy its manifests record)"
    )  # fmt: skip
    p.add_argument("--baseline", help="the baseline variant (default: as the server says)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument(
        "--duration", type=float, default=10.0, help="seconds of load per variant (default 10)"
    )
    p.add_argument("--rounds", type=int, default=5, help="turns the variants take (default 5)")
    p.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    p.add_argument("--output", type=Path, default=Path("compare-report"), help="report folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _compare(args: argparse.Namespace) -> int:
    from sparseserve.compare.loadgen import LoadSettings
    from sparseserve.compare.report import text_table
    from sparseserve.compare.run import CompareError, run_and_report
    from sparseserve.compare.server_metrics import MetricsUnavailable

    try:
        settings = LoadSettings(args.concurrency, args.duration, args.rounds, args.batch)
        comparison = run_and_report(
            args.family, args.output, settings, url=args.url, metrics_url=args.metrics_url,
            repository=args.repository, baseline=args.baseline, progress=not args.no_progress,
        )  # fmt: skip
    except (CompareError, MetricsUnavailable, ValueError) as exc:
        print(f"sparseserve compare: {exc}", file=sys.stderr)
        return 2
    print(text_table(comparison))
    print(f"\nreport: {args.output / 'report.md'} and {args.output / 'report.html'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparseserve", description="Serve dense and sparse ONNX models side by side."
    )
    parser.add_argument("--version", action="version", version=f"sparseserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _hardware_parser(sub)
    _export_triton_parser(sub)
    _health_parser(sub)
    _sparsify_parser(sub)
    _inspect_parser(sub)
    _compare_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "hardware":
        return _hardware(args)
    if args.command == "export-triton":
        return _export_triton(args)
    if args.command == "health":
        return _health(args)
    if args.command == "sparsify":
        return _sparsify(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "compare":
        return _compare(args)
    parser.error(f"unknown command {args.command}")
    return 2
