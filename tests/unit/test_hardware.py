"""The hardware probe: parsing what the machine says, and the override knob."""

from __future__ import annotations

from pathlib import Path

from sparseserve.backends.hardware import cpu_features, parse_nvidia_smi, probe_hardware
from sparseserve.cli import main


def test_nvidia_smi_output_is_parsed() -> None:
    text = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA L4, [N/A]\n\n"
    gpus = parse_nvidia_smi(text)
    assert [(g.index, g.name) for g in gpus] == [(0, "NVIDIA H100 80GB HBM3"), (1, "NVIDIA L4")]
    assert gpus[0].memory_bytes == 81559 * 2**20
    assert gpus[1].memory_bytes == 0


def test_cpu_features_come_from_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert cpu_features(cpuinfo) == ("avx2", "avx512f", "avx512_vnni")
    assert cpu_features(tmp_path / "missing") == ()


def test_assumed_gpus_replace_the_probe_and_say_so() -> None:
    report = probe_hardware(assume_gpus=2)
    assert report.gpu_count == 2 and report.gpu_source == "assumed"
    assert "CPUExecutionProvider" in report.execution_providers
    assert report.cpu_cores >= 1
    assert probe_hardware(assume_gpus=0).gpu_count == 0


def test_hardware_command_prints_json(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["hardware", "--json", "--assume-gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert '"gpu_count": 1' in out and '"gpu_source": "assumed"' in out


def test_hardware_command_says_what_openvino_can_compute(capsys) -> None:  # type: ignore[no-untyped-def]
    """Whether bf16 variants can be served here is the question the engines' docs send a
    user to this command with; the answer is OpenVINO's own, on both kinds of CPU."""
    from sparseserve.backends.openvino import cpu_capabilities

    assert main(["hardware"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("OpenVINO CPU capabilities"))
    expected = "yes" if "BF16" in cpu_capabilities() else "no (needs AVX512_BF16 or AMX-BF16)"
    assert line.endswith(f"bf16 variants: {expected}") and "FP32" in line
