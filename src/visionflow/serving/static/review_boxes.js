"use strict";
// The review page's box review, shown in the queue view when the server serves a detector (review.js hands over
// with the "vf-box-review" event): one image at a time with its predicted boxes drawn on a canvas; a person
// relabels, deletes or draws boxes and saves them. As in review.js, everything the server sends (class names,
// ids, versions) is set as text or drawn on the canvas as text, never parsed as HTML, and the token the page was
// opened with (?token=) goes on every request as an Authorization header.
(() => {
  const KEYS = "1234567890";  // the first ten classes' keys; letters are commands (n: next box)
  const PAGE = 50;
  const MAX_SIDE = 640;  // the canvas's longer side in screen pixels (small images are enlarged up to 8x)
  const MIN_DRAG = 4;    // screen pixels: a shorter drag is a click, which selects the box under it
  const token = new URLSearchParams(location.search).get("token");
  const auth = token ? {Authorization: "Bearer " + token} : {};
  const $ = id => document.getElementById(id);
  const canvas = $("boxes-canvas");

  let items = [];     // pending items fetched and not yet saved, least certain first
  let classes = [];
  let pending = 0;    // pending on the server, as of the last fetch, less what this page saved since
  const done = [];    // items this page saved, for undo
  let boxes = [];     // the shown item's boxes as edited: {bbox: [x, y, w, h] in image pixels, label, score|null}
  let selected = -1;
  let scale = 1;      // screen pixels per image pixel
  let image = null;   // the shown item's image, once loaded
  let imageUrl = null;
  let drag = null;    // the box being drawn, {x0, y0, x1, y1} in image pixels
  let busy = false;   // one request at a time

  async function api(path, options = {}) {
    const r = await fetch(path, {...options, headers: {...auth, ...(options.headers || {})}});
    if (!r.ok) {
      let detail = "";
      try { detail = String((await r.json()).detail); } catch (_) { /* not JSON */ }
      const e = new Error(`error ${r.status}${detail ? ": " + detail : ""}`);
      e.status = r.status;
      throw e;
    }
    return r;
  }

  function postJson(path, body) {
    return api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  }

  function say(text) { $("boxes-status").textContent = text; }

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

  function option(name, i) {
    const o = document.createElement("option");
    o.value = name;
    o.textContent = i < KEYS.length ? `${KEYS[i]} ${name}` : name;  // text: whatever the name holds is shown
    return o;
  }

  async function refill() {
    const d = await (await api(`/review/boxes/queue?limit=${PAGE}`)).json();
    items = d.items;
    pending = d.total;
    if (JSON.stringify(d.classes) !== JSON.stringify(classes)) {
      classes = d.classes;
      $("draw-class").replaceChildren(...classes.map(option));
    }
  }

  async function next() {
    if (!items.length) await refill();
    show();
  }

  function show() {
    const it = items[0];
    $("boxes-item").hidden = !it;
    $("boxes-empty").hidden = Boolean(it);
    $("boxes-undo").disabled = done.length === 0;
    $("boxes-count").textContent = it ? `${done.length + 1} of ${done.length + pending}` : `${done.length} reviewed`;
    if (!it) return;
    boxes = it.boxes.map(b => ({bbox: b.bbox.slice(), label: b.label, score: b.score}));
    selected = -1;
    image = null;
    canvas.dataset.loaded = "";
    scale = Math.min(MAX_SIDE / Math.max(it.width, it.height), 8);
    canvas.width = Math.round(it.width * scale);
    canvas.height = Math.round(it.height * scale);
    refresh();
    loadImage(it.id);
  }

  async function loadImage(id) {
    const blob = await (await api(`/review/boxes/image/${encodeURIComponent(id)}`)).blob();
    if (!items.length || items[0].id !== id) return;  // moved on meanwhile
    if (imageUrl) URL.revokeObjectURL(imageUrl);
    imageUrl = URL.createObjectURL(blob);
    const img = new Image();
    img.onload = () => {
      if (!items.length || items[0].id !== id) return;
      image = img;
      canvas.dataset.loaded = id;
      draw();
    };
    img.src = imageUrl;
  }

  function refresh() {
    listBoxes();
    draw();
  }

  function draw() {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (image) ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    boxes.forEach((b, i) => {
      const text = b.score === null ? b.label : `${b.label} ${b.score.toFixed(2)}`;
      outline(ctx, b.bbox, i === selected ? "#e0e" : b.score === null ? "#0a0" : "#f80", text, i);
    });
    if (drag) outline(ctx, rect(drag), "#08f", "", 0);
  }

  function outline(ctx, [x, y, w, h], colour, text, i) {
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.strokeRect(x * scale, y * scale, w * scale, h * scale);
    if (!text) return;
    ctx.font = "13px sans-serif";
    ctx.fillStyle = colour;
    ctx.fillText(text, x * scale + 3, y * scale + 14 + 15 * (i % 4), Math.max(w * scale - 6, 20));  // (canvas text)
  }

  function listBoxes() {
    $("box-list").replaceChildren(...boxes.map((b, i) => {
      const li = document.createElement("li");
      li.classList.toggle("selected", i === selected);
      const pick = document.createElement("select");
      pick.setAttribute("aria-label", "class of this box");
      pick.append(...classes.map(option));
      pick.value = b.label;
      pick.addEventListener("change", () => {
        b.label = pick.value;
        selected = i;
        pick.blur();  // the page's keys work again
        refresh();
      });
      const info = document.createElement("span");
      info.className = "box-info";
      const where = b.bbox.map(v => Math.round(v)).join(", ");
      info.textContent = `${b.score === null ? "drawn" : "score " + b.score.toFixed(2)} [${where}]`;
      const del = document.createElement("button");
      del.type = "button";
      del.className = "delete";
      del.textContent = "Delete";
      del.addEventListener("click", e => { e.stopPropagation(); remove(i); });
      li.addEventListener("click", e => {
        if (e.target.tagName === "SELECT") return;
        selected = i;
        refresh();
      });
      li.append(pick, " ", info, " ", del);
      return li;
    }));
  }

  function remove(i) {
    if (i < 0 || i >= boxes.length) return;
    const [b] = boxes.splice(i, 1);
    selected = -1;
    say(`deleted ${b.label}`);
    refresh();
  }

  function relabel(name) {
    if (selected >= 0) {
      boxes[selected].label = name;
      say(`relabelled ${name}`);
      refresh();
    } else {
      $("draw-class").value = name;
    }
  }

  // Drawing: a drag on the canvas, in image pixels, kept inside the image.
  function at(e) {
    const r = canvas.getBoundingClientRect();
    const it = items[0];
    const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
    return [clamp((e.clientX - r.left) / scale, it.width), clamp((e.clientY - r.top) / scale, it.height)];
  }

  function rect(d) {
    const round = v => Math.round(v * 100) / 100;
    return [round(Math.min(d.x0, d.x1)), round(Math.min(d.y0, d.y1)), round(Math.abs(d.x1 - d.x0)),
            round(Math.abs(d.y1 - d.y0))];
  }

  function pickAt(x, y) {  // the smallest box under the point
    let best = -1;
    boxes.forEach(({bbox: [bx, by, bw, bh]}, i) => {
      const inside = x >= bx && x <= bx + bw && y >= by && y <= by + bh;
      if (inside && (best < 0 || bw * bh < boxes[best].bbox[2] * boxes[best].bbox[3])) best = i;
    });
    selected = best;
    refresh();
  }

  canvas.addEventListener("mousedown", e => {
    if (!items.length || e.button !== 0) return;
    e.preventDefault();
    const [x, y] = at(e);
    drag = {x0: x, y0: y, x1: x, y1: y};
  });
  window.addEventListener("mousemove", e => {
    if (!drag) return;
    [drag.x1, drag.y1] = at(e);
    draw();
  });
  window.addEventListener("mouseup", e => {
    if (!drag) return;
    [drag.x1, drag.y1] = at(e);
    const d = drag;
    drag = null;
    const [x, y, w, h] = rect(d);
    if (w * scale < MIN_DRAG || h * scale < MIN_DRAG || w < 1 || h < 1) {
      pickAt(d.x0, d.y0);
      return;
    }
    const label = $("draw-class").value;
    boxes.push({bbox: [x, y, w, h], label, score: null});
    selected = boxes.length - 1;
    say(`drew ${label}`);
    refresh();
  });

  function save() {
    return run(async () => {
      const it = items[0];
      if (!it) return;
      const sent = boxes.map(b => ({bbox: b.bbox, label: b.label}));
      try {
        await postJson(`/review/boxes/${encodeURIComponent(it.id)}`, {boxes: sent});
      } catch (e) {
        if (e.status !== 404) throw e;
        say("already reviewed elsewhere");
      }
      items.shift();
      pending -= 1;
      done.push(it);
      say(`saved ${sent.length} boxes`);
      await next();
    });
  }

  function undo() {
    return run(async () => {
      const last = done[done.length - 1];
      if (!last) return;
      await postJson(`/review/boxes/${encodeURIComponent(last.id)}/undo`, {});
      done.pop();
      items.unshift(last);
      pending += 1;
      show();
      say("undid the last save");
    });
  }

  document.addEventListener("keydown", e => {
    if (document.body.dataset.task !== "detection" || document.body.dataset.view === "audit") return;
    if (e.altKey || e.metaKey || e.ctrlKey || e.target.tagName === "SELECT" || !items.length && e.key !== "Backspace") {
      return;
    }
    const i = KEYS.indexOf(e.key);
    if (e.key === "Enter") save();
    else if (e.key === "Backspace") undo();
    else if (e.key === "Delete" || e.key === "x") remove(selected);
    else if (e.key === "Escape") { selected = -1; refresh(); }
    else if (e.key === "n" && boxes.length) { selected = (selected + 1) % boxes.length; refresh(); }
    else if (i >= 0 && i < classes.length) relabel(classes[i]);
    else return;
    e.preventDefault();
  });
  $("boxes-save").addEventListener("click", save);
  $("boxes-undo").addEventListener("click", undo);
  window.addEventListener("vf-box-review", () => {
    $("boxes-view").hidden = false;
    run(next);
  });
})();
