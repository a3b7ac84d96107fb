// /play: a setup screen (name, colour, world), then the map and a chat. The identity
// lives in localStorage (every tab of this browser is the same player); the session
// in sessionStorage (each tab has its own, so two tabs never invalidate each other's
// resume token). A refresh resumes the tab's session and skips the setup.
import { WorldhostClient } from "/client/worldhost.js";
import { WorldModel, MapView, legend } from "/static/map.js";

const IDENTITY = "worldhost:player";
const COLOURS = ["#e4572e", "#2f6fde", "#1f9d55", "#7d5ba6", "#d98f00", "#f46197"];
const $ = (id) => document.getElementById(id);

const WORLDS = {
  ring: () => {
    const nodes = [], edges = [];
    for (let i = 0; i < 8; i++) {
      const a = (i / 8) * Math.PI * 2;
      nodes.push({ id: `d${i}`, x: Math.round(Math.cos(a) * 100), y: Math.round(Math.sin(a) * 100),
        building: i % 2 === 0 ? { type: "depot" } : null });
    }
    for (let i = 0; i < 8; i++) {
      const a = `d${i}`, b = `d${(i + 1) % 8}`;
      edges.push({ id: `${a}>${b}`, from: a, to: b, length: 77 }, { id: `${b}>${a}`, from: b, to: a, length: 77 });
    }
    return { nodes, edges, trucks: ["d0", "d4", "d2"] };
  },
  grid: () => {
    const nodes = [], edges = [];
    for (let y = 0; y < 4; y++) for (let x = 0; x < 4; x++) {
      nodes.push({ id: `g${x}${y}`, x: x * 60, y: y * 60, building: (x + y) % 3 === 0 ? { type: "depot" } : null });
    }
    for (let y = 0; y < 4; y++) for (let x = 0; x < 4; x++) {
      for (const [dx, dy] of [[1, 0], [0, 1]]) {
        if (x + dx > 3 || y + dy > 3) continue;
        const a = `g${x}${y}`, b = `g${x + dx}${y + dy}`;
        edges.push({ id: `${a}>${b}`, from: a, to: b, length: 60 }, { id: `${b}>${a}`, from: b, to: a, length: 60 });
      }
    }
    return { nodes, edges, trucks: ["g00", "g33", "g30"] };
  },
};

function readIdentity() {
  try { return JSON.parse(localStorage.getItem(IDENTITY) || "null"); } catch { return null; }
}
function writeIdentity(identity) { localStorage.setItem(IDENTITY, JSON.stringify(identity)); }

const model = new WorldModel();
const view = new MapView($("map"), model);
legend($("legend"));
let client = null;
let identity = readIdentity();
let waves = 0;
const seen = new Set();

function show(which) {
  for (const id of ["loading", "setup", "game"]) $(id).hidden = id !== which;
  if (which === "game") view.update();
}

function setupScreen(note) {
  if (note) $("setup-note").textContent = note;
  const chosen = identity?.colour || COLOURS[Math.floor(Math.random() * COLOURS.length)];
  $("swatches").innerHTML = "";
  for (const c of COLOURS) {
    const b = document.createElement("button");
    b.type = "button"; b.className = "swatch" + (c === chosen ? " chosen" : ""); b.style.background = c; b.dataset.colour = c;
    b.title = c;
    b.onclick = () => { for (const s of $("swatches").children) s.classList.toggle("chosen", s === b); };
    $("swatches").append(b);
  }
  $("name").value = identity?.name || "";
  if (identity?.world) $("world").value = identity.world;
  show("setup");
  $("name").focus();
}

function start(name) {
  client = new WorldhostClient({ name, snapshot: ["map", "simulation"] });
  globalThis.worldhost = client; // for the console (and the tests)
  client.on("state", ({ state }) => { $("state").textContent = state; $("state").className = `badge ${state}`; });
  client.on("snapshot", ({ slices }) => { model.load(slices); view.update(); counts(); });
  client.on("session", async (s) => {
    $("session-id").textContent = s.session_id;
    $("resumes").textContent = client.resumes;
    if (s.fresh || !s.complete) loadChat(); // a new page, or messages the host no longer held
  });
  client.on("signal", (sig) => {
    $("seq").textContent = client.lastSeq;
    const changed = model.apply(sig.signal, sig.data);
    if (changed === "reload") client.call("world.snapshot", { slices: ["map", "simulation"] }).then(({ slices }) => { model.load(slices); view.update(); });
    else if (changed) { view.update(); counts(); }
  });
  client.on("chat.message", addMessage);
  client.on("ended", ({ reason }) => setupScreen(`You were removed from the game (${reason}). Join again?`));
  return client.connect();
}

function counts() {
  $("tick").textContent = model.meta.tick ?? 0;
  const by = { waiting: 0, in_transit: 0, delivered: 0 };
  for (const p of model.packages.values()) by[p.status] = (by[p.status] || 0) + 1;
  $("counts").textContent = `${model.agents.size} trucks · ${by.waiting} waiting · ${by.in_transit} in transit · ${by.delivered} delivered`;
}

function addMessage(m) {
  if (seen.has(m.id)) return;
  seen.add(m.id);
  const div = document.createElement("div");
  const who = document.createElement("b");
  who.textContent = m.from + ": ";
  who.style.color = m.from === identity?.name ? identity.colour : colourOf(m.from);
  div.append(who, document.createTextNode(m.text));
  div.dataset.id = m.id;
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 30;
  box.append(div);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function colourOf(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return COLOURS[h % COLOURS.length];
}

async function loadChat() {
  const { messages } = await client.call("chat.history", { limit: 100 });
  $("messages").innerHTML = ""; seen.clear();
  for (const m of messages) addMessage(m);
}

async function buildWorld(kind) {
  const { slices } = await client.call("world.snapshot", { slices: ["map"] });
  if (Object.keys(slices.map || {}).length) return; // a world is being played: join it
  const w = WORLDS[kind]();
  for (const n of w.nodes) model.nodes.set(n.id, n);
  // sent together: the host applies them in order and commits them in few writes
  await Promise.all(w.nodes.map((n) => client.call("map.add_node", n)));
  await Promise.all([
    ...w.edges.map((e) => client.call("map.add_edge", e)),
    ...w.trucks.map((node, i) => client.call("simulation.add_agent", { id: `truck${i + 1}`, kind: "truck", node, speed: 15 })),
    ...[0, 1, 2, 3].map(() => sendPackage()),
  ]);
  try { await client.call("simulation.start", { tick_hz: 10 }); } catch (err) { if (err.code !== "conflict") throw err; }
  const { slices: fresh } = await client.call("world.snapshot", { slices: ["map", "simulation"] });
  model.load(fresh); view.update(); counts();
}

async function sendPackage() {
  const nodes = [...model.nodes.keys()];
  if (nodes.length < 2) return;
  const origin = nodes[Math.floor(Math.random() * nodes.length)];
  let destination = origin;
  while (destination === origin) destination = nodes[Math.floor(Math.random() * nodes.length)];
  const added = await client.call("simulation.add_package", { id: `p-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 6)}`, origin, destination });
  // the broadcast goes to the others; this page learns from the reply
  if (model.apply("simulation.package_added", added)) { view.update(); counts(); }
}

function enterGame() {
  $("me-name").textContent = identity.name;
  $("me-colour").style.background = identity.colour;
  view.highlight = identity.colour;
  show("game");
}

function pendingShown() {
  $("pending").textContent = client && client.unanswered ? `${client.unanswered} unanswered` : "";
  $("pending").dataset.count = client ? client.unanswered : 0;
}
setInterval(pendingShown, 200);

function act(promise) {
  $("play-error").textContent = "";
  promise.catch((err) => { $("play-error").textContent = `${err.code}: ${err.message}`; }).finally(pendingShown);
  pendingShown();
}

$("setup").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = $("name").value.trim();
  if (!name) return;
  const colour = document.querySelector(".swatch.chosen")?.dataset.colour || COLOURS[0];
  const world = $("world").value;
  $("join").disabled = true;
  try {
    if (!client || client.state === "closed" || client.name !== name) {
      if (client && client.state !== "closed") await client.endSession();
      await start(name);
    }
    await buildWorld(world);
    identity = { name, colour, world, world_id: client.serverInfo.world_id };
    writeIdentity(identity);
    enterGame();
  } catch (err) {
    $("world-note").textContent = `Could not join: ${err.code || ""} ${err.message}`;
    $("world-note").className = "error";
  } finally {
    $("join").disabled = false;
  }
});

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("chat-text").value.trim();
  if (!text) return;
  $("chat-text").value = "";
  act(client.call("chat.say", { text }));
});
$("wave").onclick = () => { waves += 1; act(client.call("chat.say", { text: `wave ${waves} from ${identity.name}` })); };
$("package").onclick = () => act(sendPackage());
$("leave").onclick = async () => {
  localStorage.removeItem(IDENTITY);
  await client.endSession();
  location.reload();
};
addEventListener("pagehide", () => client && client._save());

// On load: a known player whose world is still being played goes straight back in.
if (identity?.name) {
  await start(identity.name);
  if (client.serverInfo.world_id === identity.world_id) enterGame();
  else setupScreen("The world you played is gone; choose again.");
} else {
  setupScreen();
}
