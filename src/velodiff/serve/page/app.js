// velodiff serve's page: fill the pickers from /api/options, submit /api/jobs, follow the job's
// server-sent events (progress bar, step previews), add finished images to the gallery. No framework.
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
    prompt: $("prompt").value, model: $("model").value, plan: $("plan").value || null,
    solver: $("solver").value, steps: num("steps"), guidance: num("guidance"), seed: num("seed"),
    n: num("n"), width: num("width"), height: num("height"), preview: true,
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
      `${p.steps} steps, guidance ${p.guidance}, plan ${p.plan || "none"}`;
    fig.append(img, cap);
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

$("cancel").addEventListener("click", () => {
  if (current) fetch(`/api/jobs/${current}/cancel`, { method: "POST" });
});

init().catch((e) => { $("status").textContent = `error: ${e}`; });
