"""Loopback load test for `visionflow serve`: throughput, latency percentiles and errors by status.

Phases (each one bounded by a duration AND a request count, so a run can never go on unbounded):

- single: sequential requests, one at a time: the latency of a request that waits for nothing.
- ramp: closed loop at concurrency 1, 2, 4, ... up to the server's slots (max_concurrency + queue_depth); the
  best error-free throughput is the maximum.
- sustained: constant arrival rate (open loop) at a fraction (0.7) of that maximum: requests start on a fixed
  schedule whether or not earlier ones have finished, so a slow server cannot slow the client down and hide its
  own queueing (no coordinated omission).
- overload: closed loop well past the server's slots (3x max_concurrency + queue_depth): the server must shed
  the excess with fast 503s and stay healthy.

Only loopback targets are accepted: this is a tool to measure your own server, not to load somebody else's.
Every request is a real prediction: the server appends it to its prediction log and queues low-confidence ones
for review, so point serve.prediction_log / serve.review_dir somewhere disposable when the root matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import os
import socket
import ssl
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from visionflow.errors import VisionflowError

MODES = ("full", "concurrency", "rate")
# Idle keep-alive connections are dropped after this long, before the server's own keep-alive timeout (uvicorn:
# 5 s, as `visionflow serve` sets it); reusing one the server is closing would fail a request through no fault of
# the server's.
KEEPALIVE_EXPIRY_S = 2.0


class LoadTestError(VisionflowError):
    """The load test cannot run (target not on loopback, server not ready, bad settings)."""


def require_loopback(url: str) -> str:
    """The base URL without a trailing slash, if its host is (or resolves only to) loopback addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadTestError(f"{url!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000")
    host = parts.hostname
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise LoadTestError(f"cannot resolve {host!r}: {exc}") from None
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    outside = sorted(str(a) for a in addresses if not a.is_loopback)
    if outside or not addresses:
        raise LoadTestError(f"refusing to load {host!r} ({', '.join(outside) or 'no address'}): the load test only "
                            "targets loopback (127.0.0.0/8, ::1, localhost)")
    return url.rstrip("/")


@dataclass
class Phase:
    """One phase of the load test; latencies in milliseconds, measured from the moment a request was sent."""

    name: str
    mode: str  # "sequential", "concurrency" (closed loop) or "rate" (open loop, constant arrival rate)
    concurrency: int | None
    target_rate_rps: float | None
    planned_s: float
    elapsed_s: float
    requests: int
    ok: int
    errors: dict[str, int]  # HTTP status or exception name -> count, for every answer that is not a 200
    throughput_rps: float  # answers (any status) per second
    ok_rps: float  # 200s per second
    latency_ms: dict[str, float]  # of the 200s: p50, p90, p99, mean, min, max
    error_latency_ms: dict[str, float]  # of the other answers (how fast a 503 is)
    late_starts: int = 0  # rate mode: requests the client started >50 ms behind schedule (client overloaded)
    dropped: int = 0  # rate mode: arrivals skipped because max_in_flight requests were already open
    server: dict[str, Any] | None = None  # rate mode: the server's own view of the phase (see server_view)

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())


def percentiles(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {}
    ms = np.asarray(values_s) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3),
            "mean": round(float(ms.mean()), 3), "min": round(float(ms.min()), 3), "max": round(float(ms.max()), 3)}


@dataclass
class _Recorder:
    ok: list[float] = field(default_factory=list)
    failed: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    def phase(self, name: str, mode: str, *, concurrency: int | None, rate: float | None, planned_s: float,
              elapsed_s: float, late: int = 0, dropped: int = 0) -> Phase:
        n = len(self.ok) + len(self.failed)
        elapsed_s = max(elapsed_s, 1e-9)
        return Phase(name, mode, concurrency, rate, round(planned_s, 3), round(elapsed_s, 3), n, len(self.ok),
                     dict(sorted(self.errors.items())), round(n / elapsed_s, 2), round(len(self.ok) / elapsed_s, 2),
                     percentiles(self.ok), percentiles(self.failed), late, dropped)


class KeepAliveClient:
    """A minimal HTTP/1.1 client that sends one prebuilt request over reusable keep-alive connections, as wrk does.

    Not httpx: on 2 shared cores httpx spent about twice the server's CPU per request (6.5 ms against 3.1 ms), so
    the load generator, not the server, set the figures. Here a request is one write of prebuilt bytes and one
    read of the answer. Every failure (refused, reset, timeout, torn answer) comes back as its exception's name,
    never raised; a connection that failed is closed, never reused.
    """

    def __init__(self, url: str, body: bytes, content_type: str, timeout_s: float, tls: ssl.SSLContext | None = None,
                 token: str | None = None):
        parts = urlsplit(url)
        self.host, self.tls = parts.hostname, tls if parts.scheme == "https" else None
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout_s = timeout_s
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.request = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{self.port}\r\n"
                        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                        + (f"Authorization: Bearer {token}\r\n" if token else "")
                        + "Connection: keep-alive\r\n\r\n").encode() + body
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        now = time.monotonic()
        while self.idle:
            reader, writer, since = self.idle.pop()
            if now - since < KEEPALIVE_EXPIRY_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port, ssl=self.tls)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers = head[9:12].decode(), head.lower()
        if b"transfer-encoding: chunked" in headers:
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")
        else:
            at = headers.find(b"content-length:")
            await reader.readexactly(int(headers[at + 15:headers.index(b"\r\n", at)]) if at >= 0 else 0)
        return status, b"connection: close" not in headers

    async def post(self) -> str:
        """Send the request once; the HTTP status ("200", "503", ...) or the failure's name."""
        conn = None
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = await self._connection()
                conn[1].write(self.request)
                await conn[1].drain()
                status, keep = await self._answer(conn[0])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
            if conn is not None:
                conn[1].close()
            return "ReadTimeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        if keep:
            self.idle.append((*conn, time.monotonic()))
        else:
            conn[1].close()
        return status

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


class Target:
    """The endpoint under test and the one request every load request sends."""

    def __init__(self, client: KeepAliveClient):
        self.client = client

    async def hit(self, rec: _Recorder) -> None:
        start = time.perf_counter()
        status = await self.client.post()
        elapsed = time.perf_counter() - start
        if status == "200":
            rec.ok.append(elapsed)
        else:
            rec.failed.append(elapsed)
            rec.errors[status] += 1


async def sequential(target: Target, n: int, max_s: float, name: str = "single") -> Phase:
    rec = _Recorder()
    start = time.perf_counter()
    for _ in range(n):
        if time.perf_counter() - start > max_s:
            break
        await target.hit(rec)
    return rec.phase(name, "sequential", concurrency=1, rate=None, planned_s=max_s,
                     elapsed_s=time.perf_counter() - start)


async def closed_loop(target: Target, concurrency: int, duration_s: float, max_requests: int,
                      name: str) -> Phase:
    """`concurrency` workers, each sending its next request as soon as the last one is answered."""
    rec = _Recorder()
    start = time.perf_counter()
    deadline = start + duration_s
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while time.perf_counter() < deadline and issued < max_requests:
            issued += 1
            await target.hit(rec)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return rec.phase(name, "concurrency", concurrency=concurrency, rate=None, planned_s=duration_s,
                     elapsed_s=time.perf_counter() - start)


async def open_loop(target: Target, rate: float, duration_s: float, max_requests: int, max_in_flight: int,
                    name: str) -> Phase:
    """Constant arrival rate: request i starts at i/rate seconds whatever happened to the earlier ones."""
    if rate <= 0:
        raise LoadTestError(f"the arrival rate must be positive, not {rate}")
    rec = _Recorder()
    n = max(1, min(max_requests, int(rate * duration_s)))
    in_flight: set[asyncio.Task] = set()
    late = dropped = 0
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.05:
            late += 1
        if len(in_flight) >= max_in_flight:
            dropped += 1
            continue
        task = asyncio.create_task(target.hit(rec))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    return rec.phase(name, "rate", concurrency=None, rate=round(rate, 3), planned_s=duration_s,
                     elapsed_s=time.perf_counter() - start, late=late, dropped=dropped)


async def scrape_metrics(client, base: str) -> dict[tuple[str, tuple], float] | None:
    """The server's own counters (/metrics), keyed by (sample name, labels); None when it has none to give."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = await client.get(f"{base}/metrics")
        if r.status_code != 200:
            return None
        return {(x.name, tuple(sorted(x.labels.items()))): x.value
                for fam in text_string_to_metric_families(r.text) for x in fam.samples
                if x.name.startswith("visionflow_")}
    except (httpx.HTTPError, ValueError):
        return None


def _bucket_quantile(delta: dict[tuple[str, tuple], float], name: str, q: float, **labels: str) -> float | None:
    """The upper bound (ms) of the histogram bucket that holds the q-quantile: "at most this", not interpolated."""
    buckets = []
    for (sample, lbls), v in delta.items():
        d = dict(lbls)
        if sample == f"{name}_bucket" and all(d.get(k) == val for k, val in labels.items()):
            buckets.append((float(d["le"]), v))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    for le, count in buckets:
        if count >= q * buckets[-1][1]:
            return None if le == float("inf") else round(le * 1000, 3)
    return None


def server_view(before: dict | None, after: dict | None, elapsed_s: float) -> dict[str, Any] | None:
    """What the server says of one phase: its own latency (from its histogram: network and client excluded), how
    busy its inference thread was, how many requests each batch took and how long they queued for it."""
    if not before or not after:
        return None
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}

    def total(name: str) -> float:
        return delta.get((name, ()), 0.0)

    batches, busy_s = total("visionflow_inference_seconds_count"), total("visionflow_inference_seconds_sum")
    ok = delta.get(("visionflow_requests_total", (("endpoint", "predict"), ("status", "200"))), 0.0)
    view: dict[str, Any] = {"ok_requests": int(ok),
                            "p50_ms_at_most": _bucket_quantile(delta, "visionflow_request_seconds", 0.5,
                                                               endpoint="predict"),
                            "p99_ms_at_most": _bucket_quantile(delta, "visionflow_request_seconds", 0.99,
                                                               endpoint="predict")}
    if batches > 0:  # a server from before these metrics has none
        waits = total("visionflow_inference_queue_seconds_count")
        view.update(
            inference_busy=round(busy_s / max(elapsed_s, 1e-9), 3),
            batches=int(batches),
            requests_per_batch=round(total("visionflow_inference_batch_requests_sum") / batches, 2),
            inference_ms_per_batch=round(busy_s / batches * 1000, 3),
            queue_wait_ms_mean=round(total("visionflow_inference_queue_seconds_sum") / max(waits, 1) * 1000, 3),
            queue_wait_ms_p99_at_most=_bucket_quantile(delta, "visionflow_inference_queue_seconds", 0.99))
    return view


async def seen_by_server(client, base: str, phase) -> Phase:
    """Run a phase (a coroutine) between two reads of the server's /metrics, and attach its view of it."""
    before = await scrape_metrics(client, base)
    ph = await phase
    ph.server = server_view(before, await scrape_metrics(client, base), ph.elapsed_s)
    return ph


def default_image(image_size: int, channels: int, seed: int = 0) -> bytes:
    """A seeded noise PNG at the model's input size (no resize cost; the model is unsure, so it is queued)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (image_size, image_size) if channels == 1 else (image_size, image_size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _multipart(data: bytes, filename: str = "loadtest.png") -> tuple[bytes, str]:
    boundary = "visionflow-loadtest-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def _run(url: str, *, mode: str, duration_s: float, concurrency: int, rate: float | None,
               fraction: float, step_s: float, ramp_max: int, overload_concurrency: int, overload_s: float,
               single_n: int, max_requests: int, max_in_flight: int, image: Path | None, timeout_s: float,
               token: str | None, progress) -> dict[str, Any]:
    import httpx

    base = require_loopback(url)
    tls = ssl.create_default_context() if base.startswith("https") else None
    async with contextlib.AsyncExitStack() as stack:
        # The control requests (ready, model, health) go through httpx; trust_env=False: no proxy from the
        # environment gets between us and loopback.
        auth = {"Authorization": f"Bearer {token}"} if token else {}  # a server with serve.auth_token_env set
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=timeout_s, trust_env=False,
                                                                   verify=tls or True, headers=auth))
        try:
            ready = await client.get(f"{base}/ready")
        except httpx.HTTPError as exc:
            raise LoadTestError(f"no server answers at {base} ({type(exc).__name__}); start `visionflow serve` "
                                "first") from None
        if ready.status_code != 200:
            raise LoadTestError(f"{base}/ready answered {ready.status_code}: {ready.text[:200]}")
        model = await client.get(f"{base}/model")
        if model.status_code != 200:
            raise LoadTestError(f"{base}/model answered {model.status_code}: {model.text[:200]}"
                                + (" (the server wants its bearer token: export the variable serve.auth_token_env "
                                   "names)" if model.status_code == 401 else ""))
        model = model.json()
        data = Path(image).read_bytes() if image else default_image(model["image_size"], model["channels"])
        body, ctype = _multipart(data)
        load = KeepAliveClient(f"{base}/predict", body, ctype, timeout_s, tls, token)
        stack.callback(load.close)
        target = Target(load)
        report: dict[str, Any] = {
            "url": base, "mode": mode, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # Client and server share this machine: its size and load say how far the numbers can be trusted.
            "host": {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
            "client": "raw HTTP/1.1 keep-alive (prebuilt request bytes)",
            "model_version": ready.json().get("model_version"),
            "image": {"source": str(image) if image else "generated noise", "bytes": len(data),
                      "model_input": [model["image_size"], model["image_size"], model["channels"]]},
            "settings": {"duration_s": duration_s, "concurrency": concurrency, "rate_rps": rate,
                         "fraction": fraction, "step_s": step_s, "ramp_max": ramp_max,
                         "overload_concurrency": overload_concurrency, "overload_s": overload_s,
                         "single_n": single_n, "max_requests_per_phase": max_requests,
                         "max_in_flight": max_in_flight, "timeout_s": timeout_s},
        }
        progress("warm-up and sequential baseline")
        await sequential(target, 3, max_s=timeout_s, name="warmup")
        single = await sequential(target, single_n, max_s=max(10.0, duration_s / 4))
        report["single"] = asdict(single)
        phases: list[Phase] = []
        if mode == "concurrency":
            progress(f"closed loop at concurrency {concurrency} for {duration_s:g} s")
            phases.append(await closed_loop(target, concurrency, duration_s, max_requests, "fixed"))
        elif mode == "rate":
            if not rate:
                raise LoadTestError("--mode rate needs --rate (requests per second)")
            progress(f"constant arrival rate {rate:g} req/s for {duration_s:g} s")
            phases.append(await seen_by_server(client, base, open_loop(target, rate, duration_s, max_requests,
                                                                       max_in_flight, "fixed")))
        elif mode == "full":
            ramp, best, stale = [], None, 0
            levels = sorted({min(2 ** k, ramp_max) for k in range(0, 16) if 2 ** (k - 1) < ramp_max})
            for c in levels:
                progress(f"ramp: concurrency {c} for {step_s:g} s")
                ph = await closed_loop(target, c, step_s, max_requests, f"ramp c={c}")
                ramp.append(ph)
                if ph.n_errors:  # past what the server takes without shedding
                    break
                if best is None or ph.ok_rps > best.ok_rps * 1.05:
                    best, stale = ph, 0
                else:
                    stale += 1
                    if stale >= 2:  # saturated: two steps without a 5% gain
                        break
            if best is None:  # errors from the very first step
                best = max(ramp, key=lambda p: p.ok_rps)
            max_rps = best.ok_rps
            if max_rps <= 0:
                raise LoadTestError(f"no request succeeded during the ramp: {ramp[0].errors}")
            report["ramp"] = [asdict(p) for p in ramp]
            report["max_throughput_rps"] = max_rps
            report["max_at_concurrency"] = best.concurrency
            target_rate = fraction * max_rps
            progress(f"sustained: {target_rate:.1f} req/s ({fraction:.0%} of max) for {duration_s:g} s")
            sustained = await seen_by_server(client, base, open_loop(target, target_rate, duration_s, max_requests,
                                                                     max_in_flight, "sustained"))
            progress(f"overload: concurrency {overload_concurrency} for {overload_s:g} s")
            overload = await closed_loop(target, overload_concurrency, overload_s, max_requests, "overload")
            phases += [sustained, overload]
        else:
            raise LoadTestError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        report["phases"] = [asdict(p) for p in phases]
        # The load's idle keep-alive connections go first: a server may count them against a connection limit,
        # and the question is whether a new client is served after the load.
        load.close()
        health = await client.get(f"{base}/health")
        after = await sequential(target, 3, max_s=timeout_s, name="after")
        report["healthy_after"] = health.status_code == 200 and after.ok == after.requests
        main = phases[0]
        summary: dict[str, Any] = {
            "single_ms_p50": single.latency_ms.get("p50"),
            "throughput_rps": main.throughput_rps, "ok_rps": main.ok_rps,
            "p50_ms": main.latency_ms.get("p50"), "p90_ms": main.latency_ms.get("p90"),
            "p99_ms": main.latency_ms.get("p99"), "errors": main.errors, "n_errors": main.n_errors,
            "healthy_after": report["healthy_after"]}
        if mode == "full":
            overload = phases[1]
            summary = {"max_throughput_rps": report["max_throughput_rps"],
                       "sustained_target_rps": main.target_rate_rps, **summary,
                       "overload_concurrency": overload_concurrency, "overload_requests": overload.requests,
                       "overload_503": overload.errors.get("503", 0),
                       "overload_other_errors": {k: v for k, v in overload.errors.items() if k != "503"},
                       "overload_503_p50_ms": overload.error_latency_ms.get("p50"),
                       "overload_ok_rps": overload.ok_rps}
        if main.mode == "rate":  # did the client hold the schedule? If not, the server was not offered the rate
            summary.update(late_starts=main.late_starts, dropped=main.dropped,
                           kept_schedule=main.dropped == 0 and main.late_starts <= 0.01 * max(main.requests, 1))
        if summary.get("p99_ms") and summary.get("single_ms_p50"):
            summary["p99_over_single"] = round(summary["p99_ms"] / summary["single_ms_p50"], 2)
        if main.server:  # the server's side of the same phase: where the latency was spent
            summary.update({f"server_{k}": v for k, v in main.server.items() if k != "ok_requests"})
        report["summary"] = summary
        report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        report["host"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        return report


def _event_loop_runner():
    """uvloop's runner (as uvicorn uses on the server side): the generator shares the machine with the server, and
    on the default asyncio loop its own CPU per request was a third of the server's."""
    try:
        import uvloop
    except ImportError:  # not on every platform (Windows)
        return asyncio.run
    return uvloop.run


def run_loadtest(url: str, *, mode: str = "full", duration_s: float = 60, concurrency: int = 4,
                 rate: float | None = None, fraction: float = 0.7, step_s: float = 5, ramp_max: int = 20,
                 overload_concurrency: int = 60, overload_s: float = 10, single_n: int = 50,
                 max_requests: int = 100_000, max_in_flight: int = 64, image: Path | None = None,
                 timeout_s: float = 30, token: str | None = None, out: Path | None = None,
                 progress=None) -> dict[str, Any]:
    """Run the load test (see the module docstring) and return the report; also written to `out` as JSON.
    `token`: the server's bearer token, sent on every request, when it has one."""
    if mode not in MODES:
        raise LoadTestError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    for name, value in (("duration", duration_s), ("step", step_s), ("overload-s", overload_s)):
        if value <= 0:
            raise LoadTestError(f"--{name} must be positive")
    if not 0 < fraction <= 1:
        raise LoadTestError("--fraction must be in (0, 1]")
    if min(concurrency, ramp_max, overload_concurrency, single_n, max_requests, max_in_flight) < 1:
        raise LoadTestError("concurrency, counts and limits must be at least 1")
    require_loopback(url)
    report = _event_loop_runner()(_run(url, mode=mode, duration_s=duration_s, concurrency=concurrency, rate=rate,
                              fraction=fraction, step_s=step_s, ramp_max=ramp_max,
                              overload_concurrency=overload_concurrency, overload_s=overload_s, single_n=single_n,
                              max_requests=max_requests, max_in_flight=max_in_flight, image=image,
                              timeout_s=timeout_s, token=token, progress=progress or (lambda _msg: None)))
    if out is not None:
        from visionflow.report import write_json_atomic

        write_json_atomic(Path(out), report)
    return report


def render(report: dict[str, Any]):
    """A rich table of every phase, then the summary."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title=f"load test of {report['url']}/predict (model v{report['model_version']})",
                  title_justify="left")
    for col in ("phase", "load", "requests", "req/s", "ok/s", "p50 ms", "p90 ms", "p99 ms", "errors"):
        table.add_column(col, justify="left" if col in ("phase", "load", "errors") else "right")
    rows = [report["single"], *report.get("ramp", []), *report["phases"]]
    for ph in rows:
        load = (f"{ph['target_rate_rps']:g} req/s" if ph["mode"] == "rate" else
                "1 at a time" if ph["mode"] == "sequential" else f"{ph['concurrency']} concurrent")
        lat = ph["latency_ms"]
        errors = ", ".join(f"{k}: {v}" for k, v in ph["errors"].items()) or "0"
        if ph.get("late_starts") or ph.get("dropped"):
            errors += f" (late starts {ph['late_starts']}, dropped {ph['dropped']})"
        table.add_row(ph["name"], load, str(ph["requests"]), f"{ph['throughput_rps']:.1f}", f"{ph['ok_rps']:.1f}",
                      *(f"{lat[k]:.1f}" if k in lat else "-" for k in ("p50", "p90", "p99")), errors)
    summary = Table(title="summary", show_header=False, title_justify="left")
    for k, v in report["summary"].items():
        summary.add_row(k, str(v))
    return Group(table, summary)
