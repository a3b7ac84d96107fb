// /inspector: the world live, on worldhost.js. Read-only for a viewer; with the admin
// token (kept in this tab's sessionStorage only) the session is an admin's.
import { WorldhostClient } from "/client/worldhost.js";
import { WorldModel, MapView, legend } from "/static/map.js";

const $ = (id) => document.getElementById(id);
const ADMIN = "worldhost:inspector:admin-token";
const token = sessionStorage.getItem(ADMIN) || null;
const model = new WorldModel();
const view = new MapView($("map"), model);
legend($("legend"));
let slices = {};
let generation = 0;
const log = [];

const client = new WorldhostClient({
  name: token ? "inspector-admin" : "inspector", token,
  storageKey: `worldhost:inspector:${token ? "admin" : "viewer"}`, snapshot: [],
});
globalThis.worldhost = client;

client.on("state", ({ state }) => { $("state").textContent = state; $("state").className = `badge ${state}`; });
client.on("info", showInfo);
client.on("session", (s) => {
  $("role").textContent = `${s.role}${s.resumed ? " · resumed" : ""}`;
  $("admin-form").hidden = s.role === "admin";
  refreshSessions();
  refreshProcesses();
});
client.on("snapshot", (snap) => {
  slices = snap.slices; generation = snap.generation;
  model.load(slices); view.update(); renderTree(); showTick();
});
client.on("signal", (sig) => {
  addLog(sig);
  const changed = model.apply(sig.signal, sig.data);
  if (changed === true) { view.update(); showTick(); }
  if (changed === "reload") rereadSoon(true);
  else if (!changed && worldChanging(sig.signal)) rereadSoon(false);
  if (sig.signal.startsWith("process.")) refreshProcesses();
  if (sig.signal.startsWith("session") || sig.signal === "sync_state") refreshSessionsSoon();
  if (sig.signal === "sync_state") { generation = sig.data.generation; showInfo({ ...client.serverInfo, ...sig.data }); }
  renderTreeSoon();
});
client.connect();

function worldChanging(name) {
  return !["simulation.ticked", "host.pong", "error", "chunk"].includes(name);
}

function showInfo(info) {
  if (!info) return;
  const sim = info.simulation || {};  // its tick moves: the map's heading shows it
  $("info").innerHTML = "";
  const parts = [["version", info.version], ["world", info.world_id], ["phase", info.phase],
    ["plugins", (info.plugins || []).length], ["auth", info.auth], ["tick_hz", sim.tick_hz]];
  for (const [k, v] of parts) {
    if (v === undefined) continue;
    const s = document.createElement("span");
    s.innerHTML = `${k} <b></b>`; s.querySelector("b").textContent = v;
    $("info").append(s);
  }
  const list = $("actions");
  if (info.actions && !list.children.length) {
    for (const a of info.actions) { const o = document.createElement("option"); o.value = a; list.append(o); }
  }
}

function showTick() {
  $("tick").textContent = `tick ${model.meta.tick ?? 0}${model.meta.running ? " · running" : ""} · ${model.agents.size} trucks · ${model.packages.size} packages`;
  $("generation").textContent = `generation ${generation}`;
}

// the slices: the model's parts written back, so the tree follows the ticks
function syncSlices() {
  if (!slices.simulation || !slices.map) return;
  const sim = { meta: model.meta }, map = {};
  for (const a of model.agents.values()) sim[`agent:${a.id}`] = a;
  for (const p of model.packages.values()) sim[`package:${p.id}`] = p;
  for (const n of model.nodes.values()) map[`node:${n.id}`] = n;
  for (const e of model.edges.values()) map[`edge:${e.id}`] = e;
  slices.simulation = sim; slices.map = map;
}

// Other slices are re-read when a signal may have changed them: all but the map and
// the simulation, which the model follows signal by signal (and which can be big).
let rereadTimer = null;
let rereadAll = false;
function rereadSoon(all) {
  rereadAll ||= all;
  if (rereadTimer) return;
  rereadTimer = setTimeout(async () => {
    rereadTimer = null;
    const names = rereadAll ? null : Object.keys(slices).filter((n) => n !== "map" && n !== "simulation");
    rereadAll = false;
    try {
      const snap = await client.call("world.snapshot", names ? { slices: names } : {});
      slices = names ? { ...slices, ...snap.slices } : snap.slices;
      generation = snap.generation;
      if (!names) model.load(slices);
      view.update(); renderTree(); showTick();
    } catch { /* the next change tries again */ }
  }, 300);
}

let treeTimer = null;
function renderTreeSoon() {
  if (treeTimer) return;
  treeTimer = setTimeout(() => { treeTimer = null; renderTree(); }, 500);
}

const open = new Set();
function renderTree() {
  syncSlices();
  const root = $("tree");
  const scroll = root.scrollTop;
  root.innerHTML = "";
  for (const name of Object.keys(slices).sort()) root.append(node(name, slices[name], name));
  root.scrollTop = scroll;
}

function node(key, value, path) {
  if (value === null || typeof value !== "object") {
    const d = document.createElement("div");
    d.className = "leaf";
    d.innerHTML = `<span class="key"></span>: <span class="val"></span>`;
    d.children[0].textContent = key; d.children[1].textContent = JSON.stringify(value);
    return d;
  }
  const det = document.createElement("details");
  det.open = open.has(path);
  det.addEventListener("toggle", () => { det.open ? open.add(path) : open.delete(path); if (det.open && !det.dataset.filled) fill(); });
  const sum = document.createElement("summary");
  const size = Array.isArray(value) ? `[${value.length}]` : `{${Object.keys(value).length}}`;
  sum.innerHTML = `<span class="key"></span> <span class="muted"></span>`;
  sum.children[0].textContent = key; sum.children[1].textContent = size;
  det.append(sum);
  const fill = () => {
    det.dataset.filled = "1";
    const keys = Object.keys(value);
    for (const k of keys.slice(0, 500)) det.append(node(k, value[k], `${path}/${k}`));
    if (keys.length > 500) { const m = document.createElement("div"); m.className = "leaf muted"; m.textContent = `… ${keys.length - 500} more`; det.append(m); }
  };
  if (det.open) fill();
  return det;
}

// sessions
let sessionsTimer = null;
function refreshSessionsSoon() {
  if (sessionsTimer) return;
  sessionsTimer = setTimeout(() => { sessionsTimer = null; refreshSessions(); }, 300);
}
async function refreshSessions() {
  const admin = client.role === "admin";
  let rows;
  try {
    rows = admin ? (await client.call("sessions.stats")).sessions : (await client.call("sessions.list")).sessions;
  } catch { return; }
  const body = $("sessions");
  body.innerHTML = "";
  for (const s of rows) {
    const tr = document.createElement("tr");
    const cells = [s.name, s.role, s.connected ? "yes" : "no", new Date((s.last_active || 0) * 1000).toLocaleTimeString()];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.append(td); }
    const td = document.createElement("td");
    if (admin && s.id && s.id !== client.sessionId) {
      const b = document.createElement("button");
      b.className = "danger"; b.textContent = "kick";
      b.onclick = () => client.call("sessions.kick", { session_id: s.id }).then(refreshSessions, showError);
      td.append(b);
    }
    tr.append(td);
    body.append(tr);
  }
}
setInterval(() => client.state === "open" && refreshSessions(), 5000);

// processes
let processTimer = null;
function refreshProcesses() {
  if (processTimer) return;
  processTimer = setTimeout(async () => {
    processTimer = null;
    let list;
    try { list = (await client.call("process.list")).processes; } catch { return; }
    const box = $("processes");
    if (!list.length) { box.className = "muted"; box.textContent = "none"; return; }
    box.className = ""; box.innerHTML = "";
    for (const p of list) {
      let st;
      try { st = await client.call("process.status", { process_id: p.process_id }); } catch { continue; }
      const d = document.createElement("details");
      d.open = true;
      const sum = document.createElement("summary");
      sum.textContent = `${st.process_id} · ${st.template_id} · ${st.status} · stage ${st.current_stage_index}`;
      const pre = document.createElement("pre");
      pre.className = "mono";
      pre.textContent = JSON.stringify({ problem: st.problem_statement, agents: st.agents,
        stage_turns: st.stage_turn_counts, agent_turns: st.agent_turn_counts, artifacts: st.collected_artifacts }, null, 1);
      d.append(sum, pre);
      box.append(d);
    }
  }, 200);
}

// the signal log
function addLog(sig) {
  log.push(sig);
  if (log.length > 500) log.shift();
  renderLogSoon();
}
let logTimer = null;
function renderLogSoon() {
  if (logTimer) return;
  logTimer = setTimeout(() => { logTimer = null; renderLog(); }, 150);
}
function renderLog() {
  const f = $("filter").value.trim().toLowerCase();
  const hide = $("hide-ticks").checked;
  const box = $("log");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 30;
  box.innerHTML = "";
  const shown = log.filter((s) => !(hide && s.signal === "simulation.ticked"))
    .filter((s) => !f || s.signal.toLowerCase().includes(f) || JSON.stringify(s.data).toLowerCase().includes(f)).slice(-200);
  for (const s of shown) {
    const d = document.createElement("div");
    d.innerHTML = `<span class="muted"></span> <span class="name"></span> <span></span>`;
    d.children[0].textContent = s.seq ?? "";
    d.children[1].textContent = s.signal;
    d.children[2].textContent = JSON.stringify(s.data).slice(0, 300);
    box.append(d);
  }
  if (atBottom) box.scrollTop = box.scrollHeight;
}
$("filter").oninput = renderLog;
$("hide-ticks").onchange = renderLog;
$("clear").onclick = () => { log.length = 0; renderLog(); };

// send any action
function showError(err) {
  const out = $("reply");
  out.className = "mono error";
  out.textContent = `${err.code}: ${err.message}${err.details?.path ? `\nat ${err.details.path}` : ""}`;
}
$("action-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("reply");
  let params;
  try {
    params = JSON.parse($("params").value || "{}");
  } catch (err) {
    out.className = "mono error"; out.textContent = `params are not JSON: ${err.message}`; return;
  }
  out.className = "mono muted"; out.textContent = "…";
  try {
    const data = await client.call($("action").value.trim(), params);
    out.className = "mono ok"; out.textContent = JSON.stringify(data, null, 1).slice(0, 20000);
    rereadSoon(true); // broadcasts go to the others: this page reads what its action did
  } catch (err) { showError(err); }
});

// admin: the token is typed once and kept for this tab only
$("admin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const t = $("admin-token").value.trim();
  if (!t) return;
  sessionStorage.setItem(ADMIN, t);
  await client.endSession(); // the viewer's session is done with
  location.reload(); // a new session, opened with the token
});
addEventListener("pagehide", () => client._save());
