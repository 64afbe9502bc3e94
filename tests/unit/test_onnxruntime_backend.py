"""What the onnxruntime backend says when a model file cannot be loaded: the file and the
reason, without onnxruntime's source paths and C++ signatures."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest

from sparseserve.backends.base import ModelFiles
from sparseserve.backends.onnxruntime import OnnxRuntimeBackend
from sparseserve.errors import ModelLoadError
from sparseserve.settings import OnnxRuntimeSettings
from sparseserve.testing import onnx_models


def load(path: Path) -> None:
    async def run() -> None:
        with ThreadPoolExecutor(1) as executor:
            backend = OnnxRuntimeBackend(ModelFiles("m", 1, path), OnnxRuntimeSettings(), executor)
            await backend.load()

    asyncio.run(run())


def test_a_load_error_names_the_file_and_the_reason_only(tmp_path: Path) -> None:
    model = onnx.load(onnx_models.add_constant(tmp_path / "good.onnx", 1))
    model.ir_version = 99
    onnx.save(model, tmp_path / "future.onnx")
    with pytest.raises(ModelLoadError) as info:
        load(tmp_path / "future.onnx")
    message = str(info.value)
    assert "future.onnx" in message and "Unsupported model IR version: 99" in message
    assert "onnxruntime_src" not in message and "onnxruntime::" not in message, message


def test_an_unreadable_file_says_permission_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime says "system error number 13". (The suite runs as root, which reads
    any file whatever its mode, so the process's verdict is what is replaced here.)"""
    path = onnx_models.add_constant(tmp_path / "m.onnx", 1)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == path else real(p, mode))
    path.write_bytes(b"unreadable to onnxruntime too")  # as a mode-000 file would fail
    with pytest.raises(ModelLoadError, match=r"m\.onnx: permission denied \(not readable"):
        load(path)


def test_a_file_gone_since_the_repository_was_read_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"gone\.onnx: no such file \(removed since"):
        load(tmp_path / "gone.onnx")
