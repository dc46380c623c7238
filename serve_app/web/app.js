// The page at `/`: a client of the public API like any other (GET /v1/styles, GET /openapi.json for the
// limits, POST /v1/images/generations and /v1/images/edits with stream: true, read as Server-Sent Events
// through fetch + ReadableStream). No libraries, no build step, nothing from outside this server.
"use strict";

// The Z-Image-Turbo Space's sizes (WIDTHxHEIGHT), grouped as it groups them; "Small" is ours, for small
// servers (the tiny CPU model): only sizes within the server's limits are offered.
const SIZE_GROUPS = [
  ["Small", ["256x256", "512x512", "768x512", "512x768"]],
  ["Standard", ["1024x1024", "1344x768", "768x1344", "1152x896", "896x1152", "1536x640", "1216x832", "832x1216"]],
  ["XL", ["1536x1536", "1920x1088", "1088x1920", "1536x1152", "1152x1536"]],
  ["Max", ["2048x2048", "2048x1152", "1152x2048", "2048x1536", "1536x2048"]],
];
const EXAMPLES = [
  "a red fox in the snow, morning light",
  "a lighthouse on a cliff at dawn, waves crashing",
  "a cozy reading nook with plants and warm lamps",
  "an astronaut riding a horse on mars",
  "a bowl of ramen, steam rising, top view",
];
const FIELDS = ["prompt", "negative_prompt", "style_preset", "size", "num_inference_steps", "n", "seed", "image", "strength"];
const $ = (id) => document.getElementById(id);

const state = { mode: "generate", limits: {}, styles: [], file: null, abort: null, history: [] };

function setMode(mode) {
  state.mode = mode;
  $("tab-generate").setAttribute("aria-selected", String(mode === "generate"));
  $("tab-transform").setAttribute("aria-selected", String(mode === "transform"));
  $("upload").hidden = mode !== "transform";
  $("go").textContent = mode === "generate" ? "Generate" : "Transform";
}

function fillSizes() {
  const { min_size = 16, max_size = 1 << 16, size_multiple = 16 } = state.limits;
  const sel = $("size");
  const previous = sel.value;
  sel.textContent = "";
  for (const [group, sizes] of SIZE_GROUPS) {
    const fit = sizes.filter((s) => s.split("x").every((v) => +v >= min_size && +v <= max_size && +v % size_multiple === 0));
    if (!fit.length) continue;
    const og = document.createElement("optgroup");
    og.label = group;
    for (const s of fit) og.append(new Option(s.replace("x", " × "), s));
    sel.append(og);
  }
  const want = [previous, "1024x1024", state.limits.default_size].find((s) => s && [...sel.options].some((o) => o.value === s));
  if (want) sel.value = want;
}

function fillStyles() {
  const sel = $("style_preset");
  sel.textContent = "";
  for (const s of state.styles) sel.append(new Option(s.name, s.id));
  showTemplate();
}

function showTemplate() {
  const s = state.styles.find((x) => x.id === $("style_preset").value);
  $("style-template").textContent = s && s.template !== "{prompt}" ? "Adds: " + s.template.replace("{prompt}", "…") : "";
}

async function loadServerInfo() {
  try {
    const [styles, schema] = await Promise.all([fetch("/v1/styles").then((r) => r.json()), fetch("/openapi.json").then((r) => r.json())]);
    state.styles = styles.data || [];
    state.limits = (schema.info && schema.info["x-limits"]) || {};
    const size = schema.components?.schemas?.ImageGenerationRequest?.properties?.size?.description || "";
    const m = size.match(/default (\d+x\d+)/);
    if (m) state.limits.default_size = m[1];
  } catch (e) {
    state.styles = [{ id: "none", name: "None", template: "{prompt}" }];
    showError({ message: "Could not read the server's styles and limits: " + e.message });
  }
  fillStyles();
  fillSizes();
  const steps = $("steps");
  if (state.limits.max_steps) steps.max = Math.min(16, state.limits.max_steps);
  if (state.limits.max_n) $("n").max = Math.min(4, state.limits.max_n);
}

// ---- errors: next to the field the API names ({"error": {"message", "type", "param", "code"}}) ----
function clearErrors() {
  for (const f of FIELDS.concat("general")) {
    const e = $("err-" + f);
    if (e) e.textContent = "";
  }
  document.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
}

function fieldInput(param) {
  return { num_inference_steps: $("steps"), image: $("image"), mask: $("image") }[param] || $(param);
}

function showError(err) {
  const param = err && err.param;
  const slot = (param && $("err-" + (param === "mask" ? "image" : param))) || $("err-general");
  slot.textContent = (err && err.message) || "Something went wrong.";
  const input = param && fieldInput(param);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

// ---- the request -------------------------------------------------------------------------
function requestFields() {
  const fields = {
    prompt: $("prompt").value,
    size: $("size").value,
    num_inference_steps: +$("steps").value,
    n: +$("n").value,
    stream: true,
    partial_images: 2,
  };
  const neg = $("negative_prompt").value.trim();
  if (neg) fields.negative_prompt = neg;
  if ($("style_preset").value && $("style_preset").value !== "none") fields.style_preset = $("style_preset").value;
  if ($("seed-fixed").checked) fields.seed = $("seed").value === "" ? NaN : +$("seed").value;
  if (state.mode === "transform") fields.strength = +$("strength").value;
  return fields;
}

function buildRequest(fields) {
  if (state.mode === "generate") {
    return ["/v1/images/generations", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(fields) }];
  }
  const form = new FormData();
  if (state.file) form.append("image", state.file, state.file.name || "image.png");
  for (const [k, v] of Object.entries(fields)) form.append(k, String(v));
  return ["/v1/images/edits", { method: "POST", body: form }];
}

// Server-Sent Events from a fetch body: blocks separated by a blank line, `event:` and `data:` lines.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function setBusy(busy) {
  $("go").disabled = busy;
  $("cancel").hidden = !busy;
  $("form").setAttribute("aria-busy", String(busy));
}

function status(text, fraction) {
  $("status").textContent = text;
  if (fraction !== undefined) $("progress").value = fraction;
}

async function run() {
  clearErrors();
  const fields = requestFields();
  if (state.mode === "transform" && !state.file) {
    showError({ message: "Choose or drop an image to transform.", param: "image" });
    return;
  }
  if ("seed" in fields && !(Number.isSafeInteger(fields.seed) && fields.seed >= 0)) {
    showError({ message: "The seed must be a whole number from 0 to 2^53 - 1.", param: "seed" });
    return;
  }
  const [url, init] = buildRequest(fields);
  const abort = new AbortController();
  state.abort = abort;
  setBusy(true);
  $("progress-box").hidden = false;
  $("previews").textContent = "";
  status("Sending…", 0);
  const started = performance.now();
  const n = fields.n;
  const steps = {};
  const done = [];
  try {
    const response = await fetch(url, { ...init, signal: abort.signal });
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON */ }
      showError((body && body.error) || { message: `The server answered ${response.status}.` });
      status("Failed.", 0);
      return;
    }
    for await (const { data } of readEvents(response)) {
      const type = data.type || "";
      if (type === "error") {
        showError(data.error);
        status("Failed.", 0);
        return;
      }
      if (type.endsWith(".progress")) {
        steps[data.image_index] = data;
        const total = Object.values(steps).reduce((a, p) => a + (p.steps ? p.step / p.steps : 0), 0) / n;
        const words = { encoding: "Encoding the prompt", queued: `Queued (${data.queue_position} ahead)`, denoising: `Step ${data.step} of ${data.steps}`, decoding: "Decoding" };
        status((n > 1 ? `Image ${data.image_index + 1} of ${n}: ` : "") + (words[data.stage] || data.stage), total);
      } else if (type.endsWith(".partial_image")) {
        showPreview(data);
      } else if (type.endsWith(".completed")) {
        done.push(data);
        status(`Done ${done.length} of ${n}`, 1);
      }
    }
    if (done.length) {
      const elapsed = (performance.now() - started) / 1000;
      showResults(done, fields, elapsed);
      status(`Done in ${elapsed.toFixed(1)} s`, 1);
    }
  } catch (e) {
    if (e.name === "AbortError") status("Cancelled.", 0);
    else { showError({ message: "The connection failed: " + e.message }); status("Failed.", 0); }
  } finally {
    state.abort = null;
    setBusy(false);
  }
}

function dataUrl(ev) {
  return `data:image/${ev.output_format};base64,${ev.b64_json}`;
}

function showPreview(ev) {
  const id = "preview-" + ev.image_index;
  let img = $(id);
  if (!img) {
    img = document.createElement("img");
    img.id = id;
    $("previews").append(img);
  }
  img.src = dataUrl(ev);
  img.alt = `Preview of image ${ev.image_index + 1} at step ${ev.step} of ${ev.steps}`;
  img.dataset.step = ev.step;
}

function card(ev, fields) {
  const li = document.createElement("article");
  li.className = "card";
  const img = document.createElement("img");
  img.src = dataUrl(ev);
  img.alt = `Result: ${fields.prompt}`;
  img.dataset.seed = ev.seed;
  img.dataset.size = ev.size;
  const meta = document.createElement("div");
  meta.className = "meta";
  const t = ev.timings || {};
  const line = (text, cls) => { const p = document.createElement("p"); p.textContent = text; if (cls) p.className = cls; return p; };
  meta.append(
    line(`Seed ${ev.seed} · ${ev.size}`, "seed-line"),
    line(`Total ${(t.total_s || 0).toFixed(2)} s (DiT ${(t.denoiser_s || 0).toFixed(2)} s, VAE ${(t.vae_s || 0).toFixed(2)} s, text ${(t.text_encoder_s || 0).toFixed(2)} s, queue ${(t.queue_s || 0).toFixed(2)} s)`),
  );
  if (ev.revised_prompt) meta.append(line("Prompt sent: " + ev.revised_prompt, "revised"));
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "Reuse seed";
  reuse.className = "reuse";
  reuse.addEventListener("click", () => {
    $("seed-fixed").checked = true;
    $("seed").disabled = false;
    $("seed").value = ev.seed;
    $("seed").focus();
  });
  const dl = document.createElement("a");
  dl.href = img.src;
  dl.download = `z-image-${ev.seed}.${ev.output_format === "jpeg" ? "jpg" : ev.output_format}`;
  dl.textContent = "Download";
  meta.append(reuse, dl);
  li.append(img, meta);
  return li;
}

function showResults(events, fields, elapsed) {
  const gallery = $("gallery");
  gallery.textContent = "";
  events.sort((a, b) => a.image_index - b.image_index);
  for (const ev of events) {
    gallery.append(card(ev, fields));
    state.history.unshift({ ev, fields });
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.title = `Seed ${ev.seed}, ${ev.size}: ${fields.prompt}`;
    const img = document.createElement("img");
    img.src = dataUrl(ev);
    img.alt = `Seed ${ev.seed}, ${ev.size}`;
    b.append(img);
    b.addEventListener("click", () => { gallery.textContent = ""; gallery.append(card(ev, fields)); });
    li.append(b);
    $("history").prepend(li);
  }
}

// ---- the upload (Transform) ----------------------------------------------------------------
function takeFile(file) {
  if (!file) return;
  state.file = file;
  const img = $("upload-preview");
  img.src = URL.createObjectURL(file);
  img.hidden = false;
  $("drop-text").textContent = file.name + " — drop another to replace it";
  $("err-image").textContent = "";
}

function wire() {
  $("tab-generate").addEventListener("click", () => setMode("generate"));
  $("tab-transform").addEventListener("click", () => setMode("transform"));
  $("steps").addEventListener("input", () => ($("steps-out").value = $("steps").value));
  $("strength").addEventListener("input", () => ($("strength-out").value = (+$("strength").value).toFixed(2)));
  $("style_preset").addEventListener("change", showTemplate);
  for (const r of document.getElementsByName("seed_mode")) r.addEventListener("change", () => ($("seed").disabled = !$("seed-fixed").checked));
  $("image").addEventListener("change", () => takeFile($("image").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); takeFile(e.dataTransfer.files[0]); });
  const examples = document.querySelector(".examples");
  for (const text of EXAMPLES) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.addEventListener("click", () => { $("prompt").value = text; $("prompt").focus(); });
    examples.append(b);
  }
  $("form").addEventListener("submit", (e) => { e.preventDefault(); if (!state.abort) run(); });
  $("cancel").addEventListener("click", () => state.abort && state.abort.abort());
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); if (!state.abort) run(); }
  });
}

wire();
setMode("generate");
loadServerInfo();
