"""Running the load test: settings, the server's model, the phases of each mode, and the report."""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import ssl
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.tools.loadtest.client import KeepAliveClient, LoadTestError, require_loopback
from visionflow.tools.loadtest.phases import Phase, Target, closed_loop, open_loop, sequential
from visionflow.tools.loadtest.placement import Placement
from visionflow.tools.loadtest.report import summary
from visionflow.tools.loadtest.server import seen_by_server

MODES = ("full", "concurrency", "rate")


@dataclass(frozen=True)
class Settings:
    """run_loadtest's settings (see the package docstring for the phases they shape)."""

    mode: str = "full"
    duration_s: float = 60
    concurrency: int = 4
    rate: float | None = None
    fraction: float = 0.7
    step_s: float = 5
    ramp_max: int = 20
    overload_concurrency: int = 60
    overload_s: float = 10
    single_n: int = 50
    max_requests: int = 100_000
    max_in_flight: int = 64
    timeout_s: float = 30

    def check(self) -> None:
        if self.mode not in MODES:
            raise LoadTestError(f"unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        for name, value in (("duration", self.duration_s), ("step", self.step_s), ("overload-s", self.overload_s)):
            if not (math.isfinite(value) and value > 0):  # (nan and inf too: a phase must end)
                raise LoadTestError(f"--{name} must be a positive number of seconds, not {value:g}")
        if self.mode == "rate" and self.rate is None:
            raise LoadTestError("--mode rate needs --rate (requests per second)")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise LoadTestError(f"--rate must be a positive number of requests per second, not {self.rate:g}")
        if not 0 < self.fraction <= 1:
            raise LoadTestError("--fraction must be in (0, 1]")
        if (
            min(
                self.concurrency,
                self.ramp_max,
                self.overload_concurrency,
                self.single_n,
                self.max_requests,
                self.max_in_flight,
            )
            < 1
        ):
            raise LoadTestError("concurrency, counts and limits must be at least 1")

    def reported(self) -> dict[str, Any]:
        return {
            "duration_s": self.duration_s,
            "concurrency": self.concurrency,
            "rate_rps": self.rate,
            "fraction": self.fraction,
            "step_s": self.step_s,
            "ramp_max": self.ramp_max,
            "overload_concurrency": self.overload_concurrency,
            "overload_s": self.overload_s,
            "single_n": self.single_n,
            "max_requests_per_phase": self.max_requests,
            "max_in_flight": self.max_in_flight,
            "timeout_s": self.timeout_s,
        }


def preflight(image: Path | None = None, out: Path | None = None, **settings: Any) -> Settings:
    """The settings (Settings' fields), the image to send and the report's path checked before anything starts:
    a bad option is refused in one line before a server is started or a request sent. LoadTestError otherwise."""
    s = Settings(**settings)
    s.check()
    if image is not None:
        image = Path(image)
        if not image.is_file():
            what = "is a folder" if image.is_dir() else "does not exist"
            raise LoadTestError(f"--image {image} {what}: give an image file (or leave it out for a generated one)")
        if not os.access(image, os.R_OK):
            raise LoadTestError(f"--image {image} cannot be read (permissions)")
    if out is not None:  # (its folder also takes the started server's log)
        folder = Path(out).absolute().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()  # a real write: root passes os.access where writes fail
        except (FileExistsError, NotADirectoryError):
            raise LoadTestError(f"cannot write the report to {out}: part of {folder} is a file, not a folder") from None
        except OSError as exc:
            raise LoadTestError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    return s


def run_loadtest(
    url: str,
    *,
    image: Path | None = None,
    token: str | None = None,
    out: Path | None = None,
    progress=None,
    placement: Placement | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run the load test (see the package docstring) and return the report; also written to `out` as JSON.
    `settings`: Settings' fields (mode, duration_s, rate, ...; its defaults otherwise). `token`: the server's
    bearer token, sent on every request, when it has one. `placement`: where the server and this process run
    (local.placed_server), already applied; None: nothing pinned, the generator's CPU measured."""
    checked = preflight(image, out, **settings)
    require_loopback(url)
    placement = placement or Placement.unpinned("not asked: run_loadtest was given no placement")
    report = _event_loop_runner()(
        _run(url, checked, image=image, token=token, progress=progress or (lambda _msg: None), placement=placement)
    )
    if out is not None:
        from visionflow.report import write_json_atomic

        write_json_atomic(Path(out), report)
    return report


async def _run(
    url: str, s: Settings, *, image: Path | None, token: str | None, progress, placement: Placement
) -> dict[str, Any]:
    import httpx

    base = require_loopback(url)
    tls = ssl.create_default_context() if base.startswith("https") else None
    async with contextlib.AsyncExitStack() as stack:
        # The control requests (ready, model, health) go through httpx; trust_env=False: no proxy from the
        # environment gets between us and loopback.
        auth = {"Authorization": f"Bearer {token}"} if token else {}  # a server with serve.auth_token_env set
        client = await stack.enter_async_context(
            httpx.AsyncClient(timeout=s.timeout_s, trust_env=False, verify=tls or True, headers=auth)
        )
        ready, model = await _served_model(client, base)
        data = Path(image).read_bytes() if image else default_image(model["image_size"], model["channels"])
        load = KeepAliveClient(f"{base}/predict", *multipart_body(data), s.timeout_s, tls, token)
        stack.callback(load.close)
        target = Target(load)
        report = _report_head(base, s, ready, model, image, data)
        progress("warm-up and sequential baseline")
        await sequential(target, 3, max_s=s.timeout_s, name="warmup")

        async def measured(phase) -> Phase:  # each phase with the CPU each side used, new server workers pinned
            placement.refresh()
            before = placement.cpu_snapshot()
            ph = await phase
            ph.cpu = placement.cpu_used(before, ph.elapsed_s)
            return ph

        single = await measured(sequential(target, s.single_n, max_s=max(10.0, s.duration_s / 4)))
        report["single"] = asdict(single)
        phases = await _phases(s, target, client, base, report, progress, measured)
        report["phases"] = [asdict(p) for p in phases]
        # The load's idle keep-alive connections go first: a server may count them against a connection limit,
        # and the question is whether a new client is served after the load.
        load.close()
        health, ready_after = await client.get(f"{base}/health"), await client.get(f"{base}/ready")
        after = await sequential(target, 3, max_s=s.timeout_s, name="after")
        report["after"] = {"health": health.status_code, "ready": ready_after.status_code, "predictions_ok": after.ok}
        report["healthy_after"] = health.status_code == ready_after.status_code == 200 and after.ok == after.requests
        report["cpus"] = placement.reported()  # read back after the load: workers started meanwhile included
        report["summary"] = summary(report, single, phases, s.overload_concurrency)
        report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        report["host"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        return report


async def _served_model(client, base: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server's /ready and /model answers; LoadTestError when it is not there, not ready, or refuses us."""
    import httpx

    try:
        ready = await client.get(f"{base}/ready")
    except httpx.HTTPError as exc:
        raise LoadTestError(
            f"no server answers at {base} ({type(exc).__name__}); start `visionflow serve` first"
        ) from None
    if ready.status_code != 200:
        raise LoadTestError(f"{base}/ready answered {ready.status_code}: {ready.text[:200]}")
    model = await client.get(f"{base}/model")
    if model.status_code != 200:
        raise LoadTestError(
            f"{base}/model answered {model.status_code}: {model.text[:200]}"
            + (
                " (the server wants its bearer token: export the variable serve.auth_token_env names)"
                if model.status_code == 401
                else ""
            )
        )
    return ready.json(), model.json()


def _report_head(
    base: str, s: Settings, ready: dict[str, Any], model: dict[str, Any], image: Path | None, data: bytes
) -> dict[str, Any]:
    return {
        "url": base,
        "mode": s.mode,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # Client and server share this machine: its size and load say how far the numbers can be trusted.
        "host": {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "client": "raw HTTP/1.1 keep-alive (prebuilt request bytes)",
        "model_version": ready.get("model_version"),
        "image": {
            "source": str(image) if image else "generated noise",
            "bytes": len(data),
            "model_input": [model["image_size"], model["image_size"], model["channels"]],
        },
        "settings": s.reported(),
    }


async def _phases(
    s: Settings, target: Target, client, base: str, report: dict[str, Any], progress, measured
) -> list[Phase]:
    """The mode's measured phases, the main one first; full mode (the one left: Settings.check refuses any other)
    also adds its ramp to the report. `measured` wraps each phase's coroutine (CPU use, pinning)."""
    if s.mode == "concurrency":
        progress(f"closed loop at concurrency {s.concurrency} for {s.duration_s:g} s")
        return [await measured(closed_loop(target, s.concurrency, s.duration_s, s.max_requests, "fixed"))]
    if s.mode == "rate":  # (Settings.check: a positive rate is given)
        progress(f"constant arrival rate {s.rate:g} req/s for {s.duration_s:g} s")
        fixed = open_loop(target, s.rate, s.duration_s, s.max_requests, s.max_in_flight, "fixed")
        return [await measured(seen_by_server(client, base, fixed))]
    ramp, best = await _ramp(s, target, progress, measured)
    if best.ok_rps <= 0:
        raise LoadTestError(f"no request succeeded during the ramp: {ramp[0].errors}")
    report["ramp"] = [asdict(p) for p in ramp]
    report["max_throughput_rps"] = best.ok_rps
    report["max_at_concurrency"] = best.concurrency
    target_rate = s.fraction * best.ok_rps
    progress(f"sustained: {target_rate:.1f} req/s ({s.fraction:.0%} of max) for {s.duration_s:g} s")
    sustained = await measured(
        seen_by_server(
            client, base, open_loop(target, target_rate, s.duration_s, s.max_requests, s.max_in_flight, "sustained")
        )
    )
    progress(f"overload: concurrency {s.overload_concurrency} for {s.overload_s:g} s")
    overload = await measured(closed_loop(target, s.overload_concurrency, s.overload_s, s.max_requests, "overload"))
    return [sustained, overload]


async def _ramp(s: Settings, target: Target, progress, measured) -> tuple[list[Phase], Phase]:
    """Closed loops at concurrency 1, 2, 4, ... up to ramp_max, until errors or saturation; (every step, the
    best error-free step: the one after which no step gained 5%, or the fastest when the first already failed)."""
    ramp, best, stale = [], None, 0
    levels = sorted({min(2**k, s.ramp_max) for k in range(0, 16) if 2 ** (k - 1) < s.ramp_max})
    for c in levels:
        progress(f"ramp: concurrency {c} for {s.step_s:g} s")
        ph = await measured(closed_loop(target, c, s.step_s, s.max_requests, f"ramp c={c}"))
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
    return ramp, best


def default_image(image_size: int, channels: int, seed: int = 0) -> bytes:
    """A seeded noise PNG at the model's input size (no resize cost; the model is unsure, so it is queued)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (image_size, image_size) if channels == 1 else (image_size, image_size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def multipart_body(data: bytes, filename: str = "loadtest.png") -> tuple[bytes, str]:
    """A multipart/form-data body with `data` as its one file part, and the Content-Type that names its boundary."""
    boundary = "visionflow-loadtest-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _event_loop_runner():
    """uvloop's runner (as uvicorn uses on the server side): the generator shares the machine with the server, and
    on the default asyncio loop its own CPU per request was a third of the server's."""
    try:
        import uvloop
    except ImportError:  # not on every platform (Windows)
        return asyncio.run
    return uvloop.run
