"""Server configuration: defaults < YAML file < `SPARSESERVE_*` environment < CLI flags.

Nested settings use ``__`` in the environment, e.g.
``SPARSESERVE_ONNXRUNTIME__INTRA_OP_THREADS=4``.
"""

from __future__ import annotations

from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
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
        description="Longest a request waits for others to join its batch, in microseconds; "
        "only while requests overlap (a lone client never waits).",
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


class Settings(BaseSettings):
    """Everything `sparseserve serve` can be told."""

    model_config = SettingsConfigDict(
        env_prefix="SPARSESERVE_", env_nested_delimiter="__", extra="forbid"
    )

    repository: Path = Field(Path("models"), description="Model repository (Triton layout).")
    host: str = Field("0.0.0.0", description="Address the gRPC and metrics ports bind to.")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        8002, ge=0, le=65535, description="Prometheus metrics port; 0 picks one, null disables."
    )
    max_message_bytes: int = Field(
        256 * MiB,
        ge=1024,
        le=2**31 - 1,
        description="Largest gRPC message received or sent (gRPC's own default is 4 MiB).",
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
