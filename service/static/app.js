// vitserve's page: sends an image to POST /v1/explain and renders what the service decided and saw.
// Only the public API is used (GET /v1/models, POST /v1/explain, GET /v1/route), so the page shows
// what any client gets. Route fields are rendered when present and skipped when not: the router
// may add or drop fields without breaking the page.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { answer: null };

// Route fields in display order, with how to show each; unknown extra fields are listed after them.
const ROUTE_FIELDS = [
  ["model", "backbone", String],
  ["entry", "entry", String],
  ["pool", "attention", String],
  ["shape", "shape served", (v) => (Array.isArray(v) ? v.join(" × ") : String(v))],
  ["bucket", "bucket", (v) => `${v} × ${v}`],
  ["resized", "resized to", (v) => `${v[0]} × ${v[1]} (h × w)`],
  ["resize_mode", "resize", String],
  ["scale", "scale", (v) => `×${Number(v).toFixed(3)}`],
  ["padding", "padding", (v) => (typeof v === "number" ? `${(100 * v).toFixed(1)} %` : JSON.stringify(v))],
  ["detail", "detail", (v) => (typeof v === "number" ? `${(100 * v).toFixed(1)} %` : String(v))],
  ["tokens", "tokens", String],
  ["image_tokens", "image tokens", String],
  ["expected_ms", "expected", (v) => `${Number(v).toFixed(1)} ms`],
  ["degraded", "degraded", (v) => (v ? "yes" : "no")],
];
const HIDDEN_ROUTE_FIELDS = new Set(["reason", "candidates", "estimate"]);
const TIMINGS = [
  ["decode_ms", "decode"],
  ["preprocess_ms", "preprocess"],
  ["queue_and_inference_ms", "queue + inference"],
];

function setStatus(text, kind) {
  $("status").textContent = text;
  document.body.dataset.state = kind;
}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

function describe(list, pairs) {
  list.replaceChildren();
  for (const [term, value, cls] of pairs) {
    list.append(element("dt", cls ? { class: cls } : {}, term), element("dd", {}, value));
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    const error = body.error || body.detail;
    if (typeof error === "string") return error;
    if (error && error.message) return `${error.code}: ${error.message}`;
    return JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    const body = await response.json();
    const parts = Object.entries(body.backbones).map(([name, buckets]) => {
      const entry = body.models.find((m) => m.backbone === name);
      return `${name} (${entry ? entry.pool : "?"}): ${buckets.join(", ")}`;
    });
    $("models").textContent = `${body.ready ? "ready" : "loading"} · ${parts.join(" · ")}`;
  } catch (error) {
    $("models").textContent = `could not list models: ${error}`;
  }
}

async function explain(file) {
  const form = new FormData();
  form.append("image", file, file.name || "pasted-image");
  const params = new URLSearchParams({ top_k: $("top-k").value || "5" });
  if ($("route-override").value) params.set("route", $("route-override").value);
  setStatus(`explaining ${file.name || "pasted image"} (${Math.round(file.size / 1024)} KiB)…`, "busy");
  $("photo").src = URL.createObjectURL(file);
  const started = performance.now();
  const response = await fetch(`/v1/explain?${params}`, { method: "POST", body: form });
  const roundTrip = performance.now() - started;
  if (!response.ok) {
    setStatus(`${response.status}: ${await errorMessage(response)}`, "error");
    return;
  }
  const answer = await response.json();
  answer.roundTripMs = roundTrip;
  state.answer = answer;
  const candidates = answer.route.candidates || (await routeCandidates(answer, params));
  render(answer, candidates);
  setStatus(`${answer.image.format} ${answer.image.width} × ${answer.image.height}, answered in ${roundTrip.toFixed(0)} ms`, "done");
}

async function routeCandidates(answer, params) {
  const query = new URLSearchParams({ width: answer.image.width, height: answer.image.height });
  if (params.get("route")) query.set("route", params.get("route"));
  const response = await fetch(`/v1/route?${query}`);
  return response.ok ? (await response.json()).candidates || [] : [];
}

function render(answer, candidates) {
  $("result").hidden = false;
  renderTopK(answer.predictions);
  renderRoute(answer.route, answer);
  renderCandidates(candidates, answer.route);
  renderTimings(answer.timings, answer.roundTripMs);
  $("heatmap-method").textContent = `· ${answer.heatmap.method.replaceAll("_", " ")}`;
  const flat = answer.heatmap.values.flat();
  const peak = Math.max(...flat) * flat.length;
  $("heatmap-note").textContent =
    `${answer.heatmap.grid[0]} × ${answer.heatmap.grid[1]} cells of ${answer.heatmap.cell_pixels} px at the model input; ` +
    `colours span min to max, the peak cell holds ${peak.toFixed(2)}× the mean (1× is a flat map)`;
  if ($("photo").complete && $("photo").naturalWidth) drawHeatMap();
}

function renderTopK(predictions) {
  const list = $("topk");
  list.replaceChildren();
  for (const p of predictions) {
    const bar = element("span", { class: "bar" });
    bar.append(element("span", { style: `width: ${(100 * p.score).toFixed(1)}%` }));
    const item = element("li", { "data-label": p.label, "data-score": p.score });
    item.append(element("span", { class: "label", title: p.label }, p.label), bar, element("span", { class: "num" }, `${(100 * p.score).toFixed(1)} %`));
    list.append(item);
  }
}

function renderRoute(route, answer) {
  const pairs = [];
  for (const [key, label, format] of ROUTE_FIELDS) {
    if (route[key] !== undefined && route[key] !== null) pairs.push([label, format(route[key])]);
  }
  const known = new Set(ROUTE_FIELDS.map(([key]) => key));
  for (const [key, value] of Object.entries(route)) {
    if (!known.has(key) && !HIDDEN_ROUTE_FIELDS.has(key) && typeof value !== "object") pairs.push([key, String(value)]);
  }
  pairs.push(["actual", `${answer.timings.total_ms.toFixed(1)} ms server, ${answer.roundTripMs.toFixed(1)} ms round trip`]);
  describe($("route"), pairs);
  $("route").dataset.pool = route.pool;
  $("route").dataset.model = route.model;
  $("route-reason").textContent = route.reason || "";
}

function candidateValue(c) {
  if (c.expected_ms !== undefined) return [c.expected_ms, "ms expected"];
  return [c.cost, c.cost_unit === "seconds" ? "s" : c.cost_unit || ""];
}

function candidateLabel(c) {
  const shape = c.shape ? (Array.isArray(c.shape) ? c.shape.join("×") : c.shape) : `${c.bucket}`;
  return `${c.model} ${shape}`;
}

function renderCandidates(candidates, route) {
  const box = $("candidates");
  box.replaceChildren();
  if (!candidates.length) {
    box.textContent = "no candidates reported";
    return;
  }
  const rowHeight = 18;
  const labelWidth = 150;
  const width = 420;
  const values = candidates.map((c) => candidateValue(c)[0]);
  const max = Math.max(...values) || 1;
  const svgNs = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNs, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${rowHeight * candidates.length + 4}`);
  candidates.forEach((c, i) => {
    const [value, unit] = candidateValue(c);
    const chosen = c.model === route.model && (c.shape ? String(c.shape) === String(route.shape) : c.bucket === route.bucket);
    const y = i * rowHeight + 2;
    const label = document.createElementNS(svgNs, "text");
    label.setAttribute("x", 0);
    label.setAttribute("y", y + 12);
    label.textContent = candidateLabel(c);
    const bar = document.createElementNS(svgNs, "rect");
    bar.setAttribute("x", labelWidth);
    bar.setAttribute("y", y + 2);
    bar.setAttribute("height", rowHeight - 6);
    bar.setAttribute("width", Math.max(1, ((width - labelWidth - 80) * value) / max));
    bar.setAttribute("class", chosen ? "chosen" : "other");
    const number = document.createElementNS(svgNs, "text");
    number.setAttribute("x", labelWidth + ((width - labelWidth - 80) * value) / max + 4);
    number.setAttribute("y", y + 12);
    number.textContent = `${Number(value).toPrecision(3)} ${unit}`;
    const group = document.createElementNS(svgNs, "g");
    group.setAttribute("data-chosen", chosen);
    group.append(label, bar, number);
    svg.append(group);
  });
  box.append(svg);
}

function renderTimings(timings, roundTrip) {
  const parts = TIMINGS.filter(([key]) => timings[key] !== undefined).map(([key, label]) => [key, label, timings[key]]);
  const network = Math.max(0, roundTrip - timings.total_ms);
  parts.push(["network_ms", "network + client", network]);
  const total = parts.reduce((sum, [, , ms]) => sum + ms, 0) || 1;
  const bar = $("timing-bar");
  bar.replaceChildren(...parts.map(([key, label, ms]) => element("span", { class: key, title: `${label}: ${ms.toFixed(1)} ms`, style: `width: ${(100 * ms) / total}%` })));
  describe($("timings"), [...parts.map(([key, label, ms]) => [label, `${ms.toFixed(1)} ms`, key]), ["server total", `${timings.total_ms.toFixed(1)} ms`]]);
}

// A perceptual ramp (dark blue → teal → yellow → red) from the map's minimum to its maximum; alpha
// grows with relevance so the photo stays visible where the model did not look.
const RAMP = [[48, 18, 120], [33, 145, 140], [253, 231, 37], [220, 40, 30]];
function colour(t) {
  const x = Math.min(0.999, Math.max(0, t)) * (RAMP.length - 1);
  const i = Math.floor(x);
  const f = x - i;
  return RAMP[i].map((c, k) => Math.round(c + f * (RAMP[i + 1][k] - c)));
}

function drawHeatMap() {
  const answer = state.answer;
  if (!answer) return;
  const photo = $("photo");
  const canvas = $("heatmap");
  const width = photo.clientWidth;
  const height = photo.clientHeight;
  canvas.width = width;
  canvas.height = height;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const { values, grid, box } = answer.heatmap;
  const [rows, cols] = grid;
  const flat = values.flat();
  const max = Math.max(...flat);
  const min = Math.min(...flat);
  const range = max - min || 1;
  const opacity = Number($("opacity").value) / 100;
  const cells = document.createElement("canvas");
  cells.width = cols;
  cells.height = rows;
  const cellContext = cells.getContext("2d");
  const image = cellContext.createImageData(cols, rows);
  flat.forEach((v, i) => {
    const t = (v - min) / range;
    const [r, g, b] = colour(t);
    image.data.set([r, g, b, Math.round(255 * opacity * (0.15 + 0.85 * t))], 4 * i);
  });
  cellContext.putImageData(image, 0, 0);
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, width, height);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(cells, box[0] * width, box[1] * height, (box[2] - box[0]) * width, (box[3] - box[1]) * height);
  const painted = context.getImageData(0, 0, width, height).data.filter((_, i) => i % 4 === 3 && _ > 0).length;
  Object.assign(canvas.dataset, { rendered: "true", grid: `${rows}x${cols}`, painted: String(painted), max: String(max) });
}

function pickFirstImage(items) {
  for (const item of items) {
    const file = item instanceof File ? item : item.getAsFile && item.getAsFile();
    if (file && file.type.startsWith("image/")) return file;
  }
  return null;
}

function start(file) {
  if (!file) {
    setStatus("that is not an image file", "error");
    return;
  }
  explain(file).catch((error) => setStatus(`request failed: ${error}`, "error"));
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => start(event.target.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    start(pickFirstImage(event.dataTransfer.files));
  });
  document.addEventListener("paste", (event) => start(pickFirstImage(event.clipboardData.items)));
  $("photo").addEventListener("load", drawHeatMap);
  $("opacity").addEventListener("input", drawHeatMap);
  window.addEventListener("resize", drawHeatMap);
  loadModels();
}

wire();
