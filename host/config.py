"""The host's configuration: ``plugins.toml`` read strictly, then CLI overrides.

Every table is a msgspec Struct, so an unknown key or a wrong type is refused
with one line naming the file, the key and what was expected.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec


class ConfigError(Exception):
    """The configuration is wrong; the message is one line for the operator."""


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_frame_bytes: int = 16 * 1024 * 1024
    max_transfer_bytes: int = 256 * 1024 * 1024  # a chunked request, joined
    max_open_transfer_bytes: int = 256 * 1024 * 1024  # a connection's unfinished transfers
    max_all_transfer_bytes: int = 512 * 1024 * 1024  # every connection's, together
    transfer_timeout_s: float = 60.0  # a chunked request unfinished this long is dropped
    max_frame_items: int = 4_000_000  # values one frame (or joined transfer) of an admin may hold
    max_player_frame_items: int = 100_000  # the same, from anyone else (or before a session)
    outbox_size: int = 256
    max_lag_s: float = 2.0  # a signal waiting longer than this in an outbox drops the client
    socket_send_buffer: int = 256 * 1024
    rate_per_s: float = 100.0
    rate_burst: int = 200
    flood_factor: float = 10.0
    max_connections_per_address: int = 64  # connections without a session, per address
    dispatch_queue: int = 1024
    max_connections: int = 0  # open sockets in all; 0: derived from the open-file limit
    max_id_bytes: int = 128  # a request id longer than this (as text) is a bad_request
    max_ping_bytes: int = 65536  # host.ping echoes params up to this size
    max_frame_bytes_before_session: int = 131072  # a bigger frame without a session: 1009
    max_http_header_bytes: int = 16 * 1024  # an HTTP request's line and headers
    http_timeout_s: float = 10.0  # to send an HTTP request's line and headers
    http_body_timeout_s: float = 30.0  # to send an HTTP request's body, once its headers came


WEBSOCKETS = ("trio-websocket", "websockets")
WEBSOCKET_ENV = "WORLDHOST_WEBSOCKET"


def default_websocket() -> Literal["trio-websocket", "websockets"]:
    """``host.websocket`` when the config does not set it: websockets (it costs less
    a round trip and passes the suite and the kill -9 loop as trio-websocket does),
    or what ``WORLDHOST_WEBSOCKET`` names (so a whole test suite can run on either)."""
    name = os.environ.get(WEBSOCKET_ENV) or "websockets"
    if name == "trio-websocket":
        return "trio-websocket"
    if name != "websockets":
        raise ConfigError(f"{WEBSOCKET_ENV}={name!r}: the default for key 'host.websocket' "
                          f"must be one of {', '.join(WEBSOCKETS)}")
    return "websockets"


class HostSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    bind: str = "127.0.0.1"  # the address to listen on (``host``: its old, deprecated name)
    port: int = 8765
    db: str = "data/world.db"
    auth: Literal["open", "token"] = "open"
    admin_token: str = ""
    tokens: dict[str, Literal["viewer", "player", "admin"]] = {}
    allowed_origins: list[str] = []
    ping_interval_s: float = 15.0
    ping_timeout_s: float = 25.0
    # the WebSocket library behind the transport (host/websocket.py, host/websockets_channel.py)
    websocket: Literal["trio-websocket", "websockets"] = msgspec.field(
        default_factory=default_websocket)
    websocket_compression: bool = False  # permessage-deflate; needs websocket = "websockets"
    limits: Limits = Limits()


class SessionsSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    resume_ttl_s: float = 300.0
    auth_timeout_s: float = 10.0
    replay_buffer: int = 1000
    remembered_replies: int = 1000
    max_failed_opens: int = 3
    replay_buffer_bytes: int = 4 * 1024 * 1024  # per session, counted as encoded
    remembered_replies_bytes: int = 1024 * 1024  # per session, ids and reply data
    max_sessions_per_address: int = 64  # 0: no limit; admins are not counted
    max_sessions_per_token: int = 64  # 0: no limit
    max_topics: int = 64  # topics one session may subscribe to
    max_topic_length: int = 300  # characters of one topic
    outbound_log: bool = True  # signals are logged with their commit, replayable after a restart
    outbound_log_size: int = 1000  # signals kept per session in the log
    outbound_log_age_s: float = 300.0  # and for this long
    outbound_log_delay_s: float = 0.05  # a reply to a read waits at most this long unlogged


class StoreSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    durability: Literal["journal", "snapshot"] = "journal"
    debounce_s: float = 1.0
    max_delay_s: float = 5.0
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL"
    busy_timeout_ms: int = 5000
    # where journal commits run: "thread" never lets a stalled disk stall the event loop;
    # "loop" (with synchronous OFF/NORMAL only) saves the hand-off, but a write the
    # kernel blocks (a frozen filesystem) then holds every client
    journal_commits: Literal["thread", "loop"] = "thread"


class WorldsSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    dir: str = ""  # where worlds other than the default one keep their stores; "": beside --db
    server_db: str = ""  # the server's own store (sessions, the registry); "": DB.server.db
    idle_unload_s: float = 300.0  # a world with nobody in it and nothing running unloads
    max_worlds: int = 1000  # worlds the registry may hold (archived ones not counted)
class TcpSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: bool = False
    host: str = ""  # "": the [host] host
    port: int = 8766
    max_line_bytes: int = 16 * 1024 * 1024  # as max_frame_bytes: a line is a frame
    line_timeout_s: float = 30.0  # to finish a line once its first byte came


class TransportsSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    tcp: TcpSection = TcpSection()


class PluginEntry(msgspec.Struct, frozen=True):
    module: str | None = None
    enabled: bool = True


BUILTIN_PLUGINS: dict[str, dict[str, Any]] = {
    name: {"module": f"plugins.{name}"}
    for name in ("map", "simulation", "process_controller", "navigation", "session_cleanup",
                 "chat")
}


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    host: HostSection = msgspec.field(default_factory=HostSection)  # reads the environment
    sessions: SessionsSection = SessionsSection()
    store: StoreSection = StoreSection()
    worlds: WorldsSection = WorldsSection()
    transports: TransportsSection = TransportsSection()
    plugins: dict[str, dict[str, Any]] = msgspec.field(
        default_factory=lambda: {k: dict(v) for k, v in BUILTIN_PLUGINS.items()})
    source: str = "<defaults>"

    @property
    def admin_token(self) -> str:
        """The configured admin token: ``WORLDHOST_ADMIN_TOKEN``, else ``host.admin_token``."""
        return os.environ.get("WORLDHOST_ADMIN_TOKEN") or self.host.admin_token

    def plugin_entries(self) -> dict[str, tuple[PluginEntry, dict[str, Any]]]:
        """Per plugin table: its module/enabled entry and the rest, its settings."""
        out = {}
        for name, table in self.plugins.items():
            entry = PluginEntry(module=table.get("module"), enabled=table.get("enabled", True))
            settings = {k: v for k, v in table.items() if k not in ("module", "enabled")}
            out[name] = (entry, settings)
        return out


def error_path(exc: msgspec.ValidationError, root: str) -> tuple[str, str]:
    """(path, message) of a msgspec validation error, the path written from ``root``;
    an unknown field is named in the path too."""
    message, _, where = str(exc).partition(" - at `$")
    path = root + where.rstrip("`")
    if message.startswith("Object contains unknown field"):
        path += "." + message.split("`")[1]
    return path, message


def _explain(exc: msgspec.ValidationError, source: str) -> ConfigError:
    path, message = error_path(exc, "")
    key = path.lstrip(".") or "(top level)"
    if message.startswith("Object contains unknown field"):
        return ConfigError(f"{source}: unknown key {key!r}")
    return ConfigError(f"{source}: key {key!r}: {message}")


def load(path: str | os.PathLike[str] | None) -> Config:
    """Read a config file; None gives the defaults."""
    if path is None:
        return Config()
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return from_dict(raw, source)


DEPRECATED_KEYS = {("host", "host"): "bind"}  # (table, old key) -> the key it is now


def _renamed(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Old spellings of renamed keys, read as the new ones (both at once: an error)."""
    for (table, old), new in DEPRECATED_KEYS.items():
        values = raw.get(table)
        if isinstance(values, dict) and old in values:
            if new in values:
                raise ConfigError(f"{source}: keys '{table}.{old}' and '{table}.{new}' are "
                                  f"the same setting ('{old}' is its deprecated name): "
                                  f"keep '{new}'")
            values = dict(values)
            values[new] = values.pop(old)
            raw = {**raw, table: values}
    return raw


def from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Check a config given as tables; plugin tables are laid over the built-in ones."""
    raw = _renamed(raw, source)
    plugins = raw.get("plugins", {})
    if isinstance(plugins, dict):
        merged = {k: dict(v) for k, v in BUILTIN_PLUGINS.items()}
        for name, table in plugins.items():
            merged[name] = {**merged.get(name, {}), **table} if isinstance(table, dict) else table
        raw = {**raw, "plugins": merged}
    try:
        config = msgspec.convert({**raw, "source": source}, Config)
    except msgspec.ValidationError as exc:
        raise _explain(exc, source) from None
    for name, table in config.plugins.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: key 'plugins.{name}': Expected a table")
        module = table.get("module")
        if module is not None and not isinstance(module, str):
            raise ConfigError(f"{source}: key 'plugins.{name}.module': Expected `str`")
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{source}: key 'plugins.{name}.enabled': Expected `bool`")
    if config.host.websocket_compression and config.host.websocket != "websockets":
        # wsproto inflates a compressed frame whole, before any size check: a small
        # frame could inflate to gigabytes
        raise ConfigError(f"{source}: key 'host.websocket_compression': needs "
                          f"host.websocket = \"websockets\" (trio-websocket cannot bound "
                          f"what a compressed frame inflates to)")
    return config


def override(config: Config, **changes: Any) -> Config:
    """Apply CLI flags (None means not given) to the [host] table."""
    given = {("bind" if k == "host" else k): v for k, v in changes.items() if v is not None}
    if not given:
        return config
    return msgspec.structs.replace(config, host=msgspec.structs.replace(config.host, **given))


def with_sections(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy with some keys of some tables replaced, checked like a file would be."""
    raw = msgspec.to_builtins(config)
    for name, values in sections.items():
        if name == "plugins":
            for plugin, table in values.items():
                raw["plugins"].setdefault(plugin, {}).update(table)
        else:
            raw[name].update(values)
    return from_dict({k: v for k, v in raw.items() if k != "source"}, config.source)


ADMIN_TOKEN_SUFFIX = ".admin-token"


def admin_token_path(db: str) -> Path | None:
    """Where ``worldhost serve`` keeps the admin token it generated: beside the store
    (``DB.admin-token``), so ``worldhost call --admin`` finds it from the same
    --config/--db. None for an in-memory store."""
    if db == ":memory:":
        return None
    return Path(db + ADMIN_TOKEN_SUFFIX)


def read_admin_token(db: str) -> str | None:
    """The generated admin token of the store at ``db``, if there is one."""
    path = admin_token_path(db)
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def with_admin_token(config: Config) -> tuple[Config, Path | None]:
    """The config ``serve`` runs with: when no admin token is configured, the one kept
    beside the store, generated (mode 0600) on the first start so a new user can
    become admin without editing anything. Returns the config and, only when the
    token was just created, its file (so serve prints it once).

    With ``auth = "token"`` the admin token (configured or generated) is accepted
    as an admin token too, as if listed under ``[host.tokens]``.
    """
    created = None
    token = config.admin_token
    if not token:
        path = admin_token_path(config.host.db)
        token = read_admin_token(config.host.db) or ""
        if not token and path is not None:
            token = secrets.token_urlsafe(32)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another serve wrote it just now: use theirs
                token = read_admin_token(config.host.db) or ""
            else:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.write(token + "\n")
                created = path
        if not token:
            return config, None
        config = override(config, admin_token=token)
    if config.host.auth == "token":
        digest = hashlib.sha256(token.encode()).hexdigest()
        config = override(config, tokens={**config.host.tokens, digest: "admin"})
    return config, created
