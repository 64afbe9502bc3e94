"""Load through a running server: concurrent batch requests to each variant, taking turns.

Each variant gets the same inputs: the rows of the evaluation data when there are some
(cycled through, `batch` rows a request), else seeded random rows. The variants take
turns in short slices (round 1: a, b, c; round 2: a, b, c; ...), so whatever else the
machine does slows all of them alike, as the demo's latency measurement does. Latency
is measured at the client, per request, from send to answer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TextIO

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from sparseserve.client.health_check import ClientTls
from sparseserve.codec import datatype
from sparseserve.repository.eval_data import EvalData

MAX_CONCURRENCY = 256
MAX_DURATION_SECONDS = 3600.0
RANDOM_PROBE_ROWS = 256
# Agreement on more rows than this adds digits nobody reads and minutes of probing.
MAX_PROBE_ROWS = 4096


@dataclass(frozen=True)
class LoadSettings:
    """How hard and how long to push each variant."""

    concurrency: int = 4
    duration_seconds: float = 10.0  # per variant, over all rounds
    rounds: int = 5
    batch: int = 1
    warmup_requests: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be 1..{MAX_CONCURRENCY}, got {self.concurrency}")
        if not 0 < self.duration_seconds <= MAX_DURATION_SECONDS:
            raise ValueError(
                f"duration must be in (0, {MAX_DURATION_SECONDS:.0f}] seconds, "
                f"got {self.duration_seconds}"
            )
        if self.rounds < 1 or self.batch < 1 or self.warmup_requests < 0:
            raise ValueError("rounds and batch must be at least 1, warm-up requests at least 0")


@dataclass
class InputSpec:
    """One input of a model: name, v2 datatype and shape with the batch dimension first."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass
class VariantLoad:
    """What the load run measured for one model."""

    model: str
    latencies_s: list[float] = field(default_factory=list)
    round_starts: list[int] = field(default_factory=list)  # index of each round's first
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    rows_per_request: int = 1
    warmup_requests: int = 0
    probe_requests: int = 0
    probe_output: np.ndarray | None = None  # first output for the shared probe inputs

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def sent(self) -> int:
        """Every request this run sent to the model: warm-up, probes and load."""
        return self.warmup_requests + self.probe_requests + self.ok + self.failed

    @property
    def requests_per_second(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_quantile(self, q: float) -> float:
        return float(np.quantile(np.asarray(self.latencies_s), q))

    def round_quantiles(self, q: float) -> list[float]:
        """The `q` latency quantile of each round that completed requests."""
        bounds = [*self.round_starts, len(self.latencies_s)]
        return [
            float(np.quantile(np.asarray(self.latencies_s[start:end]), q))
            for start, end in pairwise(bounds)
            if end > start
        ]


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a line per
    slice otherwise, so that logs stay readable)."""

    def __init__(self, total_seconds: float, stream: TextIO = sys.stderr, width: int = 30):
        self.total = total_seconds
        self.stream = stream
        self.width = width
        self.done = 0.0
        self.tty = stream.isatty()
        self._last_draw = 0.0

    def update(self, done: float, what: str, force: bool = False) -> None:
        self.done = min(done, self.total)
        now = time.monotonic()
        if not force and (not self.tty or now - self._last_draw < 0.2):
            return
        self._last_draw = now
        filled = round(self.width * self.done / self.total) if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done / self.total:4.0%}  {what}"
        if self.tty:
            self.stream.write("\r" + line.ljust(80))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def input_specs(metadata: object, batch: int) -> list[InputSpec]:
    """The model's inputs with dynamic dimensions resolved: the batch dimension to
    `batch`, any other dynamic dimension to 1."""
    specs = []
    for tensor in metadata.inputs:  # type: ignore[attr-defined]
        dims = [int(d) for d in tensor.shape]
        shape = tuple(batch if i == 0 and d < 0 else max(d, 1) for i, d in enumerate(dims))
        specs.append(InputSpec(tensor.name, tensor.datatype, shape))
    return specs


def random_inputs(specs: Sequence[InputSpec], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs for every spec: uniform in [0, 1) for floats, 0..9 for integers."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        dtype = datatype(spec.datatype).numpy
        if dtype.kind == "f":
            arrays[spec.name] = rng.random(spec.shape).astype(dtype)
        elif dtype.kind in "iu":
            arrays[spec.name] = rng.integers(0, 10, spec.shape).astype(dtype)
        elif dtype.kind == "b":
            arrays[spec.name] = rng.random(spec.shape) < 0.5
        else:
            raise ValueError(
                f"input {spec.name!r} is {spec.datatype}: compare generates numeric and BOOL "
                "inputs only"
            )
    return arrays


def fit_to_inputs(data: EvalData, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """The data's arrays as the model's inputs: matched by name (one array and one input
    match whatever their names), each row reshaped to the input's shape and cast to its
    datatype. Raise ValueError naming what the model expects."""
    wanted = [spec.name for spec in specs]
    if len(specs) == 1 and len(data.inputs) == 1:
        by_name = {specs[0].name: next(iter(data.inputs.values()))}
    else:
        missing = [name for name in wanted if name not in data.inputs]
        if missing:
            raise ValueError(
                f"{data.description}: no array for input(s) {missing}; the model's inputs "
                f"are {wanted}, the data's arrays {sorted(data.inputs)}"
            )
        by_name = {name: data.inputs[name] for name in wanted}
    fitted = {}
    for spec in specs:
        rows = by_name[spec.name]
        row_shape = tuple(spec.shape[1:])
        per_row = int(np.prod(row_shape)) if row_shape else 1
        if rows[0].size != per_row:
            raise ValueError(
                f"{data.description}: rows of {spec.name!r} have {rows[0].size} values, the "
                f"model wants {per_row} per row (shape {[-1, *row_shape]})"
            )
        try:
            fitted[spec.name] = rows.reshape(len(rows), *row_shape).astype(
                datatype(spec.datatype).numpy, casting="same_kind"
            )
        except TypeError as exc:
            raise ValueError(
                f"{data.description}: {spec.name!r} is {rows.dtype}, the model wants "
                f"{spec.datatype} ({exc})"
            ) from exc
    return fitted


def request_batches(arrays: dict[str, np.ndarray], batch: int) -> Iterator[dict[str, np.ndarray]]:
    """`batch` rows at a time from `arrays`, cycling through them for ever (wrapping
    round the end, so every request has `batch` rows)."""
    rows = len(next(iter(arrays.values())))
    start = 0
    while True:
        index = np.arange(start, start + batch) % rows
        yield {name: np.ascontiguousarray(array[index]) for name, array in arrays.items()}
        start = (start + batch) % rows


def _tensors(
    arrays: dict[str, np.ndarray], specs: Sequence[InputSpec]
) -> list[triton_aio.InferInput]:
    tensors = []
    for spec in specs:
        array = arrays[spec.name]
        tensor = triton_aio.InferInput(spec.name, list(array.shape), spec.datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


class LoadGenerator:
    """Drives the load of one comparison over one client connection."""

    def __init__(
        self,
        url: str,
        settings: LoadSettings,
        progress: Progress | None = None,
        tls: ClientTls | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        self.url = url
        self.settings = settings
        self.progress = progress
        self.tls = tls
        # Sent with every call: the header of a restricted group (inference, metadata).
        self.headers = dict(headers) if headers else None

    def _client(self) -> triton_aio.InferenceServerClient:
        if self.tls is None:
            return triton_aio.InferenceServerClient(self.url)
        options = self.tls.tritonclient_channel_args() if self.tls.server_name else None
        return triton_aio.InferenceServerClient(
            self.url, ssl=True, creds=self.tls.credentials(), channel_args=options
        )

    async def run(
        self,
        models: Sequence[str],
        data: EvalData | None = None,
        between_slices: Callable[[], None] | None = None,
    ) -> dict[str, VariantLoad]:
        """Warm up, run the shared probe rows, then the timed load, for every model.
        `data`: the rows to send (else random ones); `between_slices` is called before
        the first slice of load and after each (the server's metrics are read there)."""
        s = self.settings
        async with self._client() as client:
            specs, results, rows = {}, {}, {}
            for model in models:
                metadata = await client.get_model_metadata(model, headers=self.headers)
                specs[model] = input_specs(metadata, s.batch)
                results[model] = VariantLoad(model, rows_per_request=s.batch)
                rows[model] = self._rows(specs[model], data)
            for model in models:
                await self._probe(client, model, specs[model], results[model], rows[model])
                batches = request_batches(rows[model], s.batch)
                for _ in range(s.warmup_requests):
                    await client.infer(
                        model, _tensors(next(batches), specs[model]), headers=self.headers
                    )
                results[model].warmup_requests = s.warmup_requests
            if between_slices is not None:
                between_slices()
            slice_s = s.duration_seconds / s.rounds
            done = 0.0
            for round_ in range(s.rounds):
                for model in models:
                    what = f"{model} (round {round_ + 1}/{s.rounds})"
                    results[model].round_starts.append(len(results[model].latencies_s))
                    tick = lambda t, w=what, d=done: self._tick(d + t, w)  # noqa: E731
                    await self._slice(
                        client, model, specs[model], results[model], rows[model], slice_s, tick
                    )
                    if between_slices is not None:
                        between_slices()
                    done += slice_s
                    self._tick(done, what, force=True)
        if self.progress is not None:
            self.progress.close()
        return results

    @staticmethod
    def _rows(specs: list[InputSpec], data: EvalData | None) -> dict[str, np.ndarray]:
        """The rows this run sends the model: the data's, else seeded random ones (the
        same for every model with the same inputs)."""
        if data is not None:
            return fit_to_inputs(data, specs)
        shaped = [InputSpec(x.name, x.datatype, (RANDOM_PROBE_ROWS, *x.shape[1:])) for x in specs]
        return random_inputs(shaped, seed=1)

    def _tick(self, done: float, what: str, force: bool = False) -> None:
        if self.progress is not None:
            self.progress.update(done, what, force)

    async def _probe(
        self,
        client: triton_aio.InferenceServerClient,
        model: str,
        specs: list[InputSpec],
        result: VariantLoad,
        rows: dict[str, np.ndarray],
    ) -> None:
        """Send the same probe rows to every model and keep the first output, for the
        agreement of each variant with the baseline on identical inputs."""
        count = min(len(next(iter(rows.values()))), MAX_PROBE_ROWS)
        outputs = []
        chunk = 64
        for start in range(0, count, chunk):
            part = {name: array[start : min(start + chunk, count)] for name, array in rows.items()}
            shaped = [InputSpec(x.name, x.datatype, part[x.name].shape) for x in specs]
            answer = await client.infer(model, _tensors(part, shaped), headers=self.headers)
            first = answer.get_response().outputs[0].name
            outputs.append(answer.as_numpy(first))
            result.probe_requests += 1
        result.probe_output = np.concatenate(outputs)

    async def _slice(
        self,
        client: triton_aio.InferenceServerClient,
        model: str,
        specs: list[InputSpec],
        result: VariantLoad,
        rows: dict[str, np.ndarray],
        seconds: float,
        tick: Callable[[float], None],
    ) -> None:
        """`concurrency` workers send requests back to back for `seconds`, each the next
        `batch` rows."""
        batches = request_batches(rows, self.settings.batch)
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                tensors = _tensors(next(batches), specs)
                now = time.perf_counter()
                try:
                    await client.infer(model, tensors, headers=self.headers)
                except InferenceServerException as exc:
                    key = exc.status() or "error"
                    result.errors[key] = result.errors.get(key, 0) + 1
                    continue
                result.latencies_s.append(time.perf_counter() - now)
                tick(now - started)

        await asyncio.gather(*(worker() for _ in range(self.settings.concurrency)))
        result.elapsed_s += time.perf_counter() - started
