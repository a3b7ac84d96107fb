// Unit tests of worldhost.js's reconnect, resend, ordering and chunking logic, against
// a scripted fake WebSocket. Run: node --test tests/js/ (tests/test_client_js.py runs it).
import { test } from "node:test";
import assert from "node:assert/strict";
import { WorldhostClient, CallError } from "../../host/web/worldhost.js";

class FakeSocket {
  static all = [];
  static refuse = 0; // the next N sockets close at once, as when the host is down
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.readyState = 0;
    this.closed = null;
    FakeSocket.all.push(this);
    if (FakeSocket.refuse > 0) {
      FakeSocket.refuse -= 1;
      setTimeout(() => this.serverClose(1006), 0);
    }
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code, reason) { this.readyState = 3; this.closed = { code, reason }; }
  // the host's side
  accept(info = { world_id: "w1", limits: { max_frame_bytes: 1 << 24 } }) {
    this.readyState = 1;
    this.push({ signal: "server.info", data: info });
  }
  push(msg) { this.onmessage?.({ data: JSON.stringify(msg) }); }
  serverClose(code = 1006, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  last() { return this.sent[this.sent.length - 1]; }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
async function until(fn, ms = 2000) {
  const end = Date.now() + ms;
  while (!fn()) {
    if (Date.now() > end) throw new Error("timed out waiting");
    await tick(2);
  }
}

function memory() {
  const m = new Map();
  return { getItem: (k) => m.get(k) ?? null, setItem: (k, v) => m.set(k, v), removeItem: (k) => m.delete(k), m };
}

function client(extra = {}) {
  FakeSocket.all = [];
  return new WorldhostClient({ url: "ws://test/ws", WebSocket: FakeSocket, storage: memory(),
    minDelayMs: 5, maxDelayMs: 40, gapTimeoutMs: 200, ...extra });
}

async function opened(c, seq = 1) {
  const ready = c.connect();
  const ws = FakeSocket.all.at(-1);
  ws.accept();
  const open = ws.last();
  assert.equal(open.action, "session.open");
  ws.push({ signal: "session.opened", re: open.id, seq, data: { session_id: "s1", resume_token: "t1", role: "player" } });
  await ready;
  return ws;
}

async function resumed(c, { seq, replayed = 0, complete = true, token = "t2" }) {
  await until(() => FakeSocket.all.at(-1).readyState === 0 || FakeSocket.all.length > 1);
  const ws = FakeSocket.all.at(-1);
  ws.accept();
  const resume = ws.last();
  assert.equal(resume.action, "session.resume");
  ws.push({ signal: "session.resumed", re: resume.id, seq, data: { session_id: "s1", role: "player", replayed, complete, resume_token: token } });
  return { ws, resume };
}

test("opens a session and reports its states", async () => {
  const c = client();
  const states = [];
  c.on("state", ({ state }) => states.push(state));
  await opened(c);
  assert.deepEqual(states, ["connecting", "open"]);
  assert.equal(c.sessionId, "s1");
  assert.equal(c.lastSeq, 1);
  c.close();
});

test("call resolves with the reply data and rejects with the error code", async () => {
  const c = client();
  const ws = await opened(c);
  const ok = c.call("host.ping", { a: 1 });
  const bad = c.call("map.add_node", { id: 1 });
  const [p1, p2] = ws.sent.slice(-2);
  ws.push({ signal: "host.pong", re: p1.id, seq: 2, data: { a: 1 } });
  ws.push({ signal: "error", re: p2.id, seq: 3, data: { code: "validation_error", message: "id: expected str", details: { path: "params.id" } } });
  assert.deepEqual(await ok, { a: 1 });
  await assert.rejects(bad, (err) => err instanceof CallError && err.code === "validation_error" && err.details.path === "params.id");
  c.close();
});

test("a call times out with code timeout", async () => {
  const c = client({ callTimeoutMs: 30 });
  await opened(c);
  await assert.rejects(c.call("host.ping"), (err) => err.code === "timeout");
  assert.equal(c.unanswered, 0);
  c.close();
});

test("signals are handed out in seq order, duplicates dropped", async () => {
  const c = client();
  const ws = await opened(c);
  const got = [];
  c.on("signal", (s) => got.push(s.seq));
  ws.push({ signal: "x", seq: 3, data: {} });
  ws.push({ signal: "x", seq: 2, data: {} });
  ws.push({ signal: "x", seq: 2, data: {} });
  ws.push({ signal: "x", seq: 4, data: {} });
  assert.deepEqual(got, [2, 3, 4]);
  c.close();
});

test("after a drop it resumes with last_seq, replays come in order before newer signals, and unanswered requests are resent with their ids", async () => {
  const c = client();
  const ws = await opened(c);
  const got = [];
  c.on("signal", (s) => got.push([s.seq, s.signal]));
  ws.push({ signal: "a", seq: 2, data: {} });
  const pending = c.call("chat.say", { text: "hi" });
  const sent = ws.last();
  const states = [];
  c.on("state", ({ state }) => states.push(state));
  ws.serverClose(1006);
  assert.equal(c.state, "offline");
  // the host crashed after applying chat.say; the reply (seq 4) and a broadcast (3) were lost
  const { ws: ws2, resume } = await resumed(c, { seq: 6, replayed: 2 });
  assert.equal(resume.params.last_seq, 2);
  assert.equal(resume.params.resume_token, "t1");
  const resent = ws2.sent.find((f) => f.action === "chat.say");
  assert.equal(resent.id, sent.id, "resent with its original id");
  // the resume reply came first (seq 6); then the replays 3, 4, then sync_state 7, then
  // the answer to the resent request (the first reply again, new seq 8)
  ws2.push({ signal: "b", seq: 3, data: {} });
  ws2.push({ signal: "chat.said", re: sent.id, seq: 4, data: { id: 1 } });
  ws2.push({ signal: "sync_state", seq: 7, data: {} });
  ws2.push({ signal: "chat.said", re: sent.id, seq: 8, data: { id: 1 } });
  assert.deepEqual(await pending, { id: 1 });
  ws2.push({ signal: "c", seq: 9, data: {} });
  assert.deepEqual(got, [[2, "a"], [3, "b"], [7, "sync_state"], [9, "c"]]);
  assert.deepEqual(states, ["offline", "connecting", "resuming", "open"]);
  assert.equal(c.resumeToken, "t2", "the rotated token is kept");
  assert.equal(c.lastSeq, 9);
  c.close();
});

test("the resume reply arriving before its replays never lets a newer signal out first", async () => {
  const c = client();
  const ws = await opened(c, 1);
  const got = [];
  c.on("signal", (s) => got.push(s.seq));
  ws.serverClose();
  const { ws: ws2 } = await resumed(c, { seq: 5, replayed: 3 });
  ws2.push({ signal: "sync_state", seq: 6, data: {} }); // out of order on purpose
  ws2.push({ signal: "r", seq: 3, data: {} });
  ws2.push({ signal: "r", seq: 2, data: {} });
  ws2.push({ signal: "r", seq: 4, data: {} });
  assert.deepEqual(got, [2, 3, 4, 6]);
  c.close();
});

test("an incomplete resume passes over the lost signals and re-reads state", async () => {
  const c = client({ snapshot: ["map"] });
  const ws = await opened(c, 1);
  const got = [];
  c.on("signal", (s) => got.push(s.seq));
  const sessions = [];
  c.on("session", (s) => sessions.push(s));
  // the first session read state once
  await until(() => FakeSocket.all.at(-1).sent.some((f) => f.action === "world.snapshot"));
  const first = ws.sent.find((f) => f.action === "world.snapshot");
  ws.push({ signal: "world.snapshot", re: first.id, seq: 2, data: { generation: 1, slices: {} } });
  ws.serverClose();
  const { ws: ws2 } = await resumed(c, { seq: 40, replayed: 0, complete: false });
  ws2.push({ signal: "sync_state", seq: 41, data: {} });
  assert.deepEqual(got, [41]);
  assert.equal(sessions.at(-1).complete, false);
  await until(() => ws2.sent.some((f) => f.action === "world.snapshot"));
  const snap = ws2.sent.find((f) => f.action === "world.snapshot");
  assert.deepEqual(snap.params, { slices: ["map"] });
  const snapshots = [];
  c.on("snapshot", (s) => snapshots.push(s));
  ws2.push({ signal: "world.snapshot", re: snap.id, seq: 42, data: { generation: 3, slices: { map: {} } } });
  await until(() => snapshots.length === 1);
  c.close();
});

test("snapshot: [] reads every slice", async () => {
  const c = client({ snapshot: [] });
  const ws = await opened(c, 1);
  const snap = ws.sent.find((f) => f.action === "world.snapshot");
  assert.deepEqual(snap.params, {});
  c.close();
});

test("a gap that never fills is passed over after gapTimeoutMs", async () => {
  const c = client({ gapTimeoutMs: 30 });
  const ws = await opened(c, 1);
  const got = [];
  c.on("signal", (s) => got.push(s.seq));
  ws.push({ signal: "x", seq: 3, data: {} });
  assert.deepEqual(got, []);
  await until(() => got.length === 1);
  assert.deepEqual(got, [3]);
  c.close();
});

test("reconnects with growing, jittered delays while the host is down", async () => {
  const c = client({ minDelayMs: 10, maxDelayMs: 80 });
  await opened(c);
  FakeSocket.refuse = 5;
  const times = [];
  const before = FakeSocket.all.length;
  const orig = FakeSocket.all.push.bind(FakeSocket.all);
  FakeSocket.all.push = (x) => { times.push(Date.now()); return orig(x); };
  FakeSocket.all[0].serverClose();
  await until(() => FakeSocket.all.length >= before + 6, 3000);
  const gaps = times.slice(1).map((t, i) => t - times[i]);
  // caps 20, 40, 80, 80 ms: each wait is between half the cap and the cap
  assert.ok(gaps[gaps.length - 1] >= 35, `later waits are longer: ${gaps}`);
  assert.ok(gaps.every((g) => g <= 160), `capped: ${gaps}`);
  FakeSocket.all.push = orig;
  c.close();
});

test("a resume that is refused opens a new session and fails the old requests", async () => {
  const c = client();
  const ws = await opened(c);
  const pending = c.call("chat.say", { text: "x" });
  ws.serverClose();
  await until(() => FakeSocket.all.length === 2);
  const ws2 = FakeSocket.all[1];
  ws2.accept();
  const resume = ws2.last();
  ws2.push({ signal: "error", re: resume.id, data: { code: "unauthenticated", message: "invalid or expired resume token" } });
  await assert.rejects(pending, (err) => err.code === "session_lost");
  const open = ws2.last();
  assert.equal(open.action, "session.open");
  ws2.push({ signal: "session.opened", re: open.id, seq: 1, data: { session_id: "s2", resume_token: "u1", role: "player" } });
  assert.equal(c.sessionId, "s2");
  assert.equal(c.state, "open");
  c.close();
});

test("credentials survive a reload through the storage, and the token rotation is saved", async () => {
  const storage = memory();
  const c = client({ storage });
  const ws = await opened(c);
  ws.push({ signal: "x", seq: 2, data: {} });
  c.close(); // the page goes away
  const again = new WorldhostClient({ url: "ws://test/ws", WebSocket: FakeSocket, storage, minDelayMs: 5 });
  const ready = again.connect();
  const ws2 = FakeSocket.all.at(-1);
  ws2.accept();
  const resume = ws2.last();
  assert.deepEqual(resume.params, { session_id: "s1", resume_token: "t1", last_seq: 2 });
  ws2.push({ signal: "session.resumed", re: resume.id, seq: 3, data: { session_id: "s1", role: "player", replayed: 0, complete: true, resume_token: "t9" } });
  await ready;
  assert.equal(JSON.parse(storage.getItem("worldhost:session:ws://test/ws")).resume_token, "t9");
  again.close();
});

test("chunked signals are joined and big requests are split", async () => {
  const c = client();
  const ready = c.connect();
  const ws = FakeSocket.all.at(-1);
  ws.accept({ world_id: "w", limits: { max_frame_bytes: 400 } });
  const open = ws.last();
  ws.push({ signal: "session.opened", re: open.id, seq: 1, data: { session_id: "s1", resume_token: "t1", role: "player" } });
  await ready;
  const whole = JSON.stringify({ signal: "big", seq: 2, data: { text: "é😀".repeat(100) } });
  const got = [];
  c.on("big", (d) => got.push(d));
  const pieces = [whole.slice(0, 100), whole.slice(100, 250), whole.slice(250)];
  pieces.forEach((payload, index) => ws.push({ signal: "chunk", data: { transfer: "h1", index, count: 3, payload } }));
  assert.equal(got.length, 1);
  assert.equal(got[0].text, "é😀".repeat(100));
  ws.sent.length = 0;
  c.call("chat.say", { text: "😀".repeat(300) }).catch(() => {});
  assert.ok(ws.sent.length > 1 && ws.sent.every((f) => f.chunk));
  const joined = ws.sent.map((f) => f.chunk.payload).join("");
  assert.equal(JSON.parse(joined).params.text, "😀".repeat(300));
  for (const f of ws.sent) {
    assert.ok(new TextEncoder().encode(JSON.stringify(f)).length <= 400);
    const p = f.chunk.payload;
    const lastCode = p.charCodeAt(p.length - 1);
    assert.ok(!(lastCode >= 0xd800 && lastCode <= 0xdbff), "no surrogate pair is cut");
  }
  c.close();
});

test("a silent connection is pinged, then dropped and resumed", async () => {
  const c = client({ heartbeatMs: 40 });
  const ws = await opened(c);
  await until(() => ws.sent.some((f) => f.action === "host.ping"));
  await until(() => FakeSocket.all.length === 2, 1000);
  assert.ok(ws.closed, "the dead socket was closed");
  c.close();
});

test("a heartbeat's answer takes its place in seq order", async () => {
  const c = client({ heartbeatMs: 30, gapTimeoutMs: 5000 });
  const ws = await opened(c, 1);
  await until(() => ws.sent.some((f) => f.action === "host.ping"));
  const ping = ws.sent.find((f) => f.action === "host.ping");
  const got = [];
  c.on("signal", (s) => got.push(s.seq));
  ws.push({ signal: "host.pong", re: ping.id, seq: 2, data: {} });
  ws.push({ signal: "x", seq: 3, data: {} });
  assert.deepEqual(got, [3], "no wait for a gap");
  c.close();
});

test("a handshake that never completes is dropped and tried again", async () => {
  const c = client({ heartbeatMs: 30 });
  c.connect();
  const ws = FakeSocket.all.at(-1);
  ws.readyState = 1; // the socket opened, but no server.info ever comes
  await until(() => FakeSocket.all.length === 2, 1000);
  assert.ok(ws.closed);
  c.close();
});

test("session.ended stops reconnecting and forgets the session", async () => {
  const storage = memory();
  const c = client({ storage });
  const ws = await opened(c);
  const ended = [];
  c.on("ended", (e) => ended.push(e));
  ws.push({ signal: "session.ended", seq: 2, data: { session_id: "s1", reason: "kicked" } });
  ws.serverClose(1000, "session kicked");
  await tick(50);
  assert.equal(ended.length, 1);
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(c.state, "closed");
  assert.equal(storage.getItem("worldhost:session:ws://test/ws"), null);
  await assert.rejects(c.call("host.ping"), (err) => err.code === "closed");
});
