"""The review page end to end in real headless Chromium (Debian's package), driven over the DevTools protocol.

A real uvicorn server on loopback serves a real champion; the browser loads /review, a person's key press labels
the image, and the image ends up as labelled data in data/reviewed/<class>/.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import make_folder_dataset, make_project
from tests.test_serve import CLASSES, _register, png
from visionflow.config import load_params

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 60) -> bytes:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


class DevTools:
    """Minimal Chrome DevTools Protocol client (websockets is already a dependency, via Prefect)."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg.get("result", {})

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    def wait_js(self, expression: str, timeout: float = 30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self):
        self.ws.close()


@pytest.fixture
def server(tmp_path):
    import uvicorn

    from visionflow.serve import create_app

    src = make_folder_dataset(tmp_path / "images", classes=tuple(CLASSES), per_class=12, size=20)
    proj = make_project(tmp_path / "proj", src, registry={"tracking_uri": f"sqlite:///{tmp_path / 'db'}"})
    p = load_params(proj / "params.yaml")
    _register(proj, p, seed=0)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(p, proj, watch=False), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    _wait_http(f"{base}/ready")
    yield proj, p, base
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium)")
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="vf-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        targets = json.loads(_wait_http(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _post_image(base: str, data: bytes) -> dict:
    boundary = "vfboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{base}/predict", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_person_labels_an_uncertain_image_in_the_browser(server, browser):
    from visionflow import stages

    proj, p, base = server
    stages.ingest_stage(p, proj)
    version_before = stages.version_stage(p, proj)["data_version"]
    first = _post_image(base, png(11))
    second = _post_image(base, png(12))
    assert first["review_id"] and second["review_id"]

    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{base}/review")
    browser.wait_js("document.querySelectorAll('#item button').length === 3")
    # The queued image really rendered in the page.
    assert browser.wait_js("(() => { const i = document.getElementById('img'); "
                           "return i && i.complete && i.naturalWidth > 0; })()")
    shown = browser.js("document.getElementById('img').src")
    # A click on a class button...
    box = browser.js("(() => { const r = document.querySelector('button[data-label=\"dog\"]')"
                     ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
    browser.wait_js("document.getElementById('status').textContent === 'saved dog'")
    # ...and a key press (3 = the third class) for the next one.
    browser.wait_js(f"document.getElementById('img') && document.getElementById('img').src !== {json.dumps(shown)}")
    browser.call("Input.dispatchKeyEvent", type="keyDown", key="3", text="3")
    browser.call("Input.dispatchKeyEvent", type="keyUp", key="3")
    browser.wait_js(f"document.getElementById('status').textContent === 'saved {CLASSES[2]}'")
    browser.wait_js("!document.getElementById('empty').hidden")

    reviewed = proj / p.serve.reviewed_dir
    saved = sorted(f.relative_to(reviewed).parts[0] for f in reviewed.rglob("*.png"))
    assert saved == sorted(["dog", CLASSES[2]])

    # The next dataset version includes the corrections: ingest adds them to data/raw, DVC records a new version.
    ingested = stages.ingest_stage(p, proj)
    assert ingested.n_reviewed == 2
    raw = proj / p.data.raw_dir
    assert sorted(f.parent.name for f in raw.glob("*/reviewed__*")) == sorted(["dog", CLASSES[2]])
    version_after = stages.version_stage(p, proj)["data_version"]
    assert version_after != version_before
    validated = stages.validate_stage(p, proj, version_after)
    assert validated.n_accepted == 36 + 2
