// Types for worldhost.js, the browser client for worldhost. See docs/client-js.md.

/** Where the client is: shown by a UI as "connecting…", "live", "resuming…", "offline". */
export type ConnectionState = "idle" | "connecting" | "resuming" | "open" | "offline" | "closed";

/** A signal from the host: `{signal, re?, seq?, data}`. */
export interface Signal<T = any> {
  signal: string;
  re?: string | number | null;
  seq?: number;
  data: T;
}

/** Any object with sessionStorage's three methods. */
export interface KeyValueStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface ClientOptions {
  /** WebSocket URL; default: the host that served the page, path /ws. */
  url?: string;
  /** The session's name (session.open `name`). Default "browser". */
  name?: string;
  /** A token for `auth = "token"` hosts, or the admin token. */
  token?: string | null;
  /** Per-call timeout in ms (0: none). Default 20000. */
  callTimeoutMs?: number;
  /** A silent connection is pinged after this many ms and dropped if still silent after as many again. Default 10000. */
  heartbeatMs?: number;
  /** Reconnect backoff: the first delay and the cap, in ms (each attempt doubles, with jitter). Defaults 250 and 3000. */
  minDelayMs?: number;
  maxDelayMs?: number;
  /** How long a gap in seq is waited for before it is passed over. Default 2000. */
  gapTimeoutMs?: number;
  /** Slices to read with world.snapshot on the first session of the page and after an incomplete resume ("snapshot" event); [] for all; null (default) for none. */
  snapshot?: string[] | null;
  /** Where the session credentials live; default sessionStorage (one session per tab). */
  storage?: KeyValueStorage;
  /** The key under which they are kept. Default `worldhost:session:<url>`. */
  storageKey?: string;
  /** A WebSocket constructor (tests). Default globalThis.WebSocket. */
  WebSocket?: any;
  /** A prefix for request ids (a random part follows). */
  idPrefix?: string;
}

export interface SessionEvent {
  session_id: string;
  role: "viewer" | "player" | "admin";
  /** True when an existing session was resumed. */
  resumed: boolean;
  /** False when the host no longer held every signal missed (state was re-read if `snapshot` is set). */
  complete: boolean;
  /** True on the first session of this page (or after a new session replaced a lost one). */
  fresh: boolean;
  replayed: number;
}

export interface CallOptions {
  timeoutMs?: number;
}

/** An `error` reply (code as the host names it), or `timeout`, `closed`, `session_lost`. */
export declare class CallError extends Error {
  code: string;
  details?: any;
  action?: string;
}

export declare class WorldhostClient extends EventTarget {
  constructor(options?: ClientOptions);
  readonly url: string;
  state: ConnectionState;
  serverInfo: Record<string, any> | null;
  sessionId: string | null;
  role: "viewer" | "player" | "admin" | null;
  /** The last seq handed out, in order. */
  lastSeq: number;
  /** How many times the session was resumed by this client. */
  resumes: number;
  /** Requests sent and not yet answered. */
  readonly unanswered: number;
  /** Connect; resolves once a session is open or resumed. */
  connect(): Promise<void>;
  /** Send an action; resolves with the reply's data, rejects with CallError. Resent with its id after a reconnect. */
  call<T = any>(action: string, params?: Record<string, any>, options?: CallOptions): Promise<T>;
  on(type: "state", fn: (e: { state: ConnectionState }) => void): () => void;
  on(type: "session", fn: (e: SessionEvent) => void): () => void;
  on(type: "snapshot", fn: (e: { generation: number; slices: Record<string, any> }) => void): () => void;
  on(type: "info", fn: (info: Record<string, any>) => void): () => void;
  on(type: "signal", fn: (s: Signal) => void): () => void;
  on(type: "ended", fn: (e: { session_id: string; reason: string }) => void): () => void;
  on(type: "error", fn: (e: { code: string; message: string; action?: string }) => void): () => void;
  /** A signal by name, e.g. "chat.message", "simulation.ticked": its data. */
  on(type: string, fn: (data: any) => void): () => void;
  /** session.close, forget the credentials, close. */
  endSession(): Promise<void>;
  /** Close and stop reconnecting; the session stays resumable (a refresh resumes it). */
  close(): void;
}

/** ws(s)://<the page's host>/ws */
export declare function defaultUrl(location?: { protocol: string; host: string }): string;
/** A client, connected. */
export declare function connect(options?: ClientOptions): Promise<WorldhostClient>;
