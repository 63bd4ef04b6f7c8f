// cync-mitm web console: polls /api/devices and /api/rollout, follows /api/events (SSE).
// No framework and no build step; every value is written with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
const MAX_ROWS = 300;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function pct(v, digits = 2) {
  return v === null || v === undefined ? "–" : (v * 100).toFixed(digits) + " %";
}

function ago(iso) {
  if (!iso) return "–";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 1) return "now";
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function clock(iso) {
  const d = new Date(iso);
  return isNaN(d) ? "" : d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

// Cync colour temperature 0 (warm) … 100 (cool), as a CSS colour for the swatch.
function tempColour(t) {
  const warm = [255, 170, 90], cool = [205, 225, 255], k = Math.min(100, Math.max(0, t)) / 100;
  const c = warm.map((w, i) => Math.round(w + (cool[i] - w) * k));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function stateText(s) {
  if (!s) return "unknown";
  const colour = s.color && s.color.rgb ? "rgb " + s.color.rgb : s.color ? "temp " + s.color.temp : "";
  return (s.on ? "on" : "off") + " " + s.brightness + " % " + colour;
}

function stateCell(d) {
  const td = el("td", null, "state");
  const s = d.state;
  if (!s) {
    td.append(el("span", "unknown", "muted"));
    return td;
  }
  const sw = el("span", null, "swatch");
  sw.style.background = !s.on ? "transparent" : s.color && s.color.rgb ? s.color.rgb : tempColour(s.color ? s.color.temp : 50);
  td.append(sw, el("span", stateText(s), s.on ? "" : "off"));
  if (d.mesh_count) td.append(el("span", ` +${d.mesh_count} mesh`, "muted"));
  td.title = "reported " + ago(d.state_at) + (d.firmware ? ", firmware " + d.firmware : "");
  return td;
}

// ---- devices --------------------------------------------------------------------------------

let devices = [];

function renderDevices() {
  const q = $("dev-filter").value.trim().toLowerCase();
  const body = document.createDocumentFragment();
  let shown = 0;
  for (const d of devices) {
    const why = d.fell_back ? "fell back to legacy" : d.connect_reason_text + (d.mirror ? ", mirrored" : "");
    const hay = [d.device_id, d.path, why, stateText(d.state)].join(" ").toLowerCase();
    if (q && !hay.includes(q)) continue;
    shown++;
    const tr = el("tr");
    tr.dataset.device = d.device_id;
    tr.dataset.path = d.path;
    tr.append(el("td", d.device_id, "mono"));
    tr.append(el("td", d.path, "path-" + d.path));
    const w = el("td", why);
    if (d.would_move) w.append(el("span", " → " + d.current_path + " on reconnect", "muted"));
    tr.append(w);
    tr.append(el("td", ago(d.since)));
    tr.append(stateCell(d));
    tr.append(el("td", d.frames_per_second.toFixed(1), "num"));
    const lf = d.last_frame;
    const l = el("td", lf ? `${lf.type} ${lf.name} ${lf.direction === "device_to_cloud" ? "↑" : "↓"} ${ago(lf.at)}` : "–");
    tr.append(l);
    body.append(tr);
  }
  const tbody = $("devices").tBodies[0];
  tbody.replaceChildren(body);
  $("dev-empty").hidden = devices.length > 0;
  $("devices-h").textContent = `Devices (${q ? shown + " of " : ""}${devices.length})`;
}

async function pollDevices() {
  const r = await fetch("api/devices", { cache: "no-store" });
  if (!r.ok) throw new Error("GET /api/devices: " + r.status);
  const d = await r.json();
  devices = d.devices;
  $("s-mode").textContent = d.mode;
  $("s-canary").textContent = d.canary_percent + " %";
  $("s-generation").textContent = d.generation;
  $("s-devices").textContent = d.counts.devices;
  $("s-paths").textContent = `${d.counts.legacy} / ${d.counts.new}`;
  $("s-mirrored").textContent = d.counts.mirrored;
  $("s-fps").textContent = d.frames_per_second.toFixed(1);
  if (d.console) stream.rateCapped = d.console.dropped_rate;
  renderDevices();
}

// ---- rollout, SLOs, parity, decisions --------------------------------------------------------

function statusText(st) {
  if (!st) return "";
  switch (st.state) {
    case "baking": return `baking, ${st.left_secs} s left`;
    case "holding": return `holding (${st.gate}): ${st.why}`;
    default: return st.state.replace("_", " ");
  }
}

function decisionText(x) {
  const parts = [];
  if (x.action) {
    const [k, v] = Object.entries(x.action)[0];
    if (k === "advance") parts.push(`advance ${v.from} → ${v.to}`);
    else if (k === "rollback") parts.push("ROLLBACK: " + (v.reason || ""));
    else parts.push(k + (v && v.reason ? ": " + v.reason : ""));
  }
  if (x.rollout) parts.push(`step ${x.rollout.at}: ${statusText(x.rollout.status)}`);
  if (x.violations && x.violations.length) parts.push("violations: " + x.violations.map((v) => typeof v === "string" ? v : JSON.stringify(v)).join(", "));
  if (x.override) parts.push("override in force");
  return parts.join(" · ") || `canary ${x.canary_percent} % (${x.mode})`;
}

function renderRollout(d) {
  const ro = d.rollout, ctl = d.slo.control || {};
  const steps = $("steps");
  steps.replaceChildren();
  if (ro.enabled) {
    ro.steps.forEach((s, i) => {
      const li = el("li", s.at, i < ro.step ? "done" : i === ro.step ? "current" : "");
      li.title = `bake ${s.bake_secs} s, min budget ${s.min_budget}`;
      steps.append(li);
    });
    $("rollout-status").textContent = (ro.paused ? "paused · " : "") + statusText(ro.status);
  } else {
    $("rollout-status").textContent = `rollout off ([rollout] enabled = false); mode ${ctl.mode}, canary ${ctl.canary_percent} % (file: ${ctl.file_canary_percent} %)`;
  }
  const ov = ctl.override;
  const banner = $("banner");
  banner.hidden = !ov;
  if (ov) banner.textContent = `Rolled back by ${ov.by} at ${ov.at}: ${ov.reason}. Every device is on the legacy path until the override is cleared.`;
  $("clear").disabled = !ov;
  $("rollback").disabled = !!ov;
  // Follows the file's value unless someone is editing it.
  const inp = $("canary-input"), fileValue = String(ctl.file_canary_percent ?? "");
  if (document.activeElement !== inp && (inp.value === "" || inp.value === inp.dataset.server)) inp.value = fileValue;
  inp.dataset.server = fileValue;

  const tbody = document.createDocumentFragment();
  for (const s of d.slo.slos || []) {
    const e = s.evaluation, tr = el("tr");
    tr.dataset.sli = s.slo_name;
    tr.dataset.transport = s.transport;
    const short = e.burns && e.burns.length ? e.burns[0][1].rate : null;
    tr.append(el("td", s.slo_name), el("td", s.transport, "path-" + s.transport),
      el("td", e.verdict + (e.burning ? " (burning)" : ""), e.verdict),
      el("td", pct(e.objective.target, 1), "num"), el("td", pct(e.compliance), "num"),
      el("td", pct(e.budget_remaining, 0), "num"),
      el("td", short === null || short === undefined ? "–" : short.toFixed(2) + "×", "num"),
      el("td", e.counts.good + e.counts.bad, "num"));
    tbody.append(tr);
  }
  $("slos").tBodies[0].replaceChildren(tbody);

  const p = d.parity;
  $("parity-summary").textContent = p.settings && p.settings.enabled === false
    ? "parity off"
    : `parity ${pct(p.parity_ratio, 3)} · ${p.matches} matches, ${p.drifts} drifts, ${p.unanswered} unanswered`;
  const drifts = document.createDocumentFragment();
  for (const x of (p.recent_drifts || []).slice(0, 20)) {
    const li = el("li");
    li.append(el("span", clock(x.ts) + " ", "muted"), el("span", `${x.device || "?"} ${x.type}: ${x.reason}${x.detail ? " — " + x.detail : ""}`));
    drifts.append(li);
  }
  $("drifts").replaceChildren(drifts);

  const log = document.createDocumentFragment();
  for (const x of d.decisions || []) {
    const li = el("li", null, x.action ? "action" : "");
    li.append(el("span", x.at + " ", "muted"), el("span", decisionText(x)));
    log.append(li);
  }
  $("decisions").replaceChildren(log);
}

async function pollRollout() {
  const r = await fetch("api/rollout", { cache: "no-store" });
  if (!r.ok) throw new Error("GET /api/rollout: " + r.status);
  renderRollout(await r.json());
}

// Runs f now and again `delay()` ms after each run ends, never two at once (an older answer
// must not overwrite a newer one). The returned kick() runs it again as soon as it may.
function every(delay, f) {
  let running = false, again = false, timer = null;
  const run = async () => {
    clearTimeout(timer);
    if (running) { again = true; return; }
    running = true;
    try {
      await f();
      link(true);
    } catch (e) {
      link(false, e);
    }
    running = false;
    if (again) { again = false; run(); } else timer = setTimeout(run, delay());
  };
  run();
  return run;
}

function link(ok, e) {
  const l = $("link");
  l.classList.toggle("down", !ok);
  l.textContent = ok ? "updated " + new Date().toLocaleTimeString([], { hour12: false }) : "proxy unreachable: " + e.message;
}

// ---- controls --------------------------------------------------------------------------------

async function post(path, what) {
  const out = $("control-result");
  out.classList.remove("error");
  out.textContent = what + "…";
  try {
    const r = await fetch(path, { method: "POST", cache: "no-store" });
    const t = await r.text();
    let j = null;
    try { j = JSON.parse(t); } catch (_) { /* a text answer */ }
    if (!r.ok) throw new Error((j && j.error) || t.trim() || String(r.status));
    let msg = what + ": " + ((j && j.result) || "ok");
    if (j && j.notes && j.notes.length) msg += " — " + j.notes.join(" ");
    out.textContent = msg;
    kick.rollout();
    kick.devices();
  } catch (e) {
    out.classList.add("error");
    out.textContent = what + " failed: " + e.message;
  }
}

$("canary-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = Number($("canary-input").value);
  post("api/canary?percent=" + encodeURIComponent(v), `canary ${v} %`);
});
$("rollback").addEventListener("click", () => {
  if (confirm("Move every device back to the legacy path now?")) post("rollback", "roll back");
});
$("clear").addEventListener("click", () => post("rollback/clear", "clear override"));
$("dev-filter").addEventListener("input", renderDevices);

// ---- frame stream ----------------------------------------------------------------------------

const stream = { es: null, received: 0, dropped: 0, paused: false, held: [], heldLost: 0, queue: [], lastCount: 0, rate: 0, max: null, rateCapped: 0, retry: 1000, timer: null, note: "" };

function openStream() {
  clearTimeout(stream.timer);
  if (stream.es) stream.es.close();
  const q = new URLSearchParams();
  const dev = $("f-device").value.split(/[\s,]+/).filter(Boolean).join(",");
  if (dev) q.set("device", dev);
  if ($("f-type").value) q.set("type", $("f-type").value);
  const es = new EventSource("api/events" + (q.toString() ? "?" + q : ""));
  stream.es = es;
  // What is shown is what the new filter passes.
  stream.queue = [];
  stream.held = [];
  stream.heldLost = 0;
  $("frames").tBodies[0].replaceChildren();
  es.addEventListener("hello", (m) => {
    stream.max = JSON.parse(m.data).max_events_per_second;
    stream.retry = 1000;
    stream.note = "";
  });
  es.addEventListener("dropped", (m) => {
    stream.dropped += JSON.parse(m.data).dropped;
  });
  es.onmessage = (m) => {
    stream.received++;
    let ev;
    try { ev = JSON.parse(m.data); } catch (_) { return; }
    if (stream.paused) {
      stream.held.push(ev);
      if (stream.held.length > MAX_ROWS) { stream.held.shift(); stream.heldLost++; }
    } else {
      stream.queue.push(ev);
      if (stream.queue.length > MAX_ROWS) stream.queue.shift();
    }
  };
  es.onerror = () => {
    if (es !== stream.es) return;
    if (es.readyState === EventSource.CLOSED) {
      // Refused (every stream slot taken, or a filter the proxy rejects): the browser gives
      // up, so try again later, each time waiting longer.
      const wait = stream.retry;
      stream.retry = Math.min(30000, stream.retry * 2);
      stream.note = `stream refused by the proxy (all admin.console_max_streams in use, or a bad filter); retrying in ${Math.round(wait / 1000)} s`;
      stream.timer = setTimeout(openStream, wait);
    } else {
      stream.note = "stream reconnecting…";
    }
    $("stream-stats").textContent = stream.note;
  };
}

function frameRow(ev) {
  const tr = el("tr");
  tr.dataset.device = ev.device || "";
  tr.dataset.type = ev.type;
  tr.append(el("td", clock(ev.at), "mono"), el("td", ev.device || ev.peer, "mono"),
    el("td", ev.direction === "device_to_cloud" ? "↑ device" : "↓ cloud"),
    el("td", ev.type + " " + ev.name), el("td", ev.summary, "summary"));
  return tr;
}

function flush() {
  if (stream.queue.length) {
    const tbody = $("frames").tBodies[0];
    const frag = document.createDocumentFragment();
    for (let i = stream.queue.length - 1; i >= 0; i--) frag.append(frameRow(stream.queue[i]));
    stream.queue = [];
    tbody.prepend(frag);
    while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
  }
  requestAnimationFrame(flush);
}

setInterval(() => {
  stream.rate = stream.received - stream.lastCount;
  stream.lastCount = stream.received;
  let s = `${stream.rate}/s · ${stream.received} received · ${stream.dropped} dropped (slow page)`;
  if (stream.max) s += ` · server samples above ${stream.max}/s (${stream.rateCapped} left out)`;
  if (stream.paused) s += ` · paused, ${stream.held.length} held` + (stream.heldLost ? `, ${stream.heldLost} older not kept` : "");
  if (stream.note) s = stream.note + " · " + s;
  $("stream-stats").textContent = s;
}, 1000);

$("pause").addEventListener("click", () => {
  stream.paused = !stream.paused;
  $("pause").setAttribute("aria-pressed", String(stream.paused));
  $("pause").textContent = stream.paused ? "Resume" : "Pause";
  if (!stream.paused) {
    stream.queue = stream.queue.concat(stream.held).slice(-MAX_ROWS);
    stream.held = [];
    stream.heldLost = 0;
  }
});
// Leaving the page gives its stream slot back at once (the proxy would otherwise notice only
// at its next write).
window.addEventListener("pagehide", () => {
  clearTimeout(stream.timer);
  if (stream.es) stream.es.close();
});
let refilter = null;
$("f-device").addEventListener("input", () => { clearTimeout(refilter); refilter = setTimeout(openStream, 400); });
$("f-type").addEventListener("change", openStream);

// A big fleet's table is polled less often (about 0.8 KB per device per poll).
const kick = {
  devices: every(() => (devices.length > 300 ? 3 * POLL_MS : POLL_MS), pollDevices),
  rollout: every(() => POLL_MS, pollRollout),
};
openStream();
requestAnimationFrame(flush);
