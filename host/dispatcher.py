"""The dispatcher: the one task that applies actions, and so the only writer of the world.

Requests from connections and internal actions from background tasks share one
queue and are applied one at a time: session gate, params checked against the
action's schema, handler run in a transaction, then either commit (journal the
action, queue its reply and signals behind the commit) or roll back (the world
is exactly as it was).
"""

from __future__ import annotations

import functools
import logging
import math
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from host.actions import (
    Action,
    ActionError,
    Context,
    Emit,
    Invalid,
    UnknownAction,
)
from host.api import AppliedAction
from host.config import error_path
from host.messages import Disconnect, Effects, Request, Signal
from host.sessions import Session, SessionTable
from host.topics import Interest
from state.codec import encode_cbor, encode_scalar, load_stored
from state.slices import Slices
from state.store import JournalEntry

if TYPE_CHECKING:
    from host.plugins import Registry
    from state.saver import Saver

log = logging.getLogger("worldhost.dispatcher")


@functools.cache
def _boxed(params: Any) -> tuple[Any, bool]:
    """How to convert to a params type: a struct of one field ``params`` of a type
    that is not a struct itself, or None for a struct (msgspec keeps what it learns
    of a struct type, so a conversion through it costs a third of converting to the
    bare type); and whether the type is ``dict[str, Any]``, which a decoded object
    with string keys already is (JSON's always are), as is."""
    if isinstance(params, type) and issubclass(params, msgspec.Struct):
        return None, False
    return msgspec.defstruct("Params", [("params", params)]), params == dict[str, Any]


def validation_details(exc: msgspec.ValidationError, boxed: bool = False) -> dict[str, str]:
    """``details`` of a params error: the path names the bad field itself, also when
    the field is missing (msgspec reports that at the enclosing object)."""
    if boxed:  # as if converted to the bare type: ``$.params...`` is ``$...``
        exc = msgspec.ValidationError(str(exc).replace("`$.params", "`$"))
    path, message = error_path(exc, "params")
    if message.startswith("Object missing required field"):
        path += "." + message.split("`")[1]
    return {"path": path, "message": message}


ERROR_TEXT_CHARS = 1024  # of an error's message, and of each text in its details


def _bounded(text: str) -> str:
    """An error's text, cut short: a message may name what the client sent (an
    unknown field's name, a transfer id), and one reply must not echo megabytes."""
    if len(text) <= ERROR_TEXT_CHARS:
        return text
    return f"{text[:ERROR_TEXT_CHARS]}… ({len(text)} characters in all)"


class Gate(Protocol):
    """What the dispatcher asks of the session gate (host/gate.py)."""

    def check(self, req: Request, action: Action | None, session: Session | None) -> None: ...

    def disconnected(self, conn: Any) -> None: ...

    def session_ended(self, session_id: str, reason: str, effects: Effects) -> None: ...

    def max_failed_opens(self) -> int: ...


class Dispatcher:
    """The one writer of one world (or of the server's own state: sessions and the
    registry of worlds). It receives everything it works with when built; the
    world that owns it sets ``saver`` and ``slices`` once its store is loaded."""

    def __init__(self, *, registry: Registry, sessions: SessionTable,
                 audience: Mapping[str, Session], gate: Gate, api: Any,
                 clock: Callable[[], float], hooks: Any, queue_size: int,
                 on_changed: Callable[[Effects, list[str]], None] | None = None,
                 settle_heap: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.sessions = sessions  # every session: a journaled one may name any
        self.audience = audience  # the sessions this world's broadcasts reach
        self.gate = gate
        self.api = api
        self.clock = clock
        self.hooks = hooks  # the pluggy hook caller of this world's plugins
        self.on_changed = on_changed
        self.settle_heap = settle_heap
        self.slices: Slices = Slices()
        self.saver: Saver = None  # type: ignore[assignment]  # set once the store is open
        self.seed = ""
        self.send_channel, self.receive_channel = trio.open_memory_channel[Any](queue_size)
        self.next_id = 1
        self.replaying = False
        self.accepting = True
        self.applied = 0
        self.errors: Counter[str] = Counter()  # error replies by code, for /metrics
        self.idle = True  # no item is being applied right now
        self.queued = 0  # items in the channel, not yet taken by the dispatcher task
        self.last_request_at = 0.0  # when a session's action last applied here
        self._interest: Interest | None = None
        self._watchers: list[tuple[frozenset[str], trio.Event]] = []  # wait_changed

    # submission -----------------------------------------------------------
    async def put(self, item: Request | Disconnect) -> None:
        """Queue an item; when nothing is queued it is applied at once, which is the
        same one-at-a-time order (handling never awaits) without a task switch. The
        caller must reach a checkpoint before its next put (a connection's reader
        does, in sending or reading), so that one client cannot starve the rest.

        An item applied at once whose outputs wait for a journal commit yields one
        turn first, so that the other connections' requests ready in this turn are
        applied too and one commit covers them all; one its client sent with more
        right behind it leaves the commit to the last of them (or, if that one
        never comes here, to the writer task). A commit the store's thread has
        finished is released first."""
        self.saver.poll()
        if self.applies_now:
            self.idle = False
            try:
                self._apply_item(item)
            finally:
                self.idle = True
            saver = self.saver
            if saver.due_now:
                if isinstance(item, Request) and item.more:
                    saver.commit_soon()
                else:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    saver.commit_now()
            return
        await self._enqueue(item)

    @property
    def applies_now(self) -> bool:
        """Whether ``put`` would apply an item at once (nothing applying or queued)."""
        return self.idle and not self.queued

    async def submit(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        """Internal action from a background task; returns once durable."""
        request = Request(action, params, internal=True, done=trio.Event())
        await self._enqueue(request)
        await request.done.wait()  # type: ignore[union-attr]
        if request.failure is not None:
            raise request.failure
        return request.result

    async def _enqueue(self, item: Request | Disconnect) -> None:
        self.queued += 1
        try:
            await self.send_channel.send(item)
        except BaseException:  # not queued after all
            self.queued -= 1
            raise

    async def run(self) -> None:
        async with self.receive_channel:
            async for item in self.receive_channel:
                self.saver.poll()
                self.idle = False
                try:
                    while True:  # and what queued up meanwhile, in order
                        self.queued -= 1
                        self._apply_item(item)
                        try:
                            item = self.receive_channel.receive_nowait()
                        except trio.WouldBlock:
                            break
                finally:
                    self.idle = True
                self.saver.commit_now()

    def _apply_item(self, item: Request | Disconnect) -> None:
        if isinstance(item, Disconnect):
            self.gate.disconnected(item.conn)
        else:
            self.handle(item)

    # applying ----------------------------------------------------------------
    def handle(self, req: Request) -> None:
        conn = req.conn
        session = None if req.internal or conn is None else conn.session
        try:
            if req.error is not None:
                raise req.error
            if not self.accepting and not req.internal:  # plugins' shutdown hooks still submit
                raise ActionError("the host is shutting down", code="conflict")
            action = self.registry.actions.get(req.action)
            if action is not None and action.internal and not req.internal:
                action = None
            if not req.internal:
                self.gate.check(req, action, session)  # before a session: unauthenticated
            if action is None:
                raise UnknownAction(f"no plugin handles the action {req.action!r}")
            if not req.internal:
                if session is not None and req.has_id and req.id is not None:
                    remembered = session.recall(req.id)
                    if remembered is not None:
                        sig = Signal(remembered[0], remembered[1], req.id, True, encoding=req.encoding)
                        self.release(req, Effects([(session, sig)]))
                        return
            params = self.check_params(action, req.params)
            if action.gateway:
                effects: Effects = action.handler(self.gate, req, params)  # type: ignore[call-arg, arg-type, assignment]
            else:
                effects = self.apply(action, params, session, req)
        except ActionError as exc:
            effects = self._error(req, session, exc)
        self.release(req, effects)

    def check_params(self, action: Action, params: Any) -> Any:
        if action.params is None:
            if params:
                raise Invalid(f"{action.name} takes no params",
                              details={"path": "params", "message": "expected no params"})
            return None
        target = action.params
        box, any_dict = _boxed(target)
        if any_dict and type(params) is dict and all(type(k) is str for k in params):
            return params
        try:
            if box is not None:
                return msgspec.convert({"params": params}, box).params
            return msgspec.convert(params, target)
        except msgspec.ValidationError as exc:
            details = validation_details(exc, box is not None)
            raise Invalid(f"invalid params for {action.name}: {details['message']} "
                          f"at {details['path']}", details=details) from None

    def apply(self, action: Action, params: Any, session: Session | None, req: Request | None,
              *, at: float | None = None, entry_id: int | None = None,
              memo: dict[str, Any] | None = None) -> Effects:
        """Run one handler in a transaction. Raises ActionError with the world unchanged."""
        world = self.slices
        if action.changes_world:
            seed_id = entry_id if entry_id is not None else self.next_id
        else:
            seed_id = 0
        now = self.clock() if at is None else at
        ctx = Context(world=world, now=now, session=session,
                      settings=self.registry.settings.get(self.registry.action_owner[action.name]),
                      seed=f"{self.seed}:{seed_id}", host=self.api,
                      memo=memo if memo is not None else {})
        if action.changes_world:  # slices are read-only between transactions
            world.begin()
        try:
            result = action.handler(ctx, params)  # type: ignore[call-arg]
        except ActionError:
            world.rollback()
            raise
        except Exception as exc:
            world.rollback()
            log.error("action %s failed in its handler; the world is unchanged\n%s",
                      action.name, traceback.format_exc())
            raise ActionError(f"{action.name} failed inside its handler ({type(exc).__name__}); "
                              f"the world is unchanged", code="internal_error") from None
        replacements = world.replacements
        changed = world.commit() if action.changes_world else []
        if world.replacements != replacements and not self.replaying:
            self.settle_heap()
        data = result if result is not None else {}
        outcome = Effects(data=data)
        if req is not None and not req.internal:
            reply = Signal(action.reply_signal, data, req.id, True, encoding=req.encoding)
            outcome.outputs.append((session if session is not None else req.conn, reply))
            if session is not None:
                session.remember(req.id if req.has_id else None, action.reply_signal, data,
                                 durable=action.changes_world)
                session.actions_applied += 1
                session.last_active = now
                if action.changes_world:
                    self.last_request_at = now
        if ctx.emitted:
            self._route(ctx.emitted, outcome)
        for session_id, reason in ctx.ended:
            self.gate.session_ended(session_id, reason, outcome)
        if changed and not self.replaying and self.on_changed is not None:
            self.on_changed(outcome, changed)
        plain = msgspec.to_builtins(params) if changed and params is not None else {}
        if action.changes_world and changed:
            if not self.replaying:  # (a replayed action's entry is in the journal already)
                outcome.entry = JournalEntry(
                    entry_id if entry_id is not None else self._take_id(), action.name,
                    encode_cbor(plain), now, session.id if session is not None else None,
                    encode_scalar(req.id) if req is not None and req.has_id else None,
                    encode_cbor(ctx.memo) if ctx.memo else None)
            self.saver.changed()
        elif action.changes_world and entry_id is None:
            self._take_id()
        if req is not None and req.internal:
            req.result = data
        self.applied += 1
        if changed:
            applied = AppliedAction(action.name, plain,
                                    session.id if session is not None else None, data, now,
                                    replayed=self.replaying, slices=tuple(changed))
            self.hooks.action_applied(host=self.api, applied=applied)
            for watched, event in self._watchers:
                if not watched.isdisjoint(changed):
                    event.set()
        return outcome

    async def wait_changed(self, slices: Iterable[str], deadline: float = math.inf) -> bool:
        """Wait until an action applied from now on changes one of ``slices`` (True),
        or until trio's clock reaches ``deadline`` (False)."""
        watcher = (frozenset(slices), trio.Event())
        self._watchers.append(watcher)
        try:
            with trio.move_on_at(deadline):
                await watcher[1].wait()
                return True
            return False
        finally:
            self._watchers.remove(watcher)

    def apply_internal(self, name: str, params: dict[str, Any]) -> Effects:
        """Apply an internal action here and now, from code already applying one
        (the session gate serving ``session.*``): checked, journaled, not yet sent."""
        action = self.registry.actions[name]
        return self.apply(action, self.check_params(action, params), None, None)

    def _take_id(self) -> int:
        taken = self.next_id
        self.next_id += 1
        return taken

    @property
    def interest(self) -> Interest:
        """Who among this dispatcher's audience wants which topic."""
        if self._interest is None:
            everyone = self.audience is self.sessions.by_id  # the server's own dispatcher
            self._interest = self.sessions.interest_in(None if everyone else self.api.world_id)
        return self._interest

    def _route(self, emitted: list[Emit], outcome: Effects) -> None:
        for emit in emitted:
            if emit.broadcast:
                shared: dict[str, bytes] = {}  # each encoding of data, made once for all
                targets: Iterable[Session] = (
                    self.audience.values() if emit.topic is None
                    else self.interest.audience(emit.topic, self.audience, emit.participants))
                for s in targets:
                    if s.id != emit.exclude:
                        outcome.outputs.append((s, Signal(emit.signal, emit.data,
                                                          encoded=shared)))
            elif emit.to is not None:
                target = self.audience.get(emit.to)
                if target is not None:
                    outcome.outputs.append((target, Signal(emit.signal, emit.data)))

    def _error(self, req: Request, session: Session | None, exc: ActionError) -> Effects:
        if req.internal:
            req.failure = exc
            return Effects()
        self.errors[exc.code] += 1
        data: dict[str, Any] = {"code": exc.code, "message": _bounded(exc.message),
                                "action": req.action}
        if exc.details is not None:
            data["details"] = {k: _bounded(v) if isinstance(v, str) else v
                               for k, v in exc.details.items()} \
                if isinstance(exc.details, dict) else exc.details
        sig = Signal("error", data, req.id, True, encoding=req.encoding)
        target = session if session is not None else req.conn
        if session is not None and req.has_id:  # a repeated id gets this again, whatever it was
            session.remember(req.id, "error", data)
        outcome = Effects([(target, sig)])
        conn = req.conn
        if conn is not None and req.action in ("session.open", "session.resume") \
                and conn.session is None:
            conn.failed_opens += 1  # any refusal counts: a bad name, a bad token, a flood
        if conn is not None and conn.failed_opens >= self.gate.max_failed_opens():
            outcome.after.append(lambda: conn.close_soon(1008, "too many failed session attempts"))
        return outcome

    def release(self, req: Request | None, effects: Effects) -> None:
        """Hand an action's effects to the saver: they go out once its journal entry
        is durable (at once if it has none and nothing of its session waits). The
        requesting session counts them as held here until then, so that the router
        keeps its next request from overtaking them through another writer."""
        saver = self.saver
        to_sessions = [(t, sig) for t, sig in effects.outputs if isinstance(t, Session)]
        if saver.record(effects.entry, to_sessions):  # nothing to wait for: out now
            _deliver(req, effects)
            saver.sent_unlogged(to_sessions)
            return
        conn = req.conn if req is not None else None
        owner: Session | None = conn.session if conn is not None else None
        if owner is not None:
            owner.hold(saver)

        def release() -> None:
            _deliver(req, effects)
            if owner is not None:
                owner.unhold(saver)

        saver.then(release)

    # replay ----------------------------------------------------------------
    def replay(self, entry: JournalEntry) -> None:
        """Re-apply a journaled action after a restart; its outputs are not sent."""
        action = self.registry.actions.get(entry.action)
        if action is None:
            raise RuntimeError(f"journal entry {entry.id} names action {entry.action!r}, "
                               f"which no loaded plugin serves")
        session = self.sessions.get(entry.session)
        request_id = load_stored(entry.request_id) if entry.request_id is not None else None
        params = self.check_params(action, load_stored(entry.params))
        memo = load_stored(entry.memo) if entry.memo is not None else None
        outcome = self.apply(action, params, session, None, at=entry.at, entry_id=entry.id,
                             memo=memo)
        if session is not None and entry.request_id is not None:
            session.remember(request_id, action.reply_signal, outcome.data, durable=True)
        if entry.action.startswith("sessions.") and "sessions" in self.slices.slices:
            self.sessions.sync(self.slices["sessions"].data())
        self.next_id = max(self.next_id, entry.id + 1)


def _deliver(req: Request | None, effects: Effects) -> None:
    """Send an action's outputs, then run what waited for them."""
    for target, sig in effects.outputs:
        if target is not None:
            target.deliver(sig)
    for after in effects.after:
        after()
    if req is not None and req.done is not None:
        if not req.internal:  # a requester that waits (HTTP)
            req.result = next((sig for _, sig in effects.outputs if sig.has_re), None)
        req.done.set()
