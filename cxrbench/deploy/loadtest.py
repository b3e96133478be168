"""A load test of ``cxrbench serve`` against offline scoring on the same machine (docs/serving.md).

``python -m cxrbench.deploy.loadtest [MODEL]`` first times offline scoring exactly as ``cxrbench predict`` does it
(:func:`cxrbench.deploy.predict.score_files`: PNG files on disk, batches of ``--max-batch``), in this process
after one warm-up batch, ``--baseline-repeats`` times. Then for each mode, dynamic batching as configured and
none (``--max-batch 1``: one picture per onnxruntime call), it starts ``cxrbench serve`` on 127.0.0.1 with a
token and, for each client count, runs that many client threads, each with its own keep-alive connection,
uploading pictures one after another until ``--requests`` answers or ``--time-limit`` seconds (one untimed
request per client first). Each cell reports requests/s, p50 and p99 latency, the mean batch the service formed
(from its ``/metrics``), errors, the ratio to offline scoring, the CPU time per picture of server and clients
together (offline: of the scoring process), and the share of the CPU other processes used meanwhile (the run's
noise guard: above its limit a cell is marked disturbed and no verdict is printed).
Without MODEL a DenseNet with seeded random weights is exported (``--arch``, ``--image-size``); speed does not
depend on the weights. Clients and server share the machine, as they would on one host.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import itertools
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.deploy.limits import MAX_BATCH, MAX_BATCH_DELAY_MS, MAX_PIXELS
from cxrbench.errors import CxrError
from cxrbench.suite import ARCHITECTURES, ExportSettings

#: The issue's goal: with 16 clients, the service keeps this share of offline throughput at the same batch size.
GOAL_SHARE, GOAL_CLIENTS = 0.9, 16
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LoadSettings:
    clients: tuple[int, ...] = (1, 8, 16)
    requests: int = 160  #: answers per cell at most
    time_limit_s: float = 60.0  #: per cell; the cell stops issuing requests after it
    max_batch: int = MAX_BATCH
    max_batch_delay_ms: float = MAX_BATCH_DELAY_MS
    pictures: int = 16  #: distinct pictures, cycled through
    picture_size: int = 1024  #: NIH's pictures are 1024 x 1024 PNGs
    baseline_repeats: int = 3
    seed: int = 0


@dataclass
class CpuUse:
    """What else ran, and what scoring cost: others' share of the usable cores, CPU seconds per picture here."""

    others_share: float
    seconds_per_picture: float

    @property
    def disturbed(self) -> bool:
        from cxrbench.machine.monitor.noise import OTHERS_CPU_SHARE_LIMIT

        return self.others_share > OTHERS_CPU_SHARE_LIMIT


@dataclass
class Cell:
    mode: str
    clients: int
    answered: int
    seconds: float
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch: float | None
    errors: dict[str, int]
    cpu: CpuUse  #: the server's and the clients' CPU


@dataclass
class LoadResult:
    settings: LoadSettings
    model: str
    baseline_images_per_s: list[float]
    baseline_cpu: CpuUse
    cells: list[Cell] = field(default_factory=list)
    conditions: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> float:
        return float(np.median(self.baseline_images_per_s))

    def cell(self, mode: str, clients: int) -> Cell | None:
        return next((c for c in self.cells if c.mode == mode and c.clients == clients), None)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "baseline_median_images_per_s": self.baseline}


def synthetic_export(folder: Path, arch: str = "densenet121", image_size: int = 224, seed: int = 0) -> Path:
    """A cxrbench export of ``arch`` with seeded random weights (the core's ONNX graph, no framework)."""
    from cxrbench.backend.canonical import init_canonical
    from cxrbench.backend.onnx_graph import write_onnx
    from cxrbench.deploy import onnx_file

    path = Path(folder) / f"{arch}-{image_size}.onnx"
    weights = init_canonical(ARCHITECTURES[arch], seed)
    write_onnx(weights, ARCHITECTURES[arch], image_size, ExportSettings.opset, path)
    onnx_file.stamp_metadata(path, onnx_file.model_metadata("NCHW", image_size, "synthetic"))
    return path


def write_pictures(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    """Phantom chest pictures as PNG files (the phantom data set's renderer, no finding)."""
    from PIL import Image

    from cxrbench.data.classes import NUM_CLASSES
    from cxrbench.data.phantom import render

    rng = np.random.default_rng([seed, 26])
    paths = []
    for i in range(count):
        pixels, _ = render(rng, size, np.zeros(NUM_CLASSES, dtype=np.int8), ap=bool(i % 2))
        paths.append(Path(folder) / f"picture{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


class CpuWatch:
    """Between :meth:`start` and :meth:`stop`: the share of the usable cores that processes other than this one and
    its children (the server) used, and the CPU seconds this process tree used (a cost that other work on the
    machine changes much less than it changes a rate)."""

    def __init__(self):
        from cxrbench.machine.monitor.sampler import MachineCpu, ProcessTree

        self.tree, self.machine, self._start = ProcessTree(os.getpid()), MachineCpu(), 0.0

    def start(self) -> None:
        self.tree.read()  # psutil's percentages count from the previous call
        self.machine.read()
        self._start = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        """(others' share of the usable cores, this process tree's CPU seconds)."""
        from cxrbench.machine.monitor import noise

        own, machine = self.tree.read(), self.machine.read()
        seconds = time.perf_counter() - self._start
        others = noise.others_cpu_share(machine["system_cpu_percent"], own["cpu_percent"], self.machine.cores)
        return others, own["cpu_percent"] / 100 * seconds


def offline_images_per_s(model_path: Path, files: list[Path], settings: LoadSettings) -> tuple[list[float], CpuUse]:
    """Offline scoring's images/s over ``settings.requests`` pictures, ``baseline_repeats`` times, and its CPU."""
    from cxrbench.deploy.model import ScoringModel
    from cxrbench.deploy.predict import score_files

    model = ScoringModel(model_path)
    cycled = [files[i % len(files)] for i in range(settings.requests)]
    watch, rates = CpuWatch(), []
    with contextlib.redirect_stderr(io.StringIO()):  # predict's progress line
        score_files(model, cycled[: settings.max_batch], settings.max_batch, MAX_PIXELS, None, None, 1)  # warm-up
        watch.start()
        for _ in range(settings.baseline_repeats):
            start = time.perf_counter()
            rows, skipped = score_files(model, cycled, settings.max_batch, MAX_PIXELS, None, None, 1)
            rates.append(len(rows) / (time.perf_counter() - start))
            if skipped:
                raise CxrError(f"offline scoring skipped pictures: {skipped[0]}")
    others, cpu_seconds = watch.stop()
    return rates, CpuUse(others, cpu_seconds / (len(cycled) * settings.baseline_repeats))


def multipart(content: bytes) -> tuple[bytes, str]:
    """A ``file`` upload as a multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="picture.png"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + content + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    """``cxrbench serve`` in a subprocess on 127.0.0.1 (a free port), with a fresh token; its log in a file."""

    def __init__(self, model_path: Path, max_batch: int, delay_ms: float, max_queue: int, log: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.token = secrets.token_hex(16)
        command = [sys.executable, "-m", "cxrbench", "serve", str(model_path), "--port", str(self.port)]
        command += ["--max-batch", str(max_batch), "--max-batch-delay-ms", str(delay_ms), "--max-queue", str(max_queue)]
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "CXRBENCH_TOKEN": self.token}
            )
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path, headers=self.headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CxrError(f"cxrbench serve exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if self.get("/ready", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise CxrError(f"cxrbench serve was not ready after {timeout:.0f} s (log: {self.log})")

    def batches(self) -> tuple[float, float]:
        """The batch-size histogram's (sum, count) so far."""
        from prometheus_client.parser import text_string_to_metric_families

        status, text = self.get("/metrics")
        if status != 200:
            raise CxrError(f"/metrics answered {status}")
        values = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text.decode())
            for sample in family.samples
            if family.name == "cxrbench_batch_size"
        }
        return values["cxrbench_batch_size_sum"], values["cxrbench_batch_size_count"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


def run_cell(server: Server, mode: str, bodies: list[tuple[bytes, str]], clients: int, settings: LoadSettings) -> Cell:
    """``clients`` closed-loop clients until ``settings.requests`` answers or the time limit."""
    numbers = itertools.count()  # next() on it is atomic under the GIL: every request gets its own number
    deadline: list[float] = []
    watch = CpuWatch()

    def go() -> None:  # run by one thread when all are past their warm-up, before any is released
        watch.start()
        deadline.append(time.monotonic() + settings.time_limit_s)

    barrier = threading.Barrier(clients + 1, action=go)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[dict[str, int]] = [{} for _ in range(clients)]

    def client(k: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=max(settings.time_limit_s, 60))
        try:
            _post(connection, server, bodies[k % len(bodies)])  # untimed: connection and first-call costs
        except (OSError, http.client.HTTPException) as exc:
            errors[k][type(exc).__name__] = errors[k].get(type(exc).__name__, 0) + 1
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()  # always: one client's failure must not stop the others
        try:
            while deadline and time.monotonic() < deadline[0] and (number := next(numbers)) < settings.requests:
                start = time.perf_counter()
                try:
                    status = str(_post(connection, server, bodies[number % len(bodies)]))
                except (OSError, http.client.HTTPException) as exc:
                    status = type(exc).__name__
                if status == "200":
                    latencies[k].append(time.perf_counter() - start)
                else:
                    errors[k][status] = errors[k].get(status, 0) + 1
        finally:
            connection.close()

    batches_before = server.batches()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait(timeout=START_TIMEOUT_S)
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for thread in threads:
        thread.join(settings.time_limit_s + START_TIMEOUT_S)
    seconds = time.perf_counter() - start
    others, cpu_seconds = watch.stop() if deadline else (1.0, 0.0)
    total, count = (after - before for after, before in zip(server.batches(), batches_before))
    done = np.concatenate([np.asarray(x) for x in latencies]) * 1000
    merged: dict[str, int] = {}
    for per_client in errors:
        for key, n in per_client.items():
            merged[key] = merged.get(key, 0) + n
    return Cell(
        mode=mode,
        clients=clients,
        answered=len(done),
        seconds=round(seconds, 3),
        requests_per_s=len(done) / seconds,
        p50_ms=float(np.percentile(done, 50)) if len(done) else None,
        p99_ms=float(np.percentile(done, 99)) if len(done) else None,
        mean_batch=total / count if count else None,  # the warm-up requests' batches included
        errors=merged,
        cpu=CpuUse(round(others, 4), cpu_seconds / max(len(done), 1)),
    )


def _post(connection: http.client.HTTPConnection, server: Server, body: tuple[bytes, str]) -> int:
    """One upload's status. A kept-alive connection the server closed while idle (uvicorn closes them after 5 s)
    is reopened once, as HTTP client libraries do."""
    content, content_type = body
    headers = {**server.headers, "Content-Type": content_type}

    def send() -> int:
        connection.request("POST", "/predict", body=content, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status

    try:
        return send()
    except (BrokenPipeError, ConnectionResetError):  # http.client.RemoteDisconnected is one
        connection.close()
        return send()


def measure(model_path: Path, settings: LoadSettings, folder: Path) -> LoadResult:
    """The offline baseline, then every (mode, clients) cell; pictures and server logs go to ``folder``."""
    files = write_pictures(folder, settings.pictures, settings.picture_size, settings.seed)
    rates, baseline_cpu = offline_images_per_s(model_path, files, settings)
    result = LoadResult(settings, str(model_path), [round(r, 3) for r in rates], baseline_cpu)
    result.conditions = _conditions()
    bodies = [multipart(path.read_bytes()) for path in files]
    modes = {f"batching {settings.max_batch}/{settings.max_batch_delay_ms:g}ms": settings.max_batch, "none": 1}
    for mode, max_batch in modes.items():
        queue = max(64, 2 * max(settings.clients))  # never the limit here: this measures speed, not refusals
        server = Server(model_path, max_batch, settings.max_batch_delay_ms, queue, folder / f"serve-{max_batch}.log")
        try:
            server.wait_ready()
            for clients in settings.clients:
                result.cells.append(run_cell(server, mode, bodies, clients, settings))
        finally:
            server.stop()
    return result


def _conditions() -> dict[str, Any]:
    import onnxruntime

    from cxrbench.machine.budget import usable_cores

    return {
        "usable_cores": usable_cores(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
    }


def format_table(result: LoadResult) -> str:
    """The result as text: conditions, the baseline, one row per cell, and the goal's verdict (or why none)."""
    s, base, cpu = result.settings, result.baseline, result.baseline_cpu
    lines = [
        f"model {result.model}; pictures {s.picture_size} px PNG x {s.pictures}; {result.conditions}",
        f"offline (cxrbench predict's scoring, batch {s.max_batch}, {s.requests} pictures x {s.baseline_repeats}): "
        f"{base:.2f} img/s median (range {min(result.baseline_images_per_s):.2f}-"
        f"{max(result.baseline_images_per_s):.2f}), {cpu.seconds_per_picture * 1000:.0f} CPU ms/picture; "
        f"others used {cpu.others_share:.0%} of the CPU{' (disturbed)' if cpu.disturbed else ''}",
        f"{'mode':<20} {'clients':>7} {'answered':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} "
        f"{'vs offline':>10} {'CPU ms/pic':>10} {'others CPU':>10}  errors",
    ]
    for c in result.cells:
        lines.append(
            f"{c.mode:<20} {c.clients:>7} {c.answered:>8} {c.requests_per_s:>8.2f} {_ms(c.p50_ms):>8} "
            f"{_ms(c.p99_ms):>8} {_num(c.mean_batch):>6} {c.requests_per_s / base:>10.0%} "
            f"{c.cpu.seconds_per_picture * 1000:>10.0f} {c.cpu.others_share:>9.0%}{'*' if c.cpu.disturbed else ' '}  "
            f"{c.errors or '-'}"
        )
    lines.append(verdict(result))
    return "\n".join(lines)


def verdict(result: LoadResult) -> str:
    """The goal (>= 90 % of offline with 16 clients) judged only from an undisturbed baseline and cell."""
    from cxrbench.machine.monitor.noise import OTHERS_CPU_SHARE_LIMIT

    batching = next((c for c in result.cells if c.mode != "none" and c.clients == GOAL_CLIENTS), None)
    if batching is None:
        return f"no verdict: no batching cell with {GOAL_CLIENTS} clients"
    if batching.cpu.disturbed or result.baseline_cpu.disturbed:
        return (
            f"no verdict: other processes used more than {OTHERS_CPU_SHARE_LIMIT:.0%} of the CPU (* above, or during"
            " the baseline); rerun on a quiet machine"
        )
    share = batching.requests_per_s / result.baseline
    met = "met" if share >= GOAL_SHARE else "NOT met"
    return (
        f"goal {met}: {GOAL_CLIENTS} clients at {share:.0%} of offline (goal {GOAL_SHARE:.0%}), "
        f"p99 {_ms(batching.p99_ms)} ms"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrbench.deploy.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="an export (default: a random-weight --arch at --image-size)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="densenet121")
    parser.add_argument("--image-size", type=int, default=224)
    defaults = LoadSettings()
    parser.add_argument("--clients", type=int, nargs="+", default=list(defaults.clients))
    parser.add_argument("--requests", type=int, default=defaults.requests, help="answers per cell at most")
    parser.add_argument("--time-limit", type=float, default=defaults.time_limit_s, help="seconds per cell at most")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--max-batch-delay-ms", type=float, default=defaults.max_batch_delay_ms)
    parser.add_argument("--picture-size", type=int, default=defaults.picture_size)
    parser.add_argument("--baseline-repeats", type=int, default=defaults.baseline_repeats)
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    settings = LoadSettings(
        clients=tuple(args.clients),
        requests=args.requests,
        time_limit_s=args.time_limit,
        max_batch=args.max_batch,
        max_batch_delay_ms=args.max_batch_delay_ms,
        picture_size=args.picture_size,
        baseline_repeats=args.baseline_repeats,
    )
    with tempfile.TemporaryDirectory(prefix="cxrbench-loadtest-") as tmp:
        model = Path(args.model) if args.model else synthetic_export(Path(tmp), args.arch, args.image_size)
        result = measure(model, settings, Path(tmp))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
