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
# Versions are int64 in Triton's protocol.
MAX_VERSION = 2**63 - 1


def version_number(text: str) -> int | None:
    """The version a folder name or a request spells, or None: only plain ASCII decimal
    without leading zeros, up to int64, counts, so that each version has one spelling
    (Python's `int` would also take "01", " 1", "1_0" and other scripts' digits, and
    two folders "1" and "01" would be one version)."""
    if not (text.isascii() and text.isdigit()) or (text[0] == "0" and text != "0"):
        return None
    if len(text) > 19 or int(text) > MAX_VERSION:  # `int` refuses 4,301 digits anyway
        return None
    return int(text)


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
        self._warned: set[Path] = set()  # folders skipped with a warning, warned once

    def _skip(self, path: Path, why: str) -> None:
        """Log once per folder that it is not served, and why."""
        if path not in self._warned:
            self._warned.add(path)
            log.warning("%s is skipped: %s", path, why)

    def names(self) -> list[str]:
        """Model directories in the repository, sorted (invalid names are skipped, each
        with one warning in the log)."""
        if not self.root.is_dir():
            return []
        names = []
        for p in self.root.iterdir():
            if not p.is_dir():
                continue
            if _MODEL_NAME.fullmatch(p.name):
                names.append(p.name)
            elif not p.name.startswith(".") and p.name != "lost+found":  # .git, a volume's
                self._skip(
                    p,
                    "not a model name sparseserve serves (letters, digits, '_', '-' and '.', "
                    "starting with a letter or digit, at most 200 characters); rename it",
                )
        return sorted(names)

    def path(self, name: str) -> Path:
        """The directory of model `name` (a valid name; `read` checks where it leads)."""
        check_model_name(name)
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir()

    def _inside(self, directory: Path, name: str) -> None:
        """Refuse a model folder that resolves (through a symlink) outside the repository:
        a model name, which clients send, names a folder of this repository only. Inside
        it a symlink may lead anywhere (`m -> .releases/m-v2`, switched with `ln -sfn`),
        and a version folder or model file may link elsewhere, e.g. into a cache: the
        operator's wiring, as `default_model_filename` is not, being one file name."""
        resolved = directory.resolve()
        if resolved == self.root or not resolved.is_relative_to(self.root):
            raise ModelLoadError(
                f"model {name!r}: its folder {directory} resolves outside the repository "
                f"{self.root} (to {resolved}); move or copy it into the repository"
            )

    def read(self, name: str) -> ModelSource:
        """Read one model directory. Raise `ModelNotFound` if it is not there and
        `ModelLoadError` if its manifest, config or version folders are unusable."""
        directory = self.path(name)
        if not directory.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the repository {self.root}")
        self._inside(directory, name)
        config = _read_config(directory / CONFIG_FILENAME)
        manifest_path = directory / MANIFEST_FILENAME
        manifest = None
        if manifest_path.is_file():
            try:
                manifest = VariantManifest.read(manifest_path)
            except ManifestError as exc:
                raise ModelLoadError(str(exc)) from exc
        filenames = _model_filenames(name, config)
        versions: dict[int, Path] = {}
        for p in directory.iterdir():
            if not p.is_dir() or not p.name[:1].isdigit():
                continue  # not a version folder
            number = version_number(p.name)
            if number is None:
                self._skip(p, "a version folder is named by a plain decimal number without "
                              "leading zeros, at most 2**63-1 (e.g. 1, 2, 10)")  # fmt: skip
            elif number > 0 and (file := _first_file(p, filenames)) is not None:
                versions[number] = file  # a symlink into a cache elsewhere is the operator's
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


def _model_filenames(name: str, config: model_config_pb2.ModelConfig | None) -> tuple[str, ...]:
    """The names a version's model file may have, preferred first: config.pbtxt's
    default_model_filename if it sets one; else model.onnx, or the OpenVINO IR model.xml
    (first for a config that names the openvino backend, as in Triton)."""
    if config is not None and config.default_model_filename:
        filename = config.default_model_filename
        if Path(filename).name != filename or filename in (".", ".."):
            raise ModelLoadError(
                f"model {name!r}: config.pbtxt default_model_filename is "
                f"{filename!r}; expected the name of a file in each version folder "
                "(no '/' or '..')"
            )
        return (filename,)
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
            f"model {name!r}: its manifest says precision fp32 (what its quality was "
            f"measured in) but config.pbtxt sets {HINT_BF16}: YES; say one precision: remove "
            f"{HINT_BF16}, or make a bf16 variant (recipe step `precision: bf16`, or "
            "`precision: bf16` in its sparseserve.yaml and its quality measured again)"
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
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path}: not UTF-8 text ({exc})") from exc
    except RecursionError as exc:
        raise ModelLoadError(f"{path}: Triton model config nested too deeply") from exc
    except (OSError, text_format.ParseError) as exc:
        raise ModelLoadError(f"{path}: cannot parse Triton model config: {exc}") from exc
    return config
