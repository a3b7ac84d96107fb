"""The ``worldhost`` command: serve, call, actions, inspect, export, import, token."""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import secrets
import shlex
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from host import config as config_mod


SERVER_GC_THRESHOLDS = (10_000, 10, 10)


def _serve(args: argparse.Namespace) -> int:
    from host.server import Server, StartupError
    from state.store import StoreFailed, StoreTooNew

    try:
        cfg = config_mod.load(args.config)
        cfg = config_mod.override(cfg, host=args.host, port=args.port,
                                  db=args.db)
        cfg, created = config_mod.with_admin_token(cfg)
        host = Server(cfg)
    except (config_mod.ConfigError, StartupError) as exc:
        print(f"worldhost: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"worldhost: cannot write the admin token file: {exc}", file=sys.stderr)
        return 2
    if created is not None:
        _announce_admin_token(args, cfg.host.admin_token, created)
    # A server allocates fast (every tick, every frame) and keeps a big heap: with
    # the default thresholds a full collection, tens of ms for the whole loop, comes
    # every second or two. These make every collection about 15x rarer.
    gc.set_threshold(*SERVER_GC_THRESHOLDS)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                started = await nursery.start(host.run)
                print(f"listening on ws://{started.listen_host}:{started.port}/", flush=True)
                if started.tcp_port is not None:
                    tcp_host = cfg.transports.tcp.host or started.listen_host
                    print(f"listening on tcp://{tcp_host}:{started.tcp_port}", flush=True)

                async def on_signals() -> None:
                    async for signum in signals:
                        # later signals while shutting down change nothing
                        logging.getLogger("worldhost").info(
                            "%s received; shutting down", signal.Signals(signum).name)
                        host.stop()

                nursery.start_soon(on_signals)
                await host.stopped.wait()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:  # noqa: BLE001 - unwrap trio's exception groups
        reason = _startup_failure(exc, (StoreTooNew, StoreFailed, StartupError,
                                        config_mod.ConfigError))
        if reason is None:
            raise
        print(f"worldhost: {reason}", file=sys.stderr)
        return 2
    return 0


def _announce_admin_token(args: argparse.Namespace, token: str, path: Path) -> None:
    """Shown once, when serve creates the admin token: how to use it."""
    where = "".join(f" --{flag} {shlex.quote(value)}" for flag, value in
                    (("config", args.config), ("db", args.db)) if value)
    program = sys.argv[0] if Path(sys.argv[0]).name == "worldhost" else "worldhost"
    print(f"admin token created: {token}\n"
          f"  kept in {path} (mode 0600) and reused on later starts; to act as admin:\n"
          f"  {program} call --admin{where} map.import @map.json\n"
          f"  (or --token TOKEN, or WORLDHOST_ADMIN_TOKEN=TOKEN)", flush=True)


def _startup_failure(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_failure(inner, kinds)
            if found is not None:
                return found
    return None


def _params(text: str) -> dict[str, Any]:
    """Params from the command line: JSON, ``@FILE`` (a JSON file) or ``@-`` (stdin)."""
    if text.startswith("@"):
        name = text[1:]
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except OSError as exc:
            raise _Usage(f"cannot read params file {name}: {exc.strerror}") from None
    try:
        params = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise _Usage(f"params are not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise _Usage("params must be a JSON object")
    return params


class _Usage(Exception):
    """A command-line mistake: printed on stderr, exit 2."""


def _client_token(args: argparse.Namespace) -> str | None:
    """--token wins; with --admin, WORLDHOST_ADMIN_TOKEN, the config's admin_token, then
    the token serve keeps beside the store (found from --config/--db as serve does);
    without, WORLDHOST_TOKEN."""
    if args.token:
        return str(args.token)
    if not args.admin:
        return os.environ.get("WORLDHOST_TOKEN") or None
    try:
        cfg = config_mod.override(config_mod.load(args.config), db=args.db)
    except config_mod.ConfigError as exc:
        raise _Usage(str(exc)) from None
    token = cfg.admin_token or config_mod.read_admin_token(cfg.host.db)
    if not token:
        where = config_mod.admin_token_path(cfg.host.db)
        raise _Usage(f"--admin: no admin token: set WORLDHOST_ADMIN_TOKEN, pass --token, or "
                     f"start `worldhost serve` once on this store so it creates {where} "
                     f"(give call the same --config/--db as serve)")
    return token


async def _call_once(args: argparse.Namespace, token: str | None, action: str,
                     params: dict[str, Any]) -> Any:
    """Open a session, make one call, close the session."""
    from host.client import connect

    async with connect(args.url, name=args.name, token=token, reconnect=False,
                       timeout=args.timeout) as client:
        try:
            return await client.call(action, params)
        finally:
            with trio.move_on_after(2):
                await client.close_session()


def _run_call(args: argparse.Namespace, action: str, params: dict[str, Any]) -> Any:
    """Make one call; a failure is printed (the wire's error data on stdout) and
    raised as SystemExit with the exit code."""
    from host.client import CallError, CallTimeout

    try:
        if args.url is None:
            cfg = config_mod.load(args.config)
            args.url = f"ws://{cfg.host.bind}:{cfg.host.port}/"
        return trio.run(_call_once, args, _client_token(args), action, params)
    except (_Usage, config_mod.ConfigError) as exc:
        print(f"worldhost {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except CallError as exc:
        print(json.dumps(exc.data, sort_keys=True))
        if exc.code == "forbidden" and not args.admin:
            print(f"worldhost {args.command}: {exc.message}; if you run this host, add --admin "
                  f"(see `worldhost call --help`)", file=sys.stderr)
        raise SystemExit(1) from None
    except CallTimeout as exc:  # before OSError: TimeoutError is one
        print(f"worldhost {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        print(f"worldhost {args.command}: cannot reach {args.url}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _call(args: argparse.Namespace) -> int:
    try:
        params = _params(args.params)
    except _Usage as exc:
        print(f"worldhost call: {exc}", file=sys.stderr)
        return 2
    data = _run_call(args, args.action, params)
    print(json.dumps(data, indent=None, sort_keys=True))
    return 0


def _actions(args: argparse.Namespace) -> int:
    params = {"actions": args.names} if args.names else {}
    described = _run_call(args, "host.describe", params)["actions"]
    if args.json:
        print(json.dumps(described, indent=2, sort_keys=True))
        return 0
    width = max((len(a["name"]) for a in described), default=6)
    print(f"{'action':<{width}}  {'role':<6}  {'world':<7}  description")
    for a in described:
        world = "changes" if a["changes_world"] else "reads"
        print(f"{a['name']:<{width}}  {a['role']:<6}  {world:<7}  {a['description']}")
    return 0


def _connect(args: argparse.Namespace) -> int:
    from host import connect
    from host.client import CallError

    try:
        if args.url is None:
            cfg = config_mod.load(args.config)
            args.url = f"ws://{cfg.host.bind}:{cfg.host.port}/"
        connect.opener_for(args.url)  # a bad URL is told before anything else
        token = _client_token(args)
        return trio.run(partial(connect.run, args.url, name=args.name, token=token,
                                history=args.history))
    except (_Usage, config_mod.ConfigError, ValueError) as exc:
        print(f"worldhost connect: {exc}", file=sys.stderr)
        return 2
    except CallError as exc:
        print(f"worldhost connect: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"worldhost connect: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _token(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token: {token}")
    print("add this line under [host.tokens] in your config:")
    print(f'"{digest}" = "{args.role}"')
    return 0


def _offline(args: argparse.Namespace) -> int:
    from host import offline

    try:
        return offline.run(args)
    except BaseException as exc:  # noqa: BLE001 - unwrap trio's exception groups
        reason = _startup_failure(exc, (offline.OfflineError,))
        if reason is None:
            raise
        print(f"worldhost {args.command}: {reason}", file=sys.stderr)
        return 2


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="the host (default: from --config, else ws://127.0.0.1:8765/)")
    parser.add_argument("--name", default="cli", help="the session's name")
    parser.add_argument("--token", default=None,
                        help="token to open the session with (default: WORLDHOST_TOKEN; "
                             "none in open mode gives a player)")
    parser.add_argument("--admin", action="store_true",
                        help="open an admin session: the token is WORLDHOST_ADMIN_TOKEN, the "
                             "config's admin_token, or the one serve created beside the store")
    parser.add_argument("--config", default=None, help="with --admin: serve's config file")
    parser.add_argument("--db", default=None, help="with --admin: serve's store file")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the reply (default 30)")


def _new_plugin(args: argparse.Namespace) -> int:
    from pathlib import Path

    from host import scaffold

    try:
        target = scaffold.new_plugin(args.name, Path(args.dir))
    except scaffold.ScaffoldError as exc:
        print(f"worldhost new-plugin: {exc}", file=sys.stderr)
        return 2
    print(f"created {target}")
    print(f"next: cd {target} && python -m pytest -q   (see its README.md)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldhost", description="Serve a world over WebSocket; inspect, export and "
                                      "import its store.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the host")
    serve.add_argument("--config", default=None, help="config file (default: built-in defaults)")
    serve.add_argument("--db", default=None, help="SQLite store file")
    serve.add_argument("--host", default=None, help="address to bind")
    serve.add_argument("--port", type=int, default=None, help="port (0 picks a free one)")
    serve.set_defaults(func=_serve)

    call = sub.add_parser(
        "call", help="send one action and print its reply as JSON",
        description="Open a session, send one action, print its reply data as JSON (an "
                    "error: the wire's error data, exit 1).")
    call.add_argument("action")
    call.add_argument("params", nargs="?", default="{}",
                      help="a JSON object, @FILE.json, or @- for stdin")
    _client_options(call)
    call.set_defaults(func=_call)

    actions = sub.add_parser("actions", help="list the actions a host serves (host.describe)")
    actions.add_argument("names", nargs="*", help="only these actions")
    actions.add_argument("--json", action="store_true",
                         help="everything, with each action's params as JSON Schema")
    _client_options(actions)
    actions.set_defaults(func=_actions)

    conn = sub.add_parser(
        "connect", help="an interactive session over ws:// or tcp://",
        description="Open a session and type actions: a name, then JSON params "
                    "(chat.say {\"text\": \"hi\"}). Replies and signals are printed "
                    "pretty; after a server restart the session resumes by itself.")
    conn.add_argument("url", nargs="?", default=None,
                      help="ws://HOST:PORT/ or tcp://HOST:PORT (default: from --config, "
                           "else ws://127.0.0.1:8765/)")
    conn.add_argument("--name", default="terminal", help="the session's name")
    conn.add_argument("--token", default=None,
                      help="token to open the session with (default: WORLDHOST_TOKEN)")
    conn.add_argument("--admin", action="store_true",
                      help="open an admin session, with the token `call --admin` uses")
    conn.add_argument("--config", default=None, help="serve's config file")
    conn.add_argument("--db", default=None, help="with --admin: serve's store file")
    conn.add_argument("--history", default=str(Path.home() / ".worldhost_history"),
                      help="readline history file (on a terminal)")
    conn.set_defaults(func=_connect)

    token = sub.add_parser("token", help="tokens for auth = \"token\"")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    new = token_sub.add_parser("new", help="print a new token and its config line")
    new.add_argument("--role", choices=["viewer", "player", "admin"], default="player")
    new.set_defaults(func=_token)

    inspect = sub.add_parser("inspect", help="describe a store file")
    inspect.add_argument("db")
    inspect.set_defaults(func=_offline)
    export = sub.add_parser("export", help="write a store's world to JSON or CBOR")
    export.add_argument("db")
    export.add_argument("--out", required=True, help="FILE.json or FILE.cbor")
    export.set_defaults(func=_offline)
    imp = sub.add_parser("import", help="replace a store's world from an export")
    imp.add_argument("db")
    imp.add_argument("file")
    imp.add_argument("--config", default=None)
    imp.set_defaults(func=_offline)

    new_plugin = sub.add_parser("new-plugin", help="start a plugin project from the template")
    new_plugin.add_argument("name", help="the plugin's name: lowercase, e.g. scoreboard")
    new_plugin.add_argument("--dir", default=".", help="where to create worldhost-NAME/")
    new_plugin.set_defaults(func=_new_plugin)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("WORLDHOST_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`worldhost actions | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
