"""The `sparseserve` command line.

Every failure a user can cause ends in one line on stderr, `sparseserve: error: ...`,
and a non-zero exit code; `--debug` (or SPARSESERVE_DEBUG=1) shows the traceback
instead. Output cut short by a closed pipe (`sparseserve inspect DIR | head`) ends
quietly, as it does for any Unix tool.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

import yaml

from sparseserve import __version__
from sparseserve.errors import SparseServeError, StartupError


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository over the Open Inference Protocol (gRPC and REST)",
        description="Serve a model repository over the Open Inference Protocol (KServe v2 / "
        "Triton, gRPC and HTTP/REST). Flags override SPARSESERVE_* environment variables, "
        "which override the --config YAML file.",
    )
    p.add_argument("--config", type=Path, help="YAML file with any of the settings below")
    p.add_argument("--repository", type=Path, help="model repository (default: ./models)")
    p.add_argument("--host", help="bind address of both ports (default: 0.0.0.0)")
    p.add_argument("--grpc-address", help="bind address of the gRPC port (default: --host)")
    p.add_argument("--grpc-port", type=int, help="gRPC port, 0 = any free (default: 8001)")
    p.add_argument("--http-port", type=int, help="v2 REST port, 0 = any free (default: 8000)")
    p.add_argument(
        "--allow-http",
        type=_boolean,
        metavar="true|false",
        help="serve v2 REST on --http-port (default: true)",
    )
    p.add_argument("--max-http-body-bytes", type=int, help="default: 67108864 (64 MiB)")
    p.add_argument("--max-http-connections", type=int, help="REST connections open at once "
                   "(more: 503; default 1000)")  # fmt: skip
    p.add_argument("--max-grpc-streams-per-connection", type=int, help="gRPC calls one "
                   "connection may have open at once (default 1000)")  # fmt: skip
    _grpc_security_arguments(p)
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
        help="in explicit mode, load only these models at start (repeatable; default: all); "
        "a name that is not in the repository or does not load stops the start",
    )
    p.add_argument(
        "--exit-on-error",
        action=argparse.BooleanOptionalAction,
        help="refuse to start when a --load-model model is missing or fails to load, as "
        "Triton does (default: on); --no-exit-on-error starts without it",
    )
    p.add_argument("--poll-interval", type=float, dest="poll_interval_seconds")
    p.add_argument("--max-message-bytes", type=int, help="default: 67108864 (64 MiB)")
    p.add_argument(
        "--max-inflight-request-bytes",
        type=int,
        help="bytes of inference requests held at once (default: 536870912, 512 MiB)",
    )
    p.add_argument(
        "--max-bytes-elements", type=int, help="BYTES elements per request (default: 1000000)"
    )
    p.add_argument("--max-inflight-per-model", type=int)
    p.add_argument("--inference-threads", type=int, help="default: one per core")
    p.add_argument("--intra-op-threads", type=int, help="onnxruntime threads per inference")
    p.add_argument("--shutdown-grace", type=float, dest="shutdown_grace_seconds")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument(
        "--dispatch", choices=["auto", "cpu", "triton"], help="where models run (default: auto)"
    )
    p.add_argument(
        "--cpu-engine",
        choices=["onnxruntime", "openvino", "auto"],
        help="engine for models on the CPU; auto: the fastest measured at load "
        "(default: onnxruntime)",
    )
    p.add_argument(
        "--no-measure-engines",
        action="store_true",
        help="with --cpu-engine auto: do not time the engines (onnxruntime unless only "
        "OpenVINO can run the model)",
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
        help="once ready, write {pid, grpc_port, http_port, metrics_port} as JSON to this "
        "file (http_port/metrics_port null when off)",
    )


def _triton_bool(text: str) -> bool:
    """Triton's boolean option values (`--grpc-use-ssl=true`)."""
    lowered = text.lower()
    if lowered in ("true", "1", "on", "yes"):
        return True
    if lowered in ("false", "0", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _grpc_security_arguments(p: argparse.ArgumentParser) -> None:
    """Triton's TLS and restricted-protocol flags, spelled as Triton spells them."""
    for flag, what in (
        ("--grpc-use-ssl", "serve gRPC over TLS"),
        ("--grpc-use-ssl-mutual", "mutual TLS: clients need a certificate from --grpc-root-cert"),
    ):
        p.add_argument(flag, nargs="?", const=True, type=_triton_bool, metavar="BOOL", help=what)
    p.add_argument("--grpc-server-cert", type=Path, metavar="PEM", help="server certificate chain")
    p.add_argument("--grpc-server-key", type=Path, metavar="PEM", help="server private key")
    p.add_argument(
        "--grpc-root-cert", type=Path, metavar="PEM", help="CA bundle of client certificates (mTLS)"
    )
    p.add_argument(
        "--grpc-restricted-protocol",
        action="append",
        dest="grpc_restricted_protocols",
        metavar="GROUPS:KEY=VALUE",
        help="RPC groups (comma-separated: health, metadata, inference, shared-memory, "
        "model-config, model-repository, statistics, trace, logging) that answer only calls "
        "with the header triton-grpc-protocol-KEY: VALUE (repeatable)",
    )
    p.add_argument(
        "--http-restricted-api",
        action="append",
        dest="http_restricted_apis",
        metavar="GROUPS:KEY=VALUE",
        help="REST route groups (as --grpc-restricted-protocol) that answer only requests "
        "with the header KEY: VALUE, else 403 (repeatable)",
    )


def _grpc_tls_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The TLS flags given, as `grpc_tls` settings (merged with the file and environment)."""
    given = {
        "enabled": args.grpc_use_ssl,
        "mutual": args.grpc_use_ssl_mutual,
        "server_cert": args.grpc_server_cert,
        "server_key": args.grpc_server_key,
        "root_cert": args.grpc_root_cert,
    }
    return {name: value for name, value in given.items() if value is not None}


def _serve(args: argparse.Namespace) -> int:
    from sparseserve.observability.logs import configure_logging
    from sparseserve.server.security import (
        Restrictions,
        SecurityConfigError,
        check_certificate_files,
    )
    from sparseserve.settings import Settings

    names = (
        "repository", "host", "grpc_address", "grpc_port", "grpc_restricted_protocols",
        "http_restricted_apis", "allow_http", "http_port", "max_http_body_bytes",
        "max_http_connections", "max_grpc_streams_per_connection",
        "metrics_port", "model_control", "startup_models",
        "poll_interval_seconds", "max_message_bytes", "max_inflight_per_model",
        "max_inflight_request_bytes", "max_bytes_elements",
        "inference_threads", "shutdown_grace_seconds", "log_level", "log_format",
        "exit_on_error",
    )  # fmt: skip
    overrides: dict[str, object] = {name: getattr(args, name) for name in names}
    overrides["dispatch"] = args.dispatch
    overrides["cpu_engine"] = args.cpu_engine
    if args.no_measure_engines:
        overrides["measure_engines"] = False
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
    if tls := _grpc_tls_overrides(args):
        overrides["grpc_tls"] = tls  # merged like the two above
    try:
        settings = Settings.load(args.config, **overrides)
        if args.no_metrics:
            settings = settings.model_copy(update={"metrics_port": None})
    except (ValueError, OSError, yaml.YAMLError) as exc:  # ValidationError is a ValueError
        print(f"sparseserve: error: invalid configuration: {_settings_error(exc)}", file=sys.stderr)
        return 2
    try:
        # Checked again when the server starts; here, before the server's imports, so
        # that a wrong file fails at once with one line.
        Restrictions.for_grpc(settings.grpc_restricted_protocols)
        if settings.grpc_tls.enabled:
            check_certificate_files(settings.grpc_tls)
    except SecurityConfigError as exc:  # a TLS file or restriction value it cannot use
        print(f"sparseserve: error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from sparseserve.server.app import serve

    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(serve(settings, args.ready_file))


def _boolean(text: str) -> bool:
    """A true/false flag value, spelled as Triton's flags take them."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _settings_error(error: Exception) -> str:
    """A settings error as one line: each invalid field and why. pydantic's own text
    spreads one error over several lines and repeats the input, which may be a secret
    (a restriction's value)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: "
            + e["msg"].removeprefix("Value error, ")
            for e in error.errors()
        )
    return " ".join(str(error).split())


def _assume_gpus_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--assume-gpus",
        type=int,
        metavar="N",
        help="TEST/OVERRIDE: report N GPUs instead of probing the machine",
    )


def _hardware_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    try:
        from sparseserve.backends.openvino import cpu_capabilities

        capabilities = cpu_capabilities()
    except Exception as exc:  # not installed, or no CPU plugin: say so, never fail
        print(f"OpenVINO: unavailable ({type(exc).__name__}: {exc})")
    else:
        bf16 = "yes" if "BF16" in capabilities else "no (needs AVX512_BF16 or AMX-BF16)"
        print(f"OpenVINO CPU capabilities: {' '.join(capabilities)}; bf16 variants: {bf16}")
    return 0


def _health_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    _client_tls_arguments(
        p, implied="implied by --root-cert or --client-cert, or when the settings enable TLS"
    )


def _client_tls_arguments(p: argparse.ArgumentParser, implied: str) -> None:
    """How a client command reaches a TLS port (tritonclient's ssl options)."""
    p.add_argument("--ssl", action="store_true", help=f"connect over TLS ({implied})")
    p.add_argument(
        "--root-cert",
        type=Path,
        metavar="PEM",
        help="CA to verify the server with (health's default: the settings' "
        "grpc_tls.root_cert, else its server_cert, which fits a self-signed certificate)",
    )
    p.add_argument(
        "--client-cert",
        type=Path,
        metavar="PEM",
        help="certificate for mutual TLS (health's default: the server's own, when mutual)",
    )
    p.add_argument("--client-key", type=Path, metavar="PEM", help="its key")
    p.add_argument(
        "--server-name",
        help="name to expect in the server's certificate (default: the address's host)",
    )


def _health(args: argparse.Namespace) -> int:
    from sparseserve.client.health_check import SERVING, HealthCheckError, check_health
    from sparseserve.server.security import SecurityConfigError, health_check_access
    from sparseserve.settings import Settings

    try:
        settings = Settings.load(args.config)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"sparseserve: error: invalid configuration: {_settings_error(exc)}", file=sys.stderr)
        return 2
    address = args.address or f"127.0.0.1:{settings.grpc_port}"
    try:
        tls, metadata = health_check_access(
            settings,
            # As for compare: a CA or a client certificate only makes sense over TLS.
            ssl=args.ssl or args.root_cert is not None or args.client_cert is not None,
            root_cert=args.root_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.server_name,
        )
    except SecurityConfigError as exc:
        print(f"sparseserve: error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        status = check_health(address, args.service, args.timeout, tls, metadata)
    except HealthCheckError as exc:
        hint = ""
        if tls is None and "Socket closed" in str(exc):
            hint = " (the server may serve TLS on that port: --ssl, with --root-cert CA)"
        print(f"sparseserve: error: {exc}{hint}", file=sys.stderr)
        return 1
    print(f"{address} {args.service or '(server)'}: {status}")
    return 0 if status == SERVING else 1


def _export_triton_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export-triton",
        help="write a Triton model repository (config.pbtxt per model) for a GPU Triton",
        description="Write a Triton Inference Server model repository from a sparseserve "
        "one: into --output (default: <repository>-triton), each model's directory with its "
        "files hard-linked (copied across filesystems) and a config.pbtxt: "
        "platform onnxruntime_onnx, its inputs and outputs, max_batch_size (--max-batch-size) "
        "and dynamic_batching {} for models whose inputs and outputs all have a dynamic "
        "leading dimension, instance_group KIND_GPU x --gpu-instances, and TensorRT for "
        "int8 and 2:4 variants (each line says what TensorRT computes in). bf16 variants and "
        "OpenVINO models are skipped, with the reason: Triton would not compute them as they "
        "were measured. The source repository is not changed. A model's existing "
        "config.pbtxt is copied as it is unless --force (which keeps its version_policy and "
        "default_model_filename).",
    )
    p.add_argument("--repository", type=Path, required=True, help="model repository to export")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--output",
        type=Path,
        help="the Triton repository to write (default: <repository>-triton); each run "
        "replaces the model directories it exports there",
    )
    where.add_argument(
        "--in-place",
        action="store_true",
        help="write config.pbtxt into --repository itself instead. sparseserve reads these "
        "files too: serving that repository, it then batches every batchable model on the "
        "CPU (dynamic_batching, up to --max-batch-size rows) and runs --gpu-instances "
        "batches of each at once",
    )
    p.add_argument("--force", action="store_true", help="rewrite existing config.pbtxt files")
    p.add_argument("--gpu-instances", type=int, default=1, help="instances per GPU (default 1)")
    p.add_argument(
        "--max-batch-size", type=int, default=64, help="for batchable models (default 64)"
    )


def _export_triton(args: argparse.Namespace) -> int:
    from sparseserve.backends.triton_export import default_output, export_repository

    output = None if args.in_place else (args.output or default_output(args.repository))
    results = export_repository(
        args.repository,
        output,
        force=args.force,
        gpu_instances=args.gpu_instances,
        max_batch_size=args.max_batch_size,
    )
    for result in results:
        print(f"{result.model}: {result.action} {result.detail}".rstrip())
    if output is not None:
        print(f"Triton repository: {output} ({args.repository} unchanged)")
    return 1 if any(r.action == "failed" for r in results) else 0


def _sparsify_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        from sparseserve.sparsify.distill import format_duration
        from sparseserve.sparsify.pipeline import build_family
        from sparseserve.sparsify.precision import PrecisionUnavailable
        from sparseserve.sparsify.recipe import RecipeError
    except ImportError as exc:
        print(f"sparseserve: error: sparsify needs the [sparsify] extra: {exc}", file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    started = time.monotonic()
    repository = Path(args.repository)
    there = {p.name for p in repository.iterdir() if p.is_dir()} if repository.is_dir() else set()
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
        print(f"sparseserve: error: {exc}", file=sys.stderr)
        return 2
    except PrecisionUnavailable as exc:  # a fine recipe, on a CPU that cannot measure it
        print(f"sparseserve: error: {exc}", file=sys.stderr)
        return 1
    for variant in built:
        replaced = (
            " (replacing the model that was there)" if variant.directory.name in there else ""
        )
        print(f"wrote {variant.directory}{replaced}")
        from sparseserve.repository.store import version_number

        numbers = (version_number(v.name) for v in variant.directory.iterdir() if v.is_dir())
        others = sorted(n for n in numbers if n is not None and n != 1)
        if others:
            print(
                f"  note: {variant.directory} also holds version(s) {others} from before; "
                "the server serves the highest (its policy: latest), not this build's "
                "version 1: remove them to serve it",
                file=sys.stderr,
            )
    took = format_duration(time.monotonic() - started)
    print(f"built {len(built)} variants into {args.repository} in {took}")
    return 0


def _inspect_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect",
        help="show what a model is: per-layer sparsity, 2:4, quantization, size, quality",
        description="Measure an ONNX file, or the newest version of a model directory, "
        "from its weights: parameters, zeros and sparsity per layer, whether each layer "
        "follows the 2:4 pattern, quantized operators and integer weights, bytes on disk. "
        "For a directory with a sparseserve.yaml, also what the manifest records (family, "
        "method, quality). Works on any ONNX model, wherever it was made.",
    )
    p.add_argument(
        "model",
        type=Path,
        help="a model directory (./models/digits-mlp.pruned90) or an .onnx file",
    )
    p.add_argument(
        "--openvino",
        action="store_true",
        help="also compile the newest version with OpenVINO on this CPU, as the server "
        "would, and report the precision it computes in and the layers on its sparse "
        "kernel (whether the zeros are skipped)",
    )


def _inspect(args: argparse.Namespace) -> int:
    from sparseserve.repository.inspect import describe_model

    print(describe_model(args.model))
    if args.openvino:
        from sparseserve.backends.openvino import describe_compiled

        print(describe_compiled(args.model))
    return 0


def _manifest_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sparseserve.repository.manifest import Task

    p = sub.add_parser(
        "manifest",
        help="write a sparseserve.yaml for a model made elsewhere (SparseML, NNCF, torch...)",
        description="Measure the newest model file of a model directory and write its "
        "sparseserve.yaml: family, variant, baseline, parameters, per-layer sparsity, "
        "quantization, file and gzip size and, with --data, quality against --baseline "
        "(top-1 agreement, cosine of the outputs, accuracy if the data has labels), run "
        "with onnxruntime. Put the model in the repository first: "
        "<repository>/<family>.<variant>/1/model.onnx.",
    )
    p.add_argument("model", type=Path, help="the model directory, e.g. ./models/bert.pruned80")
    p.add_argument("--family", required=True, help="the family the model belongs to")
    p.add_argument("--variant", required=True, help="its variant name (dense, pruned80...)")
    p.add_argument(
        "--baseline",
        help="model name of the family's dense baseline, a directory beside this one "
        "(omit for the baseline itself)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help=".npz file: one array per model input (by input name; any name for a "
        "one-input model), optional 'labels'. Quality is measured on it against --baseline",
    )
    p.add_argument("--method", help="how it was made (default: what the file shows)")
    p.add_argument("--task", choices=[t.value for t in Task], help="default: classification "
                   "if --data has labels, else other")  # fmt: skip
    p.add_argument("--description", default="", help="one line for people")
    p.add_argument("--force", action="store_true", help="replace an existing sparseserve.yaml")


def _manifest(args: argparse.Namespace) -> int:
    from sparseserve.repository.manifest import Task
    from sparseserve.repository.measure import measure_manifest, write_manifest

    manifest = measure_manifest(
        args.model,
        args.family,
        args.variant,
        baseline=args.baseline,
        data=args.data,
        method=args.method,
        task=Task(args.task) if args.task else None,
        description=args.description,
    )
    path = write_manifest(args.model, manifest, force=args.force)
    counts = f"{manifest.nonzero_parameters:,} of {manifest.parameters:,} parameters non-zero"
    print(f"wrote {path}: sparsity {manifest.sparsity or 0:.2%}, {counts}")
    for q in manifest.quality:
        baseline = f" (baseline {q.baseline_value:.4f})" if q.baseline_value is not None else ""
        print(f"  {q.metric}: {q.value:.4f}{baseline} on {q.samples} samples")
    return 0


def _compare_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    p.add_argument("--metrics-url", help="its metrics endpoint: http://host:port/metrics or "
                   "host:port (default: port 8002 on --url's host)")  # fmt: skip
    p.add_argument(
        "--repository", type=Path, help="start a server on this repository (or, with --url, "
        "read the accuracy its manifests record)"
    )  # fmt: skip
    p.add_argument("--baseline", help="the baseline variant (default: as the server says)")
    p.add_argument(
        "--data", type=Path, help="rows to send, for load and agreement: an .npz with one "
        "array per input name, or an .npy for a one-input model (default: the eval.npz "
        "sparsify wrote beside the baseline in --repository, else random rows)"
    )  # fmt: skip
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument(
        "--duration", type=float, default=10.0, help="seconds of load per variant (default 10)"
    )
    p.add_argument("--rounds", type=int, default=5, help="turns the variants take (default 5)")
    p.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    p.add_argument("--output", type=Path, default=Path("compare-report"), help="report folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _client_tls_arguments(p, implied="with --url; implied by --root-cert or --client-cert")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="send this header with every call, e.g. a restricted group's "
        "triton-grpc-protocol-<key>=<value> (repeatable)",
    )


def _compare(args: argparse.Namespace) -> int:
    from sparseserve.client.health_check import ClientTls
    from sparseserve.compare.loadgen import LoadSettings
    from sparseserve.compare.report import text_table
    from sparseserve.compare.run import CompareError, ServerUnreachable, run_and_report
    from sparseserve.compare.server_metrics import MetricsUnavailable
    from sparseserve.repository.eval_data import read_eval_data

    tls = None
    if args.ssl or args.root_cert or args.client_cert:
        tls = ClientTls(args.root_cert, args.client_cert, args.client_key, args.server_name)
    try:
        headers = dict(_header(text) for text in args.header)
        settings = LoadSettings(args.concurrency, args.duration, args.rounds, args.batch)
        data = None if args.data is None else read_eval_data(args.data)
        comparison = run_and_report(
            args.family, args.output, settings, url=args.url, metrics_url=args.metrics_url,
            repository=args.repository, baseline=args.baseline, data=data,
            progress=not args.no_progress, tls=tls, headers=headers,
        )  # fmt: skip
    except (ServerUnreachable, MetricsUnavailable) as exc:  # not the arguments' fault
        print(f"sparseserve: error: {exc}", file=sys.stderr)
        return 1
    except (CompareError, ValueError) as exc:
        print(f"sparseserve: error: {exc}", file=sys.stderr)
        return 2
    print(text_table(comparison))
    print(f"\nreport: {args.output / 'report.md'} and {args.output / 'report.html'}")
    return 0


def _header(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key or not value:
        raise ValueError(f"--header expects KEY=VALUE, got {key!r} without a value")
    return key.lower(), value


# The exceptions whose message alone tells the user what to fix; anything else is
# printed with its type and a pointer to --debug, since it may be a bug to report.
_USER_ERRORS = (OSError, ValueError, StartupError, SparseServeError)
DEBUG_ENVIRONMENT = "SPARSESERVE_DEBUG"
_COMMANDS = {
    "serve": _serve,
    "hardware": _hardware,
    "export-triton": _export_triton,
    "health": _health,
    "sparsify": _sparsify,
    "inspect": _inspect,
    "manifest": _manifest,
    "compare": _compare,
}


class _Parser(argparse.ArgumentParser):
    """argparse, failing as every other error of the CLI does: one line on stderr, exit
    code 2 (argparse prints its whole usage first: 32 lines for `serve`), and flags only
    as spelled (argparse takes any unambiguous prefix: `--repo` for `--repository`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sparseserve: error: {message} (see {self.prog} --help)\n")


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's "unrecognized arguments" for a command, with the flags they resemble."""
    flags = [f for action in parser._actions for f in action.option_strings]
    hints = []
    for extra in extras:
        if extra.startswith("-"):
            name = extra.split("=", 1)[0]
            spelled = name.replace("_", "-").lower()
            close = [f for f in flags if f.startswith(spelled) and len(spelled) > 3]
            close = close or difflib.get_close_matches(spelled, flags, n=1, cutoff=0.7)
            if close and close[0] != name:  # not a flag given after `--`, as a value
                hints.append(f"{name}: did you mean {close[0]}?")
    said = f"unrecognized arguments: {' '.join(extras)}"
    return f"{said} ({'; '.join(hints)})" if hints else said


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparseserve", description="Serve dense and sparse ONNX models side by side."
    )
    parser.add_argument("--version", action="version", version=f"sparseserve {__version__}")
    _debug_argument(parser, default=False)
    # Typed as argparse's own: the _Parser subclass changes nothing the commands use.
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True),
    )
    _serve_parser(sub)
    _hardware_parser(sub)
    _export_triton_parser(sub)
    _health_parser(sub)
    _sparsify_parser(sub)
    _inspect_parser(sub)
    _manifest_parser(sub)
    _compare_parser(sub)
    for command in sub.choices.values():
        _debug_argument(command, default=argparse.SUPPRESS)  # `sparseserve CMD ... --debug`
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _debug_argument(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help=f"show the traceback of an error (or set {DEBUG_ENVIRONMENT}=1)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `sparseserve` command; return its exit code."""
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = _subparsers(parser)[args.command]
        command.error(_unrecognized(command, extras))
    debug = args.debug or os.environ.get(DEBUG_ENVIRONMENT, "") not in ("", "0")
    try:
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as a process killed by SIGPIPE
        # would. stdout points at /dev/null so the interpreter's last flush cannot
        # raise again (Python's documentation, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception as exc:
        if debug:
            raise
        print(f"sparseserve: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(error: Exception) -> str:
    """The error as one line: its message, and for unexpected errors its type and how
    to see more."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, _USER_ERRORS):
        return message
    return f"{type(error).__name__}: {message} (--debug shows the traceback)"
