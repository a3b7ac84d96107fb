"""The session gate: who is asking, may they, and the session actions themselves.

``session.open``/``resume``/``close`` need the connection and fresh secrets,
so they are served here rather than by a world handler. They change the
persisted session records only through the internal ``sessions.*`` actions,
whose params hold no secret (only SHA-256 hashes), so the journal can hold
them and replay them.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import TYPE_CHECKING, Any

from host.actions import Action, ActionError, Conflict, Forbidden, Role, Unauthenticated
from host.dispatcher import OPEN_ACTIONS, Outcome, Request
from host.sessions import Session, Signal, State, hash_matches, new_token, token_hash

if TYPE_CHECKING:
    from host.server import Host

log = logging.getLogger("worldhost.sessions")

_BAD_RESUME = "invalid or expired resume token"
_DUMMY_HASH = token_hash("no such session")


class Gateway:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.config = host.config

    # the gate ---------------------------------------------------------------
    def check(self, req: Request, action: Action, session: Session | None) -> None:
        if session is None:
            if action.name not in OPEN_ACTIONS:
                raise Unauthenticated(f"{action.name} needs an open session: "
                                      f"send session.open or session.resume first")
            return
        if Role.parse(session.role) < action.role:
            raise Forbidden(f"{action.name} needs role {action.role.name}; "
                            f"this session is {session.role}")

    # session.open -------------------------------------------------------------
    def _role_for(self, token: str | None) -> str:
        if self.config.host.auth == "open":
            if token is None:
                return "player"
            admin = self.config.admin_token
            if admin and hmac.compare_digest(token_hash(token), token_hash(admin)):
                return "admin"
            raise Unauthenticated("unknown token")
        if token is None:
            raise Unauthenticated("this host requires a token to open a session")
        presented = token_hash(token)
        role = None
        for digest, candidate in self.config.host.tokens.items():
            if hmac.compare_digest(presented, digest.lower()):
                role = candidate
        if role is None:
            raise Unauthenticated("unknown token")
        return role

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
            role = self._role_for(params.token)
        except Unauthenticated:
            conn.failed_opens += 1
            raise
        limit_error = self.host.check_session_limit()
        if limit_error is not None:
            raise limit_error
        session_id = "s-" + secrets.token_urlsafe(12)
        token = new_token()
        outcome = self._internal("sessions.create", {
            "session_id": session_id, "name": name, "role": role, "token_hash": token_hash(token)})
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
        if params.last_seq < 0:
            raise ActionError("last_seq must be 0 or more", code="validation_error",
                              details={"path": "params.last_seq", "message": "negative"})
        if session.outbox is not None:
            session.outbox.displace()
            session.outbox = None
        token = new_token()
        outcome = self._internal("sessions.attach", {"session_id": session.id,
                                                     "token_hash": token_hash(token)})
        self.host.sessions.sync(self.host.world["sessions"].data())
        if params.last_seq >= session.next_seq:
            session.next_seq = params.last_seq + 1  # the client saw signals we lost
        missed, complete = session.missed(params.last_seq)
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
        outcome.outputs.append((conn, Signal("session.closed", {"session_id": session.id},
                                             req.id, True, encoding=req.encoding)))
        return outcome

    def end(self, session_id: str, reason: str) -> Outcome:
        """End a session for good; the dispatcher drops it once applied."""
        return self._internal("sessions.end", {"session_id": session_id, "reason": reason})

    # connections ------------------------------------------------------------------
    def _attach(self, session: Session, conn: Any) -> None:
        session.outbox = conn
        conn.session = session
        conn.ever_had_session = True

    def disconnected(self, conn: Any) -> None:
        """A connection went away: its session stays, resumable, for the window."""
        session = conn.session
        conn.session = None
        if session is None or session.outbox is not conn:
            return
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
