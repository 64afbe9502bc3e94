"""Soak and fault run: steady load through poll-mode version swaps (a good one, then a
corrupt one), large messages, SIGTERM and SIGKILL, and what each cost the clients.

One server in poll mode on a fixed port serves `soak` (y = x + version, so every answer
says which version computed it). `--clients` asyncio clients (tritonclient) send batch-1
requests back to back for the whole run and check every answer. The run goes through
these phases, each `--phase-seconds` long:

  steady          load only
  swap-good       version 2 is moved in (`mv`, as docs/deploy.md recommends)
  swap-corrupt    a corrupt version 3 is moved in: version 2 must keep serving
  large           `--large-count` concurrent requests of `--large-mib` MiB each, whose
                  refusal is expected; the load must not notice. Version 3 is then
                  removed again (the rollback)
  sigterm         SIGTERM under load: in-flight requests finish, later ones are refused
                  (UNAVAILABLE), none CANCELLED; the server is started again
  sigkill         SIGKILL under load (in-flight requests fail: nothing can answer them);
                  the server is started again
  recovered       load only, on the restarted server

Every second the server's RSS and open file descriptors are sampled from /proc.
Requests are counted per phase by outcome: OK, a wrong answer, or the gRPC status of
the failure. Writes bench/results/soak.json (every request outcome count, the samples,
machine, versions, command) and bench/results/soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.report import (
    REPO_ROOT,
    environment,
    machine_lines,
    markdown_table,
    progress,
    write_results,
)
from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

MODEL = "soak"
SETUP_KEYS = (
    "clients", "phase_seconds", "poll_interval", "shutdown_grace",
    "large_count", "large_mib", "sample_interval",
)  # fmt: skip
WIDTH = 4
PHASES = ("steady", "swap-good", "swap-corrupt", "large", "sigterm", "sigkill", "recovered")
# Phases in which no request may fail: the server is up and nothing it serves is lost.
NO_FAILURE_PHASES = ("steady", "swap-good", "swap-corrupt", "large", "recovered")
# The client reconnects quickly after a restart; tritonclient's own message limits kept.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass(slots=True)
class PhaseCount:
    """Request outcomes of one phase."""

    sent: int = 0
    ok: int = 0
    wrong_answer: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "wrong_answer": self.wrong_answer,
            "failed": dict(self.failed),
            "versions_served": dict(self.versions),
        }


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    phase: str
    pid: int
    rss_mib: float
    fds: int


class Run:
    """Shared state of the load, the fault injector and the sampler."""

    def __init__(self) -> None:
        self.phase = PHASES[0]
        self.counts = {phase: PhaseCount() for phase in PHASES}
        self.large: Counter[str] = Counter()
        self.samples: list[Sample] = []
        self.term_at: float | None = None  # when SIGTERM was sent (monotonic)
        # CANCELLED answers to requests sent before SIGTERM: requests in flight that the
        # drain must answer, never cut off.
        self.cancelled_in_flight = 0
        self.done = False
        self.started = time.monotonic()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_repository(root: Path) -> tuple[Path, Path]:
    """`<root>/repo/soak/1` serves; versions 2 (good) and 3 (corrupt) wait in `<root>/staging`
    on the same file system, to be moved in whole by `mv`."""
    repo, staging = root / "repo", root / "staging"
    onnx_models.add_constant(repo / MODEL / "1" / "model.onnx", 1, width=WIDTH)
    onnx_models.add_constant(staging / "2" / "model.onnx", 2, width=WIDTH)
    (staging / "3").mkdir(parents=True)
    (staging / "3" / "model.onnx").write_bytes(b"not an onnx model\x00\xff" * 64)
    return repo, staging


def status_name(error: InferenceServerException) -> str:
    return (error.status() or "UNKNOWN").removeprefix("StatusCode.")


async def client_loop(url: str, run: Run, seed: int) -> None:
    rng = np.random.default_rng(seed)
    async with triton_aio.InferenceServerClient(url, channel_args=CHANNEL_ARGS) as client:
        while not run.done:
            x = rng.random((1, WIDTH), dtype=np.float32)
            tensor = triton_aio.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            phase = run.phase
            count = run.counts[phase]
            count.sent += 1
            sent_at = time.monotonic()
            try:
                result = await client.infer(MODEL, [tensor], client_timeout=30)
            except InferenceServerException as error:
                status = status_name(error)
                count.failed[status] += 1
                if status == "CANCELLED" and (run.term_at is None or sent_at < run.term_at):
                    run.cancelled_in_flight += 1
                await asyncio.sleep(0.01)  # a refused client retries, not spins
                continue
            y = result.as_numpy("y")
            version = result.get_response().model_version
            expected = x + float(version) if version.isdigit() else None
            if expected is not None and y is not None and np.allclose(y, expected, atol=1e-6):
                count.ok += 1
                count.versions[version] += 1
            else:
                count.wrong_answer += 1


async def send_large(url: str, run: Run, count: int, mib: int) -> None:
    """`count` concurrent requests of `mib` MiB whose shape does not match the model."""
    rows = mib * 2**20 // 4 // WIDTH

    async def one() -> None:
        data = np.zeros((rows, WIDTH + 1), dtype=np.float32)  # wrong width: refused
        tensor = triton_aio.InferInput("x", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        async with triton_aio.InferenceServerClient(url, channel_args=CHANNEL_ARGS) as client:
            try:
                await client.infer(MODEL, [tensor], client_timeout=120)
                run.large["OK (unexpected)"] += 1
            except InferenceServerException as error:
                run.large[status_name(error)] += 1

    await asyncio.gather(*(one() for _ in range(count)))


def read_sample(run: Run, pid: int) -> Sample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return Sample(round(time.monotonic() - run.started, 2), run.phase, pid, rss_kib / 1024, fds)


async def sampler(run: Run, server: ServerProcess, interval: float) -> None:
    while not run.done:
        if server.process is not None and server.process.poll() is None:
            sample = read_sample(run, server.pid)
            if sample is not None:
                run.samples.append(sample)
        await asyncio.sleep(interval)


async def restart(server: ServerProcess) -> float:
    """Start the server again on its fixed ports; return how long it took."""
    started = time.monotonic()
    await asyncio.to_thread(server.start)
    return time.monotonic() - started


async def faults(
    args: argparse.Namespace, run: Run, server: ServerProcess, repo: Path, staging: Path
) -> dict[str, Any]:
    events: dict[str, Any] = {}
    seconds = args.phase_seconds

    async def enter(phase: str) -> None:
        run.phase = phase
        progress(f"{phase} ...")

    await asyncio.sleep(seconds)

    await enter("swap-good")
    shutil.move(str(staging / "2"), str(repo / MODEL / "2"))
    await asyncio.sleep(seconds)

    await enter("swap-corrupt")
    shutil.move(str(staging / "3"), str(repo / MODEL / "3"))
    await asyncio.sleep(seconds)

    await enter("large")
    started = time.monotonic()
    await send_large(server.grpc_url, run, args.large_count, args.large_mib)
    events["large_seconds"] = round(time.monotonic() - started, 2)
    await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))
    # The operator takes the corrupt version back out before the restarts: a server
    # started beside a corrupt newest version has no good version of its own to keep.
    shutil.rmtree(repo / MODEL / "3")

    await enter("sigterm")
    await asyncio.sleep(0.5)  # requests in flight when the signal lands
    term_sent = time.monotonic()
    run.term_at = term_sent
    server.signal(signal.SIGTERM)
    returncode = await asyncio.to_thread(server.process.wait)  # type: ignore[union-attr]
    events["sigterm_exit_code"] = returncode
    events["sigterm_stop_seconds"] = round(time.monotonic() - term_sent, 2)
    events["sigterm_restart_seconds"] = round(await restart(server), 2)
    await asyncio.sleep(seconds / 2)

    await enter("sigkill")
    await asyncio.sleep(0.5)
    server.signal(signal.SIGKILL)
    await asyncio.to_thread(server.process.wait)  # type: ignore[union-attr]
    events["sigkill_restart_seconds"] = round(await restart(server), 2)
    await asyncio.sleep(seconds / 2)

    await enter("recovered")
    await asyncio.sleep(seconds)
    return events


async def drive(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    repo, staging = build_repository(root)
    port, metrics_port = free_port(), free_port()
    run = Run()
    server = ServerProcess(
        repo,
        "--grpc-port", str(port), "--metrics-port", str(metrics_port),
        "--model-control", "poll", "--poll-interval", str(args.poll_interval),
        "--shutdown-grace", str(args.shutdown_grace), "--log-level", "WARNING",
        log_path=root / "server.log",
    )  # fmt: skip
    with server:
        clients = [
            asyncio.create_task(client_loop(server.grpc_url, run, seed))
            for seed in range(args.clients)
        ]
        sampling = asyncio.create_task(sampler(run, server, args.sample_interval))
        progress(f"steady: {args.clients} clients on {server.grpc_url} ...")
        try:
            events = await faults(args, run, server, repo, staging)
        finally:
            run.done = True
            await asyncio.gather(*clients, sampling, return_exceptions=True)
        log = server.log()
    events["server_log_errors"] = [
        line for line in log.splitlines() if "Traceback" in line or " CRITICAL " in line
    ][:20]
    return {"events": events, "run": run}


def summarize(run: Run) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    for phase in PHASES:
        samples = [s for s in run.samples if s.phase == phase]
        phases[phase] = {
            **run.counts[phase].as_dict(),
            "rss_mib": _range([s.rss_mib for s in samples]),
            "fds": _range([float(s.fds) for s in samples]),
        }
    failures = {
        phase: run.counts[phase].wrong_answer + sum(run.counts[phase].failed.values())
        for phase in PHASES
    }
    return {
        "phases": phases,
        "large_requests": dict(run.large),
        "cancelled_in_flight": run.cancelled_in_flight,
        "checks": {
            "no failed request while the server was up": all(
                failures[p] == 0 for p in NO_FAILURE_PHASES
            ),
            "no wrong answer in any phase": all(run.counts[p].wrong_answer == 0 for p in PHASES),
            "SIGTERM: no request CANCELLED": run.counts["sigterm"].failed.get("CANCELLED", 0) == 0,
            "SIGTERM: every request in flight at the signal answered": (
                run.cancelled_in_flight == 0
            ),
            "corrupt version 3 never served": all(
                "3" not in run.counts[p].versions for p in PHASES
            ),
        },
    }


def _range(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "first": round(values[0], 1),
        "max": round(max(values), 1),
        "last": round(values[-1], 1),
    }


def render_markdown(report: dict[str, Any]) -> str:
    setup, summary, events = report["setup"], report["summary"], report["events"]

    def failed(row: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(row["failed"].items())) or "0"

    def span(value: dict[str, float] | None) -> str:
        if value is None:
            return "—"
        return f"{value['first']:.0f} / {value['max']:.0f} / {value['last']:.0f}"

    rows = [
        [
            phase,
            str(row["sent"]),
            str(row["ok"]),
            failed(row),
            str(row["wrong_answer"]),
            ", ".join(f"v{k}: {v}" for k, v in sorted(row["versions_served"].items())) or "—",
            span(row["rss_mib"]),
            span(row["fds"]),
        ]
        for phase, row in summary["phases"].items()
    ]
    lines = [
        "# Soak and fault run",
        "",
        f"{setup['clients']} clients sending batch-1 requests back to back to one server in "
        f"poll mode (poll every {setup['poll_interval']} s, shutdown grace "
        f"{setup['shutdown_grace']} s), {setup['phase_seconds']} s a phase. "
        "Failed requests are counted by gRPC status; RSS (MiB) and open fds are "
        "first / max / last of the phase's samples.",
        "",
        *markdown_table(
            ["phase", "sent", "OK", "failed", "wrong answer", "served by", "RSS MiB", "fds"],
            rows,
        ),
        "",
        f"Large requests ({setup['large_count']} of {setup['large_mib']} MiB, wrong shape): "
        + (", ".join(f"{k} {v}" for k, v in sorted(summary["large_requests"].items())) or "none")
        + f", answered in {events.get('large_seconds', '?')} s.",
        f"SIGTERM: the server exited with {events.get('sigterm_exit_code')} after "
        f"{events.get('sigterm_stop_seconds')} s and was ready again "
        f"{events.get('sigterm_restart_seconds')} s after that; after SIGKILL, ready again "
        f"in {events.get('sigkill_restart_seconds')} s. Requests refused while no server "
        "was listening count as UNAVAILABLE in those phases. Requests sent before the "
        f"signal and CANCELLED: {summary['cancelled_in_flight']}.",
        "",
        "## Checks",
        "",
        *(f"- {'met' if ok else 'NOT MET'}: {name}" for name, ok in summary["checks"].items()),
    ]
    if events.get("server_log_errors"):
        errors = events["server_log_errors"]
        lines += ["", "Server log lines with errors:", "", "```", *errors, "```"]
    lines += ["", "## Machine", "", *machine_lines(report["environment"]), ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--phase-seconds", type=float, default=10.0)
    parser.add_argument("--poll-interval", type=float, default=0.5, help="the server's, seconds")
    parser.add_argument("--shutdown-grace", type=float, default=10.0, help="the server's, seconds")
    parser.add_argument("--large-count", type=int, default=4, help="concurrent large requests")
    parser.add_argument("--large-mib", type=int, default=100, help="size of each large request")
    parser.add_argument("--sample-interval", type=float, default=0.5, help="RSS/fd sampling")
    parser.add_argument("--server-cpu", type=int, help="accepted for symmetry; not pinned")
    parser.add_argument("--client-cpu", type=int, help="accepted for symmetry; not pinned")
    parser.add_argument(
        "--output-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="where to write"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sparseserve-soak-") as tmp:
        result = asyncio.run(drive(args, Path(tmp)))
    run: Run = result["run"]
    report = {
        "setup": {key: getattr(args, key) for key in SETUP_KEYS},
        "summary": summarize(run),
        "events": result["events"],
        "samples": [
            {"t": s.t, "phase": s.phase, "pid": s.pid, "rss_mib": round(s.rss_mib, 1), "fds": s.fds}
            for s in run.samples
        ],
        "environment": environment(),
    }
    write_results(args.output_dir, "soak", report, render_markdown(report))
    return 0 if all(report["summary"]["checks"].values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
