// GAIR studio: plain JavaScript over the service's own /v1 API (no framework, no build step, no CDN).
// Every URL is relative to the page, so the studio works under any route prefix. When the service
// requires a key, the page asks for it once and keeps it in sessionStorage (never in a URL); images are
// fetched with the key and shown from blob: URLs.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "tokenfactory.apiKey";
const state = { concepts: [], picked: new Set(), last: null, previewAlpha: null };

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function status(message) { $("status").textContent = message; }

async function api(path, body) {
  const init = body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) };
  const r = await fetch(path, init);
  if (r.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
    throw new Error("This service needs an API key: enter it above.");
  }
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
    if (r.status === 429) message += ` (busy: retry in ${r.headers.get("Retry-After") || "a few"} s)`;
    throw new Error(message);
  }
  return r;
}

async function imageUrl(path) {
  const r = await api(path);
  return URL.createObjectURL(await r.blob());
}

function img(alt, className) {
  const el = document.createElement("img");
  el.alt = alt;
  if (className) el.className = className;
  return el;
}

async function fill(el, path) {
  try {
    el.src = await imageUrl(path);
  } catch (e) {
    el.alt += " (unavailable)";
  }
}

// --- concepts ------------------------------------------------------------------------------------------
async function loadConcepts() {
  const body = await (await api("v1/tokens")).json();
  state.concepts = body.tokens.sort((a, b) => a.concept_id.localeCompare(b.concept_id));
  status(`${state.concepts.length} concepts served (registry version ${body.registry_version})`);
  renderConcepts();
}

function renderConcepts() {
  const q = $("concept-search").value.trim().toLowerCase();
  const list = $("concept-list");
  list.replaceChildren();
  for (const c of state.concepts) {
    if (q && !c.concept_id.toLowerCase().includes(q) && !c.parent.toLowerCase().includes(q)) continue;
    const li = document.createElement("li");
    li.className = "concept";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = `pick-${c.concept_id}`;
    box.checked = state.picked.has(c.concept_id);
    box.addEventListener("change", () => {
      box.checked ? state.picked.add(c.concept_id) : state.picked.delete(c.concept_id);
      renderChosen();
    });
    const label = document.createElement("label");
    label.htmlFor = box.id;
    label.textContent = `${c.concept_id} (${c.parent})`;
    const thumbs = document.createElement("span");
    thumbs.className = "thumbs";
    for (let k = 0; k < c.thumbnails; k++) {
      const t = img(`reference ${k + 1} of ${c.concept_id}`, "thumb");
      thumbs.append(t);
      fill(t, `v1/tokens/${encodeURIComponent(c.concept_id)}/thumbnails/${k}`);
    }
    li.append(box, label, thumbs);
    list.append(li);
  }
}

function renderChosen() {
  const ids = [...state.picked];
  $("chosen").textContent = ids.length ? `Query: ${ids.join(" + ")} + your intent`
    : "No concept picked yet: tick one or more on the left.";
}

// --- GAIR ----------------------------------------------------------------------------------------------
async function runGair(extra) {
  const ids = [...state.picked];
  if (!ids.length) { showError("Pick at least one concept first."); return; }
  showError("");
  $("progress").hidden = false;
  $("progress-text").textContent = extra.mode === "manual" ? `generating at α = ${extra.alpha}…`
    : "generating previews for every balance and choosing one…";
  $("run-gair").disabled = true;
  try {
    const body = { concept_ids: ids, intent: $("intent").value, top_k: 8, previews: 2, steps: 12, ...extra };
    const res = await (await api("v1/gair", body)).json();
    state.last = res;
    renderSteps(res);
    await renderResults(res.ranking);
    $("balance").hidden = false;
    if (extra.mode !== "manual") { $("alpha").value = res.alpha; }
    $("alpha-value").textContent = res.alpha;
    status(`α = ${res.alpha} (registry version ${res.registry_version})`);
  } catch (e) {
    showError(e.message);
  } finally {
    $("progress").hidden = true;
    $("run-gair").disabled = false;
  }
}

function renderSteps(res) {
  const steps = $("steps");
  steps.replaceChildren();
  for (const s of res.steps) {
    const row = document.createElement("div");
    row.className = "step" + (s.alpha === res.alpha ? " chosen" : "");
    row.dataset.alpha = s.alpha;
    const head = document.createElement("p");
    // Why this α was (not) chosen: what its query retrieved first, then what its previews show.
    const top = s.retrieved && s.retrieved.length ? s.retrieved[0].id : "nothing";
    const fmt = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));
    head.textContent = `α = ${s.alpha}: finds ${top} (like the concept ${fmt(s.retrieved_fidelity)}, ` +
      `matches the intent ${fmt(s.retrieved_intent)}); previews: fidelity ${fmt(s.fidelity)}, ` +
      `intent ${fmt(s.intent)}${s.admitted === false ? "; vetoed: intent too far from the best α's" : ""}` +
      `${s.alpha === res.alpha ? " (chosen)" : ""}`;
    row.append(head);
    s.previews.forEach((b64, i) => {
      const fig = document.createElement("figure");
      const p = img(`preview ${i + 1} at α = ${s.alpha}`, "preview");
      p.src = `data:image/png;base64,${b64}`;
      const use = document.createElement("button");
      use.type = "button";
      use.textContent = "Use this preview";
      use.addEventListener("click", () => runGair({ mode: "manual", alpha: s.alpha, expand: 0.5, expand_with: [i] }));
      fig.append(p, use);
      row.append(fig);
    });
    steps.append(row);
  }
}

async function renderResults(ranking) {
  const ol = $("results");
  ol.replaceChildren();
  for (const item of ranking) {
    const li = document.createElement("li");
    li.className = "result";
    li.dataset.id = item.id;
    const t = img(`gallery item ${item.id}`, "thumb");
    const caption = document.createElement("span");
    caption.textContent = `${item.id} · ${item.score.toFixed(3)}`;
    li.append(t, caption);
    ol.append(li);
    fill(t, `v1/items/${encodeURIComponent(item.id)}/thumbnail`);
  }
}

// --- classify ------------------------------------------------------------------------------------------
function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(new Error("could not read the file"));
    reader.readAsDataURL(file);
  });
}

async function classify(file) {
  showError("");
  const ol = $("classify-results");
  ol.replaceChildren();
  try {
    const res = await (await api("v1/classify", { image: await fileToBase64(file), top_k: 5 })).json();
    for (const c of res.concepts) {
      const li = document.createElement("li");
      li.className = "classified";
      const t = img(`reference of ${c.concept_id}`, "thumb");
      const text = document.createElement("span");
      text.textContent = `${c.concept_id} (${c.parent}) · ${c.score.toFixed(3)}`;
      li.append(t, text);
      ol.append(li);
      const known = state.concepts.find((x) => x.concept_id === c.concept_id);
      if (known && known.thumbnails) fill(t, `v1/tokens/${encodeURIComponent(c.concept_id)}/thumbnails/0`);
    }
  } catch (e) {
    showError(e.message);
  }
}

// --- wiring --------------------------------------------------------------------------------------------
async function begin() {
  const auth = await (await fetch("v1/auth", { headers: headers() })).json();
  if (auth.key_required && !auth.key_valid) {
    if (sessionStorage.getItem(KEY)) showError("That key was not accepted.");
    sessionStorage.removeItem(KEY);
    $("key-form").hidden = false;
    $("api-key").focus();
    status("This service needs an API key.");
    return;
  }
  await loadConcepts();
}

function start() {
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("api-key").value);
    $("api-key").value = "";
    $("key-form").hidden = true;
    showError("");
    begin().catch((e) => showError(e.message));
  });
  $("concept-search").addEventListener("input", renderConcepts);
  $("gair-form").addEventListener("submit", (ev) => { ev.preventDefault(); runGair({ mode: "auto", refine: Number($("refine").value) }); });
  $("alpha").addEventListener("change", () => {
    $("alpha-value").textContent = $("alpha").value;
    runGair({ mode: "manual", alpha: Number($("alpha").value) });
  });
  $("classify-file").addEventListener("change", (ev) => { if (ev.target.files[0]) classify(ev.target.files[0]); });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    if (ev.dataTransfer.files[0]) classify(ev.dataTransfer.files[0]);
  });
  begin().catch((e) => showError(e.message));
}

start();
