"""The version reconcile of a real `ModelRegistry` (real onnxruntime models on disk):
under every kind of version policy, a version that fails to load leaves the version that
served its slot serving, until a replacement loads."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sparseserve.errors import ModelLoadError
from sparseserve.registry import ModelRegistry
from sparseserve.repository.store import ModelRepository
from sparseserve.settings import Settings
from sparseserve.testing import onnx_models

Step = Callable[[ModelRegistry], Awaitable[None]]


def good(repository: Path, version: int) -> None:
    onnx_models.add_constant(repository / "m" / str(version) / "model.onnx", version)


def corrupt(repository: Path, version: int) -> None:
    path = repository / "m" / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an onnx model" * 20)


def policy(repository: Path, text: str) -> None:
    (repository / "m" / "config.pbtxt").write_text(f"version_policy: {{ {text} }}\n")


def serving_after(repository: Path, *changes: Callable[[], None]) -> list[list[int]]:
    """Load `m`, then after each of `changes` to the disk load it again; the versions it
    serves after each load (a failed load is expected to raise ModelLoadError)."""

    async def main() -> list[list[int]]:
        with ThreadPoolExecutor(1) as executor:
            registry = ModelRegistry(
                ModelRepository(repository), Settings(repository=repository), executor
            )
            served = []
            for change in (lambda: None, *changes):
                change()
                with contextlib.suppress(ModelLoadError):  # checked by what serves after
                    await registry.load("m")
                served.append(registry.versions("m"))
            await registry.close()
            return served

    return asyncio.run(main())


def test_latest_one_keeps_the_old_version_until_a_good_new_one_loads(tmp_path: Path) -> None:
    good(tmp_path, 1)
    assert serving_after(
        tmp_path,
        lambda: corrupt(tmp_path, 2),
        lambda: (shutil.rmtree(tmp_path / "m" / "2"), good(tmp_path, 3)),
    ) == [[1], [1], [3]]


def test_latest_two_keeps_the_slot_of_the_failed_version(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        good(tmp_path, version)
    policy(tmp_path, "latest { num_versions: 2 }")
    assert serving_after(
        tmp_path,
        lambda: corrupt(tmp_path, 4),  # 3 and 4 wanted; 4 fails: 2 keeps its slot
        lambda: good(tmp_path, 4),
    ) == [[2, 3], [2, 3], [3, 4]]


def test_all_keeps_every_version_when_a_new_one_fails(tmp_path: Path) -> None:
    good(tmp_path, 1)
    good(tmp_path, 2)
    policy(tmp_path, "all { }")
    assert serving_after(
        tmp_path, lambda: corrupt(tmp_path, 3), lambda: shutil.rmtree(tmp_path / "m" / "1")
    ) == [[1, 2], [1, 2], [2]]


def test_specific_keeps_the_old_version_when_the_newly_named_one_fails(tmp_path: Path) -> None:
    good(tmp_path, 1)
    policy(tmp_path, "specific { versions: [1] }")
    assert serving_after(
        tmp_path,
        lambda: (corrupt(tmp_path, 2), policy(tmp_path, "specific { versions: [2] }")),
        lambda: (shutil.rmtree(tmp_path / "m" / "2"), good(tmp_path, 2)),
    ) == [[1], [1], [2]]


def test_a_corrupt_overwrite_of_the_serving_version_keeps_its_old_files(tmp_path: Path) -> None:
    good(tmp_path, 1)
    assert serving_after(tmp_path, lambda: corrupt(tmp_path, 1)) == [[1], [1]]


def test_the_failed_load_names_the_version_and_what_still_serves(tmp_path: Path) -> None:
    good(tmp_path, 1)

    async def main() -> str:
        with ThreadPoolExecutor(1) as executor:
            registry = ModelRegistry(
                ModelRepository(tmp_path), Settings(repository=tmp_path), executor
            )
            await registry.load("m")
            corrupt(tmp_path, 2)
            with pytest.raises(ModelLoadError) as failed:
                await registry.load("m")
            await registry.close()
            return str(failed.value)

    message = asyncio.run(main())
    assert "version 2" in message and "onnxruntime cannot load" in message
    assert message.endswith("still serving version 1")


def test_close_stops_loads_whose_callers_left_rather_than_waiting_for_them(
    tmp_path: Path,
) -> None:
    """Five loads whose callers gave up, each 1 s of waiting on an upstream (a Triton's
    load RPC, which cannot run here: a sleep stands in for it). Shutting down stops
    them: close() once ran them to their end, one after another under the load lock
    (5 s here; a pod would be killed first)."""
    for i in range(5):
        onnx_models.add_constant(tmp_path / f"m{i}" / "1" / "model.onnx", 1)

    async def main() -> tuple[float, list[str]]:
        with ThreadPoolExecutor(1) as executor:
            registry = ModelRegistry(
                ModelRepository(tmp_path), Settings(repository=tmp_path, measure_engines=False),
                executor,
            )  # fmt: skip
            load = registry.dispatcher.load

            async def upstream_load(files):  # type: ignore[no-untyped-def]
                await asyncio.sleep(1.0)
                return await load(files)

            registry.dispatcher.load = upstream_load  # type: ignore[method-assign]
            callers = [asyncio.create_task(registry.load(f"m{i}")) for i in range(5)]
            await asyncio.sleep(0.2)
            for caller in callers:
                caller.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
            started = asyncio.get_running_loop().time()
            await registry.close()
            took = asyncio.get_running_loop().time() - started
            return took, [m.name for m in registry.loaded()]

    took, serving = asyncio.run(main())
    assert took < 0.5, f"close() took {took:.2f} s"
    assert serving == []


def index_after_start(repository: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """RepositoryIndex as {(model, version): (state, reason)} after the start's loads,
    which must not end the start."""

    async def main() -> dict[tuple[str, str], tuple[str, str]]:
        with ThreadPoolExecutor(1) as executor:
            registry = ModelRegistry(ModelRepository(repository), Settings(), executor)
            assert await registry.load_startup_models() == {}
            rows = {(r.name, r.version): (r.state.name, r.reason) for r in registry.index()}
            await registry.close()
            return rows

    return asyncio.run(main())


@pytest.mark.parametrize("first", [True, False], ids=["loaded-first", "loaded-second"])
def test_an_engines_unforeseen_exception_fails_that_model_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: bool
) -> None:
    """An engine that raises something other than the server's own errors (no real file
    makes onnxruntime do it, so its load is made to here) fails its model, with the
    reason in RepositoryIndex, and the start goes on: also for the first model loaded,
    which a one-off unmeasured load (`_prime`) runs before the measured one."""
    from sparseserve.backends import onnxruntime as engine

    broken = "aaa" if first else "ccc"
    real_load = engine.OnnxRuntimeBackend.load

    async def load(self: engine.OnnxRuntimeBackend) -> object:
        if self._files.name == broken:
            raise RuntimeError("engine bug")
        return await real_load(self)

    monkeypatch.setattr(engine.OnnxRuntimeBackend, "load", load)
    for name in ("aaa", "bbb", "ccc"):
        onnx_models.add_constant(tmp_path / name / "1" / "model.onnx", 1)

    rows = index_after_start(tmp_path)
    state, reason = rows[(broken, "1")]
    assert state == "UNAVAILABLE" and reason.endswith(
        f"{broken}/1/model.onnx: RuntimeError: engine bug"
    )
    assert all(rows[(name, "1")][0] == "READY" for name in {"aaa", "bbb", "ccc"} - {broken})


def test_a_check_after_the_engine_loaded_that_fails_unloads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config.pbtxt with `data_type: 99` parses (the enum is open) and made the check of
    config against model raise: the start ended and the loaded engine was never unloaded."""
    from sparseserve.backends import onnxruntime as engine

    loaded: list[str] = []
    unloaded: list[str] = []
    real_load, real_unload = engine.OnnxRuntimeBackend.load, engine.OnnxRuntimeBackend.unload

    async def load(self: engine.OnnxRuntimeBackend) -> object:
        loaded.append(self._files.name)
        return await real_load(self)

    async def unload(self: engine.OnnxRuntimeBackend) -> None:
        unloaded.append(self._files.name)
        await real_unload(self)

    monkeypatch.setattr(engine.OnnxRuntimeBackend, "load", load)
    monkeypatch.setattr(engine.OnnxRuntimeBackend, "unload", unload)
    good(tmp_path, 1)
    (tmp_path / "m" / "config.pbtxt").write_text(
        'output [{ name: "y" data_type: 99 dims: [-1, 4] }]\n'
    )
    onnx_models.add_constant(tmp_path / "n" / "1" / "model.onnx", 2)

    rows = index_after_start(tmp_path)
    state, reason = rows[("m", "1")]
    assert state == "UNAVAILABLE" and "data_type 99, no type of Triton's" in reason
    assert rows[("n", "1")][0] == "READY"
    # Every engine loaded was unloaded (m's when its load failed, n's at close): none
    # outlives the registry. (The first model is loaded once more, unmeasured, first.)
    assert sorted(unloaded) == sorted(loaded), (loaded, unloaded)
