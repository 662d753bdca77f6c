// scatlas cell search page: plain JavaScript, no build step, no external requests.
// Every query goes through the service's JSON API (/search, /search/expression, /annotate) or
// the page's endpoints (/cells/<id>, /query/h5ad, /map, /map/points), so errors are the API's
// 4xx messages, shown as text. A result by cell id has a stable URL: /?cell=<id>&k=<k>.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { health: null, map: null, mapImage: null, result: null, sortCol: null,
                sortDir: 1, query: 0 };

// ---------------------------------------------------------------------------------------------
// requests
// ---------------------------------------------------------------------------------------------

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    throw new Error(`the service did not answer (${err.message}); is scatlas serve running?`);
  }
  return readAnswer(resp.status, await resp.text());
}

function readAnswer(status, text) {
  let data = null;
  try { data = JSON.parse(text); } catch (err) { data = null; }
  if (status >= 400 || data === null) {
    const msg = data && data.error ? data.error : `unexpected answer (HTTP ${status})`;
    throw new Error(`${msg} [HTTP ${status}]`);
  }
  return data;
}

function upload(file, k, labelKey) {
  // XMLHttpRequest, not fetch: it reports upload progress.
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const params = new URLSearchParams({ k: String(k) });
    if (labelKey) params.set("label_key", labelKey);
    xhr.open("POST", `/query/h5ad?${params}`);
    xhr.setRequestHeader("content-type", "application/x-hdf5");
    const bar = $("progress");
    bar.hidden = false;
    bar.value = 0;
    xhr.upload.onprogress = (ev) => {
      if (ev.lengthComputable) {
        bar.value = Math.round((100 * ev.loaded) / ev.total);
        say(`Uploading ${file.name}: ${bar.value}%`);
      }
    };
    xhr.upload.onload = () => {
      bar.removeAttribute("value");  // indeterminate while the server embeds
      say(`Uploaded ${file.name}; embedding its cells and searching…`);
    };
    xhr.onload = () => {
      bar.hidden = true;
      try { resolve(readAnswer(xhr.status, xhr.responseText)); } catch (err) { reject(err); }
    };
    xhr.onerror = () => {
      bar.hidden = true;
      reject(new Error("the upload failed (connection closed; is the file over the limit?)"));
    };
    xhr.send(file);
  });
}

// ---------------------------------------------------------------------------------------------
// status and errors
// ---------------------------------------------------------------------------------------------

function say(text) { $("status").textContent = text; }

function showError(err) {
  const box = $("error");
  box.textContent = `Error: ${err.message || err}`;
  box.hidden = false;
  say("");
  document.body.dataset.state = "error";
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

async function busy(work) {
  clearError();
  document.body.dataset.state = "loading";
  const buttons = document.querySelectorAll("form button");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    await work();
    document.body.dataset.state = "done";
  } catch (err) {
    showError(err);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

function readK() {
  const text = $("k").value.trim();
  // sent as typed: the service checks it (an integer in [1, max_k]) and says what is wrong
  if (text === "") return 50;
  const n = Number(text);
  return Number.isFinite(n) ? n : text;
}

// ---------------------------------------------------------------------------------------------
// queries
// ---------------------------------------------------------------------------------------------

async function queryCell(cellText, k) {
  const label = $("label-key").value;
  say(`Looking up cell ${cellText}…`);
  const cell = await api("GET", `/cells/${encodeURIComponent(cellText)}`);
  say(`Searching the ${k} nearest cells of cell ${cell.id}…`);
  const emb = [cell.embedding];
  const [hits, ann] = await Promise.all([
    api("POST", "/search", { embeddings: emb, k }),
    label ? api("POST", "/annotate", { embeddings: emb, k, label_key: label }) : null,
  ]);
  const url = `/?cell=${cell.id}&k=${hits.k}` + (label ? `&label=${encodeURIComponent(label)}` : "");
  history.replaceState(null, "", url);
  await show({ names: [`cell ${cell.id}`], hits, ann, self: cell.id, queryXY: [cell.xy],
               url });
}

function parsePaste(text) {
  const genes = [];
  const counts = [];
  const lines = text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
  lines.forEach((line, i) => {
    const parts = line.split(/[\s,;:=]+/);
    if (parts.length !== 2) {
      throw new Error(`line ${i + 1} ("${line}") is not "GENE count"`);
    }
    const value = Number(parts[1]);
    if (!Number.isFinite(value)) {
      throw new Error(`line ${i + 1}: "${parts[1]}" is not a number`);
    }
    genes.push(parts[0]);
    counts.push(value);
  });
  if (!genes.length) throw new Error("paste at least one line \"GENE count\"");
  return { genes, counts };
}

async function queryPaste(text, k) {
  const label = $("label-key").value;
  const { genes, counts } = parsePaste(text);
  say(`Embedding the pasted cell (${genes.length} genes) and searching…`);
  const hits = await api("POST", "/search/expression",
                         { genes, counts: [counts], k, return_embeddings: true });
  const ann = label
    ? await api("POST", "/annotate", { embeddings: hits.embeddings, k, label_key: label })
    : null;
  history.replaceState(null, "", "/");
  await show({ names: ["pasted cell"], hits, ann, self: null, queryXY: [null], url: null });
}

async function queryUpload(file, k) {
  const label = $("label-key").value;
  const limit = state.health ? state.health.limits.max_body_bytes : Infinity;
  if (file.size > limit) {
    throw new Error(`${file.name} has ${file.size} bytes; the service accepts at most ` +
                    `${limit} bytes (scatlas serve --max-body-mb)`);
  }
  const out = await upload(file, k, label);
  history.replaceState(null, "", "/");
  const note = `${out.n_cells} cell(s) from ${file.name}; ${out.genes_matched} of the ` +
               `model's ${out.model_genes} genes found in the file`;
  await show({ names: out.cell_names, hits: out.search, ann: out.annotation || null,
               self: null, queryXY: out.cell_names.map(() => null), url: null, note });
}

// ---------------------------------------------------------------------------------------------
// results
// ---------------------------------------------------------------------------------------------

async function show(result) {
  if (state.map && state.map.available) {
    const pts = await api("POST", "/map/points", { ids: result.hits.ids });
    result.xy = pts.xy;
  }
  state.result = result;
  state.query = 0;
  state.sortCol = null;
  const pick = $("query-cell");
  pick.innerHTML = "";
  result.names.forEach((name, i) => pick.add(new Option(`${i}: ${name}`, String(i))));
  $("query-pick").hidden = result.names.length < 2;
  $("share").hidden = !result.url;
  if (result.url) {
    $("share-link").href = result.url;
    $("share-link").textContent = location.origin + result.url;
  }
  renderAll();
  $("results").hidden = false;
  const n = result.hits.ids.length;
  say(`${result.note ? result.note + ". " : ""}Showing the ${result.hits.k} nearest cells` +
      (n > 1 ? ` of each of ${n} query cells.` : "."));
}

function renderAll() {
  renderAnnotation();
  renderTable();
  renderBars();
  drawMap();
}

function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(digits);
  return String(v);
}

function renderAnnotation() {
  const box = $("annotation");
  const ann = state.result.ann;
  box.innerHTML = "";
  if (!ann) {
    box.textContent = "Choose a label column under Options to annotate the query.";
    return;
  }
  const p = ann.predictions[state.query];
  const dl = document.createElement("dl");
  const add = (term, value, cls, id) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    if (cls) dd.className = cls;
    if (id) dd.id = id;
    dl.append(dt, dd);
  };
  add(ann.label_key, fmt(p.label), "label-big", "annotation-label");
  add("confidence", `${(100 * p.confidence).toFixed(1)}% of the distance-weighted vote ` +
      `(k = ${ann.k})`, null, "annotation-confidence");
  add("ahead of the second label by", fmt(p.vs_second, 3));
  add("nearest distance", fmt(p.min_dist));
  const flag = p.is_ood === null ? "no threshold known" :
    (p.is_ood ? "out of distribution: no reference cell is close" : "within the atlas");
  add("out-of-distribution flag", flag, p.is_ood ? "ood" : "in-dist", "annotation-ood");
  if (ann.ood && ann.ood.ood_distance !== null && ann.ood.ood_distance !== undefined) {
    add("flag rule", `nearest distance > ${fmt(ann.ood.ood_distance)} (${ann.ood.ood_source})`);
  }
  box.append(dl);
  if (state.result.self !== null) {
    const s = document.createElement("p");
    s.textContent = `Cell ${state.result.self} is in the index: it is its own nearest hit, ` +
      "at distance 0, and its vote outweighs the others, so the label is its own. The " +
      "neighbours' labels are in the table below.";
    box.append(s);
  }
  if (ann.predictions.length > 1) {
    const tally = {};
    ann.predictions.forEach((q) => { tally[q.label] = (tally[q.label] || 0) + 1; });
    const s = document.createElement("p");
    s.textContent = "All query cells: " + Object.entries(tally).sort((a, b) => b[1] - a[1])
      .map(([l, c]) => `${l} ${c}`).join(", ") + ` (${ann.predictions.filter((q) => q.is_ood).length} out of distribution)`;
    box.append(s);
  }
}

function hitRows(q) {
  const h = state.result.hits;
  const rows = [];
  h.ids[q].forEach((id, j) => {
    if (id < 0) return;
    rows.push({ rank: j + 1, id, distance: h.distances[q][j],
                ...(h.metadata ? h.metadata[q][j] : {}) });
  });
  return rows;
}

function columns() {
  const cols = ["rank", "id", "distance"];
  return cols.concat(state.health ? state.health.metadata_columns : []);
}

function renderTable() {
  const cols = columns();
  const thead = $("neighbours").querySelector("thead");
  const tbody = $("neighbours").querySelector("tbody");
  thead.innerHTML = "";
  tbody.innerHTML = "";
  const tr = document.createElement("tr");
  cols.forEach((c) => {
    const th = document.createElement("th");
    th.scope = "col";
    const dir = state.sortCol === c ? (state.sortDir > 0 ? "ascending" : "descending") : "none";
    th.setAttribute("aria-sort", dir);
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = c + (dir === "ascending" ? " ▲" : dir === "descending" ? " ▼" : "");
    b.addEventListener("click", () => {
      state.sortDir = state.sortCol === c ? -state.sortDir : 1;
      state.sortCol = c;
      renderTable();
      thead.querySelector(`th[data-col="${CSS.escape(c)}"] button`).focus();
    });
    th.dataset.col = c;
    th.append(b);
    tr.append(th);
  });
  thead.append(tr);
  const rows = hitRows(state.query);
  if (state.sortCol) {
    const c = state.sortCol;
    rows.sort((a, b) => state.sortDir * compare(a[c], b[c]));
  }
  const k = state.result.hits.k;
  for (const row of rows) {
    const r = document.createElement("tr");
    if (row.id === state.result.self) r.className = "self";
    cols.forEach((c) => {
      const td = document.createElement("td");
      td.dataset.col = c;
      if (c === "id") {
        const a = document.createElement("a");
        a.href = `/?cell=${row.id}&k=${k}`;
        a.textContent = String(row.id);
        a.title = `search the neighbours of cell ${row.id}`;
        td.append(a);
      } else {
        td.textContent = fmt(row[c], c === "distance" ? 6 : 4);
      }
      if (typeof row[c] === "number") td.className = "num";
      r.append(td);
    });
    tbody.append(r);
  }
  $("hits-caption").textContent = `The ${rows.length} nearest cells of ` +
    `${state.result.names[state.query]}, closest first` +
    (state.result.self !== null ? " (the cell itself is the first hit)" : "") +
    ". Choose a column heading to sort.";
}

function compare(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined) return 1;
  if (b === null || b === undefined) return -1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}

function csvCell(v) {
  const s = v === null || v === undefined ? "" : String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function downloadCsv() {
  if (!state.result) return;
  const cols = columns();
  const lines = [["query", ...cols].map(csvCell).join(",")];
  state.result.names.forEach((name, q) => {
    for (const row of hitRows(q)) lines.push([name, ...cols.map((c) => row[c])].map(csvCell).join(","));
  });
  const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "scatlas_hits.csv";
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

function renderBars() {
  const box = $("bars");
  box.innerHTML = "";
  const col = $("group-by").value;
  if (!col || !state.result.hits.metadata) {
    box.textContent = "The index has no metadata to group the hits by.";
    return;
  }
  const tally = new Map();
  let total = 0;
  state.result.hits.metadata.forEach((row) => row.forEach((m) => {
    if (!m) return;
    const v = m[col] === null || m[col] === undefined ? "(missing)" : String(m[col]);
    tally.set(v, (tally.get(v) || 0) + 1);
    total += 1;
  }));
  const entries = [...tally.entries()].sort((a, b) => b[1] - a[1]).slice(0, 15);
  const top = entries.length ? entries[0][1] : 1;
  const list = document.createElement("div");
  list.setAttribute("role", "list");
  list.setAttribute("aria-label", `hits by ${col}`);
  for (const [name, n] of entries) {
    const row = document.createElement("div");
    row.className = "bar-row";
    row.setAttribute("role", "listitem");
    const pct = (100 * n) / total;
    row.innerHTML = '<span class="bar-name"></span><span class="bar-track"><span class="bar"></span></span><span class="num"></span>';
    row.children[0].textContent = name;
    row.children[0].title = name;
    row.querySelector(".bar").style.width = `${(100 * n) / top}%`;
    row.querySelector(".bar").style.display = "block";
    row.children[2].textContent = `${n} (${pct.toFixed(0)}%)`;
    row.setAttribute("aria-label", `${name}: ${n} hits, ${pct.toFixed(0)}%`);
    list.append(row);
  }
  box.append(list);
  if (tally.size > entries.length) {
    const p = document.createElement("p");
    p.textContent = `${tally.size - entries.length} more values not shown.`;
    box.append(p);
  }
}

function drawMap() {
  const canvas = $("map");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!state.map || !state.map.available) {
    ctx.fillStyle = "#4a4a4a";
    ctx.font = "14px sans-serif";
    ctx.fillText("No map stored with this index.", 20, 40);
    return;
  }
  if (state.mapImage) ctx.drawImage(state.mapImage, 0, 0);
  if (!state.result || !state.result.xy) return;
  // all hits faint, the selected query's hits strong, the query cell as a ring
  ctx.lineWidth = 1.5;
  state.result.xy.forEach((row, q) => {
    if (q === state.query) return;
    row.forEach((p) => { if (p) dot(ctx, p, 2.5, "rgba(0,0,0,0.35)", null); });
  });
  let shown = 0;
  (state.result.xy[state.query] || []).forEach((p) => {
    if (p) { dot(ctx, p, 4, "#000", "#ffd400"); shown += 1; }
  });
  const qxy = state.result.queryXY[state.query];
  if (qxy) {  // a red ring with a white halo, visible over any colour
    ctx.lineWidth = 6;
    dot(ctx, qxy, 11, "#fff", null);
    ctx.lineWidth = 3;
    dot(ctx, qxy, 11, "#a4161a", null);
  }
  $("map-note").textContent = `${state.map.method} map of ${state.map.n} cells, coloured by ` +
    `${state.map.color || "nothing"}; ${shown} hits of the selected query in yellow` +
    (qxy ? ", the query cell ringed in red." : ".");
  canvas.setAttribute("aria-label", $("map-note").textContent);
}

function dot(ctx, p, r, stroke, fill) {
  ctx.beginPath();
  ctx.arc(p[0], p[1], r, 0, 2 * Math.PI);
  if (fill) { ctx.fillStyle = fill; ctx.fill(); }
  if (stroke) { ctx.strokeStyle = stroke; ctx.stroke(); }
}

async function loadMap() {
  const color = $("label-key").value;
  const params = color ? `?color=${encodeURIComponent(color)}` : "";
  state.map = await api("GET", `/map${params}`);
  const legend = $("legend");
  legend.innerHTML = "";
  if (!state.map.available) {
    $("map-note").textContent = state.map.message;
    state.mapImage = null;
    drawMap();
    return;
  }
  for (const item of state.map.legend) {
    const li = document.createElement("li");
    li.innerHTML = '<span class="swatch" aria-hidden="true"></span><span></span>';
    li.children[0].style.background = item.colour;
    li.children[1].textContent = `${item.value} (${item.cells})`;
    legend.append(li);
  }
  const img = new Image();
  await new Promise((resolve) => {
    img.onload = resolve;
    img.onerror = resolve;
    img.src = `/map.png${params}`;
  });
  state.mapImage = img.complete && img.naturalWidth ? img : null;
  drawMap();
}

// ---------------------------------------------------------------------------------------------
// start
// ---------------------------------------------------------------------------------------------

async function start() {
  const h = await api("GET", "/health");
  state.health = h;
  $("facts").textContent = `${h.ntotal} cells, ${h.dim}-dimensional embeddings, ${h.metric} ` +
    `distance, ${h.engine} index; ` + (h.model_loaded
      ? `model loaded (${h.model_genes} genes, reads ${h.model_input}).`
      : "no model loaded: uploads and pasted expression are disabled.");
  $("max-id").textContent = String(h.ntotal - 1);
  $("max-mb").textContent = (h.limits.max_body_bytes / 2 ** 20).toFixed(0);
  $("k").max = String(h.limits.max_k);
  if (!h.model_loaded) {
    for (const id of ["go-upload", "go-paste", "upload", "paste"]) $(id).disabled = true;
  }
  const params = new URLSearchParams(location.search);
  const info = await api("GET", "/map");
  const labelSel = $("label-key");
  for (const c of h.metadata_columns) labelSel.add(new Option(c, c));
  labelSel.value = params.get("label") || info.label_column || "";
  const group = $("group-by");
  const groupCols = info.group_columns.concat(h.metadata_columns.filter(
    (c) => !info.group_columns.includes(c)));
  for (const c of groupCols) group.add(new Option(c, c));
  if (params.get("by")) group.value = params.get("by");
  await loadMap();
  if (params.has("k")) $("k").value = params.get("k");
  if (params.has("cell")) {
    $("cell-id").value = params.get("cell");
    await busy(() => queryCell(params.get("cell").trim(), readK()));
  } else {
    document.body.dataset.state = "ready";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("form-cell").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(() => queryCell($("cell-id").value.trim(), readK()));
  });
  $("form-upload").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const file = $("upload").files[0];
    busy(() => (file ? queryUpload(file, readK())
                     : Promise.reject(new Error("choose a .h5ad file first"))));
  });
  $("form-paste").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(() => queryPaste($("paste").value, readK()));
  });
  $("download").addEventListener("click", downloadCsv);
  $("group-by").addEventListener("change", () => { if (state.result) renderBars(); });
  $("query-cell").addEventListener("change", () => {
    state.query = Number($("query-cell").value);
    renderAll();
  });
  $("label-key").addEventListener("change", () => { busy(loadMap); });
  start().catch(showError);
});
