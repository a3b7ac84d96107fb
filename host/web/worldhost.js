// worldhost.js: the browser client for worldhost. One ES module, no dependencies.
//
// It opens or resumes a session and keeps it: after any drop it reconnects with
// exponential backoff and jitter, resumes with last_seq, re-reads state when the
// resume is incomplete, and resends every unanswered request with its original id
// (the host answers a resent id once). Signals are handed out in seq order, chunked
// frames are joined and split, and a heartbeat notices a dead connection.
// API and examples: docs/client-js.md. Types: worldhost.d.ts beside this file.

const PIECE = 1 << 20;

/** A request answered with an `error` signal, or one the client gave up on. */
export class CallError extends Error {
  constructor(code, message, details, action) {
    super(message); // as the host wrote it; `code` names the kind
    this.name = "CallError";
    this.code = code;
    this.details = details;
    this.action = action;
  }
}

/** The WebSocket URL of the host that served this page. */
export function defaultUrl(loc = globalThis.location) {
  if (!loc) return "ws://127.0.0.1:8765/ws";
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

function memoryStorage() {
  const m = new Map();
  return {
    getItem: (k) => (m.has(k) ? m.get(k) : null),
    setItem: (k, v) => void m.set(k, String(v)),
    removeItem: (k) => void m.delete(k),
  };
}

function tabStorage() {
  try {
    if (globalThis.sessionStorage) return globalThis.sessionStorage;
  } catch { /* storage disabled */ }
  return memoryStorage();
}

export class WorldhostClient extends EventTarget {
  /**
   * @param {object} [options] see worldhost.d.ts (ClientOptions)
   */
  constructor(options = {}) {
    super();
    this.url = options.url ?? defaultUrl();
    this.name = options.name ?? "browser";
    this.token = options.token ?? null;
    this.callTimeoutMs = options.callTimeoutMs ?? 20000;
    this.heartbeatMs = options.heartbeatMs ?? 10000;
    this.minDelayMs = options.minDelayMs ?? 250;
    this.maxDelayMs = options.maxDelayMs ?? 3000;
    this.gapTimeoutMs = options.gapTimeoutMs ?? 2000;
    this.snapshot = options.snapshot ?? null; // slice names to re-read, or null: none
    this.storage = options.storage ?? tabStorage();
    this.storageKey = options.storageKey ?? `worldhost:session:${this.url}`;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.state = "idle";
    this.serverInfo = null;
    this.sessionId = null;
    this.role = null;
    this.resumeToken = null;
    this.lastSeq = 0; // the last seq handed out
    this.resumes = 0;
    this._prefix = `${options.idPrefix ?? "b"}${Math.random().toString(36).slice(2, 8)}-`;
    this._ids = 0;
    this._transfers = 0;
    this._pending = new Map(); // id -> {frame, resolve, reject, timer, action}
    this._buffer = new Map(); // seq -> signal (or null: seen, nothing to hand out)
    this._barrier = null; // while a resume's replays arrive: {seq, remaining}
    this._gapTimer = null;
    this._chunks = new Map();
    this._ws = null;
    this._attempt = 0;
    this._retryTimer = null;
    this._heartbeat = null;
    this._lastFrameAt = 0;
    this._pingSentAt = 0;
    this._handshake = null; // {id, action}
    this._needState = true; // this page has not read the state yet
    this._ended = false;
    this._closed = false;
    this._ready = null;
    this._readyResolve = null;
    this._newReady();
    this._load();
  }

  // public ------------------------------------------------------------------------

  /** Connect (once); resolves when a session is open or resumed. */
  connect() {
    if (this.state === "idle") this._open();
    return this._ready;
  }

  /** Send one action; resolves with the reply's data, rejects with a CallError. */
  call(action, params = {}, { timeoutMs } = {}) {
    if (this._closed || this._ended) {
      return Promise.reject(new CallError("closed", this._ended ? "the host ended the session" : "the client is closed", null, action));
    }
    const id = `${this._prefix}${++this._ids}`;
    const frame = JSON.stringify({ id, action, params });
    return new Promise((resolve, reject) => {
      const pending = { id, action, frame, resolve, reject, timer: null };
      const ms = timeoutMs ?? this.callTimeoutMs;
      if (ms > 0) {
        pending.timer = setTimeout(() => {
          this._pending.delete(id);
          reject(new CallError("timeout", `no reply to ${action} within ${ms} ms`, null, action));
        }, ms);
      }
      this._pending.set(id, pending);
      if (this.state === "open") this._sendText(frame);
      else if (this.state === "idle") this._open();
      // otherwise it goes out once the session is open again
    });
  }

  /** Listen to an event: "state", "signal", "session", "snapshot", "info", "ended", or a
   * signal's name ("chat.message"). Returns a function that stops listening. */
  on(type, fn) {
    const handler = (ev) => fn(ev.detail);
    this.addEventListener(type, handler);
    return () => this.removeEventListener(type, handler);
  }

  /** End the session for good (session.close), forget it, and close. */
  async endSession() {
    if (this.sessionId && this.state === "open") {
      try { await this.call("session.close", {}, { timeoutMs: 5000 }); } catch { /* gone anyway */ }
    }
    this._forget();
    this.close();
  }

  /** Close the connection and stop reconnecting; the session stays resumable. */
  close() {
    this._closed = true;
    this._save();
    clearTimeout(this._retryTimer);
    clearInterval(this._heartbeat);
    clearTimeout(this._gapTimer);
    this._drop(1000, "client closed");
    for (const p of this._pending.values()) {
      clearTimeout(p.timer);
      p.reject(new CallError("closed", "the client was closed", null, p.action));
    }
    this._pending.clear();
    this._setState("closed");
  }

  /** Requests sent and not yet answered. */
  get unanswered() {
    return this._pending.size;
  }

  // storage -------------------------------------------------------------------------

  _load() {
    try {
      const saved = JSON.parse(this.storage.getItem(this.storageKey) || "null");
      if (saved && saved.session_id && saved.resume_token) {
        this.sessionId = saved.session_id;
        this.resumeToken = saved.resume_token;
        this.lastSeq = saved.last_seq || 0;
        this.worldId = saved.world_id || null;
      }
    } catch { /* unreadable: start afresh */ }
  }

  _save() {
    if (!this.sessionId) return;
    try {
      this.storage.setItem(this.storageKey, JSON.stringify({
        session_id: this.sessionId, resume_token: this.resumeToken,
        last_seq: this.lastSeq, world_id: this.serverInfo?.world_id ?? this.worldId ?? null,
      }));
    } catch { /* storage full or disabled: the session lasts as long as the page */ }
  }

  _forget() {
    this.sessionId = this.resumeToken = null;
    this.lastSeq = 0;
    try { this.storage.removeItem(this.storageKey); } catch { /* ignore */ }
  }

  // connection ----------------------------------------------------------------------

  _newReady() {
    this._ready = new Promise((resolve) => { this._readyResolve = resolve; });
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", { state });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _open() {
    if (this._closed) return;
    this._setState("connecting");
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (err) {
      this._retry();
      return;
    }
    this._ws = ws;
    this._chunks.clear();
    ws.onmessage = (ev) => this._onMessage(ws, ev.data);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
    ws.onerror = () => {}; // a close follows
    this._lastFrameAt = Date.now();
    clearInterval(this._heartbeat);
    this._heartbeat = setInterval(() => this._beat(), Math.max(50, this.heartbeatMs / 4));
  }

  _drop(code, reason) {
    const ws = this._ws;
    this._ws = null;
    if (!ws) return;
    ws.onmessage = ws.onclose = ws.onerror = null;
    try { ws.close(code, reason); } catch { /* already closing */ }
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._lostConnection(code, reason);
  }

  _lostConnection() {
    clearInterval(this._heartbeat);
    this._handshake = null;
    if (this._closed) return;
    if (this._ended) {
      this._setState("closed");
      return;
    }
    this._retry();
  }

  _retry() {
    this._setState("offline");
    const cap = Math.min(this.maxDelayMs, this.minDelayMs * 2 ** this._attempt);
    this._attempt += 1;
    const delay = cap / 2 + Math.random() * (cap / 2); // backoff with jitter
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  _beat() {
    if (!this._ws || this._closed) return;
    const now = Date.now();
    const silent = now - this._lastFrameAt;
    if (this._pingSentAt && now - this._pingSentAt > this.heartbeatMs) {
      this._pingSentAt = 0; // no answer: the connection is dead though not closed
      this._drop(4000, "heartbeat timeout");
      this._lostConnection();
    } else if (this.state !== "open" && silent > 2 * this.heartbeatMs) {
      this._drop(4000, "no answer to the handshake"); // connecting to a host that is not there
      this._lostConnection();
    } else if (!this._pingSentAt && silent > this.heartbeatMs && this.state === "open") {
      this._pingSentAt = now;
      this._sendText(JSON.stringify({ id: `${this._prefix}hb${++this._ids}`, action: "host.ping", params: {} }));
    }
  }

  _sendText(text) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    const limit = this.serverInfo?.limits?.max_frame_bytes ?? 16 * 1024 * 1024;
    if (text.length * 3 <= limit || new TextEncoder().encode(text).length <= limit) {
      ws.send(text);
      return true;
    }
    const piece = Math.max(1, Math.min(PIECE, Math.floor(limit / 4)));
    const pieces = [];
    for (let i = 0; i < text.length;) {
      let end = Math.min(text.length, i + piece);
      const last = text.charCodeAt(end - 1);
      if (end < text.length && last >= 0xd800 && last <= 0xdbff) end -= 1; // keep pairs whole
      pieces.push(text.slice(i, end));
      i = end;
    }
    const transfer = `${this._prefix}t${++this._transfers}`;
    pieces.forEach((payload, index) => {
      ws.send(JSON.stringify({ chunk: { transfer, index, count: pieces.length, payload } }));
    });
    return true;
  }

  // frames in ---------------------------------------------------------------------

  _onMessage(ws, data) {
    if (ws !== this._ws) return;
    this._lastFrameAt = Date.now();
    this._pingSentAt = 0;
    if (typeof data !== "string") return; // this client speaks JSON only
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    this._frame(msg);
  }

  _frame(msg) {
    if (msg.signal === "chunk" && msg.re === undefined && msg.seq === undefined) {
      const joined = this._join(msg.data);
      if (joined !== null) this._frame(JSON.parse(joined));
      return;
    }
    if (msg.signal === "server.info" && msg.seq === undefined) {
      this.serverInfo = msg.data;
      this._emit("info", msg.data);
      this._startSession();
      return;
    }
    if (this._handshake && msg.re === this._handshake.id) {
      this._handshakeReply(msg);
      return;
    }
    if (msg.seq === undefined || msg.seq === null) {
      this._deliver(msg); // before a session: not numbered
      return;
    }
    this._ordered(msg);
  }

  _join(chunk) {
    const { transfer, index, count, payload } = chunk;
    let parts = this._chunks.get(transfer);
    if (index === 0) parts = [];
    if (!parts || parts.length !== index) {
      this._chunks.delete(transfer);
      return null;
    }
    parts.push(payload);
    if (parts.length < count) {
      this._chunks.set(transfer, parts);
      return null;
    }
    this._chunks.delete(transfer);
    return parts.join("");
  }

  _startSession() {
    if (this._ended) return;
    const id = `${this._prefix}${++this._ids}`;
    let params;
    if (this.sessionId) {
      this._handshake = { id, action: "session.resume" };
      params = { session_id: this.sessionId, resume_token: this.resumeToken, last_seq: this.lastSeq };
      this._setState("resuming");
    } else {
      this._handshake = { id, action: "session.open" };
      params = { name: this.name };
      if (this.token) params.token = this.token;
    }
    this._sendText(JSON.stringify({ id, action: this._handshake.action, params }));
  }

  _handshakeReply(msg) {
    const action = this._handshake.action;
    this._handshake = null;
    if (msg.signal === "error") {
      const err = msg.data || {};
      if (action === "session.resume") {
        // The session is gone (expired, or another tab with a copy of this tab's storage
        // took it): open a new one. Requests sent in the old one cannot be told apart
        // from new ones, so they fail rather than risk being applied twice.
        this._forget();
        this._failPending("session_lost", "the session could not be resumed; a new one was opened");
        this._needState = true;
        this._startSession();
        return;
      }
      this._emit("error", err);
      this._ended = true;
      this._drop(1000, "session refused");
      this._setState("closed");
      for (const p of this._pending.values()) {
        clearTimeout(p.timer);
        p.reject(new CallError(err.code, err.message, err.details, p.action));
      }
      this._pending.clear();
      return;
    }
    const data = msg.data;
    this.role = data.role;
    this.resumeToken = data.resume_token;
    let complete = true;
    if (action === "session.open") {
      this.sessionId = data.session_id;
      this._buffer.clear();
      this.lastSeq = msg.seq;
      this._barrier = null;
    } else {
      this.resumes += 1;
      complete = data.complete;
      // The reply comes before the signals it replays; its own seq is passed over.
      this._buffer.set(msg.seq, null);
      this._barrier = { seq: msg.seq, remaining: data.replayed };
    }
    this._attempt = 0;
    this._save();
    const fresh = this._needState;
    this._setState("open");
    this._emit("session", { session_id: this.sessionId, role: this.role, resumed: action === "session.resume",
      complete, fresh, replayed: data.replayed ?? 0 });
    this._readyResolve();
    for (const p of this._pending.values()) this._sendText(p.frame);
    this._drain();
    if (this.snapshot && (fresh || !complete)) this._readState();
    this._needState = false;
  }

  async _readState() {
    const params = this.snapshot.length ? { slices: this.snapshot } : {}; // []: every slice
    try {
      const data = await this.call("world.snapshot", params);
      this._emit("snapshot", data);
    } catch (err) {
      this._emit("error", { code: err.code, message: err.message, action: "world.snapshot" });
    }
  }

  _failPending(code, message) {
    for (const p of this._pending.values()) {
      clearTimeout(p.timer);
      p.reject(new CallError(code, message, null, p.action));
    }
    this._pending.clear();
  }

  // seq order -----------------------------------------------------------------------

  _ordered(msg) {
    const seq = msg.seq;
    if (seq <= this.lastSeq || this._buffer.has(seq)) return; // seen already
    this._buffer.set(seq, msg);
    const barrier = this._barrier;
    if (barrier && seq < barrier.seq) barrier.remaining -= 1;
    this._drain();
  }

  _drain() {
    while (this._buffer.has(this.lastSeq + 1)) {
      const msg = this._buffer.get(this.lastSeq + 1);
      this._buffer.delete(this.lastSeq + 1);
      this.lastSeq += 1;
      if (msg) this._deliver(msg);
    }
    if (this._barrier && this._barrier.remaining <= 0) {
      // What the host no longer held will not come: pass over the gaps, in order.
      this._barrier = null;
      this._skipGaps();
    }
    clearTimeout(this._gapTimer);
    if (this._buffer.size) this._gapTimer = setTimeout(() => this._skipGaps(), this.gapTimeoutMs);
    this._saveSoon();
  }

  _skipGaps() {
    const seqs = [...this._buffer.keys()].sort((a, b) => a - b);
    for (const seq of seqs) {
      const msg = this._buffer.get(seq);
      this._buffer.delete(seq);
      this.lastSeq = Math.max(this.lastSeq, seq);
      if (msg) this._deliver(msg);
    }
  }

  _saveSoon() {
    if (this._saveTimer) return;
    this._saveTimer = setTimeout(() => {
      this._saveTimer = null;
      this._save();
    }, 250);
  }

  _deliver(msg) {
    const rid = msg.re;
    if (rid !== undefined && rid !== null) {
      const pending = this._pending.get(rid);
      if (pending) {
        this._pending.delete(rid);
        clearTimeout(pending.timer);
        if (msg.signal === "error") {
          const e = msg.data || {};
          pending.reject(new CallError(e.code, e.message, e.details, e.action ?? pending.action));
        } else {
          pending.resolve(msg.data);
        }
      }
      return; // a reply to a request of this page's (or of the page before a refresh)
    }
    if (msg.signal === "session.ended") {
      this._ended = true;
      this._forget();
      this._emit("ended", msg.data);
    }
    this._emit("signal", msg);
    this._emit(msg.signal, msg.data);
  }
}

/** Create a client and connect it; resolves once the session is open. */
export async function connect(options = {}) {
  const client = new WorldhostClient(options);
  await client.connect();
  return client;
}
