"use strict";
// The review page's "label audit" view (#audit): the suspected label errors of the label audit, one at a time.
// As in review.js, everything the server sends (labels, paths, scopes, problems) is set as text, never parsed as
// HTML, and the token the page was opened with (?token=) goes on every request as an Authorization header.
(() => {
  const KEYS = "1234567890";  // the first ten classes' keys; letters are a (accept) and k (keep)
  const PAGE = 50;
  const token = new URLSearchParams(location.search).get("token");
  const auth = token ? {Authorization: "Bearer " + token} : {};
  const $ = id => document.getElementById(id);

  let suspects = [];  // fetched and not yet decided, in the audit's order
  let classes = [];
  let left = 0;       // undecided on the server, as of the last fetch, less what this page decided since
  let decided = 0;    // decided on this page
  let loaded = false;
  let busy = false;   // one request at a time
  let imageUrl = null;

  async function api(path, options = {}) {
    const r = await fetch(path, {...options, headers: {...auth, ...(options.headers || {})}});
    if (!r.ok) {
      let detail = "";
      try { detail = String((await r.json()).detail); } catch (_) { /* not JSON */ }
      const e = new Error(`error ${r.status}${detail ? ": " + detail : ""}`);
      e.status = r.status;
      e.detail = detail;
      throw e;
    }
    return r;
  }

  function say(text) { $("audit-status").textContent = text; }

  async function refill() {
    const d = await (await api(`/review/audit/suspects?limit=${PAGE}`)).json();
    suspects = d.suspects;
    left = d.total;
    loaded = true;
    $("audit-problems").replaceChildren(...d.problems.map(text => {
      const li = document.createElement("li");
      li.textContent = text;
      return li;
    }));
    if (JSON.stringify(d.classes) !== JSON.stringify(classes)) {
      classes = d.classes;
      buildButtons();
    }
  }

  function buildButtons() {
    $("audit-classes").replaceChildren(...classes.map((name, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.label = name;
      if (i < KEYS.length) {
        const k = document.createElement("kbd");
        k.textContent = KEYS[i];
        b.append(k, " ");
      }
      b.append(name);  // a text node
      b.addEventListener("click", () => decide(name));
      return b;
    }));
  }

  function cell(text) {
    const td = document.createElement("td");
    td.textContent = text;
    return td;
  }

  function score(s) { return typeof s.score === "number" ? s.score.toFixed(3) : "-"; }

  function render() {
    const s = suspects[0];
    $("suspect").hidden = !s;
    $("audit-empty").hidden = Boolean(s) || !loaded;
    $("audit-count").textContent = s ? `${decided + 1} of ${decided + left}` : `${decided} decided`;
    $("audit-rows").replaceChildren(...suspects.slice(1, 11).map(n => {
      const tr = document.createElement("tr");
      tr.append(cell(n.scope), cell(String(n.rank)), cell(n.label), cell(n.suggested), cell(score(n)));
      return tr;
    }));
    if (!s) return;
    $("audit-label").textContent = s.label;
    $("audit-suggested").textContent = s.suggested;
    $("audit-method").textContent = `${s.method}, ${s.scope}, rank ${s.rank}, score ${score(s)}`;
    $("audit-path").textContent = s.path;
    const known = classes.includes(s.suggested);
    $("accept").disabled = !known;
    $("accept").title = known ? "" : "the suggested label is not one of the model's classes";
    for (const b of $("audit-classes").children) b.disabled = b.dataset.label === s.label;
    showImage(s.id);
  }

  async function showImage(id) {
    const img = $("audit-img");
    img.removeAttribute("src");
    img.hidden = false;
    $("audit-missing").hidden = true;
    let blob;
    try {
      blob = await (await api(`/review/audit/image/${encodeURIComponent(id)}`)).blob();
    } catch (e) {
      if (!suspects.length || suspects[0].id !== id) return;
      img.hidden = true;
      $("audit-missing").hidden = false;
      $("audit-missing").textContent = `image not shown: ${e.detail || e.message}`;  // the row can still be decided
      return;
    }
    if (!suspects.length || suspects[0].id !== id) return;  // moved on meanwhile
    if (imageUrl) URL.revokeObjectURL(imageUrl);
    imageUrl = URL.createObjectURL(blob);
    img.src = imageUrl;
  }

  async function next() {
    if (!suspects.length) await refill();
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

  function decide(label) {
    return run(async () => {
      const s = suspects[0];
      if (!s) return;
      try {
        await api(`/review/audit/${encodeURIComponent(s.id)}`, {
          method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({label}),
        });
        decided += 1;
        say(label === s.label ? `kept ${label}` : label === s.suggested ? `accepted ${label}` : `set ${label}`);
      } catch (e) {
        if (e.status !== 409 && e.status !== 404) throw e;
        // someone was first (their decision stands), or a new audit no longer lists it: move on
        say(e.status === 409 ? `decided elsewhere meanwhile (${e.detail})` : "no longer a suspect");
      }
      suspects.shift();
      left -= 1;
      await next();
    });
  }

  function showView() {
    const audit = location.hash === "#audit";
    document.body.dataset.view = audit ? "audit" : "queue";
    $("queue-view").hidden = audit;
    $("audit-view").hidden = !audit;
    if (audit && !loaded) run(next);
  }

  document.addEventListener("keydown", e => {
    if (document.body.dataset.view !== "audit" || e.altKey || e.metaKey || e.ctrlKey || e.key.length !== 1) return;
    const s = suspects[0];
    if (!s) return;
    const key = e.key.toLowerCase();
    const i = KEYS.indexOf(key);
    if (key === "a" && classes.includes(s.suggested)) decide(s.suggested);
    else if (key === "k") decide(s.label);
    else if (i >= 0 && i < classes.length && classes[i] !== s.label) decide(classes[i]);
    else return;
    e.preventDefault();
  });
  $("accept").addEventListener("click", () => suspects[0] && decide(suspects[0].suggested));
  $("keep").addEventListener("click", () => suspects[0] && decide(suspects[0].label));
  window.addEventListener("hashchange", showView);
  showView();
})();
