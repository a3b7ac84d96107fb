"""The session gate: who is asking, may they, and the session actions themselves.

``session.open``/``resume``/``close`` need the connection and fresh secrets,
so they are served here rather than by a world handler. They change the
persisted session records only through the internal ``sessions.*`` actions,
whose params hold no secret (only SHA-256 hashes), so the journal can hold
them and replay them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from host.actions import (
    Action,
    ActionError,
    BadRequest,
    Conflict,
    Forbidden,
    Invalid,
    Role,
    Unauthenticated,
)
from host.api import SessionInfo
from host.config import Config
from host.framing import echoable
from host.lobby import check_world_id
from host.messages import Effects, Request, Signal
from host.plugins import Registry
from host.sessions import MAX_SEQ, Session, SessionTable, State, hash_matches, new_token, token_hash
from host.topics import TopicForms
from host.transport import POLICY

if TYPE_CHECKING:
    from host.sync import ClientView
    from host.worlds import Worlds

log = logging.getLogger("worldhost.sessions")

_BAD_RESUME = "invalid or expired resume token"
_DUMMY_HASH = token_hash("no such session")
_RANK = {"viewer": 0, "player": 1, "admin": 2}


def credential_of(token_sha256: str) -> str:
    """What a session record keeps of the token that granted its role: a fingerprint
    of the token's SHA-256 (the form ``[host.tokens]`` lists), never the token, and
    not the config's own hash either, so a snapshot or export reveals neither."""
    return hashlib.sha256(b"worldhost credential\0" + token_sha256.lower().encode()).hexdigest()[:32]


# what a connection without a session may send
OPEN_ACTIONS = frozenset({"session.open", "session.resume", "host.ping"})  # PROTOCOL.md


class SessionGate:
    """The session gate: who may send what, and the ``session.*`` and ``world.*``
    actions, which need the connection and so are served here rather than by a
    handler. It changes sessions and the registry only through the server's
    internal actions, applied by the server's own dispatcher."""

    def __init__(self, config: Config, registry: Registry, sessions: SessionTable,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.registry = registry
        self.sessions = sessions
        self.clock = clock
        # wired by the server, which builds these with the gate in hand
        self.worlds: Worlds = None  # type: ignore[assignment]
        self.view: ClientView = None  # type: ignore[assignment]
        self.topic_forms: TopicForms | None = None  # what world.subscribe accepts, once known

    def max_failed_opens(self) -> int:
        return self.config.sessions.max_failed_opens

    # the gate ---------------------------------------------------------------
    def check(self, req: Request, action: Action | None, session: Session | None) -> None:
        rid, limit = req.id, self.config.host.limits.max_id_bytes
        if rid is not None and not echoable(rid, limit):
            # an id is kept with its reply for repeats and replays: keep it small; and
            # not echoed either (its reply's re is null)
            req.id, req.has_id = None, False
            raise BadRequest(f"id is longer than max_id_bytes ({limit} bytes)")
        if session is None:
            if action is None or action.name not in OPEN_ACTIONS:  # an unknown one too
                raise Unauthenticated(f"{req.action} needs an open session: "
                                      f"send session.open or session.resume first")
            return
        if action is not None and Role.parse(session.role) < action.role:
            raise Forbidden(f"{action.name} needs role {action.role.name}; "
                            f"this session is {session.role}")

    # session.open -------------------------------------------------------------
    def _role_for(self, token: str | None) -> tuple[str, str | None]:
        """The role a token grants, and the credential to record (None: no token)."""
        if token is None:
            if self.config.host.auth == "open":
                return "player", None
            raise Unauthenticated("this host requires a token to open a session")
        presented = token_hash(token)
        found = None
        for digest, role in self.grants().items():  # every one compared: no early exit
            if hmac.compare_digest(presented, digest):
                found = role, credential_of(digest)
        if found is None:
            raise Unauthenticated("unknown token")
        return found

    def grants(self) -> dict[str, str]:
        """SHA-256 of each token the configuration accepts -> the role it grants."""
        if self.config.host.auth == "open":
            admin = self.config.admin_token
            return {token_hash(admin): "admin"} if admin else {}
        return {digest.lower(): role for digest, role in self.config.host.tokens.items()}

    def current_role(self, credential: str | None) -> str | None:
        """The role a session's credential grants now (None: it grants nothing)."""
        if credential is None:
            return "player" if self.config.host.auth == "open" else None
        for digest, role in self.grants().items():
            if credential_of(digest) == credential:
                return role
        return None

    # the server's records -------------------------------------------------------
    @property
    def _lobby(self) -> Any:
        return self.worlds.lobby

    def _records(self) -> dict[str, dict[str, Any]]:
        return self._lobby.slices["sessions"].data()  # type: ignore[no-any-return]

    def apply_internal(self, name: str, params: dict[str, Any]) -> Effects:
        """Apply one of the server's internal actions (journaled in its store), and
        bring the session table in step with the records."""
        effects: Effects = self._lobby.dispatcher.apply_internal(name, params)
        self.sessions.sync(self._records())
        return effects

    def release(self, effects: Effects) -> None:
        """Send effects applied outside a request (after their commit)."""
        self._lobby.dispatcher.release(None, effects)
        self._lobby.saver.commit_now()

    def session_info(self, s: Session, resumed: bool = False) -> SessionInfo:
        return SessionInfo(s.id, s.name, s.role, resumed)

    def _session_hook(self, hook: str, subject: Session, **kwargs: Any) -> None:
        """A session hook reaches the server's plugins with the server's ``host``,
        and the world plugins with the ``host`` of the session's world."""
        getattr(self._lobby.hooks, hook)(host=self._lobby.api, **kwargs)
        world = self.worlds.loaded.get(subject.world) if subject.world else None
        if world is not None:
            getattr(world.hooks, hook)(host=world.api, **kwargs)

    def _session_limit(self, world_id: str | None) -> ActionError | None:
        errors = list(self._lobby.hooks.session_limit(host=self._lobby.api))
        world = self.worlds.loaded.get(world_id) if world_id else None
        if world is not None:
            errors += world.hooks.session_limit(host=world.api)
        return next((e for e in errors if e is not None), None)

    # session.open -------------------------------------------------------------
    def open(self, req: Request, params: Any) -> Effects:
        conn = req.conn
        if conn.session is not None:
            raise Conflict("this connection already has a session; close it first")
        name = params.name.strip()
        if not name or len(name) > 64 or not name.isprintable():
            raise ActionError("name must be 1 to 64 printable characters",
                              details={"path": "params.name", "message": "bad name"},
                              code="validation_error")
        role, credential = self._role_for(params.token)  # a refusal counts (Dispatcher._error)
        address = str(conn.remote)
        world = self.worlds.default_id()
        self._make_room(role, credential, address, world)
        session_id = "s-" + secrets.token_urlsafe(12)
        token = new_token()
        effects = self.apply_internal("sessions.create", {
            "session_id": session_id, "name": name, "role": role, "token_hash": token_hash(token),
            "credential": credential, "address": address, "world": world})
        session = self.sessions.get(session_id)
        assert session is not None
        session.last_active = self.clock()
        self._attach(session, conn)
        reply = Signal("session.opened", {"session_id": session_id, "resume_token": token,
                                          "role": role, "resumed": False},
                       req.id, True, encoding=req.encoding)
        effects.outputs = [(session, reply), (session, self.sync_state(session))]
        self._session_hook("session_opened", session, session=self.session_info(session))
        return effects

    # making room --------------------------------------------------------------------
    def _make_room(self, role: str, credential: str | None, address: str,
                   world: str | None) -> None:
        """Apply the per-token and per-address limits and the plugins' session limit,
        ending disconnected sessions (oldest and least trusted first) to make room:
        sessions nobody is connected to never lock out someone who is. An admin's
        open may also end a connected non-admin session; it is refused only when
        admins hold every slot. A refusal by the per-token or per-address limit ends
        nothing."""
        sc = self.config.sessions
        records = list(self._records().values())
        victims: list[dict[str, Any]] = []
        limits = []
        if credential is not None and sc.max_sessions_per_token:
            limits.append(([r for r in records if r.get("credential") == credential],
                           sc.max_sessions_per_token, "this token", "max_sessions_per_token"))
        if role != "admin" and sc.max_sessions_per_address:
            limits.append(([r for r in records
                            if r.get("address") == address and r["role"] != "admin"],
                           sc.max_sessions_per_address, "this address",
                           "max_sessions_per_address"))
        for mine, limit, who, key in limits:
            left = [r for r in mine if r not in victims]
            if len(left) < limit:
                continue
            victim = self._pick(left, role)
            if victim is None:
                raise Conflict(f"{who} already holds {len(left)} sessions ({key}); "
                               f"close one first")
            victims.append(victim)
        for victim in victims:
            self._end_for_room(victim, role)
        error = self._session_limit(world)
        if error is None:
            return
        # a slot for this open: one session ended at most, so a plugin that refuses
        # for another reason does not cost every disconnected session
        records = list(self._records().values())
        victim = self._pick(records, role, connected_too=role == "admin")
        if victim is not None:
            self._end_for_room(victim, role)
            error = self._session_limit(world)
        if error is not None:
            raise error

    def _pick(self, candidates: list[dict[str, Any]], role: str,
              connected_too: bool = False) -> dict[str, Any] | None:
        """The session to end to make room for one of ``role``: the oldest disconnected
        one of the least trusted role no higher than ``role`` (and, with
        ``connected_too``, else the least recently active connected non-admin)."""
        rank = _RANK[role]
        gone = [r for r in candidates
                if r["state"] == State.DISCONNECTED.value and _RANK.get(r["role"], 0) <= rank]
        victim = min(gone, key=lambda r: (_RANK.get(r["role"], 0), r.get("disconnected_at") or 0),
                     default=None)
        if victim is None and connected_too:
            live = [r for r in candidates if r["role"] != "admin"]
            victim = min(live, key=lambda r: (_RANK.get(r["role"], 0), self._last_active(r)),
                         default=None)
        return victim

    def _end_for_room(self, victim: dict[str, Any], role: str) -> None:
        log.info("ending session %s (%s, %s) to make room for a new %s session",
                 victim["id"], victim["role"], victim["state"], role)
        self.release(self.end(victim["id"], "evicted"))

    def _last_active(self, record: dict[str, Any]) -> float:
        session = self.sessions.get(record["id"])
        return session.last_active if session is not None else 0.0

    # session.resume -------------------------------------------------------------
    def resume(self, req: Request, params: Any) -> Effects:
        conn = req.conn
        if conn.session is not None:
            raise Conflict("this connection already has a session")
        record = self._records().get(params.session_id)
        session = self.sessions.get(params.session_id)
        ok = self._token_ok(record, params.resume_token)
        if record is None or session is None or not ok or not self._within_window(record):
            conn.failed_opens += 1
            raise Unauthenticated(_BAD_RESUME)
        last_seq = params.last_seq
        if not 0 <= last_seq <= MAX_SEQ:
            raise Invalid(f"last_seq must be from 0 to {MAX_SEQ}",
                          details={"path": "params.last_seq", "message": "out of range"})
        if last_seq >= session.next_seq and session.seq_exact:
            raise Invalid(f"last_seq {last_seq} is beyond the last signal this session was "
                          f"sent ({session.next_seq - 1})",
                          details={"path": "params.last_seq", "message": "never sent"})
        if session.outbox is not None:
            session.outbox.displace()
            session.outbox = None
        # an SSE stream keeps the token it presented: its Authorization header must stay
        # valid. Otherwise the token rotates, and the one presented stays good until the
        # new one is (this reply may be lost to a crash): it becomes the previous token,
        # and the one before it is forgotten.
        keep = getattr(conn, "keeps_token", False)
        token = None if keep else new_token()
        presented = token_hash(params.resume_token)
        effects = self.apply_internal("sessions.attach", {
            "session_id": session.id,
            "token_hash": presented if token is None else token_hash(token),
            "previous_hash": None if token is None else presented})
        if last_seq >= session.next_seq:
            # restored from the store, whose seq can lag what was sent before a
            # crash: the client saw signals we did not count; never reuse their seqs
            session.skip_to(last_seq + 1)
        session.seq_exact = True
        missed, complete = session.missed(last_seq)
        session.last_active = self.clock()
        self._attach(session, conn)
        data = {"session_id": session.id, "role": session.role, "replayed": len(missed),
                "complete": complete}
        if token is not None:
            data["resume_token"] = token
        reply = Signal("session.resumed", data, req.id, True, encoding=req.encoding)
        replay = session.outbox = _Replay(conn, session, reply, missed)
        # a stream's reply is its own, unnumbered (an SSE client resumes from the last
        # id it read); elsewhere the reply is numbered as any signal to the session
        effects.outputs = [(replay if keep else session, reply),
                           (session, self.sync_state(session))]
        self._session_hook("session_opened", session,
                           session=self.session_info(session, resumed=True))
        return effects

    @staticmethod
    def _token_ok(record: dict[str, Any] | None, resume_token: str) -> bool:
        """Whether a resume token is the session's current one or, within the grace, its
        previous one (the client presented it, and the reply that rotated it may never
        have arrived). Both are compared, in constant time, whichever matches and
        whether the session exists, so the time says nothing about which was wrong."""
        current = record["token_hash"] if record else _DUMMY_HASH
        previous = record.get("previous_hash") if record else None
        current_ok = hash_matches(resume_token, current)
        previous_ok = hash_matches(resume_token, previous or _DUMMY_HASH)
        return record is not None and (current_ok or (previous_ok and previous is not None))

    def credential(self, session_id: str, resume_token: str) -> Session | None:
        """The session a credential names (an HTTP request's Bearer header), if the
        token matches and the session may still be resumed; nothing changes."""
        record = self._records().get(session_id)
        ok = hash_matches(resume_token, record["token_hash"] if record else _DUMMY_HASH)
        if record is None or not ok or not self._within_window(record):
            return None
        return self.sessions.get(session_id)

    def _within_window(self, record: dict[str, Any]) -> bool:
        if record["state"] == State.OPEN.value:
            return True
        gone_at = record.get("disconnected_at")
        return gone_at is not None and self.clock() - gone_at <= self.config.sessions.resume_ttl_s

    # session.close --------------------------------------------------------------
    def close(self, req: Request, params: None = None) -> Effects:
        conn = req.conn
        session = conn.session
        if session is None:
            raise Unauthenticated("no session is open on this connection")
        other = _connection(session)
        other = other if other is not conn else None
        effects = self.end(session.id, "closed")
        conn.detached()  # it stays, without a session
        if other is not None:  # closed over HTTP while a connection has it: tell that one
            effects.outputs.append((other, Signal("session.ended", {
                "session_id": session.id, "reason": "closed"})))
            effects.after.append(lambda: other.close_soon(1000, "session closed"))
        reply = Signal("session.closed", {"session_id": session.id}, req.id, True,
                       encoding=req.encoding)
        session.number(reply)  # its last signal: counted, as every reply to a session is
        effects.outputs.append((conn, reply))
        return effects

    def end(self, session_id: str, reason: str) -> Effects:
        """End a session for good; the dispatcher drops it once applied."""
        return self.apply_internal("sessions.end", {"session_id": session_id, "reason": reason})

    def session_ended(self, session_id: str, reason: str, effects: Effects) -> None:
        """A handler ended a session: drop it now, tell and close its connection on release."""
        session = self.sessions.get(session_id)
        if session is None:
            return
        conn = _connection(session)
        self._session_hook("session_closed", session, session=self.session_info(session),
                           reason=reason)
        self.sessions.drop(session_id)
        if conn is not None:
            conn.session = None
            if reason != "closed":
                effects.outputs.append((conn, Signal("session.ended", {
                    "session_id": session_id, "reason": reason})))
                effects.after.append(lambda: conn.close_soon(1000, f"session {reason}"))

    # connections ------------------------------------------------------------------
    def _attach(self, session: Session, conn: Any) -> None:
        session.outbox = conn
        conn.attached(session)

    def disconnected(self, conn: Any) -> None:
        """A connection went away: its session stays, resumable, for the window."""
        session = conn.session
        conn.session = None
        if session is None or _connection(session) not in (conn, None):
            return  # resumed on another connection meanwhile
        # (an outbox already None: the connection refused a signal, too slow; the
        # record still says open until this detach)
        if isinstance(session.outbox, _Replay):
            session.outbox.stop(False)  # what it still held goes now, not with the socket
        session.outbox = None
        if session.id not in self._records() or not self._lobby.dispatcher.accepting:
            return  # shutting down: startup marks every open session disconnected
        try:
            effects = self.apply_internal("sessions.detach", {"session_id": session.id})
        except ActionError:
            return
        self.release(effects)

    # worlds -------------------------------------------------------------------------
    def list_worlds(self, req: Request, params: None) -> Effects:
        session = req.conn.session if req.conn is not None else None
        data = {"worlds": self.worlds.listing(detail=True), "default": self.worlds.default_id(),
                "joined": session.world if session is not None else None}
        return self._reply(req, "world.list", data)

    def create_world(self, req: Request, params: Any) -> Effects:
        world_id = check_world_id(params.world_id)
        name = params.name if params.name is not None else world_id
        if not name.strip() or len(name) > 64 or not name.isprintable():
            raise Invalid("a world's name is 1 to 64 printable characters",
                          details={"path": "params.name", "message": "bad name"})
        effects = self.worlds.create(world_id, name)
        return self._reply(req, "world.created", {"world_id": world_id, "name": name}, effects)

    def archive_world(self, req: Request, params: Any) -> Effects:
        world_id = check_world_id(params.world_id)
        members = list(self.sessions.members(world_id).values())
        effects, archived_to = self.worlds.archive(world_id)
        self.sessions.sync(self._records())
        for s in members:
            effects.outputs.append((s, Signal("world.left", {"world_id": world_id,
                                                             "reason": "archived"})))
        return self._reply(req, "world.archived",
                           {"world_id": world_id, "archived_to": archived_to}, effects)

    def join(self, req: Request, params: Any) -> Effects:
        session = self._session(req)
        world_id = check_world_id(params.world_id)
        world = self.worlds.require_loaded(world_id)
        effects = self.apply_internal("sessions.join", {"session_id": session.id,
                                                   "world_id": world_id})
        self.worlds.touched(world_id)
        effects = self._reply(req, "world.joined", {"world_id": world_id, "name": world.name},
                              effects)
        effects.outputs.append((session, self.sync_state(session)))
        return effects

    def leave(self, req: Request, params: None) -> Effects:
        session = self._session(req)
        if session.world is None:
            raise Conflict("this session is in no world; send world.join to enter one")
        world_id = session.world
        effects = self.apply_internal("sessions.join", {"session_id": session.id, "world_id": None})
        self.worlds.touched(world_id)
        effects = self._reply(req, "world.left", {"world_id": world_id}, effects)
        effects.outputs.append((session, self.sync_state(session)))
        return effects

    # subscriptions ----------------------------------------------------------------------
    def subscribe(self, req: Request, params: Any) -> Effects:
        session = self._session(req)
        topics = self._topics(params.topics)
        now = set(session.topics or ()) | topics
        limit = self.config.sessions.max_topics
        if len(now) > limit:
            raise Invalid(f"a session subscribes to at most max_topics ({limit}) topics; "
                          f"this would make {len(now)}",
                          details={"path": "params.topics", "message": "too many topics"})
        return self._subscribed(req, session, "world.subscribed", now)

    def unsubscribe(self, req: Request, params: Any) -> Effects:
        session = self._session(req)
        topics = self._topics(params.topics)
        return self._subscribed(req, session, "world.unsubscribed",
                                set(session.topics or ()) - topics)

    def _topics(self, topics: list[Any]) -> set[str]:
        """The topics named, each checked against the declared forms and the limits."""
        limit, length = self.config.sessions.max_topics, self.config.sessions.max_topic_length
        if len(topics) > limit:
            raise Invalid(f"{len(topics)} topics; a session subscribes to at most max_topics "
                          f"({limit})", details={"path": "params.topics",
                                                  "message": "too many topics"})
        if self.topic_forms is None:
            self.topic_forms = TopicForms.of(self.registry)
        out = set()
        for i, topic in enumerate(topics):
            path = f"params.topics[{i}]"
            if isinstance(topic, str) and len(topic) > length:
                raise Invalid(f"a topic is at most max_topic_length ({length}) characters; "
                              f"{path} is {len(topic)}",
                              details={"path": path, "message": "topic too long"})
            out.add(self.topic_forms.check(topic, path))
        return out

    def _subscribed(self, req: Request, session: Session, signal: str,
                    topics: set[str]) -> Effects:
        """Journal what a session now watches (in its record, so it survives resume and
        restart) and reply with it."""
        effects = self.apply_internal("sessions.subscribe", {"session_id": session.id,
                                                        "topics": sorted(topics)})
        return self._reply(req, signal, {"topics": sorted(topics)}, effects)

    def _session(self, req: Request) -> Session:
        session = req.conn.session if req.conn is not None else None
        if session is None:
            raise Unauthenticated("this needs an open session")
        return session  # type: ignore[no-any-return]

    def _reply(self, req: Request, signal: str, data: dict[str, Any],
               effects: Effects | None = None) -> Effects:
        effects = effects if effects is not None else Effects()
        effects.data = data
        conn = req.conn
        session = conn.session if conn is not None else None
        sig = Signal(signal, data, req.id, True, encoding=req.encoding)
        effects.outputs.insert(0, (session if session is not None else conn, sig))
        if session is not None:
            session.remember(req.id if req.has_id else None, signal, data,
                             durable=effects.entry is not None)
        return effects

    # what a client is told -----------------------------------------------------------
    def sync_state(self, session: Session) -> Signal:
        return Signal("sync_state", self.view.sync_state(session))


def _connection(session: Session) -> Any:
    """The connection a session speaks through (also while it is replayed to)."""
    outbox = session.outbox
    return outbox.conn if isinstance(outbox, _Replay) else outbox


class _Replay:
    """A resumed session's outbox until the client has caught up: the reply, then what
    it missed, then what was sent to it since the resume was applied, in seq order.

    The connection pulls these as its outbox runs empty (``feed``), a budget at a
    time, so a replay longer than the outbox is never taken for a slow reader; once
    nothing is left the connection is the session's outbox again. What waits here is
    the session's own signals (its replay buffer's, not copies), let go as they are
    handed over; one replay per session, since a resume elsewhere displaces it. A
    reader that stops is still dropped: by ``max_lag_s`` as new signals arrive, or
    when more wait here than the replay buffer and the outbox hold together.
    """

    def __init__(self, conn: Any, session: Session, reply: Signal, missed: list[Signal]) -> None:
        self.conn = conn
        self.session: Session | None = session
        self.encoding = conn.encoding
        self.reply = reply
        self.started = False
        self.waiting: deque[Signal] = deque(missed)
        self.bound = session.buffer_size + conn.config.host.limits.outbox_size

    def deliver(self, sig: Signal) -> bool:
        conn = self.conn
        if sig is self.reply:
            self.started = True
            conn.feed = self.feed  # it pulls the rest once the reply is out
            if not conn.deliver(sig):
                return self.stop(False)
            return True
        if self.session is None or conn.close_code is not None:
            return False
        self.waiting.append(sig)
        if not self.started:
            return True
        if len(self.waiting) > self.bound:
            log.warning("disconnecting %s: %d signals behind its replay", conn.remote,
                        len(self.waiting))
            conn.abort(POLICY, f"too slow: more than {self.bound} signals behind "
                               f"(replay_buffer and outbox_size)")
            return self.stop(False)
        if conn.stalled():  # nothing went out for max_lag_s: the reader stopped
            return self.stop(False)
        return True

    def feed(self, room: int) -> bool:
        """Hand the connection up to ``room`` signals; whether any were."""
        conn, waiting = self.conn, self.waiting
        if self.session is None or self.session.outbox is not self:
            return self.stop(False)  # displaced, ended, or dropped as too slow
        handed = 0
        while waiting and handed < room:
            if not conn.deliver(waiting.popleft()):
                return self.stop(False)
            handed += 1
        if not waiting:
            self.stop(True)
        return handed > 0

    def stop(self, caught_up: bool) -> bool:
        """The replay is over: the connection takes the session over if it caught up;
        else the session is left without one (resumable)."""
        session, self.session = self.session, None
        self.waiting.clear()
        if self.conn.feed == self.feed:
            self.conn.feed = None
        if session is not None and session.outbox is self:
            session.outbox = self.conn if caught_up else None
        return False

    def displace(self) -> None:
        self.stop(False)
        self.conn.displace()

    def close_soon(self, code: int, reason: str) -> None:
        self.conn.close_soon(code, reason)
