"""The ``worldhost`` command: serve, call, inspect, export, import, token."""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import secrets
import signal
import sys
from typing import Any

import trio

from host import config as config_mod


SERVER_GC_THRESHOLDS = (10_000, 10, 10)


def _serve(args: argparse.Namespace) -> int:
    from host.server import Host, StartupError
    from state.store import StoreFailed, StoreTooNew

    try:
        cfg = config_mod.load(args.config)
        cfg = config_mod.override(cfg, host=args.host, port=args.port,
                                  db=args.db)
        host = Host(cfg)
    except (config_mod.ConfigError, StartupError) as exc:
        print(f"worldhost: {exc}", file=sys.stderr)
        return 2
    # A server allocates fast (every tick, every frame) and keeps a big heap: with
    # the default thresholds a full collection, tens of ms for the whole loop, comes
    # every second or two. These make every collection about 15x rarer.
    gc.set_threshold(*SERVER_GC_THRESHOLDS)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                started = await nursery.start(host.run)
                print(f"listening on ws://{started.listen_host}:{started.port}/", flush=True)

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


def _startup_failure(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_failure(inner, kinds)
            if found is not None:
                return found
    return None


def _call(args: argparse.Namespace) -> int:
    from host.client import CallError, connect

    try:
        params = json.loads(args.params) if args.params else {}
    except json.JSONDecodeError as exc:
        print(f"worldhost call: params are not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(params, dict):
        print("worldhost call: params must be a JSON object", file=sys.stderr)
        return 2

    async def main() -> Any:
        async with connect(args.url, name=args.name, token=args.token,
                           reconnect=False) as client:
            try:
                return await client.call(args.action, **params)
            finally:
                with trio.move_on_after(2):
                    await client.close_session()

    try:
        data = trio.run(main)
    except CallError as exc:
        print(json.dumps({"error": exc.code, "message": exc.message, "details": exc.details}))
        return 1
    except OSError as exc:
        print(f"worldhost call: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(data, indent=None, sort_keys=True))
    return 0


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

    call = sub.add_parser("call", help="send one action and print its reply as JSON")
    call.add_argument("action")
    call.add_argument("params", nargs="?", default="{}")
    call.add_argument("--url", default="ws://127.0.0.1:8765/")
    call.add_argument("--name", default="cli")
    call.add_argument("--token", default=os.environ.get("WORLDHOST_TOKEN"))
    call.set_defaults(func=_call)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("WORLDHOST_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
