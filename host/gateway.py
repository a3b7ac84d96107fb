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
from host.dispatcher import OPEN_ACTIONS, Outcome, Request
from host.sessions import MAX_SEQ, Session, Signal, State, hash_matches, new_token, token_hash

if TYPE_CHECKING:
    from host.server import Host

log = logging.getLogger("worldhost.sessions")

_BAD_RESUME = "invalid or expired resume token"
_DUMMY_HASH = token_hash("no such session")
_RANK = {"viewer": 0, "player": 1, "admin": 2}


def credential_of(token_sha256: str) -> str:
    """What a session record keeps of the token that granted its role: a fingerprint
    of the token's SHA-256 (the form ``[host.tokens]`` lists), never the token, and
    not the config's own hash either, so a snapshot or export reveals neither."""
    return hashlib.sha256(b"worldhost credential\0" + token_sha256.lower().encode()).hexdigest()[:32]


class Gateway:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.config = host.config

    # the gate ---------------------------------------------------------------
    def check(self, req: Request, action: Action, session: Session | None) -> None:
        rid, limit = req.id, self.config.host.limits.max_id_bytes
        if rid is not None and len(rid.encode("utf-8", "surrogatepass") if isinstance(rid, str)
                                   else str(rid)) > limit:
            # an id is kept with its reply for repeats and replays: keep it small
            raise BadRequest(f"id is longer than max_id_bytes ({limit} bytes)")
        if session is None:
            if action.name not in OPEN_ACTIONS:
                raise Unauthenticated(f"{action.name} needs an open session: "
                                      f"send session.open or session.resume first")
            return
        if Role.parse(session.role) < action.role:
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

    def open(self, req: Request, params: Any) -> Outcome:
        conn = req.conn
        if conn.session is not None:
            raise Conflict("this connection already has a session; close it first")
        name = params.name.strip()
        if not name or len(name) > 64 or not name.isprintable():
            raise ActionError("name must be 1 to 64 printable characters",
                              details={"path": "params.name", "message": "bad name"},
                              code="validation_error")
        try:
            role, credential = self._role_for(params.token)
        except Unauthenticated:
            conn.failed_opens += 1
            raise
        address = str(conn.remote)
        self._make_room(role, credential, address)
        session_id = "s-" + secrets.token_urlsafe(12)
        token = new_token()
        outcome = self._internal("sessions.create", {
            "session_id": session_id, "name": name, "role": role, "token_hash": token_hash(token),
            "credential": credential, "address": address})
        self.host.sessions.sync(self.host.world["sessions"].data())
        session = self.host.sessions.get(session_id)
        assert session is not None
        session.last_active = self.host.clock()
        self._attach(session, conn)
        reply = Signal("session.opened", {"session_id": session_id, "resume_token": token,
                                          "role": role, "resumed": False},
                       req.id, True, encoding=req.encoding)
        outcome.outputs = [(session, reply), (session, self.sync_state(session))]
        self.host.registry.pm.hook.session_opened(host=self.host.api,
                                                  session=self.host.session_info(session))
        return outcome

    # making room --------------------------------------------------------------------
    def _make_room(self, role: str, credential: str | None, address: str) -> None:
        """Apply the per-token and per-address limits and the plugins' session limit,
        ending disconnected sessions (oldest and least trusted first) to make room:
        sessions nobody is connected to never lock out someone who is. An admin's
        open may also end a connected non-admin session; it is refused only when
        admins hold every slot. A refusal by the per-token or per-address limit ends
        nothing."""
        sc = self.config.sessions
        records = list(self.host.world["sessions"].data().values())
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
        error = self.host.check_session_limit()
        if error is None:
            return
        # a slot for this open: one session ended at most, so a plugin that refuses
        # for another reason does not cost every disconnected session
        records = list(self.host.world["sessions"].data().values())
        victim = self._pick(records, role, connected_too=role == "admin")
        if victim is not None:
            self._end_for_room(victim, role)
            error = self.host.check_session_limit()
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
        self.host.dispatcher._finish(None, self.end(victim["id"], "evicted"))

    def _last_active(self, record: dict[str, Any]) -> float:
        session = self.host.sessions.get(record["id"])
        return session.last_active if session is not None else 0.0

    # session.resume -------------------------------------------------------------
    def resume(self, req: Request, params: Any) -> Outcome:
        conn = req.conn
        if conn.session is not None:
            raise Conflict("this connection already has a session")
        record = self.host.world["sessions"].data().get(params.session_id)
        session = self.host.sessions.get(params.session_id)
        ok = hash_matches(params.resume_token, record["token_hash"] if record else _DUMMY_HASH)
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
        token = new_token()
        outcome = self._internal("sessions.attach", {"session_id": session.id,
                                                     "token_hash": token_hash(token)})
        self.host.sessions.sync(self.host.world["sessions"].data())
        if last_seq >= session.next_seq:
            # restored from the store, whose seq can lag what was sent before a
            # crash: the client saw signals we did not count; never reuse their seqs
            session.next_seq = last_seq + 1
        session.seq_exact = True
        missed, complete = session.missed(last_seq)
        session.last_active = self.host.clock()
        self._attach(session, conn)
        reply = Signal("session.resumed", {
            "session_id": session.id, "role": session.role, "replayed": len(missed),
            "complete": complete, "resume_token": token}, req.id, True, encoding=req.encoding)
        outcome.outputs = [(session, reply)]
        outcome.outputs += [(conn, sig) for sig in missed]
        outcome.outputs.append((session, self.sync_state(session)))
        self.host.registry.pm.hook.session_opened(
            host=self.host.api, session=self.host.session_info(session, resumed=True))
        return outcome

    def _within_window(self, record: dict[str, Any]) -> bool:
        if record["state"] == State.OPEN.value:
            return True
        gone_at = record.get("disconnected_at")
        return gone_at is not None and self.host.clock() - gone_at <= self.config.sessions.resume_ttl_s

    # session.close --------------------------------------------------------------
    def close(self, req: Request) -> Outcome:
        conn = req.conn
        session = conn.session
        if session is None:
            raise Unauthenticated("no session is open on this connection")
        outcome = self.end(session.id, "closed")
        conn.detached()  # it stays, without a session
        outcome.outputs.append((conn, Signal("session.closed", {"session_id": session.id},
                                             req.id, True, encoding=req.encoding)))
        return outcome

    def end(self, session_id: str, reason: str) -> Outcome:
        """End a session for good; the dispatcher drops it once applied."""
        return self._internal("sessions.end", {"session_id": session_id, "reason": reason})

    # connections ------------------------------------------------------------------
    def _attach(self, session: Session, conn: Any) -> None:
        session.outbox = conn
        conn.attached(session)

    def disconnected(self, conn: Any) -> None:
        """A connection went away: its session stays, resumable, for the window."""
        session = conn.session
        conn.session = None
        if session is None or session.outbox not in (conn, None):
            return  # resumed on another connection meanwhile
        # (an outbox already None: the connection refused a signal, too slow; the
        # record still says open until this detach)
        session.outbox = None
        if session.id not in self.host.world["sessions"].data() or \
                not self.host.dispatcher.accepting:
            return  # shutting down: startup marks every open session disconnected
        try:
            outcome = self._internal("sessions.detach", {"session_id": session.id})
        except ActionError:
            return
        self.host.dispatcher._finish(None, outcome)

    def _internal(self, name: str, params: dict[str, Any]) -> Outcome:
        dispatcher = self.host.dispatcher
        action = self.host.registry.actions[name]
        return dispatcher.apply(action, dispatcher._check_params(action, params), None, None)

    # what a client is told -----------------------------------------------------------
    def sync_state(self, session: Session) -> Signal:
        return Signal("sync_state", self.host.sync_state(session))
