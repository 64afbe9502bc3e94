"""Server configuration: defaults < YAML file < `SPARSESERVE_*` environment < CLI flags.

Nested settings use ``__`` in the environment, e.g.
``SPARSESERVE_ONNXRUNTIME__INTRA_OP_THREADS=4``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from sparseserve.cpu import usable_cores

MiB = 1024 * 1024
_CONFIG_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("sparseserve_config", default=None)


class GraphOptimization(StrEnum):
    disable = "disable"
    basic = "basic"
    extended = "extended"
    all = "all"


class ModelControl(StrEnum):
    """How the set of loaded models changes (Triton's model-control modes).

    none: load every model at start, never change. explicit: load `startup_models` at
    start, then only what RepositoryModelLoad/Unload ask. poll: load every model, then
    follow the repository on disk every `poll_interval_seconds`.
    """

    none = "none"
    explicit = "explicit"
    poll = "poll"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class OnnxRuntimeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    intra_op_threads: int = Field(
        1,
        ge=0,
        description="Threads one inference may use (0: onnxruntime's default, one per core). "
        "1 lets concurrent requests use the cores instead; raise it for large models.",
    )
    inter_op_threads: int = Field(1, ge=0, description="Threads across independent graph nodes.")
    graph_optimization: GraphOptimization = Field(
        GraphOptimization.all, description="onnxruntime graph optimisation level."
    )
    inline_max_us: float = Field(
        100.0,
        ge=0,
        description="Requests whose run is estimated (from warm-up) to take less than this "
        "many microseconds run on the event loop instead of the thread pool, whose hand-off "
        "costs more than such a run. 0: always use the thread pool.",
    )


class PerformanceHint(StrEnum):
    """OpenVINO's PERFORMANCE_HINT: LATENCY (few streams, each inference as fast as it
    can be) or THROUGHPUT (more streams, more inferences at once)."""

    LATENCY = "LATENCY"
    THROUGHPUT = "THROUGHPUT"


class OpenVinoSettings(BaseModel):
    """How the OpenVINO engine compiles models (config.pbtxt `parameters` with Triton's
    OpenVINO-backend keys override these per model; see docs/design-notes.md)."""

    model_config = ConfigDict(extra="forbid")

    performance_hint: PerformanceHint = Field(
        PerformanceHint.LATENCY,
        description="PERFORMANCE_HINT. LATENCY: requests run side by side on the server's "
        "inference threads, each on its own infer request, as with onnxruntime.",
    )
    num_streams: int = Field(
        1,
        ge=0,
        description="NUM_STREAMS: executions the compiled model runs at once. 0: what the "
        "performance hint chooses.",
    )
    inference_num_threads: int | None = Field(
        None,
        ge=0,
        description="INFERENCE_NUM_THREADS: threads one inference may use. None: the same "
        "as onnxruntime.intra_op_threads, so that one setting sizes both engines; 0: "
        "OpenVINO's default (every core).",
    )
    sparse_weights_decompression_rate: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE: int8 layers with at least this "
        "fraction of zero weights run on OpenVINO's sparse kernel, which needs AMX (Intel "
        "Sapphire Rapids and later); None: never. sparseserve_model_sparse_kernel_layers "
        "says how many layers did.",
    )


class CpuEngine(StrEnum):
    """Which engine runs a model on the CPU. onnxruntime or openvino: that one. auto:
    each engine that can run the variant at its precision is timed on the warm-up at
    load and the fastest serves (onnxruntime unless another is faster by more than
    `engine_margin`); with `measure_engines` off, onnxruntime unless only OpenVINO can
    run the variant (a bf16 variant, an OpenVINO IR model.xml)."""

    auto = "auto"
    onnxruntime = "onnxruntime"
    openvino = "openvino"


# The longest a request may wait for others to join its batch (settings and config.pbtxt):
# a minute is already far past what serving wants; a delay of years left every request
# after a burst waiting for company until its deadline.
MAX_QUEUE_DELAY_US = 60_000_000


class BatchingSettings(BaseModel):
    """The server-wide default for models whose config.pbtxt has no `dynamic_batching`
    block (a model with one is batched as it says, whatever this says)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False,
        description="Batch every model whose inputs and outputs all have a dynamic leading "
        "dimension. Off by default, as in Triton: a dynamic leading dimension does not "
        "prove that rows are independent (a model may normalise or sort across them), and "
        "batching a model that mixes rows would silently change its answers.",
    )
    max_batch_size: int = Field(
        64, ge=1, description="Most rows per execution (unless config.pbtxt says)."
    )
    max_queue_delay_us: int = Field(
        500,
        ge=0,
        le=MAX_QUEUE_DELAY_US,
        description="Longest a request waits for others to join its batch, in microseconds; "
        "only while requests overlap (a lone client never waits). At most 60 s.",
    )
    max_queue_size: int = Field(
        0, ge=0, description="Most requests waiting per model; 0: max_inflight_per_model."
    )


class DispatchPolicy(StrEnum):
    """Where a model runs. auto: on the Triton server when this machine has a GPU and
    `triton.url` answers ServerReady at load, else on onnxruntime; cpu: always
    onnxruntime; triton: always the Triton server (with the onnxruntime fallback unless
    `dispatch_fallback` is off)."""

    auto = "auto"
    cpu = "cpu"
    triton = "triton"


class TritonSettings(BaseModel):
    """How to reach the Triton Inference Server that runs models on the GPU."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        None, description="host:port of Triton's gRPC endpoint; None: no Triton (CPU only)."
    )
    ssl: bool = Field(False, description="Use TLS to talk to Triton.")
    root_certificates: Path | None = Field(None, description="PEM CA bundle (TLS).")
    private_key: Path | None = Field(None, description="PEM client key (mutual TLS).")
    certificate_chain: Path | None = Field(None, description="PEM client cert (mutual TLS).")
    timeout_seconds: float = Field(
        10.0, gt=0, description="Deadline of one inference sent to Triton."
    )
    control_timeout_seconds: float = Field(
        2.0, gt=0, description="Deadline of readiness and metadata calls."
    )
    load_timeout_seconds: float = Field(
        60.0, gt=0, description="Deadline of a RepositoryModelLoad sent to Triton."
    )
    retries: int = Field(
        0,
        ge=0,
        le=5,
        description="Extra attempts of an inference that found Triton unreachable, before "
        "it falls back (or fails, with fallback off).",
    )
    failure_threshold: int = Field(
        3,
        ge=1,
        description="Consecutive failed inferences that open the circuit breaker: while "
        "open, requests go straight to onnxruntime.",
    )
    probe_interval_seconds: float = Field(
        2.0, gt=0, description="How often an open breaker asks Triton whether it is back."
    )


class TrafficSettings(BaseModel):
    """How requests that name a family are routed, and how shadow runs are bounded."""

    model_config = ConfigDict(extra="forbid")

    policy_file: Path | None = Field(
        None,
        description="YAML traffic policy (default variant, weighted split, shadow per "
        "family; see docs/traffic.md), re-read when it changes. None: every family "
        "resolves to its baseline and nothing is shadowed.",
    )
    reload_interval_seconds: float = Field(
        2.0, gt=0, description="How often the policy file is checked for changes."
    )
    shadow_queue_size: int = Field(
        64,
        ge=1,
        description="Shadow runs waiting at most; a request sampled for shadowing while "
        "the queue is full is not shadowed (counted as outcome=dropped).",
    )
    shadow_concurrency: int = Field(
        1,
        ge=1,
        description="Shadow runs executing at once, across all families: shadows use at "
        "most this many of the server's inference slots, whatever the traffic.",
    )


class RestrictedGroup(StrEnum):
    """Triton's groups of RPCs for `--grpc-restricted-protocol` (and its HTTP
    `--http-restricted-api`), spelled as Triton spells them. Which RPC belongs to which
    is `sparseserve.server.security.RPC_GROUPS` (docs/deploy.md has the table). sparseserve
    serves no shared-memory, trace or logging RPC; the groups are accepted so that a
    Triton command line works unchanged."""

    health = "health"
    metadata = "metadata"
    inference = "inference"
    shared_memory = "shared-memory"
    model_config = "model-config"
    model_repository = "model-repository"
    statistics = "statistics"
    trace = "trace"
    logging = "logging"


RESTRICTION_SYNTAX = "<group>[,<group>...]:<key>=<value>"
# A header name a gRPC client can send: HTTP/2 sends names in lower case, and gRPC
# reserves the "-bin" suffix for binary values.
_HEADER_KEY = re.compile(r"^[a-z0-9_.-]+$")
# Printable ASCII: what gRPC accepts in a text metadata value.
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]+$")


class ProtocolRestriction(BaseModel):
    """RPCs of `groups` answer only calls that carry the header `<key>: <value>`
    (`triton-grpc-protocol-<key>` on gRPC). Given as Triton's string
    `<group>[,<group>...]:<key>=<value>` or as a mapping; the value comes from `value`
    or from the file `value_file` (a mounted Secret), read at start."""

    model_config = ConfigDict(extra="forbid")

    groups: list[RestrictedGroup] = Field(min_length=1, description="Restricted groups.")
    key: str = Field(
        description="Header name without Triton's prefix (gRPC: triton-grpc-protocol-<key>)."
    )
    value: SecretStr | None = Field(None, description="The value the header must carry.")
    value_file: Path | None = Field(
        None, description="A file holding the value (e.g. a mounted Secret), instead of value."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_triton_syntax(cls, data: Any) -> Any:
        if isinstance(data, str):
            return parse_restriction(data)
        return data

    @field_validator("key")
    @classmethod
    def _header_name(cls, key: str) -> str:
        key = key.lower()
        if not _HEADER_KEY.match(key) or key.endswith("-bin"):
            raise ValueError(
                f"restriction key {key!r} is not a header name gRPC can carry: use lower-case "
                "letters, digits, '-', '_' and '.', not ending in '-bin'"
            )
        return key

    @field_validator("value")
    @classmethod
    def _header_value(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _HEADER_VALUE.match(value.get_secret_value()):
            # The value is a secret: the message does not repeat it.
            raise ValueError("restriction value must be non-empty printable ASCII")
        return value

    @model_validator(mode="after")
    def _one_value(self) -> ProtocolRestriction:
        if (self.value is None) == (self.value_file is None):
            raise ValueError(
                f"restriction of {self.group_names}: give exactly one of value and value_file"
            )
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"restriction of {self.group_names}: a group is named twice")
        return self

    @property
    def group_names(self) -> str:
        return ",".join(group.value for group in self.groups)


def parse_restriction(text: str) -> dict[str, Any]:
    """Triton's `<group>[,<group>...]:<key>=<value>` as ProtocolRestriction fields. The
    value may itself hold ':' and '='; error messages never repeat it."""
    groups, colon, setting = text.partition(":")
    key, equals, value = setting.partition("=")
    if not colon or not equals or not groups or not key or not value:
        raise ValueError(
            f"restriction must be {RESTRICTION_SYNTAX} (e.g. model-repository:my-key=my-value), "
            f"got {groups!r}{' with no key=value' if not equals or not value else ''}"
        )
    names = [name.strip() for name in groups.split(",")]
    known = [group.value for group in RestrictedGroup]
    for name in names:
        if name not in known:
            raise ValueError(f"unknown restricted group {name!r}; groups: {', '.join(known)}")
    return {"groups": names, "key": key, "value": value}


class GrpcTlsSettings(BaseModel):
    """TLS on the gRPC port (Triton's --grpc-use-ssl, --grpc-use-ssl-mutual,
    --grpc-server-cert, --grpc-server-key, --grpc-root-cert). The files are PEM and are
    re-read when they change, for every new connection (cert-manager rotation)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Serve gRPC over TLS only (--grpc-use-ssl).")
    mutual: bool = Field(
        False,
        description="Mutual TLS: refuse clients without a certificate signed by root_cert "
        "(--grpc-use-ssl-mutual; implies enabled).",
    )
    server_cert: Path | None = Field(
        None, description="PEM certificate chain of the server (--grpc-server-cert)."
    )
    server_key: Path | None = Field(
        None, description="PEM private key of the server, unencrypted (--grpc-server-key)."
    )
    root_cert: Path | None = Field(
        None,
        description="PEM CA bundle that client certificates must chain to (--grpc-root-cert); "
        "required with mutual, unused without.",
    )

    @model_validator(mode="after")
    def _complete(self) -> GrpcTlsSettings:
        if self.mutual:
            self.enabled = True
        if not self.enabled:
            return self
        missing = [
            flag
            for flag, path in (
                ("--grpc-server-cert", self.server_cert),
                ("--grpc-server-key", self.server_key),
            )
            if path is None
        ]
        if missing:
            raise ValueError(f"TLS on the gRPC port needs {' and '.join(missing)}")
        if self.mutual and self.root_cert is None:
            raise ValueError(
                "mutual TLS needs --grpc-root-cert: the CA bundle client certificates must chain to"
            )
        return self


class Settings(BaseSettings):
    """Everything `sparseserve serve` can be told."""

    model_config = SettingsConfigDict(
        env_prefix="SPARSESERVE_", env_nested_delimiter="__", extra="forbid"
    )

    repository: Path = Field(Path("models"), description="Model repository (Triton layout).")
    host: str = Field(
        "0.0.0.0",
        description="Address the gRPC, HTTP and metrics ports bind to (0.0.0.0: every interface, "
        "which a pod needs for its probes and Service; 127.0.0.1: this machine only).",
    )
    grpc_address: str | None = Field(
        None, description="Address the gRPC port binds to (Triton's --grpc-address); None: host."
    )
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    allow_http: bool = Field(
        True,
        description="Serve the v2 REST protocol (HTTP/JSON) on http_port (Triton's --allow-http).",
    )
    http_port: int = Field(
        8000, ge=0, le=65535, description="v2 REST (HTTP) port; 0 picks a free one."
    )
    max_http_body_bytes: int = Field(
        64 * MiB,
        ge=1024,
        le=2**31 - 1,
        description="Largest HTTP request body accepted (larger ones are refused with 413). "
        "JSON tensors cost far more memory than their bytes once parsed; send large "
        "tensors as binary data.",
    )
    max_http_connections: int = Field(
        1000,
        ge=1,
        description="REST connections open at once; more are answered 503 and closed, so "
        "that idle or slow clients cannot take every file descriptor (and gRPC with them).",
    )
    metrics_port: int | None = Field(
        8002, ge=0, le=65535, description="Prometheus metrics port; 0 picks one, null disables."
    )
    max_grpc_streams_per_connection: int = Field(
        1000,
        ge=1,
        description="HTTP/2 streams (calls) one gRPC connection may have open at once; a "
        "client library queues the ones past it. Unbounded, a burst of thousands of calls "
        "on one connection outran the server's intake, and gRPC's core answered a fifth of "
        "them, other clients' too, CANCELLED (which clients do not retry).",
    )
    max_message_bytes: int = Field(
        64 * MiB,
        ge=1024,
        le=2**31 - 1,
        description="Largest gRPC message received or sent. gRPC's own default is 4 MiB, "
        "too small for tensors; Triton's is 2 GiB, which lets a few requests take "
        "gigabytes. 64 MiB holds a batch of 64 FP32 images of 3x224x224 (38.5 MB); raise "
        "it for larger tensors, with max_inflight_request_bytes.",
    )
    max_inflight_request_bytes: int = Field(
        512 * MiB,
        ge=1024,
        description="Bytes of inference requests (ModelInfer and Predict messages of 64 KiB "
        "and more, every ModelStreamInfer message with its answer until the answer is sent, and "
        "REST inference bodies, their JSON counted 8 times for what decoding it costs) the "
        "server holds at once; a request that would pass it is "
        "refused with RESOURCE_EXHAUSTED (HTTP 429; one is always admitted when none is in "
        "flight).",
    )
    max_bytes_elements: int = Field(
        1_000_000,
        ge=1,
        description="BYTES (string) elements one inference request may carry over all its "
        "inputs; more are refused with RESOURCE_EXHAUSTED. Each element becomes Python "
        "objects of 40-90 bytes, so this bounds the memory and CPU time of one request.",
    )
    grpc_tls: GrpcTlsSettings = Field(default_factory=GrpcTlsSettings)
    grpc_restricted_protocols: list[ProtocolRestriction] = Field(
        default_factory=list,
        description="RPC groups that need a header (Triton's --grpc-restricted-protocol, "
        "one entry per flag); each group in at most one entry.",
    )
    http_restricted_apis: list[ProtocolRestriction] = Field(
        default_factory=list,
        description="REST route groups that need a header (Triton's --http-restricted-api, "
        "one entry per flag): a request without the header '<key>: <value>' is answered 403; "
        "each group in at most one entry.",
    )
    model_control: ModelControl = ModelControl.explicit
    startup_models: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Models loaded at start in explicit mode; '*' means all.",
    )
    exit_on_error: bool = Field(
        True,
        description="Refuse to start when a model named in startup_models (--load-model) "
        "is not in the repository or fails to load, as Triton's --exit-on-error does. "
        "False: start without it and report it UNAVAILABLE. Models loaded by '*' (and in "
        "none and poll modes) that fail never stop the server; RepositoryIndex says why.",
    )
    poll_interval_seconds: float = Field(
        5.0, gt=0, description="How often poll mode rescans the repository."
    )
    max_inflight_per_model: int = Field(
        256,
        ge=1,
        description="Requests one model runs or queues at once; more are refused "
        "with RESOURCE_EXHAUSTED.",
    )
    inference_threads: int = Field(
        0,
        ge=0,
        description="Threads running model inference (0: one per core this process may use).",
    )
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_format: LogFormat = LogFormat.text
    onnxruntime: OnnxRuntimeSettings = Field(default_factory=OnnxRuntimeSettings)
    openvino: OpenVinoSettings = Field(default_factory=OpenVinoSettings)
    cpu_engine: CpuEngine = Field(
        CpuEngine.onnxruntime,
        description="The engine that runs models on the CPU (see CpuEngine); a model's "
        "config.pbtxt `backend:` and cpu_engine_overrides pin one per model. A variant "
        "onnxruntime cannot run (bf16, an OpenVINO IR model.xml) goes to OpenVINO unless "
        "pinned to onnxruntime.",
    )
    cpu_engine_overrides: dict[str, CpuEngine] = Field(
        default_factory=dict,
        description="Per-model CPU engine, by model name; wins over config.pbtxt `backend:`.",
    )
    measure_engines: bool = Field(
        True,
        description="With cpu_engine auto: time each candidate engine at load and serve with "
        "the fastest. Off: no measurement (onnxruntime, unless only OpenVINO can run it).",
    )
    engine_margin: float = Field(
        0.10,
        ge=0.0,
        le=1.0,
        description="With cpu_engine auto: another engine replaces onnxruntime only when its "
        "median run at load is lower by more than this fraction (timing noise), at one row "
        "and, for a model with dynamic batching, at max_batch_size rows too.",
    )
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    dispatch: DispatchPolicy = Field(
        DispatchPolicy.auto, description="Where models run (see DispatchPolicy)."
    )
    dispatch_overrides: dict[str, DispatchPolicy] = Field(
        default_factory=dict, description="Per-model dispatch policy, by model name."
    )
    dispatch_fallback: bool = Field(
        True,
        description="When Triton fails or is unreachable, serve from onnxruntime on the CPU. "
        "Off: such requests fail with UNAVAILABLE, so GPU faults surface.",
    )
    triton: TritonSettings = Field(default_factory=TritonSettings)
    traffic: TrafficSettings = Field(default_factory=TrafficSettings)
    assume_gpus: int | None = Field(
        None,
        ge=0,
        description="TEST/OVERRIDE KNOB: report this many GPUs instead of probing the "
        "machine (NVML, nvidia-smi). For tests and for forcing or disabling the GPU path.",
    )

    @field_validator("grpc_restricted_protocols", "http_restricted_apis")
    @classmethod
    def _each_group_once(cls, restrictions: list[ProtocolRestriction]) -> list[ProtocolRestriction]:
        seen: set[RestrictedGroup] = set()
        for restriction in restrictions:
            for group in restriction.groups:
                if group in seen:
                    raise ValueError(
                        f"restricted group {group.value!r} is in more than one restriction"
                    )
                seen.add(group)
        return restrictions

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_values = InitSettingsSource(settings_cls, init_kwargs=_CONFIG_VALUES.get() or {})
        return (init_settings, env_settings, config_values)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Settings from an optional YAML file, the environment, then `overrides`."""
        token = _CONFIG_VALUES.set(_read_config(config_file) if config_file else {})
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _CONFIG_VALUES.reset(token)

    @property
    def inference_thread_count(self) -> int:
        return self.inference_threads or usable_cores()


# SPARSESERVE_ variables that are not settings: the CLI's own, the compose file's, the
# test suite's, and the ones Kubernetes injects for each Service named "sparseserve" or
# "sparseserve-<x>": <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT[_<port>], <NAME>_PORT and
# <NAME>_PORT_<n>_<protocol>[_ADDR...] (names without "__", a setting section's). The
# chart turns those links off (enableServiceLinks: false): one of sparseserve-metrics
# would set SPARSESERVE_METRICS_PORT, a setting.
_NOT_SETTINGS = re.compile(
    r"SPARSESERVE_(DEBUG|IMAGE|REQUIRE_[A-Z_]+)"
    r"|(?!.*__)SPARSESERVE(_[A-Z0-9_]+?)?_(SERVICE_HOST|SERVICE_PORT\w*|PORT_\d+_(TCP|UDP|SCTP)\w*)"
)
# <NAME>_PORT alone is a service link only with its value, "tcp://10.0.0.1:8001": a
# misspelt SPARSESERVE_METRIC_PORT=9000 is still warned of.
_SERVICE_LINK_PORT = re.compile(r"(?!.*__)SPARSESERVE(_[A-Z0-9_]+?)?_PORT")
_SERVICE_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://\S+", re.IGNORECASE)


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """A warning for each SPARSESERVE_ variable that sets no setting, with the names it
    may have meant: the environment may hold anything, so a misspelt name (the flag's
    SPARSESERVE_SHUTDOWN_GRACE for shutdown_grace_seconds) is otherwise ignored without
    a word, where the same mistake in a config file is refused."""
    top: dict[str, set[str] | None] = {}  # name -> its sections' sub-names (None: no section)
    for field, info in Settings.model_fields.items():
        nested = info.annotation
        section = isinstance(nested, type) and issubclass(nested, BaseModel)
        top[f"SPARSESERVE_{field.upper()}"] = (
            {sub.upper() for sub in nested.model_fields} if section else None  # type: ignore[union-attr]
        )
    names = [*top] + [f"{head}__{sub}" for head, subs in top.items() for sub in sorted(subs or ())]
    warnings = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith("SPARSESERVE_") or _NOT_SETTINGS.fullmatch(name):
            continue
        if _SERVICE_LINK_PORT.fullmatch(name) and _SERVICE_LINK_VALUE.fullmatch(environ[variable]):
            continue
        head, _, rest = name.partition("__")
        if head in top:
            subs = top[head]
            # A section's key must be one of its settings; a mapping's (dispatch
            # overrides) may be any model name.
            if not rest or subs is None or rest.partition("__")[0] in subs:
                continue
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"environment variable {variable} sets no setting and is ignored{hint}")
    return warnings


def _read_config(path: Path) -> dict[str, Any]:
    """The YAML config file as a mapping; errors name the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path}: expected a mapping of settings, got {type(data).__name__}"
        )
    return data
