"""`sparseserve_model_memory_bytes` charges each model its own load, not onnxruntime's
one-time set-up: two copies of one small model, loaded one after the other, cost about
the same (without the registry's unmeasured first load, the first copy carried 7 to
16 MiB more)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models
from tests.scrape import scrape, values

pytestmark = pytest.mark.integration

# A model of 64x256x256x10 float weights (about 350 KiB) grows the process by well under
# this; onnxruntime's one-time set-up alone is several times more.
SMALL_MODEL_BYTES = 4 << 20


def test_the_first_model_is_not_charged_onnxruntimes_set_up(tmp_path: Path) -> None:
    for name in ("first", "second"):
        onnx_models.mlp(tmp_path / name / "1" / "model.onnx")
    with ServerProcess(tmp_path) as server:
        samples = scrape(server)
    memory = {
        name: values(samples, "sparseserve_model_memory_bytes", model=name)[0]
        for name in ("first", "second")
    }
    assert all(0 < m < SMALL_MODEL_BYTES for m in memory.values()), memory
