"""What this machine can run models on: NVIDIA GPUs, onnxruntime's execution providers,
and the CPU (cores, AVX2 / AVX-512 / VNNI, which decide how fast int8 runs on it).

The dispatcher reads the report to decide where a model runs, the server logs it at start
and exports it as metrics, and `sparseserve hardware` prints it.

GPUs are found through NVML (`nvidia-ml-py`, imported only here and only when probing),
else through `nvidia-smi`; neither present means no GPU. Nothing here initialises CUDA.
`assume_gpus` overrides the GPU probe: it is a test and operator knob (CI machines have
no GPU; an operator may want to force the GPU path), and the report says it was assumed.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from sparseserve.cpu import usable_cores

log = logging.getLogger(__name__)

# The /proc/cpuinfo flags that matter for inference (and distillation) on the CPU.
CPU_FEATURES = (
    "avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16"
)  # fmt: skip
# Either one gives the CPU native bf16 matrix products; without them bf16 is emulated
# and slower than fp32.
BF16_FEATURES = frozenset({"avx512_bf16", "amx_bf16"})
_NVIDIA_SMI_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    memory_bytes: int  # 0 when unknown (or assumed)


@dataclass(frozen=True, slots=True)
class HardwareReport:
    """One probe's findings. `gpu_source` says how the GPUs were found: "nvml",
    "nvidia-smi", "assumed" (the override), or "none"."""

    gpus: tuple[GpuInfo, ...]
    gpu_source: str
    execution_providers: tuple[str, ...]
    cpu_cores: int  # that this process may use (affinity, cgroup CPU limit)
    cpu_features: tuple[str, ...]

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "gpu_count": self.gpu_count}

    def summary(self) -> str:
        """One line for the server log."""
        gpus = ", ".join(g.name for g in self.gpus) or "none"
        return (
            f"GPUs: {self.gpu_count} ({gpus}; via {self.gpu_source}); "
            f"CPU: {self.cpu_cores} cores, features {', '.join(self.cpu_features) or 'none'}; "
            f"onnxruntime providers: {', '.join(self.execution_providers)}"
        )


def probe_hardware(assume_gpus: int | None = None) -> HardwareReport:
    """Probe this machine. `assume_gpus` (tests, overrides): report that many GPUs
    instead of asking NVML or nvidia-smi."""
    if assume_gpus is not None:
        gpus = tuple(GpuInfo(i, "assumed GPU (assume_gpus)", 0) for i in range(assume_gpus))
        source = "assumed"
    else:
        gpus, source = _probe_gpus()
    return HardwareReport(
        gpus=gpus,
        gpu_source=source,
        execution_providers=_execution_providers(),
        cpu_cores=usable_cores(),
        cpu_features=cpu_features(),
    )


def _probe_gpus() -> tuple[tuple[GpuInfo, ...], str]:
    found = _nvml_gpus()
    if found is not None:
        return found, "nvml"
    found = _nvidia_smi_gpus()
    if found is not None:
        return found, "nvidia-smi"
    return (), "none"


def _nvml_gpus() -> tuple[GpuInfo, ...] | None:
    """GPUs through NVML; None when nvidia-ml-py or the driver is missing."""
    try:
        import pynvml  # nvidia-ml-py; optional
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver: the usual case on a CPU host
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(GpuInfo(index, name if isinstance(name, str) else name.decode(), memory))
        return tuple(gpus)
    except pynvml.NVMLError as exc:
        log.warning("NVML failed while listing GPUs: %s", exc)
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi_gpus() -> tuple[GpuInfo, ...] | None:
    """GPUs through `nvidia-smi`; None when it is missing, fails or hangs."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        result = subprocess.run(
            [executable, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_SECONDS, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed: %s", exc)
        return None
    return parse_nvidia_smi(result.stdout)


def parse_nvidia_smi(text: str) -> tuple[GpuInfo, ...]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits`
    (memory in MiB)."""
    gpus = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        memory = int(parts[2]) * 1024 * 1024 if parts[2].isdigit() else 0
        gpus.append(GpuInfo(int(parts[0]), parts[1], memory))
    return tuple(gpus)


def _execution_providers() -> tuple[str, ...]:
    import onnxruntime  # already imported by any server; keeps `hardware --help` light

    return tuple(onnxruntime.get_available_providers())


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The inference-relevant flags of the first CPU in `cpuinfo` (empty off Linux)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return tuple(f for f in CPU_FEATURES if f in flags)
    return ()


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool(BF16_FEATURES.intersection(cpu_features(cpuinfo)))
