"""The protocol-agnostic core: every protocol adapter calls these methods, so routing,
validation, metrics, statistics, shadow sampling and errors live in one place."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from sparseserve.errors import SparseServeError, status_of
from sparseserve.observability.metrics import Metrics
from sparseserve.registry import LoadedModel, ModelRegistry
from sparseserve.routing.router import Router
from sparseserve.routing.shadow import ShadowJob, ShadowRunner
from sparseserve.routing.traffic import PolicyFile

T = TypeVar("T")


@dataclass(slots=True)
class Answer:
    """A model's answer to one request. `shadow`: the shadow job sampled for it, which
    the protocol adapter hands to `DataPlane.after_sent` once the answer is sent."""

    model: LoadedModel
    outputs: dict[str, np.ndarray]
    shadow: ShadowJob | None = None


class DataPlane:
    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        max_inflight_per_model: int,
        router: Router | None = None,
        shadows: ShadowRunner | None = None,
        codec_executor: Executor | None = None,
    ):
        self.registry = registry
        self.metrics = metrics
        self.router = router or Router(registry, PolicyFile(None))
        self.shadows = shadows
        self._max_inflight = max_inflight_per_model
        self._random = random.random
        self._codec_executor = codec_executor

    async def in_codec_thread(self, work: Callable[..., T], *args: Any) -> T:
        """Run `work(*args)` (decoding or encoding a large tensor) on the codec thread,
        so that the event loop serves other requests meanwhile (inline if there is none).
        One thread: large payloads are decoded one at a time, which also bounds the
        memory their Python objects take at once."""
        if self._codec_executor is None:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self._codec_executor, work, *args)

    def after_sent(self, answer: Answer) -> None:
        """The answer is on the wire: now its shadow runs may start."""
        if answer.shadow is not None and self.shadows is not None:
            self.shadows.submit(answer.shadow)

    async def infer(
        self,
        name: str,
        version: str,
        decode: Callable[[], Mapping[str, np.ndarray]],
        requested_outputs: Sequence[str] = (),
        decode_in_thread: bool = False,
    ) -> Answer:
        """Route to the model (by model or family name) and let it serve the request
        (`LoadedModel.run`: decode with `decode`, so that malformed requests count
        against the model they were sent to, validate, run, record). The outputs come
        back in the order requested (or the model's order when none were requested);
        the answer says which model version gave them.
        `decode_in_thread`: the payload is costly to decode; do it on the codec thread."""
        try:
            route = self.router.route(name, version)
        except SparseServeError as exc:
            self.metrics.unroutable.labels(status_of(exc)).inc()
            raise
        model = route.model
        inputs, record = await model.run(
            decode,
            requested_outputs,
            self._max_inflight,
            self.in_codec_thread if decode_in_thread else None,
        )
        results = record.outputs
        answer = Answer(model, results)
        plan = route.shadow
        if plan is not None and self.shadows is not None and self._random() < plan.fraction:
            targets = tuple(t for t in plan.targets if t[0] != model.variant)
            if targets:
                answer.shadow = ShadowJob(model, inputs, results, targets)
        return answer
