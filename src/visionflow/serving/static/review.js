"use strict";
// The review page. Everything the server sends (class names, ids, versions) is set as text or as element
// properties, never parsed as HTML; the page's Content-Security-Policy would refuse inline script anyway.
// The token the page was opened with (?token=) goes on every request as an Authorization header; images are
// fetched with it and shown from blob: URLs.

const KEYS = "1234567890abcdefghijklmnopqrstuvwxyz";  // the 1st..36th button's key: 1-9, 0, then letters
const PAGE = 50;
const token = new URLSearchParams(location.search).get("token");
const auth = token ? {Authorization: "Bearer " + token} : {};
const $ = id => document.getElementById(id);

let items = [];    // the pending items fetched and not yet labelled, least confident first
let classes = [];
let pending = 0;   // pending on the server, as of the last fetch, less what this page labelled since
const done = [];   // what this page labelled, for undo: {item, label}
let busy = false;  // one request at a time: a second key press while one is saving is ignored
let imageUrl = null;

class ApiError extends Error {
  constructor(status, detail) { super(`error ${status}${detail ? ": " + detail : ""}`); this.status = status; }
}

async function api(path, options = {}) {
  const r = await fetch(path, {...options, headers: {...auth, ...(options.headers || {})}});
  if (!r.ok) {
    let detail = "";
    try { detail = String((await r.json()).detail); } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, detail);
  }
  return r;
}

function postJson(path, body) {
  return api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

function say(text) { $("status").textContent = text; }

async function refill() {
  // Labelled items leave the pending set, so the first page is always the next one: this walks the whole queue.
  const d = await (await api(`/review/queue?limit=${PAGE}`)).json();
  if (d.task === "detection") {  // a detector is served: the box review (review_boxes.js) takes this view
    document.body.dataset.task = "detection";
    $("classify").hidden = true;
    window.dispatchEvent(new Event("vf-box-review"));
    return;
  }
  items = d.items;
  pending = d.total;
  if (JSON.stringify(d.classes) !== JSON.stringify(classes)) {
    classes = d.classes;
    buildButtons();
  }
}

function buildButtons() {
  const box = $("buttons");
  box.replaceChildren();
  classes.forEach((name, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.label = name;
    if (i < KEYS.length) {
      const k = document.createElement("kbd");
      k.textContent = KEYS[i];
      b.dataset.key = KEYS[i];
      b.append(k, " ");
    }
    b.append(name);  // a text node: whatever the name holds is shown, not run
    b.addEventListener("click", () => label(name));
    box.append(b);
  });
}

function render() {
  const it = items[0];
  $("item").hidden = !it;
  $("empty").hidden = Boolean(it);
  $("undo").disabled = done.length === 0;
  $("count").textContent = it ? `${done.length + 1} of ${done.length + pending}` : `${done.length} labelled`;
  if (!it) return;
  const guess = document.createElement("strong");
  guess.textContent = it.predicted;
  $("guess").replaceChildren(`model v${it.model_version} guessed `, guess,
                             ` (${(100 * it.confidence).toFixed(1)}%)`);
  if (it.challenger_version) {  // a shadow disagreement: the challenger's other answer, as text
    const other = document.createElement("strong");
    other.textContent = it.challenger_predicted;
    $("guess").append(`; challenger v${it.challenger_version} said `, other,
                      ` (${(100 * it.challenger_confidence).toFixed(1)}%)`);
  }
  for (const b of $("buttons").children) b.classList.toggle("guess", b.dataset.label === it.predicted);
  showImage(it.id);
}

async function showImage(id) {
  const img = $("img");
  img.removeAttribute("src");
  const blob = await (await api(`/review/image/${encodeURIComponent(id)}`)).blob();
  if (!items.length || items[0].id !== id) return;  // moved on meanwhile
  if (imageUrl) URL.revokeObjectURL(imageUrl);
  imageUrl = URL.createObjectURL(blob);
  img.src = imageUrl;
}

async function next() {
  if (!items.length) await refill();
  render();
}

async function run(action) {
  if (busy) return;
  busy = true;
  try {
    await action();
  } catch (e) {
    say(e.message);
  } finally {
    busy = false;
  }
}

function label(name) {
  return run(async () => {
    const it = items[0];
    if (!it) return;
    try {
      await postJson(`/review/${encodeURIComponent(it.id)}`, {label: name});
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) throw e;
      items.shift();  // labelled elsewhere meanwhile: move on
      pending -= 1;
      say(`already labelled elsewhere`);
      await next();
      return;
    }
    items.shift();
    pending -= 1;
    done.push({item: it, label: name});
    say(`saved ${name}`);
    await next();
  });
}

function undo() {
  return run(async () => {
    const last = done[done.length - 1];
    if (!last) return;
    await postJson(`/review/${encodeURIComponent(last.item.id)}/undo`, {});
    done.pop();
    items.unshift(last.item);
    pending += 1;
    say(`undid ${last.label}`);
    render();
  });
}

document.addEventListener("keydown", e => {
  // the label audit's keys are audit.js's, the box review's review_boxes.js's
  if (document.body.dataset.view === "audit" || document.body.dataset.task === "detection" || e.altKey || e.metaKey) {
    return;
  }
  if (e.key === "Backspace" || (e.ctrlKey && e.key.toLowerCase() === "z")) {
    e.preventDefault();
    undo();
    return;
  }
  if (e.ctrlKey || e.key.length !== 1) return;
  const i = KEYS.indexOf(e.key.toLowerCase());
  if (i >= 0 && i < classes.length) {
    e.preventDefault();
    label(classes[i]);
  }
});
$("undo").addEventListener("click", undo);
run(next);
