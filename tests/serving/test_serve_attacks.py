"""Malicious uploads against a real `visionflow serve` process on loopback.

Every hostile upload must get a clear 4xx within a few seconds (a hostile file name on a valid image is simply
ignored), nothing may be written outside the served folders, and /health must still answer afterwards. The server
is a separate uvicorn process (the same command a user runs), so these tests see what a client on the network sees:
real sockets, real HTTP parsing, real connection handling.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.helpers import (
    CLASSES,
    DV,
    corrupt_exif_jpegs,
    free_port,
    make_project,
    png,
    png_header_only,
    register_champion,
    run_cli,
)
from visionflow.config import Params, load_params
from visionflow.tools.loadtest.cpus import format_cpus, process_affinity

TWO_CPUS = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2  # pinning to disjoint sets

pytestmark = pytest.mark.slow  # starts a server process: ~30-60 s of setup on a small machine
QUICK_S = 5.0  # "answered quickly": generous, the machine may be busy with other work
GIB = 1 << 30


@dataclass
class Server:
    root: Path  # the tmp folder that holds the project and the MLflow store
    proj: Path
    p: Params
    port: int
    base: str
    proc: subprocess.Popen
    log: Path


def start_server(root: Path, **serve: object) -> Server:
    """A throwaway project with a tiny registered champion, served by the real `visionflow serve` command."""
    proj = make_project(
        root / "proj", root, registry={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}, serve=dict(serve)
    )
    p = load_params(proj / "params.yaml")
    register_champion(proj, p, CLASSES, tags=DV, seed=0)
    port = free_port()
    exe = Path(sys.executable).with_name("visionflow")
    log = root / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [str(exe), "--params", str(proj / "params.yaml"), "serve", "--port", str(port)],
            cwd=proj,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server not ready in 120 s:\n{log.read_text()}")
        time.sleep(0.2)
    return Server(root, proj, p, port, base, proc, log)


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


DEADLINE_S = 4  # the header and body deadlines of the module's server: short, so slow clients are seen closed


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("attacks"), header_timeout_s=DEADLINE_S, body_timeout_s=DEADLINE_S)
    yield srv
    stop_server(srv)


def assert_healthy(server: Server) -> None:
    assert server.proc.poll() is None, f"the server died:\n{server.log.read_text()}"
    r = httpx.get(f"{server.base}/health", timeout=QUICK_S)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def multipart(parts: list[tuple[bytes, bytes | None, bytes]], boundary: bytes = b"vfattack") -> tuple[bytes, str]:
    """A multipart body built byte by byte (name, filename or None, content): no client library sanitises it."""
    body = bytearray()
    for name, filename, content in parts:
        disp = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename is not None else b"")
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disp + b"\r\n"
        if filename is not None:
            body += b"Content-Type: image/png\r\n"
        body += b"\r\n" + content + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return bytes(body), f"multipart/form-data; boundary={boundary.decode()}"


def post(server: Server, body: bytes, content_type: str, path: str = "/predict") -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = httpx.post(f"{server.base}{path}", content=body, headers={"content-type": content_type}, timeout=QUICK_S * 4)
    return r, time.monotonic() - start


def upload(server: Server, data: bytes, filename: bytes = b"x.png") -> tuple[httpx.Response, float]:
    return post(server, *multipart([(b"file", filename, data)]))


# ---------------------------------------------------------------------------------------------------------------
# (a) a 1 GiB body, streamed: never built in memory on either side


@dataclass
class StreamOutcome:
    status: int | None  # the HTTP status the server sent, when the client got to read it
    sent: int  # body bytes the client managed to send
    answered_s: float | None  # when the response (or the reset) arrived
    closed_s: float | None  # when the server closed the connection (EOF or reset)
    how: str


def stream_huge_body(port: int, *, chunked: bool, total: int = GIB, limit_s: float = 20) -> StreamOutcome:
    """POST a `total`-byte multipart body over a raw socket, 1 MiB at a time, reading whatever comes back.

    Keeps sending after the response arrives, to see whether the server closes the connection (good) or quietly
    swallows the whole GiB (bad: a client could keep a worker busy reading garbage).
    """
    boundary = b"vfhuge"
    head = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="huge.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    tail = b"\r\n--" + boundary + b"--\r\n"
    filler = total - len(head) - len(tail)
    headers = [
        "POST /predict HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Type: multipart/form-data; boundary={boundary.decode()}",
    ]
    headers.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    chunk = b"\x00" * (1 << 20)

    def pieces():
        yield head
        left = filler
        while left > 0:
            n = min(left, len(chunk))
            yield chunk[:n]
            left -= n
        yield tail

    def framed():
        for piece in pieces():
            yield (b"%x\r\n" % len(piece) + piece + b"\r\n") if chunked else piece
        if chunked:
            yield b"0\r\n\r\n"

    sock = socket.create_connection(("127.0.0.1", port), timeout=limit_s)
    sock.setblocking(False)
    start = time.monotonic()
    status = answered = closed = None
    received = b""
    sent = 0
    how = "sent everything"
    pending = ("\r\n".join(headers) + "\r\n\r\n").encode()
    source = framed()
    try:
        while time.monotonic() - start < limit_s:
            readable, writable, _ = select.select([sock], [sock] if pending is not None else [], [], 0.5)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data, how = None, "reset by the server"
                if not data:
                    closed = time.monotonic() - start
                    answered = answered or closed
                    how = how if data is None else "closed by the server"
                    break
                received += data
                m = re.match(rb"HTTP/1\.1 (\d{3})", received)
                if m and status is None:
                    status, answered = int(m.group(1)), time.monotonic() - start
            if writable and pending is not None:
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    closed = time.monotonic() - start
                    answered = answered or closed
                    how = "reset by the server"
                    break
                sent += n
                pending = pending[n:] or next(source, None)
        else:
            how = f"still open after {limit_s} s"
    finally:
        sock.close()
    return StreamOutcome(status, sent, answered, closed, how)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_one_gib_body_is_refused_early_and_the_connection_closed(server, chunked):
    out = stream_huge_body(server.port, chunked=chunked)
    print(out)
    assert out.status in (413, None), out
    assert out.answered_s is not None and out.answered_s < QUICK_S, out
    assert out.closed_s is not None and out.closed_s < QUICK_S, f"server kept reading the body: {out}"
    assert out.sent < GIB // 4, out
    assert_healthy(server)


# ---------------------------------------------------------------------------------------------------------------
# (b) a pixel-count bomb header, (c) a compression bomb and archives posing as images, (d) random bytes


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


_BOMBS: dict[tuple[int, int], bytes] = {}


def png_zlib_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A complete, valid 8-bit grayscale PNG of zeros: a few hundred KB that inflate to width*height bytes."""
    if (width, height) not in _BOMBS:
        comp = zlib.compressobj(9)
        row = b"\x00" * (width + 1)  # filter byte + pixels
        per = max(1, (4 << 20) // len(row))
        idat, done = bytearray(), 0
        while done < height:
            n = min(per, height - done)
            idat += comp.compress(row * n)
            done += n
        idat += comp.flush()
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        _BOMBS[width, height] = (
            b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", bytes(idat)) + png_chunk(b"IEND", b"")
        )
    return _BOMBS[width, height]


def test_the_zlib_bomb_is_a_real_bomb():
    bomb = png_zlib_bomb()
    assert len(bomb) < 1 << 20
    idat = bomb[bomb.index(b"IDAT") + 4 : bomb.index(b"IEND") - 8]
    inflated = len(zlib.decompressobj().decompress(idat, 64 << 20))  # stop at 64 MiB: enough to prove the point
    assert inflated == 64 << 20 and inflated > 100 * len(bomb)


def archive(kind: str) -> bytes:
    import zipfile

    payload = png(1)
    if kind == "gzip":
        return gzip.compress(payload * 50)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("image.png", payload)
        z.writestr("zeros.bin", b"\x00" * (8 << 20))  # a classic small-to-big archive member
    return buf.getvalue()


def gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, "GIF")  # Pillow reads GIF, the allow-list does not
    return buf.getvalue()


def flat_png(width: int, height: int) -> bytes:
    """A grey PNG of width x height that compresses to a few tens of KB: cheap to send, costly to decode."""
    buf = io.BytesIO()
    Image.new("L", (width, height), 90).save(buf, "PNG")
    return buf.getvalue()


HOSTILE_BYTES = {  # name: (make the bytes, expected status, reason in the detail)
    "50k x 50k header": (lambda: png_header_only(50_000, 50_000), 422, "too_many_pixels"),
    "20k x 20k zlib bomb": (png_zlib_bomb, 422, "too_many_pixels"),
    "gzip": (lambda: archive("gzip"), 415, "not_an_image"),
    "zip": (lambda: archive("zip"), 415, "not_an_image"),
    "gif": (gif, 415, "format_not_allowed"),
    "random bytes": (lambda: np.random.default_rng(0).bytes(100_000), 415, "not_an_image"),
    "truncated png": (lambda: png(2, 64)[:200], 422, "corrupt_data"),
    # corrupt EXIF (Pillow's own EXIF code raises on each): decoded without it
    **{f"corrupt exif {i}": (lambda i=i: corrupt_exif_jpegs(4, seed=7)[i], 200, None) for i in range(4)},
    # just under max_pixels, a few KB on the wire: allowed, and decoded to the model's size without a long stall
    "38 MP flat png": (lambda: flat_png(6400, 6000), 200, None),
}


@pytest.mark.parametrize("name", HOSTILE_BYTES)
def test_hostile_image_bytes_get_a_quick_clear_4xx(server, name):
    make, status, reason = HOSTILE_BYTES[name]
    data = make()
    r, elapsed = upload(server, data)
    assert r.status_code == status, r.text
    assert reason is None or reason in r.json()["detail"]
    assert elapsed < QUICK_S, f"{name}: {elapsed:.1f} s"
    assert_healthy(server)


# ---------------------------------------------------------------------------------------------------------------
# (e) hostile file names: the server never uses them, so nothing lands outside the served folders

SERVED = ("data/review", "data/reviewed", "data/predictions", "models/serving")


def snapshot(root: Path) -> set[Path]:
    return {f for f in root.rglob("*") if f.is_file()}


def test_hostile_filenames_write_nothing_outside_the_served_folders(server):
    marker = f"vf_attack_{uuid.uuid4().hex}"
    passwd = Path("/etc/passwd")
    passwd_before = (passwd.stat().st_mtime_ns, passwd.read_bytes()) if passwd.exists() else None
    before = snapshot(server.root)
    names = [
        b"../../etc/passwd",
        b"../../../../../../../../tmp/" + marker.encode() + b".png",
        b"/tmp/" + marker.encode() + b"_abs.png",
        b"..\\..\\..\\" + marker.encode() + b"_win.png",
        b"nul\x00name.png",
        b"../" + marker.encode() + b"\x00.png",
        b"%2e%2e%2f" + marker.encode() + b".png",
        b"a" * 5000 + b".png",
    ]
    review_ids = []
    for i, name in enumerate(names):
        r, elapsed = upload(server, png(100 + i), filename=name)
        assert elapsed < QUICK_S
        # The name is ignored (200, stored under a server-made id) or the part refused outright (400).
        assert r.status_code in (200, 400), (name, r.status_code, r.text)
        if r.status_code == 200 and r.json()["review_id"]:
            review_ids.append(r.json()["review_id"])
        # ...and a file that is not an image, under the same name, is refused.
        r, _ = upload(server, b"root:x:0:0:root:/root:/bin/bash\n", filename=name)
        assert r.status_code in (400, 415), (name, r.status_code, r.text)
        assert_healthy(server)
    assert review_ids, "an untrained model is never sure: at least one upload must have been queued for review"

    # The review endpoints refuse ids that are not ours.
    for bad in ("..%2F..%2Fqueue.db", "%2E%2E%2Fqueue", "queue", "%2E%2E", f"{review_ids[0]}%00"):
        assert httpx.get(f"{server.base}/review/image/{bad}", timeout=QUICK_S).status_code in (404, 422)
        r = httpx.post(f"{server.base}/review/{bad}", json={"label": CLASSES[0]}, timeout=QUICK_S)
        assert r.status_code in (404, 405, 422), (bad, r.status_code)
    assert (
        httpx.post(f"{server.base}/review/{review_ids[0]}", json={"label": "../../x"}, timeout=QUICK_S).status_code
        == 422
    )
    ok = httpx.post(f"{server.base}/review/{review_ids[0]}", json={"label": CLASSES[1]}, timeout=QUICK_S)
    assert ok.status_code == 200

    if passwd_before is not None:
        assert (passwd.stat().st_mtime_ns, passwd.read_bytes()) == passwd_before
    for folder in {server.root, server.proj.parent, Path("/tmp"), Path.cwd(), Path("/")}:
        assert not list(folder.glob(f"{marker}*")), f"a hostile name became a file in {folder}"
    new = snapshot(server.root) - before
    outside = [f for f in new if not any(f.is_relative_to(server.proj / s) for s in SERVED) and f != server.log]
    assert not outside, f"files written outside the served folders: {outside}"

    review = server.proj / server.p.serve.review_dir
    assert {f.name for f in review.iterdir()} <= {
        "images",
        "queue.db",
        "queue.db-journal",
        "queue.db-wal",
        "queue.db-shm",
    }
    images = [f.name for f in (review / "images").iterdir()]
    assert images and all(re.fullmatch(r"[0-9a-f]{32}\.png", n) for n in images), images
    reviewed = server.proj / server.p.serve.reviewed_dir
    saved = [f.relative_to(reviewed).as_posix() for f in new if f.is_relative_to(reviewed)]  # (the repo ships a README)
    assert saved and all(re.fullmatch(rf"({'|'.join(CLASSES)})/review_[0-9a-f]{{32}}\.png", s) for s in saved)


# ---------------------------------------------------------------------------------------------------------------
# (f) thousands of form parts


@pytest.mark.parametrize(
    "path,file_parts",
    [("/predict", False), ("/predict", True), ("/predict/batch", True)],
    ids=["5000 fields", "5000 files", "5000 files batch"],
)
def test_thousands_of_form_parts_get_a_quick_400(server, path, file_parts):
    tiny = png(0, 2)
    parts = [(b"f", b"p.png" if file_parts else None, tiny if file_parts else b"x") for _ in range(5000)]
    r, elapsed = post(server, *multipart(parts), path=path)
    assert r.status_code == 400, r.text
    assert elapsed < QUICK_S
    assert_healthy(server)


@pytest.mark.parametrize("length", [257, 1000, 4000])
def test_an_over_long_multipart_boundary_gets_a_400(server, length):
    r, elapsed = post(server, *multipart([(b"file", b"x.png", png(1))], boundary=b"b" * length))
    assert r.status_code == 400 and "boundary" in r.json()["detail"], r.text
    assert elapsed < QUICK_S
    assert_healthy(server)


def test_expensive_images_are_bounded_per_request_and_do_not_starve_others(server):
    """Each image under max_pixels, together over serve.max_request_pixels: refused before the second is decoded;
    a request sent meanwhile is answered (not a 504 behind the batch)."""
    import concurrent.futures

    costly = flat_png(6000, 6000)  # 36 MP each, ~50 KB
    parts = [(b"files", f"{i}.png".encode(), costly) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        batch = pool.submit(post, server, *multipart(parts), path="/predict/batch")
        single = pool.submit(upload, server, png(5))
        (r, _), (normal, _) = batch.result(), single.result()
    assert r.status_code == 422 and "over_pixel_budget" in r.json()["detail"], r.text
    assert normal.status_code == 200, normal.text
    assert_healthy(server)


def open_slow_clients(port: int, n: int) -> dict[str, list[socket.socket]]:
    """n connections, a third of each kind: idle (nothing sent), a request head never finished (slowloris), and a
    whole head with a body that never comes."""
    heads = {
        "idle": b"",
        "slow head": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a",
        "slow body": (
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
            b"Content-Type: multipart/form-data; boundary=vfslow\r\n\r\n--vfslow\r\n"
        ),
    }
    clients: dict[str, list[socket.socket]] = {kind: [] for kind in heads}
    for i in range(n):
        kind = list(heads)[i % 3]
        sock = socket.create_connection(("127.0.0.1", port), timeout=QUICK_S)
        sock.sendall(heads[kind])
        clients[kind].append(sock)
    return clients


def read_until_closed(sock: socket.socket, limit_s: float) -> bytes | None:
    """What the server sent before closing the connection; None if still open after limit_s."""
    sock.settimeout(limit_s)
    received = b""
    try:
        while data := sock.recv(4096):
            received += data
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def test_idle_and_slow_clients_neither_starve_health_nor_stay_for_ever(server):
    """250 idle and slowloris connections (uvicorn's limit_concurrency was ~200: past it every request, /health
    included, got a 503): /health and a prediction are still answered while they are open, and the header and
    body deadlines close every one of them with a 408."""
    clients = open_slow_clients(server.port, 250)
    try:
        assert_healthy(server)
        r, _ = upload(server, png(9))
        assert r.status_code == 200, r.text
        for kind, socks in clients.items():
            answers = [read_until_closed(s, limit_s=DEADLINE_S * 5) for s in socks]
            assert all(a is not None for a in answers), f"{kind}: connections left open"
            assert all(a.startswith(b"HTTP/1.1 408") for a in answers), (kind, {a[:40] for a in answers})
    finally:
        for socks in clients.values():
            for s in socks:
                s.close()
    assert_healthy(server)


def test_startup_says_which_model_is_served_and_where(server):
    log = server.log.read_text()
    assert f"serving {server.p.registry.model_name} v1 " in log and f"http://127.0.0.1:{server.port}" in log, log


def test_a_normal_request_still_works_after_all_that(server):
    r, _ = upload(server, png(1))
    assert r.status_code == 200 and r.json()["label"] in CLASSES
    assert b"Traceback" not in server.log.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# The load-test tool against the same server process (after all the attacks above)


def test_loadtest_at_a_low_rate_has_no_errors(server, tmp_path):
    from visionflow.tools.loadtest import run_loadtest

    out = tmp_path / "rate.json"
    report = run_loadtest(server.base, mode="rate", rate=5, duration_s=3, single_n=5, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    phase = report["phases"][0]
    assert phase["mode"] == "rate" and phase["target_rate_rps"] == 5 and phase["requests"] == 15
    assert phase["errors"] == {} and phase["ok"] == 15 and phase["dropped"] == 0
    assert set(phase["latency_ms"]) == {"p50", "p90", "p99", "mean", "min", "max"}
    assert report["single"]["ok"] == 5 and report["single"]["errors"] == {}
    summary = report["summary"]
    assert {
        "single_ms_p50",
        "throughput_rps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "p99_over_single",
        "errors",
        "healthy_after",
    } <= set(summary)
    assert summary["n_errors"] == 0 and summary["healthy_after"] is True
    assert summary["dropped"] == 0 and isinstance(summary["kept_schedule"], bool)
    assert report["host"]["cpus"] >= 1 and len(report["host"]["loadavg_at_end"]) == 3
    # the server's side of the phase, from the difference of its /metrics before and after it
    server_side = phase["server"]
    assert server_side["ok_requests"] == 15  # exactly this phase's requests: nothing else hit the server meanwhile
    assert 1 <= server_side["batches"] <= 15 and 1 <= server_side["requests_per_batch"] <= 15
    assert 0 < server_side["inference_busy"] < 1 and server_side["inference_ms_per_batch"] > 0
    assert 0 < server_side["p50_ms_at_most"] <= server_side["p99_ms_at_most"]
    assert summary["server_p99_ms_at_most"] == server_side["p99_ms_at_most"]


def test_loadtest_cli_full_mode_ramps_sustains_and_overloads(server):
    """The whole `full` mode through the real command, shrunk to a few seconds; structure only, no speed."""
    slots = server.p.serve.max_concurrency + server.p.serve.queue_depth
    proc = run_cli(
        server.proj,
        "loadtest",
        "--url",
        server.base,
        "--duration",
        "3",
        "--step",
        "1",
        "--overload-s",
        "1",
        "--out",
        "lt.json",
        timeout=120,
    )
    report = json.loads((server.proj / "lt.json").read_text())
    assert report["mode"] == "full" and report["ramp"][0]["concurrency"] == 1
    assert all(step["concurrency"] <= slots for step in report["ramp"])
    assert report["max_throughput_rps"] > 0
    sustained, overload = report["phases"]
    assert sustained["mode"] == "rate" and sustained["target_rate_rps"] == pytest.approx(
        0.7 * report["max_throughput_rps"], rel=1e-3
    )
    assert overload["concurrency"] == 3 * slots
    # Past the slots the server sheds load with 503s, never anything else, and stays up.
    assert set(overload["errors"]) <= {"503"}, overload["errors"]
    assert report["healthy_after"] is True and report["summary"]["overload_503"] == overload["errors"].get("503", 0)
    assert "load test of" in proc.stdout and "summary" in proc.stdout
    assert_healthy(server)
    summary = report["summary"]
    assert summary["overload_only_503"] is True and isinstance(summary["p99_within_4x_single_no_errors"], bool)
    assert summary["generator_cores_at_max"] > 0 and summary["server_cores_at_max"] > 0
    assert all(step["cpu"]["server_processes"] >= 1 for step in report["ramp"])  # 1 s steps: long enough to count
    # The server was found by its port, pinned (every process and thread) for the run, and put back after it.
    cpus = report["cpus"]
    if TWO_CPUS:
        assert cpus["pinned"] and cpus["server"].startswith(f"found listening on port {server.port}")
        assert cpus["server_processes"][0]["pid"] == server.proc.pid and cpus["all_on_their_sets"] is True
        assert cpus["usable_cpus"] == format_cpus(os.sched_getaffinity(0))
        assert (summary["server_cpus"], summary["client_cpus"]) == (cpus["server_cpus"], cpus["client_cpus"])
        assert f"server on CPU {cpus['server_cpus']}, generator on CPU {cpus['client_cpus']}" in proc.stdout
        assert process_affinity(server.proc.pid) == tuple(sorted(os.sched_getaffinity(0)))
    else:
        assert not cpus["pinned"] and summary["not_pinned"]


def test_loadtest_starts_its_own_pinned_server_and_stops_it(server):
    """--start-server: `visionflow serve` with the same params, on the server's CPUs from its first instruction,
    on a free port; stopped after the run."""
    proc = run_cli(
        server.proj,
        "--json",
        "loadtest",
        "--start-server",
        "--server-cpus",
        "0",
        *(("--client-cpus", str(max(os.sched_getaffinity(0)))) if TWO_CPUS else ("--no-pin",)),
        "--mode",
        "rate",
        "--rate",
        "5",
        "--duration",
        "2",
        "--out",
        "own.json",
        timeout=240,
    )
    report = json.loads(proc.stdout)
    assert report["url"] != server.base and report["summary"]["n_errors"] == 0 and report["healthy_after"]
    cpus = report["cpus"]
    pids = [p["pid"] for p in cpus.get("server_processes", [])]
    if TWO_CPUS:
        assert cpus["server"].startswith("started by the load test") and cpus["server_cpus"] == "0"
        assert pids and all(p["cpus"] == "0" for p in cpus["server_processes"]) and cpus["all_on_their_sets"]
        assert report["phases"][0]["cpu"]["server_cores"] > 0
    assert (server.proj / "own.server.log").read_text().strip()  # its output, kept
    assert not any(psutil.pid_exists(pid) for pid in pids)  # stopped
    assert_healthy(server)  # the module's server was not touched


def test_loadtest_sends_the_token_of_a_server_with_auth(tmp_path_factory, monkeypatch):
    """A server with serve.auth_token_env answers 401 without the bearer token: the load test reads the token
    from the same variable and sends it on every request (before: every request was a 401)."""
    monkeypatch.setenv("VF_LOADTEST_TOKEN", "s3cret-load")
    srv = start_server(tmp_path_factory.mktemp("authload"), auth_token_env="VF_LOADTEST_TOKEN")
    try:
        proc = run_cli(
            srv.proj,
            "--json",
            "loadtest",
            "--url",
            srv.base,
            "--mode",
            "rate",
            "--rate",
            "5",
            "--duration",
            "1",
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["summary"]["n_errors"] == 0 and report["summary"]["ok_rps"] > 0
        monkeypatch.setenv("VF_LOADTEST_TOKEN", "wrong")
        proc = run_cli(
            srv.proj, "loadtest", "--url", srv.base, "--mode", "rate", "--rate", "5", "--duration", "1", check=False
        )
        assert proc.returncode == 2 and "401" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        stop_server(srv)
