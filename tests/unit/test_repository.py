"""The model repository on disk: names, version folders, config.pbtxt, manifests and
fingerprints, read from real directories."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from sparseserve.errors import InvalidModelName, ModelLoadError, ModelNotFound
from sparseserve.protocol import model_config_pb2
from sparseserve.repository.manifest import (
    LayerSparsity,
    ManifestError,
    Quality,
    Task,
    VariantManifest,
)
from sparseserve.repository.store import ModelRepository, VersionPolicy, check_model_name
from sparseserve.testing import onnx_models

# -- names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "digits-mlp.pruned90", "resnet_50", "A1", "7b", "x" * 200])
def test_valid_model_names_are_accepted(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["../x", "..", ".", ".hidden", "a/b", "a\\b", "", "x" * 201, "/etc", "a b", "-rf", "mlp\n"],
)
def test_unsafe_or_malformed_model_names_are_refused(name: str) -> None:
    """A name is one plain directory name: nothing that walks out of the repository,
    hides, or could be taken for an option."""
    with pytest.raises(InvalidModelName, match="not a valid model name"):
        check_model_name(name)


def test_symlinked_model_pointing_outside_the_repository_is_refused(tmp_path: Path) -> None:
    """A model folder that leads out of the repository is not read, and the reason says
    where it leads (RepositoryIndex shows it: the name itself is valid)."""
    outside = tmp_path / "outside"
    onnx_models.add_constant(outside / "1" / "model.onnx", 1)
    root = tmp_path / "repo"
    root.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    repository = ModelRepository(root)
    assert repository.names() == ["escape"]
    with pytest.raises(
        ModelLoadError, match=f"folder .*escape resolves outside the repository .*{outside}"
    ):
        repository.read("escape")


@pytest.mark.parametrize("link", ["version", "file"])
def test_version_folder_or_model_file_may_link_elsewhere(tmp_path: Path, link: str) -> None:
    """A version folder or a model file that is a symlink (into a cache, say) is the
    operator's wiring and is followed; only a model folder must be the repository's."""
    outside = tmp_path / "outside"
    onnx_models.add_constant(outside / "1" / "model.onnx", 1)
    model = tmp_path / "repo" / "m"
    onnx_models.add_constant(model / "1" / "model.onnx", 1)
    if link == "version":
        (model / "2").symlink_to(outside / "1", target_is_directory=True)
    else:
        (model / "2").mkdir()
        (model / "2" / "model.onnx").symlink_to(outside / "1" / "model.onnx")
    assert ModelRepository(tmp_path / "repo").read("m").versions.keys() == {1, 2}


@pytest.mark.parametrize("filename", ["../../outside.onnx", "/etc/passwd", "sub/model.onnx", ".."])
def test_default_model_filename_must_be_a_file_name(tmp_path: Path, filename: str) -> None:
    """default_model_filename names a file in each version folder (as in Triton), never
    a path: an absolute one or one with '..' would read a file anywhere."""
    model = tmp_path / "m"
    onnx_models.add_constant(model / "1" / "model.onnx", 1)
    (model / "config.pbtxt").write_text(f'default_model_filename: "{filename}"\n')
    with pytest.raises(ModelLoadError, match=r"default_model_filename is .*expected the name of "
                       "a file in each version folder"):  # fmt: skip
        ModelRepository(tmp_path).read("m")


def test_symlinked_model_inside_the_repository_is_allowed(tmp_path: Path) -> None:
    """A symlink that stays inside the repository (an alias, or the release switched
    with `ln -sfn` into a hidden folder) is a normal model; one to the repository
    itself is not a model."""
    root = tmp_path / "repo"
    onnx_models.add_constant(root / "real" / "1" / "model.onnx", 1)
    onnx_models.add_constant(root / ".releases" / "c-v1" / "1" / "model.onnx", 1)
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    (root / "c").symlink_to(".releases/c-v1", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    repository = ModelRepository(root)
    assert repository.read("alias").versions.keys() == {1}
    assert repository.read("c").versions.keys() == {1}
    with pytest.raises(ModelLoadError, match="resolves outside the repository"):
        repository.read("loop")


def test_names_lists_model_directories_only(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for name in ("b-model", "a.model", ".git"):
        (root / name).mkdir(parents=True)
    (root / "README.md").write_text("not a model")
    assert ModelRepository(root).names() == ["a.model", "b-model"]


def test_unservable_folder_names_are_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder whose name sparseserve does not serve (a space, a non-ASCII letter) is
    named in the log once, with the rule, not skipped in silence."""
    root = tmp_path / "repo"
    for name in ("good", "my model", "modèle", ".hidden", "lost+found"):
        (root / name).mkdir(parents=True)
    repository = ModelRepository(root)
    with caplog.at_level("WARNING"):
        assert repository.names() == ["good"]
        assert repository.names() == ["good"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert any("my model is skipped: not a model name" in w for w in warnings)
    assert any("modèle is skipped" in w for w in warnings)


def test_missing_model_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="'ghost'"):
        ModelRepository(tmp_path).read("ghost")


# -- version policy -------------------------------------------------------------------


def policy_from(text: str) -> VersionPolicy:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(text, config)
    return VersionPolicy.from_config(config)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, [7]),  # no config.pbtxt: Triton's default, the latest one
        ("", [7]),
        ("version_policy: { latest { num_versions: 2 } }", [3, 7]),
        ("version_policy: { latest { num_versions: 10 } }", [1, 2, 3, 7]),
        ("version_policy: { all { } }", [1, 2, 3, 7]),
        ("version_policy: { specific { versions: [3, 1] } }", [1, 3]),
        ("version_policy: { specific { versions: [2, 99] } }", [2]),
    ],
    ids=[
        "no-config",
        "no-policy",
        "latest-2",
        "latest-more-than-exist",
        "all",
        "specific",
        "specific-missing",
    ],
)
def test_version_policy_selects(config: str | None, expected: list[int]) -> None:
    policy = VersionPolicy.from_config(None) if config is None else policy_from(config)
    assert policy.select([7, 1, 3, 2]) == expected


# -- reading a model directory --------------------------------------------------------


def test_read_discovers_numeric_positive_versions(tmp_path: Path) -> None:
    """Versions are the positive numeric folders holding a model file; `0`, names,
    empty folders and stray files are not versions."""
    model = tmp_path / "m"
    for version in ("1", "2", "10"):
        onnx_models.add_constant(model / version / "model.onnx", int(version))
    onnx_models.add_constant(model / "0" / "model.onnx", 0)
    onnx_models.add_constant(model / "latest" / "model.onnx", 9)
    (model / "5").mkdir()  # no model file yet
    (model / "6").write_text("a file, not a folder")
    source = ModelRepository(tmp_path).read("m")
    assert source.versions == {v: model / str(v) / "model.onnx" for v in (1, 2, 10)}
    assert source.served_versions() == [10]
    assert source.manifest is None and source.config is None


def test_version_folders_have_one_spelling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version folder is plain ASCII decimal without leading zeros, up to int64, as a
    request spells it: "01" beside "1" would be two folders for one version (which one
    served depended on directory order), "²" or an Arabic-Indic one are digits to Python
    but not numbers a request can name. Each such folder is skipped with a warning."""
    model = tmp_path / "m"
    onnx_models.add_constant(model / "1" / "model.onnx", 1)
    for odd in ("01", "²", "\u0661", "9" * 19, str(2**63)):
        onnx_models.add_constant(model / odd / "model.onnx", 5)
    onnx_models.add_constant(model / str(2**63 - 1) / "model.onnx", 2)
    with caplog.at_level("WARNING"):
        source = ModelRepository(tmp_path).read("m")
    assert sorted(source.versions) == [1, 2**63 - 1]
    skipped = [r.getMessage() for r in caplog.records if "is skipped" in r.getMessage()]
    assert len(skipped) == 5, skipped
    assert all("plain decimal number without leading zeros" in w for w in skipped)


def test_config_that_is_not_utf8_or_nested_too_deeply_is_a_load_error(tmp_path: Path) -> None:
    """What text_format cannot take is one model's load error naming the file, not an
    exception that escapes the repository (it stopped the whole server's start)."""
    model = tmp_path / "m"
    onnx_models.add_constant(model / "1" / "model.onnx", 1)
    config = model / "config.pbtxt"
    config.write_bytes(b'name: "m" # caf\xe9\n')
    with pytest.raises(ModelLoadError, match=r"m/config\.pbtxt: not UTF-8 text"):
        ModelRepository(tmp_path).read("m")
    config.write_text('model_warmup { inputs { key: "a" value { ' * 400 + "} } }" * 400)
    with pytest.raises(ModelLoadError, match=r"m/config\.pbtxt: .*nested too deeply"):
        ModelRepository(tmp_path).read("m")
    config.unlink()
    (model / "sparseserve.yaml").write_bytes(b"family: caf\xe9\n")
    with pytest.raises(ModelLoadError, match=r"sparseserve\.yaml: cannot read manifest: not UTF-8"):
        ModelRepository(tmp_path).read("m")


def test_read_parses_config_with_default_model_filename_and_unknown_fields(
    tmp_path: Path,
) -> None:
    """A config.pbtxt written for Triton loads unchanged: fields sparseserve does not
    model are skipped (without a warning: pytest turns warnings into errors here)."""
    model = tmp_path / "m"
    onnx_models.add_constant(model / "1" / "net.onnx", 1)
    onnx_models.add_constant(model / "2" / "net.onnx", 2)
    onnx_models.add_constant(model / "3" / "model.onnx", 3)  # not this model's file name
    (model / "config.pbtxt").write_text(
        'name: "m"\n'
        'platform: "onnxruntime_onnx"\n'
        'default_model_filename: "net.onnx"\n'
        "max_batch_size: 8\n"
        "version_policy: { all { } }\n"
        'model_warmup: [ { name: "w" batch_size: 1 } ]\n'
        "some_future_triton_field: 3\n"
        "optimization { priority: PRIORITY_MAX }\n"
    )
    source = ModelRepository(tmp_path).read("m")
    assert source.versions == {1: model / "1" / "net.onnx", 2: model / "2" / "net.onnx"}
    assert source.config is not None
    assert source.config.max_batch_size == 8
    assert source.served_versions() == [1, 2]


def test_config_syntax_error_names_the_file(tmp_path: Path) -> None:
    model = tmp_path / "m"
    onnx_models.add_constant(model / "1" / "model.onnx", 1)
    (model / "config.pbtxt").write_text('name: "m"\nversion_policy: { all { }\n')
    with pytest.raises(ModelLoadError, match=r"m/config\.pbtxt: cannot parse"):
        ModelRepository(tmp_path).read("m")


def test_model_without_versions_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "m" / "not-a-version").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=r"'m' has no version: expected .*/<N>/model\.onnx"):
        ModelRepository(tmp_path).read("m")


def test_bad_manifest_is_a_load_error_naming_the_problem(tmp_path: Path) -> None:
    model = tmp_path / "m"
    onnx_models.add_constant(model / "1" / "model.onnx", 1)
    (model / "sparseserve.yaml").write_text("family: f\nvariant: v\nsparsity: 1.5\n")
    with pytest.raises(ModelLoadError, match=r"sparseserve\.yaml: invalid manifest: sparsity"):
        ModelRepository(tmp_path).read("m")


# -- manifests ------------------------------------------------------------------------


def full_manifest() -> VariantManifest:
    return VariantManifest(
        family="digits-mlp",
        variant="pruned90",
        baseline="digits-mlp.dense",
        task=Task.classification,
        description="magnitude-pruned, ünïcode ok",
        method="magnitude",
        parameters=1000,
        nonzero_parameters=100,
        sparsity=0.9,
        layers=[
            LayerSparsity(name="w0", shape=[10, 100], parameters=1000, nonzero=100, sparsity=0.9)
        ],
        quantization="int8",
        file_bytes=4096,
        quality=[
            Quality(
                metric="accuracy", value=0.95, dataset="digits", samples=360, baseline_value=0.97
            )
        ],
        recipe={"steps": [{"prune": {"sparsity": 0.9}}]},
    )


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = full_manifest()
    path = tmp_path / "sparseserve.yaml"
    manifest.write(path)
    assert VariantManifest.read(path) == manifest
    assert not path.with_name("sparseserve.yaml.tmp").exists()


def test_manifest_read_by_the_repository(tmp_path: Path) -> None:
    model = tmp_path / "digits-mlp.pruned90"
    onnx_models.add_constant(model / "1" / "model.onnx", 1)
    full_manifest().write(model / "sparseserve.yaml")
    source = ModelRepository(tmp_path).read("digits-mlp.pruned90")
    assert source.manifest == full_manifest()
    assert not source.manifest.is_baseline


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("family: f\nvariant: v\nspasity: 0.5\n", "spasity: Extra inputs are not permitted"),
        (
            "family: f\nvariant: v\nsparsity: 1.5\n",
            "sparsity: Input should be less than or equal to 1",
        ),
        ("family: f\nvariant: v\nsparsity: -0.1\n", "sparsity: Input should be greater than"),
        ("family: f\n", "variant: Field required"),
        ("family: f\nvariant: v\nschema_version: 2\n", "schema_version"),
        (
            "family: f\nvariant: v\nlayers: [{name: w, shape: [1], parameters: 1, nonzero: 1, "
            "sparsity: 2}]\n",
            r"layers\.0\.sparsity",
        ),
        ("- a list\n", "manifest must be a mapping"),
        ("family: [unclosed\n", "cannot read manifest"),
    ],
    ids=[
        "unknown-key",
        "sparsity-above-1",
        "negative-sparsity",
        "missing-variant",
        "future-schema",
        "layer-sparsity",
        "not-a-mapping",
        "yaml-syntax",
    ],
)
def test_invalid_manifest_is_rejected_readably(tmp_path: Path, text: str, message: str) -> None:
    """The error names the file and the field, in words, not a pydantic dump."""
    path = tmp_path / "sparseserve.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message) as info:
        VariantManifest.read(path)
    assert str(path) in str(info.value)
    assert "errors.pydantic.dev" not in str(info.value)


# -- fingerprints ---------------------------------------------------------------------


def test_fingerprint_changes_when_the_model_file_is_rewritten(tmp_path: Path) -> None:
    """Rewriting a version's model.onnx (same size, new content) is seen as a change,
    so explicit reload and poll mode load it; an untouched file is not."""
    model = tmp_path / "m"
    path = onnx_models.add_constant(model / "1" / "model.onnx", 1)
    repository = ModelRepository(tmp_path)
    before = repository.read("m").fingerprint(1)
    assert repository.read("m").fingerprint(1) == before
    size = path.stat().st_size
    onnx_models.add_constant(path, 2)
    assert path.stat().st_size == size
    assert repository.read("m").fingerprint(1) != before


def test_fingerprint_changes_when_config_or_manifest_changes(tmp_path: Path) -> None:
    model = tmp_path / "m"
    onnx_models.add_constant(model / "1" / "model.onnx", 1)
    repository = ModelRepository(tmp_path)
    first = repository.read("m").fingerprint(1)
    (model / "config.pbtxt").write_text('name: "m"\n')
    second = repository.read("m").fingerprint(1)
    assert second != first
    VariantManifest(family="m", variant="dense").write(model / "sparseserve.yaml")
    assert repository.read("m").fingerprint(1) != second
