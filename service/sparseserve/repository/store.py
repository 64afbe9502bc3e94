"""The model repository on disk, in Triton's layout, so one directory serves both:

    <repository>/<model>/config.pbtxt          optional (Triton's ModelConfig, text form)
    <repository>/<model>/sparseserve.yaml      optional variant manifest
    <repository>/<model>/<version>/model.onnx  numeric version folders
    <repository>/<model>/<version>/model.xml   (and model.bin) OpenVINO IR, as Triton's
                                               OpenVINO backend reads it

This module only reads the disk; it knows nothing of backends or loaded models.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from sparseserve.errors import InvalidModelName, ModelLoadError, ModelNotFound
from sparseserve.protocol import model_config_pb2
from sparseserve.repository.manifest import (
    MANIFEST_FILENAME,
    ManifestError,
    Precision,
    VariantManifest,
)

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.pbtxt"
DEFAULT_MODEL_FILENAME = "model.onnx"
# Triton's OpenVINO backend reads model.xml (with model.bin beside it) by default.
OPENVINO_MODEL_FILENAME = "model.xml"
# The config.pbtxt parameter of Triton's OpenVINO backend that asks for bf16 inference.
HINT_BF16 = "HINT_BF16"
# A model name is one plain directory name: no separators, no leading dot (so no `..`).
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")


def check_model_name(name: str) -> str:
    """Return `name` if it is a valid model name; raise `InvalidModelName` otherwise."""
    if not _MODEL_NAME.fullmatch(name):
        raise InvalidModelName(
            f"{name!r} is not a valid model name: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which versions on disk are served: the latest N, all, or a specific list."""

    latest: int | None = 1
    specific: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: model_config_pb2.ModelConfig | None) -> VersionPolicy:
        if config is None or not config.HasField("version_policy"):
            return cls()
        policy = config.version_policy
        kind = policy.WhichOneof("policy_choice")
        if kind == "all":
            return cls(latest=None)
        if kind == "specific":
            return cls(latest=None, specific=tuple(sorted(policy.specific.versions)))
        return cls(latest=max(1, policy.latest.num_versions))

    @property
    def serves_all(self) -> bool:
        """Every version on disk is served (each its own slot, none in another's place)."""
        return self.latest is None and not self.specific

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.specific:
            return [v for v in ordered if v in self.specific]
        if self.latest is None:
            return ordered
        return ordered[-self.latest :]

    def describe(self) -> str:
        if self.specific:
            return f"specific {list(self.specific)}"
        return "all" if self.latest is None else f"latest {self.latest}"


# Identity of a version's files: inode, mtime, ctime and size of the model file, plus the
# model's settings stamp. ctime and inode catch a copy that preserves mtime (`cp -p`).
Fingerprint = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Everything the repository says about one model directory."""

    name: str
    directory: Path
    versions: dict[int, Path]  # version -> model file
    manifest: VariantManifest | None
    config: model_config_pb2.ModelConfig | None
    policy: VersionPolicy
    settings_stamp: int  # changes when the manifest or config.pbtxt changes
    precision: Precision = Precision.fp32  # from the manifest or config.pbtxt's HINT_BF16

    def served_versions(self) -> list[int]:
        return self.policy.select(list(self.versions))

    def fingerprint(self, version: int) -> Fingerprint:
        """Changes whenever the version's model file or the model's settings change."""
        try:
            st = self.versions[version].stat()
        except OSError:
            return (-1, self.settings_stamp)
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, self.settings_stamp)


class ModelRepository:
    """Reads a Triton-layout model repository."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def names(self) -> list[str]:
        """Model directories in the repository, sorted (invalid names are skipped)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _MODEL_NAME.fullmatch(p.name)
        )

    def path(self, name: str) -> Path:
        """The directory of model `name`, which must stay inside the repository."""
        check_model_name(name)
        directory = (self.root / name).resolve()
        if directory.parent != self.root:  # a symlink pointing elsewhere
            raise InvalidModelName(f"model {name!r} resolves outside the repository")
        return directory

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir()

    def read(self, name: str) -> ModelSource:
        """Read one model directory. Raise `ModelNotFound` if it is not there and
        `ModelLoadError` if its manifest, config or version folders are unusable."""
        directory = self.path(name)
        if not directory.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the repository {self.root}")
        config = _read_config(directory / CONFIG_FILENAME)
        manifest_path = directory / MANIFEST_FILENAME
        manifest = None
        if manifest_path.is_file():
            try:
                manifest = VariantManifest.read(manifest_path)
            except ManifestError as exc:
                raise ModelLoadError(str(exc)) from exc
        filenames = _model_filenames(config)
        versions = {
            int(p.name): file
            for p in directory.iterdir()
            if p.is_dir()
            and p.name.isdigit()
            and int(p.name) > 0
            and (file := _first_file(p, filenames)) is not None
        }
        if not versions:
            filename = " or ".join(filenames)
            raise ModelLoadError(
                f"model {name!r} has no version: expected {directory}/<N>/{filename} "
                "with N a positive integer"
            )
        policy = VersionPolicy.from_config(config)
        if not policy.select(list(versions)):
            raise ModelLoadError(
                f"model {name!r}: version policy {policy.describe()} selects none of the "
                f"versions on disk {sorted(versions)}"
            )
        stamp = sum(_mtime(p) for p in (manifest_path, directory / CONFIG_FILENAME))
        return ModelSource(
            name=name,
            directory=directory,
            versions=versions,
            manifest=manifest,
            config=config,
            policy=policy,
            settings_stamp=stamp,
            precision=_precision(name, manifest, config),
        )


def _model_filenames(config: model_config_pb2.ModelConfig | None) -> tuple[str, ...]:
    """The names a version's model file may have, preferred first: config.pbtxt's
    default_model_filename if it sets one; else model.onnx, or the OpenVINO IR model.xml
    (first for a config that names the openvino backend, as in Triton)."""
    if config is not None and config.default_model_filename:
        return (config.default_model_filename,)
    if config is not None and "openvino" in (config.backend, config.platform):
        return (OPENVINO_MODEL_FILENAME, DEFAULT_MODEL_FILENAME)
    return (DEFAULT_MODEL_FILENAME, OPENVINO_MODEL_FILENAME)


def _first_file(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _precision(
    name: str, manifest: VariantManifest | None, config: model_config_pb2.ModelConfig | None
) -> Precision:
    """The variant's precision: bf16 if its manifest says so or its config.pbtxt sets
    Triton's OpenVINO parameter HINT_BF16 to YES; fp32 otherwise. A manifest that says
    fp32 in so many words and a config that asks for bf16 contradict each other."""
    hint = (
        config.parameters[HINT_BF16].string_value
        if config and HINT_BF16 in config.parameters
        else ""
    )
    if hint.strip().upper() not in ("", "YES", "NO"):
        raise ModelLoadError(
            f"model {name!r}: config.pbtxt parameter {HINT_BF16} is {hint!r}; expected YES or NO"
        )
    from_config = Precision.bf16 if hint.strip().upper() == "YES" else None
    if manifest is None:
        return from_config or Precision.fp32
    if (
        from_config
        and manifest.precision is Precision.fp32
        and "precision" in manifest.model_fields_set
    ):
        raise ModelLoadError(
            f"model {name!r}: its manifest says precision fp32 but config.pbtxt sets "
            f"{HINT_BF16}: YES; say one precision"
        )
    return from_config or manifest.precision


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _read_config(path: Path) -> model_config_pb2.ModelConfig | None:
    if not path.is_file():
        return None
    config = model_config_pb2.ModelConfig()
    try:
        # Fields of Triton's ModelConfig that sparseserve does not model are skipped,
        # so a config written for Triton loads here unchanged.
        text_format.Parse(path.read_text(encoding="utf-8"), config, allow_unknown_field=True)
    except (OSError, text_format.ParseError) as exc:
        raise ModelLoadError(f"{path}: cannot parse Triton model config: {exc}") from exc
    return config
