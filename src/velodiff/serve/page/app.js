// velodiff serve's page: fill the pickers from /api/options, submit /api/jobs, follow the job's
// server-sent events (progress bar, step previews), add finished images to the gallery, paint brush
// layers over a gallery image (/api/brush), and fill the form from an image's settings (/api/parameters).
// No framework.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value; o.textContent = label || value; select.appendChild(o);
}

async function init() {
  const r = await fetch("/api/options");
  const opts = await r.json();
  opts.models.forEach((m) => option($("model"), m));
  opts.solvers.forEach((s) => option($("solver"), s));
  opts.grids.forEach((g) => option($("grids"), g));
  opts.plans.forEach((p) => option($("plans"), p.name, `${p.name}: ${p.summary}`));
  const d = opts.defaults;
  $("solver").value = d.solver; $("steps").value = d.steps; $("guidance").value = d.guidance;
  $("width").value = d.width; $("height").value = d.height; $("n").max = opts.max_n;
  $("status").textContent = `ready: ${opts.models[0]}`;
  const jobs = await (await fetch("/api/jobs?state=done")).json();
  jobs.forEach(addToGallery);
  const reports = await (await fetch("/api/reports")).json();
  reports.forEach((r) => {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = r.url; a.textContent = r.path; a.target = "_blank";
    li.appendChild(a);
    if (r.kind === "png" || r.kind === "svg") {
      const img = document.createElement("img");
      img.src = r.url; img.alt = r.path; img.className = "plot"; img.loading = "lazy";
      li.appendChild(img);
    }
    $("reports").appendChild(li);
  });
  $("reports-section").hidden = reports.length === 0;
}

function body() {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  return {
    prompt: $("prompt").value, negative: $("negative").value || null, model: $("model").value,
    plan: $("plan").value || null, solver: $("solver").value, grid: $("grid").value || null,
    steps: num("steps"), guidance: num("guidance"), seed: num("seed"),
    n: num("n"), width: num("width"), height: num("height"), preview: true,
    layout: $("layout").value || null, layout_mode: $("layout_mode").value, noise: $("noise").value,
  };
}

function addToGallery(job) {
  const p = job.params;
  job.images.forEach((url, i) => {
    const fig = document.createElement("figure");
    fig.className = "result";
    const img = document.createElement("img");
    img.src = url; img.alt = p.prompt;
    const cap = document.createElement("figcaption");
    cap.textContent = `${p.prompt} | ${p.model} ${p.width}x${p.height} seed ${p.seed + i}, ${p.solver}, ` +
      `${p.steps} steps, guidance ${p.guidance}, plan ${p.plan || "none"}` +
      (p.layout ? `, layout ${p.kind === "collage" ? "collage" : "guidance"}` : "");
    const edit = document.createElement("button");
    edit.type = "button"; edit.className = "brush-open"; edit.textContent = "Brush";
    edit.addEventListener("click", () => openBrush(job, i, url));
    const reuse = document.createElement("button");
    reuse.type = "button"; reuse.className = "reuse"; reuse.textContent = "Reuse settings";
    reuse.addEventListener("click", async () => {
      const blob = await (await fetch(url)).blob();
      loadSettings(new File([blob], url.split("/").pop(), { type: blob.type }));
    });
    fig.append(img, cap, reuse);
    if (!p.layout) fig.append(edit);  // brushes repaint a plain generation's steps
    $("gallery").prepend(fig);
  });
}

function follow(job) {
  current = job.id;
  $("cancel").disabled = false;
  const es = new EventSource(`/api/jobs/${job.id}/events`);
  es.onmessage = (m) => {
    const ev = JSON.parse(m.data);
    if (ev.type === "progress") {
      $("progress").max = ev.steps; $("progress").value = ev.step;
      $("progress-text").textContent = `step ${ev.step} / ${ev.steps}`;
      if (ev.preview) $("preview").src = ev.preview;
    } else if (ev.type === "started") {
      $("progress-text").textContent = `running (batch of ${ev.batch})`;
    } else if (["done", "failed", "cancelled"].includes(ev.type)) {
      es.close(); $("cancel").disabled = true; current = null;
      if (ev.type === "done") {
        $("progress").value = $("progress").max;
        $("progress-text").textContent = "done";
        addToGallery(ev);
      } else {
        $("progress-text").textContent = ev.type; $("error").textContent = ev.error || ev.type;
      }
    } else if (ev.type === "status" && ev.state === "queued") {
      $("progress-text").textContent = "queued";
    }
  };
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("error").textContent = ""; $("progress").value = 0;
  const r = await fetch("/api/jobs", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body()),
  });
  const job = await r.json();
  if (!r.ok) { $("error").textContent = job.error; return; }
  follow(job);
});

// --- settings from an image: its A1111 infotext, read by the server (/api/parameters) ----------------
async function loadSettings(file) {
  const url = await new Promise((ok) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result);
    reader.readAsDataURL(file);
  });
  const r = await fetch("/api/parameters", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image: url }),
  });
  const got = await r.json();
  if (!r.ok) { $("load-info").textContent = got.error; return; }
  if (!got.parameters) { $("load-info").textContent = `no generation settings in ${file.name}`; return; }
  const q = got.request;
  const known = (select, v) => [...select.options].some((o) => o.value === v);
  if (q.solver && !known($("solver"), q.solver)) option($("solver"), q.solver);  // another tool's label
  if (q.model && !known($("model"), q.model)) delete q.model;  // a model this server does not serve
  ["prompt", "negative", "model", "plan", "solver", "grid", "steps", "guidance", "seed", "width", "height"]
    .forEach((k) => { if (k in q) $(k).value = q[k]; });
  $("n").value = q.n || 1;
  $("noise").value = q.noise || "velodiff";  // an image that says nothing of its noise: velodiff's
  const skipped = Object.entries(got.not_job_fields)  // what this page cannot run
    .map(([k, v]) => `${k} ${v}`);
  $("load-info").textContent = `settings of ${file.name} loaded` +
    (skipped.length ? ` (not applied here: ${skipped.join(", ")})` : "");
}

$("load").addEventListener("change", (e) => { if (e.target.files[0]) loadSettings(e.target.files[0]); });
$("form").addEventListener("dragover", (e) => e.preventDefault());
$("form").addEventListener("drop", (e) => {
  e.preventDefault();
  if (e.dataTransfer.files[0]) loadSettings(e.dataTransfer.files[0]);
});

$("cancel").addEventListener("click", () => {
  if (current) fetch(`/api/jobs/${current}/cancel`, { method: "POST" });
});

// --- the brush editor: strokes on a mask canvas, layers sent whole to /api/brush -------------------
let brush = null;   // {job, index, width, height, layers, image}
const view = $("brush-canvas");
const mask = document.createElement("canvas");
mask.width = view.width; mask.height = view.height;

function clearStroke() {
  const g = mask.getContext("2d");
  g.fillStyle = "black"; g.fillRect(0, 0, mask.width, mask.height);
  draw();
}

function draw() {
  const g = view.getContext("2d");
  g.imageSmoothingEnabled = false;
  g.clearRect(0, 0, view.width, view.height);
  if (brush && brush.image) g.drawImage(brush.image, 0, 0, view.width, view.height);
  g.globalAlpha = 0.45; g.globalCompositeOperation = "screen";
  g.drawImage(mask, 0, 0);
  g.globalAlpha = 1; g.globalCompositeOperation = "source-over";
}

function showImage(src) {
  const img = new Image();
  img.onload = () => { brush.image = img; draw(); };
  img.src = src;
}

function openBrush(job, index, url) {
  brush = { job: job.id, index, width: job.params.width, height: job.params.height, layers: [], image: null };
  $("brush-section").hidden = false; $("brush-info").textContent = ""; $("brush-layers").innerHTML = "";
  clearStroke(); showImage(url);
  $("brush-section").scrollIntoView();
  sendLayers([]);  // cache the base trajectory, so each layer costs only its own steps
}

let painting = false;
function paint(e) {
  if (!painting) return;
  const r = view.getBoundingClientRect();
  const x = (e.clientX - r.left) * (view.width / r.width), y = (e.clientY - r.top) * (view.height / r.height);
  const g = mask.getContext("2d");
  g.fillStyle = "white"; g.beginPath();
  g.arc(x, y, Number($("brush-size").value) / 2, 0, 2 * Math.PI); g.fill();
  draw();
}
view.addEventListener("pointerdown", (e) => { painting = true; paint(e); });
view.addEventListener("pointermove", paint);
window.addEventListener("pointerup", () => { painting = false; });

function maskPNG() {
  const small = document.createElement("canvas");
  small.width = brush.width; small.height = brush.height;
  const g = small.getContext("2d");
  g.drawImage(mask, 0, 0, small.width, small.height);
  return small.toDataURL("image/png");
}

async function sendLayers(layers) {
  $("brush-info").textContent = "painting…";
  const r = await fetch("/api/brush", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ job: brush.job, index: brush.index, layers }),
  });
  const out = await r.json();
  if (!r.ok) { $("brush-info").textContent = out.error; return false; }
  brush.layers = layers; showImage(out.image);
  $("brush-layers").innerHTML = "";
  layers.forEach((l) => {
    const li = document.createElement("li");
    li.textContent = `${l.prompt} (strength ${l.strength}, seed ${l.seed})`;
    $("brush-layers").appendChild(li);
  });
  $("brush-info").textContent = layers.length === 0 && out.rendered === 0
    ? `ready (base trajectory cached: ${out.base_nfe} network calls)`
    : `${out.nfe} network calls for ${out.rendered} new layer(s) (a generation: ${out.steps}); ` +
      `${out.seconds.toFixed(2)} s`;
  return true;
}

$("brush-apply").addEventListener("click", async () => {
  if (!brush) return;
  const layer = {
    mask: maskPNG(), prompt: $("brush-prompt").value, seed: Number($("brush-seed").value),
    strength: Number($("brush-strength").value),
  };
  if (await sendLayers([...brush.layers, layer])) clearStroke();
});
$("brush-clear").addEventListener("click", clearStroke);
$("brush-undo").addEventListener("click", () => { if (brush && brush.layers.length) sendLayers(brush.layers.slice(0, -1)); });

init().catch((e) => { $("status").textContent = `error: ${e}`; });
