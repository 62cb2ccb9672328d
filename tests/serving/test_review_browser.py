"""The review page end to end in real headless Chromium (Debian's package), driven over the DevTools protocol.

A real uvicorn server on loopback serves a real champion; the browser loads /review, a person's key press labels
the image, and the image ends up as labelled data in data/reviewed/<class>/. Also in the browser: scripts in the
token or in class names do not run, a cross-site page cannot label, each button's shown key is the key that
labels it, undo, the whole queue with its count, and /docs offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import pytest

from tests.helpers import (
    CLASSES,
    DETECTOR_CLASSES,
    DV,
    free_port,
    make_folder_dataset,
    make_project,
    png,
    register_champion,
    register_detector,
)
from visionflow.config import load_params
from visionflow.serving.review import ReviewQueue

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


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
        status = self.js("(document.getElementById('status') || {}).textContent")
        raise AssertionError(f"timed out waiting for {expression} (the page's status line: {status!r})")

    def close(self):
        self.ws.close()


@contextlib.contextmanager
def _serving(p, proj):
    """A real uvicorn server on loopback, for the with block; gives its base URL."""
    import uvicorn

    from visionflow.serving.app import create_app

    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(p, proj, watch=False), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    _wait_http(f"{base}/health")
    try:
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server(tmp_path):
    src = make_folder_dataset(tmp_path / "images", classes=tuple(CLASSES), per_class=12, size=20)
    proj = make_project(tmp_path / "proj", src, registry={"tracking_uri": f"sqlite:///{tmp_path / 'db'}"})
    p = load_params(proj / "params.yaml")
    register_champion(proj, p, CLASSES, tags=DV, seed=0)
    with _serving(p, proj) as base:
        _wait_http(f"{base}/ready")
        yield proj, p, base


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium)")
    port = free_port()
    profile = tempfile.mkdtemp(prefix="vf-chromium-")
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1024,900",
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={port}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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


def _press(browser: DevTools, key: str) -> None:
    code = {"Backspace": 8, "Enter": 13, "Escape": 27}.get(key)
    down = {"key": key, "windowsVirtualKeyCode": code} if code else {"key": key, "text": key}
    browser.call("Input.dispatchKeyEvent", type="keyDown", **down)
    browser.call("Input.dispatchKeyEvent", type="keyUp", key=key)


def _click(browser: DevTools, selector: str) -> None:
    """A real mouse click at the element's centre (scrolled into view first)."""
    box = browser.js(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
        "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
        "return [r.x + r.width / 2, r.y + r.height / 2]; })()"
    )
    for kind in ("mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


def _text(browser: DevTools, element_id: str) -> str:
    return browser.js(f"document.getElementById({json.dumps(element_id)}).textContent")


def _post_image(base: str, data: bytes) -> dict:
    boundary = "vfboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        f"{base}/predict",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_person_labels_an_uncertain_image_in_the_browser(server, browser):
    from visionflow import stages

    proj, p, base = server
    stages.ingest_stage(p, proj)
    version_before = stages.version_stage(p, proj).data_version
    first = _post_image(base, png(11))
    second = _post_image(base, png(12))
    assert first["review_id"] and second["review_id"]

    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{base}/review")
    browser.wait_js("document.querySelectorAll('#item button').length === 3")
    # The queued image really rendered in the page.
    assert browser.wait_js(
        "(() => { const i = document.getElementById('img'); return i && i.complete && i.naturalWidth > 0; })()"
    )
    shown = browser.js("document.getElementById('img').src")
    # A click on a class button...
    _click(browser, 'button[data-label="dog"]')
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
    version_after = stages.version_stage(p, proj).data_version
    assert version_after != version_before
    validated = stages.validate_stage(p, proj, version_after)
    assert validated.n_accepted == 36 + 2


def test_a_cross_site_page_cannot_label(server, browser):
    """CSRF from a real browser: a page on another origin (localhost is not 127.0.0.1) posts to the review API
    the ways a page can without a CORS grant; the item stays pending."""
    proj, p, base = server
    item = _post_image(base, png(21))["review_id"]
    port = base.rsplit(":", 1)[1]
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"http://localhost:{port}/health")  # any page of the other origin
    browser.wait_js("document.readyState === 'complete'")
    target = json.dumps(f"{base}/review/{item}")
    outcomes = browser.js(f"""Promise.all([
        fetch({target}, {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
                          body: '{{"label": "dog"}}'}}).then(() => "sent", e => "blocked"),
        fetch({target}, {{method: "POST", mode: "no-cors", body: new URLSearchParams({{label: "dog"}})}})
            .then(() => "sent", e => "blocked"),
        fetch({target}, {{method: "POST", headers: {{"Content-Type": "application/json"}},
                          body: '{{"label": "dog"}}'}}).then(() => "sent", e => "blocked"),
    ])""")
    assert outcomes[:2] == ["sent", "sent"] and outcomes[2] == "blocked"  # (the preflight is not granted)
    queued = httpx.get(f"{base}/review/queue").json()
    assert item in [i["id"] for i in queued["items"]], "a cross-site request labelled the item"
    assert not any((proj / p.serve.reviewed_dir).rglob("*.png"))


# Scripts where the page shows data: in the token it is opened with, and in class names from a model card.
TOKEN = '"><img src=x onerror="window.__xss=\'token\'"><script>window.__xss="token"</script>'
EVIL_CLASSES = [
    "<img src=x onerror=\"window.__xss='class'\">",
    '"><svg onload="window.__xss=\'svg\'">',
    "<button autofocus onfocus=\"window.__xss='focus'\">",
    "${window.__xss='template'}",
]
MANY = [*EVIL_CLASSES, "zebra", "apple", "mango", "kiwi", "fig", "lime", "date", "pear"]  # 12: keys 1-9, 0, a, b
KEYS = "1234567890ab"
INJECTED = "document.querySelectorAll('img[src=\"x\"], svg, script:not([src]), [onerror], [onload]').length"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A server with auth on (the token itself a script) and a champion with 12 classes, 4 of them scripts."""
    root = tmp_path_factory.mktemp("hostile")
    proj = make_project(
        root / "proj",
        root,
        registry={"tracking_uri": f"sqlite:///{root / 'db'}"},
        serve={"auth_token_env": "VF_REVIEW_TEST_TOKEN"},
    )
    p = load_params(proj / "params.yaml")
    # ingest would refuse such names today; a card from an older ingest or another tool can still carry them
    register_champion(proj, p, MANY)
    os.environ["VF_REVIEW_TEST_TOKEN"] = TOKEN
    try:
        with _serving(p, proj) as base:
            yield proj, p, base
    finally:
        del os.environ["VF_REVIEW_TEST_TOKEN"]


def _fresh_queue(proj: Path, p, n: int, predicted: str = "zebra") -> list[str]:
    """An empty queue, then n items (written by the test into the server's own SQLite queue and image folder)."""
    queue = ReviewQueue(proj / p.serve.review_dir, proj / p.serve.reviewed_dir)
    with contextlib.closing(sqlite3.connect(queue.db)) as c, c:
        c.execute("DELETE FROM items")
    return [
        queue.add(
            png(1000 + i, size=16), model_version="1", predicted=predicted, confidence=0.1 + i / 1000, probabilities={}
        )
        for i in range(n)
    ]


def _open_review(browser: DevTools, base: str, n_buttons: int = len(MANY)) -> None:
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{base}/review?token={urllib.parse.quote(TOKEN)}")
    browser.wait_js(f"document.querySelectorAll('#buttons button').length === {n_buttons}")


def _pending(base: str) -> list[str]:
    r = httpx.get(f"{base}/review/queue", params={"limit": 500}, headers={"Authorization": f"Bearer {TOKEN}"})
    return [i["id"] for i in r.json()["items"]]


def test_scripts_in_the_token_and_in_class_names_do_not_run(hostile, browser):
    proj, p, base = hostile
    _fresh_queue(proj, p, 2, predicted=EVIL_CLASSES[0])
    _open_review(browser, base)
    browser.wait_js(
        "(() => { const i = document.getElementById('img'); return i && i.complete && i.naturalWidth > 0; })()"
    )  # the page works with that token
    # Every name is shown as the text it is, on its button and as the model's guess.
    shown = browser.js("[...document.querySelectorAll('#buttons button')].map(b => b.textContent)")
    assert shown == [f"{k} {c}" for k, c in zip(KEYS, MANY)]
    assert EVIL_CLASSES[0] in _text(browser, "guess")
    assert browser.js("window.__xss === undefined") and browser.js(INJECTED) == 0
    # The CSP holds even if markup got in: an inline handler added to the page does not run.
    browser.js("document.body.insertAdjacentHTML('beforeend', '<img src=\"data:,\" onerror=\"window.__csp=1\">')")
    time.sleep(0.3)  # (an error handler that could run would have run by now; nothing to wait on instead)
    assert browser.js("window.__csp === undefined")
    # A wrong token carrying a script: refused before any page, nothing reflected.
    browser.call("Page.navigate", url=f"{base}/review?token={urllib.parse.quote('<script>window.__xss=1</script>')}")
    browser.wait_js("document.readyState === 'complete' && document.body.textContent.includes('bearer token')")
    assert browser.js("window.__xss === undefined") and browser.js(INJECTED) == 0


def test_page_headers_and_csrf_rules(hostile):
    _, _, base = hostile
    auth = {"Authorization": f"Bearer {TOKEN}"}
    page = httpx.get(f"{base}/review", params={"token": TOKEN})
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "<script>" not in page.text
    assert httpx.get(f"{base}/review").status_code == 401
    item = _fresh_queue(*hostile[:2], 1)[0]
    url = f"{base}/review/{item}"
    body = json.dumps({"label": "zebra"})
    for headers, status in [
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
        ({"Content-Type": "application/json", "Origin": base.replace("127.0.0.1", "localhost")}, 403),
        ({"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403),
        ({"Content-Type": "application/json", "Sec-Fetch-Site": "same-site"}, 403),
        ({"Content-Type": "application/json"}, 401),
    ]:  # no token
        extra = {} if status == 401 else auth
        assert httpx.post(url, content=body, headers={**headers, **extra}).status_code == status, headers
        assert item in _pending(base)
    ok = httpx.post(
        url,
        content=body,
        headers={**auth, "Content-Type": "application/json", "Origin": base, "Sec-Fetch-Site": "same-origin"},
    )
    assert ok.status_code == 200, ok.text
    undo = httpx.post(f"{url}/undo", content="{}", headers={**auth, "Content-Type": "application/json"})
    assert undo.status_code == 200 and item in _pending(base)


def test_each_buttons_key_labels_that_button_and_undo_puts_it_back(hostile, browser):
    proj, p, base = hostile
    items = _fresh_queue(proj, p, len(MANY))
    _open_review(browser, base)
    reviewed = proj / p.serve.reviewed_dir
    keys = browser.js("[...document.querySelectorAll('#buttons button')].map(b => b.querySelector('kbd').textContent)")
    assert keys == list(KEYS), "the 10th class has key 0, the 11th and 12th letters"
    for n, (key, item) in enumerate(zip(KEYS, items)):
        assert _text(browser, "count") == f"{n + 1} of {len(items)}"
        _press(browser, key)
        label = MANY[n]
        browser.wait_js(f"document.getElementById('status').textContent === {json.dumps('saved ' + label)}")
        saved = [f.relative_to(reviewed).parts for f in reviewed.rglob("*.png")]
        assert (label, f"review_{item}.png") in saved, (key, label)
    browser.wait_js("!document.getElementById('empty').hidden")
    assert _pending(base) == []
    # Undo, twice (Backspace, then the button): the last two labels are taken back, the items shown again.
    _press(browser, "Backspace")
    browser.wait_js(f"document.getElementById('status').textContent === {json.dumps('undid ' + MANY[-1])}")
    assert _text(browser, "count") == f"{len(items)} of {len(items)}"
    _click(browser, "#undo")
    browser.wait_js(f"document.getElementById('status').textContent === {json.dumps('undid ' + MANY[-2])}")
    assert _text(browser, "count") == f"{len(items) - 1} of {len(items)}"
    assert sorted(_pending(base)) == sorted(items[-2:])
    assert not (reviewed / MANY[-1] / f"review_{items[-1]}.png").exists()
    _press(browser, "1")  # relabel the item now shown (the 11th) as the first class
    browser.wait_js(f"document.getElementById('status').textContent === {json.dumps('saved ' + MANY[0])}")
    assert (reviewed / MANY[0] / f"review_{items[-2]}.png").is_file() and _pending(base) == [items[-1]]


def test_the_page_walks_the_whole_queue_with_a_count(hostile, browser):
    proj, p, base = hostile
    n = 53  # past the page's 50 per fetch
    items = _fresh_queue(proj, p, n)
    _open_review(browser, base)
    for k in range(n):
        browser.wait_js(f"document.getElementById('count').textContent === '{k + 1} of {n}'")
        _press(browser, "5")
    browser.wait_js(f"document.getElementById('count').textContent === '{n} labelled'")
    assert not browser.js("document.getElementById('empty').hidden")
    assert _pending(base) == []
    saved = {f.name for f in (proj / p.serve.reviewed_dir / MANY[4]).glob("*.png")}
    assert {f"review_{i}.png" for i in items} <= saved


def test_docs_work_offline_behind_the_token(hostile, browser):
    _, _, base = hostile
    assert httpx.get(f"{base}/docs").status_code == 401
    assert httpx.get(f"{base}/openapi.json").status_code == 401
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{base}/docs?token={urllib.parse.quote(TOKEN)}")
    # Swagger UI rendered the API from this server's own files: the machine running the tests has no internet.
    browser.wait_js("[...document.querySelectorAll('.opblock-summary-path')].some(e => e.textContent === '/predict')")
    assert browser.js("document.querySelector('.info .title').textContent").startswith("visionflow")
    external = browser.js(
        "[...document.querySelectorAll('script[src], link[href], img[src]')]"
        ".map(e => e.src || e.href).filter(u => !u.startsWith(location.origin) "
        "&& !u.startsWith('data:') && !u.startsWith('blob:'))"
    )
    assert external == []
    assert browser.js("window.__xss === undefined")


def test_a_key_accepts_a_suspected_label_error_into_the_overrides_file(hostile, browser):
    """The label audit view: `a` accepts the suggested label, `k` keeps one; both are rows of the overrides file.
    The second suspect's labels and scope are markup, shown as text; `a` (also a class key of the queue view)
    labels nothing in the queue."""
    from visionflow.data.overrides import read_overrides
    from visionflow.monitoring.label_audit import write_suspects

    proj, p, base = hostile
    queued = _fresh_queue(proj, p, 1)
    rows = []
    for i, (label, suggested, scope) in enumerate(
        [("zebra", "apple", "train"), (EVIL_CLASSES[1], EVIL_CLASSES[0], EVIL_CLASSES[2])]
    ):
        image = proj / "data/raw" / f"suspect{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(png(500 + i))
        sha = hashlib.sha256(image.read_bytes()).hexdigest()
        rows.append(dict(rank=i + 1, path=f"data/raw/{image.name}", sha256=sha, label=label, suggested=suggested,
                         score=0.01, method="confident-learning", scope=scope))  # fmt: skip
    write_suspects(proj / p.review.audit_dir / "suspects-reviewed-b1.csv", rows)
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{base}/review?token={urllib.parse.quote(TOKEN)}#audit")
    browser.wait_js(
        "(() => { const i = document.getElementById('audit-img'); return i.complete && i.naturalWidth > 0; })()"
    )
    assert (_text(browser, "audit-label"), _text(browser, "audit-suggested")) == ("zebra", "apple")
    _press(browser, "a")
    browser.wait_js("document.getElementById('audit-status').textContent === 'accepted apple'")
    decided = read_overrides(proj / p.data.label_overrides)
    assert [(o.sha256, o.label, o.was, o.source) for o in decided.values()] == [
        (rows[0]["sha256"], "apple", "zebra", "review-page")
    ]
    assert _pending(base) == queued
    browser.wait_js(f"document.getElementById('audit-label').textContent === {json.dumps(EVIL_CLASSES[1])}")
    assert _text(browser, "audit-suggested") == EVIL_CLASSES[0] and EVIL_CLASSES[2] in _text(browser, "audit-method")
    assert browser.js("window.__xss === undefined") and browser.js(INJECTED) == 0
    _press(browser, "k")
    browser.wait_js("!document.getElementById('audit-empty').hidden")
    kept = read_overrides(proj / p.data.label_overrides)[rows[1]["sha256"]]
    assert kept.label == kept.was == EVIL_CLASSES[1]


@pytest.fixture
def detection_server(tmp_path, detector):
    """A real server on a detector champion (one whole-image box per class: cat 0.9, dog 0.4, fox 0.1)."""
    proj = make_project(
        tmp_path / "proj",
        tmp_path,
        base={"task": "detection"},
        registry={"tracking_uri": f"sqlite:///{tmp_path / 'db'}"},
    )
    p = load_params(proj / "params.yaml")
    register_detector(proj, p, detector[0], DETECTOR_CLASSES)
    with _serving(p, proj) as base:
        _wait_http(f"{base}/ready")
        yield proj, p, base


def _drag(browser: DevTools, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A real mouse drag on the box canvas, from and to points given in the canvas's own pixels."""
    left, top = browser.js(
        "(() => { const c = document.getElementById('boxes-canvas'); c.scrollIntoView({block: 'center'}); "
        "const r = c.getBoundingClientRect(); return [r.left, r.top]; })()"
    )
    steps = [("mousePressed", start), ("mouseMoved", ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)),
             ("mouseMoved", end), ("mouseReleased", end)]  # fmt: skip
    for kind, (x, y) in steps:
        browser.call("Input.dispatchMouseEvent", type=kind, x=left + x, y=top + y, button="left", clickCount=1)


def test_a_reviewer_fixes_the_boxes_of_an_image(detection_server, browser):
    """Relabel one predicted box (a click and a key), delete the other, draw the missing one with the mouse, save
    with Enter: data/reviewed/detection holds the image and the corrected boxes, as ingest reads them."""
    proj, p, base = detection_server
    upload = _rgb_png(50, 40)
    assert _post_image(base, upload)["review_id"]
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{base}/review")
    browser.wait_js("document.querySelectorAll('#box-list li').length === 2")
    browser.wait_js("document.getElementById('boxes-canvas').dataset.loaded !== ''")
    assert browser.js("document.getElementById('classify').hidden") is True
    assert browser.js("document.getElementById('boxes-canvas').width") == 400  # 50 px at the page's 8x
    labels = "[...document.querySelectorAll('#box-list select')].map(s => s.value)"
    assert browser.js(labels) == ["cat", "dog"]
    # The first box (cat) is wrong: select it in the list, press 3 (fox).
    _click(browser, "#box-list li:nth-child(1) .box-info")
    _press(browser, "3")
    browser.wait_js("document.getElementById('boxes-status').textContent === 'relabelled fox'")
    # The second (dog) is not there: delete it.
    _click(browser, "#box-list li:nth-child(2) button.delete")
    browser.wait_js("document.getElementById('boxes-status').textContent === 'deleted dog'")
    assert browser.js(labels) == ["fox"]
    # A missing dog: Esc (no box selected), 2 chooses dog for new boxes, a drag draws it.
    _press(browser, "Escape")
    _press(browser, "2")
    assert browser.js("document.getElementById('draw-class').value") == "dog"
    _drag(browser, (80, 40), (240, 200))  # canvas pixels: image pixels x 8
    browser.wait_js("document.getElementById('boxes-status').textContent === 'drew dog'")
    assert browser.js(labels) == ["fox", "dog"]
    _press(browser, "Enter")
    browser.wait_js("document.getElementById('boxes-status').textContent === 'saved 2 boxes'")
    browser.wait_js("!document.getElementById('boxes-empty').hidden")

    reviewed = proj / p.serve.reviewed_dir / "detection"
    sha = hashlib.sha256(upload).hexdigest()
    assert sorted(f.name for f in reviewed.iterdir()) == [f"{sha}.json", f"{sha}.png"]
    assert (reviewed / f"{sha}.png").read_bytes() == upload
    doc = json.loads((reviewed / f"{sha}.json").read_text())
    assert (doc["file"], doc["width"], doc["height"]) == (f"{sha}.png", 50, 40)
    (fixed, drawn) = doc["boxes"]
    assert fixed == [0, 0, 50, 40, "fox"]
    assert drawn[4] == "dog" and drawn[:4] == pytest.approx([10, 5, 20, 20], abs=0.25)
    # The next data version holds the image with the corrected boxes (ingest beside a few bundled scenes).
    from visionflow.config import parse_params
    from visionflow.tasks.detection.ingest import ingest

    raw = p.as_dict()
    raw["detection"].update(scenes=10, scene_size=64)
    assert ingest(parse_params(raw), proj).n_reviewed == 1
    coco = json.loads((proj / p.data.raw_dir / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    (entry,) = [i for i in coco["images"] if sha in i["file_name"]]
    got = sorted((names[a["category_id"]], a["bbox"]) for a in coco["annotations"] if a["image_id"] == entry["id"])
    assert [n for n, _ in got] == ["dog", "fox"] and got[1][1] == [0, 0, 50, 40]
    assert (proj / p.data.raw_dir / "images" / entry["file_name"]).read_bytes() == upload
    # Backspace takes the save back: the item is shown again and its files leave the labelled data.
    _press(browser, "Backspace")
    browser.wait_js("document.getElementById('boxes-status').textContent === 'undid the last save'")
    assert not any(reviewed.iterdir())
    assert browser.js("window.__xss === undefined") and browser.js(INJECTED) == 0


def _rgb_png(width: int, height: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()
