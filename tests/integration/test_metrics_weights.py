"""Weights counted at load: a model without a manifest (pruned elsewhere, dropped into the
repository) still gets `sparseserve_model_parameters`, `_nonzero_parameters` and
`_weight_sparsity`, counted from its own file once per version; a manifest that records
them wins. Scraped from a real server, as an operator's Prometheus would."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from prometheus_client.samples import Sample

from sparseserve.client.server_process import ServerProcess
from sparseserve.repository.manifest import VariantManifest
from sparseserve.testing import onnx_models
from tests.scrape import scrape, value, values

pytestmark = pytest.mark.integration

SIZES = (64, 128, 10)
ALL_VERSIONS = "version_policy: { all { } }\n"
# Deliberately not the file's numbers: the manifest's must be the ones exported.
RECORDED = {"parameters": 1234, "nonzero_parameters": 567, "sparsity": 0.25}


@dataclass(frozen=True)
class Expected:
    parameters: int
    nonzero: int
    sparsity: float


def expected_counts(path: Path) -> Expected:
    """The counts, straight from the file's initializers (matrices for the sparsity)."""
    arrays = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    matrices = [a for a in arrays if a.ndim >= 2]
    zeros = sum(a.size - np.count_nonzero(a) for a in matrices)
    return Expected(
        parameters=sum(a.size for a in arrays),
        nonzero=sum(int(np.count_nonzero(a)) for a in arrays),
        sparsity=zeros / sum(a.size for a in matrices),
    )


@dataclass
class Scraped:
    samples: list[Sample]
    log: str
    expected: dict[tuple[str, str], Expected]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    root = tmp_path_factory.mktemp("weights-repository")
    expected = {}
    # Two versions pruned to different degrees elsewhere, no manifest: each counted.
    for version, sparsity in ((1, 0.75), (2, 0.5)):
        path = onnx_models.mlp(
            root / "pruned-elsewhere" / str(version) / "model.onnx", SIZES, sparsity=sparsity
        )
        expected["pruned-elsewhere", str(version)] = expected_counts(path)
    (root / "pruned-elsewhere" / "config.pbtxt").write_text(ALL_VERSIONS)
    # A manifest without the numbers: counted too.
    path = onnx_models.mlp(root / "partial" / "1" / "model.onnx", SIZES, sparsity=0.9)
    expected["partial", "1"] = expected_counts(path)
    VariantManifest(family="fam", variant="partial").write(root / "partial" / "sparseserve.yaml")
    # A manifest that records them: not counted, its numbers exported.
    onnx_models.mlp(root / "recorded" / "1" / "model.onnx", SIZES)
    VariantManifest(family="fam", variant="recorded", **RECORDED).write(  # type: ignore[arg-type]
        root / "recorded" / "sparseserve.yaml"
    )
    with ServerProcess(root) as server:
        samples = scrape(server)
        log = server.log()
    assert server.returncode == 0, log
    yield Scraped(samples, log, expected)


@pytest.mark.parametrize(
    ("model", "version"), [("pruned-elsewhere", "1"), ("pruned-elsewhere", "2"), ("partial", "1")]
)
def test_a_model_without_counts_in_a_manifest_is_counted_at_load(
    scraped: Scraped, model: str, version: str
) -> None:
    labels = {"model": model, "version": version}
    counts = scraped.expected[model, version]
    assert value(scraped.samples, "sparseserve_model_parameters", **labels) == counts.parameters
    nonzero = value(scraped.samples, "sparseserve_model_nonzero_parameters", **labels)
    assert nonzero == counts.nonzero
    sparsity = value(scraped.samples, "sparseserve_model_weight_sparsity", **labels)
    assert sparsity == pytest.approx(counts.sparsity)


def test_each_version_is_counted_once_with_its_own_weights(scraped: Scraped) -> None:
    first = value(scraped.samples, "sparseserve_model_weight_sparsity", model="pruned-elsewhere",
                  version="1")  # fmt: skip
    second = value(scraped.samples, "sparseserve_model_weight_sparsity",
                   model="pruned-elsewhere", version="2")  # fmt: skip
    assert first == pytest.approx(0.75, abs=0.01)
    assert second == pytest.approx(0.5, abs=0.01)
    for version in ("1", "2"):
        assert scraped.log.count(f"model pruned-elsewhere version {version}: ") == 1


def test_the_manifests_numbers_win_and_the_file_is_not_read(scraped: Scraped) -> None:
    labels = {"model": "recorded", "version": "1"}
    assert value(scraped.samples, "sparseserve_model_parameters", **labels) == 1234
    assert value(scraped.samples, "sparseserve_model_nonzero_parameters", **labels) == 567
    assert value(scraped.samples, "sparseserve_model_weight_sparsity", **labels) == 0.25
    assert "model recorded version 1: " not in scraped.log


def test_the_counted_series_carry_the_usual_labels(scraped: Scraped) -> None:
    found = values(scraped.samples, "sparseserve_model_parameters", model="pruned-elsewhere",
                   family="pruned-elsewhere", variant="default", backend="onnxruntime")  # fmt: skip
    assert len(found) == 2
