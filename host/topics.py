"""Topics: the streams a session may subscribe to, and who in a world wants each.

A plugin declares its topics (``register_topics``) and emits to one with
``ctx.broadcast(..., topic=...)``. A session that never subscribed gets every
signal, as before topics existed; one that subscribed gets the signals of its
topics (and those emitted with no topic). ``Interest`` is the per-world index
the dispatcher routes by, so a signal costs its audience, never a scan of every
session.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from host.actions import Invalid


class Member(Protocol):
    """A session as the index sees it (host.sessions.Session, which imports this)."""

    @property
    def id(self) -> str: ...

    @property
    def topics(self) -> Any: ...


Session = TypeVar("Session", bound=Member)

RATE = "@"
"""What puts a rate after a topic: ``simulation.agent:t1@2``, at most 2 signals a second."""

UNSUBSCRIBED = "*"
"""The topic of a signal meant only for the sessions that never subscribed (a
stream that subscribers get in another form, such as ``simulation.ticked``,
which subscribers get as ``simulation.delta``)."""


@dataclass(frozen=True)
class Topic:
    """A topic a plugin emits to: ``name`` alone (``chat``) or, with ``parse``, a
    family of topics ``name:<argument>`` (``simulation.agent:<id>``). ``parse``
    checks the argument and raises ValueError saying what is wrong with it.

    With ``max_rate``, a subscriber may also ask for at most so many signals a
    second, ``name@2`` or ``name:<argument>@2`` (up to ``max_rate``): the plugin
    then coalesces what happens in between. The rate is part of the topic, so
    subscribers of one topic at one rate share its signal, and no action is needed
    beyond ``world.subscribe``."""

    name: str
    parse: Callable[[str], Any] | None = None
    description: str = ""
    max_rate: float | None = None


def family(topic: str) -> str:
    """``simulation.agent`` of ``simulation.agent:t1`` (and of ``simulation.agent:t1@2``);
    a plain topic is its own family (``simulation.ticks`` of ``simulation.ticks@5``)."""
    return topic.split(":", 1)[0].split(RATE, 1)[0]


def split_rate(topic: str) -> tuple[str, str | None]:
    """``simulation.agent:t1`` and ``"2"`` of ``simulation.agent:t1@2``; the topic and
    None when it names no rate. Only for topics of a form with ``max_rate``: the
    rate is what follows the last ``@`` when that starts like a number (so an
    argument may itself hold an ``@``: ``simulation.agent:a@b`` is agent ``a@b``)."""
    head, sep, tail = topic.rpartition(RATE)
    if sep and tail[:1] in set("0123456789.+-"):
        return head, tail
    return topic, None


def rate_of(topic: str) -> float | None:
    """The signals a second a topic (of a form with ``max_rate``, already checked)
    asks for; None: every one."""
    text = split_rate(topic)[1]
    return None if text is None else float(text)


def argument(topic: str) -> str:
    """``t1`` of ``simulation.agent:t1``."""
    return topic.split(":", 1)[1]


class TopicForms:
    """Every topic the loaded plugins declared: what ``world.subscribe`` accepts."""

    def __init__(self, topics: Iterable[Topic]) -> None:
        self.forms: dict[str, Topic] = {}
        for topic in topics:
            if ":" in topic.name or RATE in topic.name or topic.name == UNSUBSCRIBED:
                raise ValueError(f"topic name {topic.name!r} may not contain ':' or "
                                 f"{RATE!r} or be {UNSUBSCRIBED!r}")
            self.forms[topic.name] = topic

    @classmethod
    def of(cls, registry: Any) -> TopicForms:
        return cls(t for _, declared in registry.collect("register_topics") for t in declared)

    def check(self, topic: Any, path: str) -> str:
        """The topic, if it is one of a declared form; else ``validation_error`` naming it."""
        if not isinstance(topic, str):
            raise Invalid(f"a topic is a string, not {type(topic).__name__}",
                          details={"path": path, "message": "not a string"})
        form = self.forms.get(family(topic))
        if form is None:
            known = ", ".join(sorted(f.name + (":<...>" if f.parse else "")
                                     + ("[@<rate>]" if f.max_rate else "")
                                     for f in self.forms.values()))
            raise Invalid(f"unknown topic {topic!r}; topics are {known}",
                          details={"path": path, "message": "unknown topic", "topic": topic})
        bare = topic
        if form.max_rate is not None:
            bare, rate = split_rate(topic)
            if rate is not None:
                self._check_rate(form, topic, rate, path)
        name, sep, arg = bare.partition(":")
        if name != form.name:  # ``chat@2``, ``simulation.ticks@x``: no topic of the form
            why = (f"a rate is @<signals a second>, at most {form.max_rate:g}"
                   if form.max_rate else "it takes no rate")
            raise Invalid(f"bad topic {topic!r}: {form.name!r} takes no "
                          f"{name[len(form.name):]!r} ({why})",
                          details={"path": path, "message": "unexpected suffix", "topic": topic})
        if form.parse is None:
            if sep:
                raise Invalid(f"topic {name!r} takes no argument (got {topic!r})",
                              details={"path": path, "message": "unexpected argument",
                                       "topic": topic})
            return topic
        if not sep or not arg:
            raise Invalid(f"topic {topic!r} needs an argument: {name}:<...>",
                          details={"path": path, "message": "missing argument", "topic": topic})
        try:
            form.parse(arg)
        except ValueError as exc:
            raise Invalid(f"bad topic {topic!r}: {exc}",
                          details={"path": path, "message": str(exc), "topic": topic}) from None
        return topic

    @staticmethod
    def _check_rate(form: Topic, topic: str, rate: str, path: str) -> None:
        try:
            value = float(rate)
        except ValueError:
            value = math.nan
        assert form.max_rate is not None
        if not (math.isfinite(value) and 0 < value <= form.max_rate):
            message = (f"a rate is a number of signals a second above 0 and at most "
                       f"{form.max_rate:g} (got {rate!r})")
            raise Invalid(f"bad topic {topic!r}: {message}",
                          details={"path": path, "message": message, "topic": topic})


class Interest(Generic[Session]):
    """Who, among one world's sessions, wants which topic.

    Kept in step by the session table as sessions join, leave and subscribe;
    ``audience`` then costs the sessions it returns."""

    def __init__(self) -> None:
        self.everything: dict[str, Session] = {}  # never subscribed: they get every signal
        self.by_topic: dict[str, dict[str, Session]] = {}
        self.by_family: dict[str, set[str]] = {}  # family -> its topics with subscribers

    def add(self, s: Session) -> None:
        if s.topics is None:
            self.everything[s.id] = s
            return
        for topic in s.topics:
            self.by_topic.setdefault(topic, {})[s.id] = s
            self.by_family.setdefault(family(topic), set()).add(topic)

    def remove(self, s: Session) -> None:
        """Forget a session, as it was added (call before its topics change)."""
        if s.topics is None:
            self.everything.pop(s.id, None)
            return
        for topic in s.topics:
            subscribers = self.by_topic.get(topic)
            if subscribers is None:
                continue
            subscribers.pop(s.id, None)
            if not subscribers:
                del self.by_topic[topic]
                topics = self.by_family[family(topic)]
                topics.discard(topic)
                if not topics:
                    del self.by_family[family(topic)]

    def audience(self, topic: str, members: Mapping[str, Session],
                 participants: Iterable[str] = ()) -> Iterator[Session]:
        """The sessions a signal of ``topic`` reaches: those that never subscribed,
        its subscribers, and ``participants`` (session ids, among ``members``) who
        get it whether or not they subscribed."""
        yield from list(self.everything.values())
        if topic == UNSUBSCRIBED:
            return
        subscribers = self.by_topic.get(topic, {})
        yield from list(subscribers.values())
        for sid in participants:
            s = members.get(sid)
            if s is not None and s.topics is not None and sid not in subscribers:
                yield s

    def subscribed(self, name: str) -> set[str]:
        """The topics of a family (or the plain topic ``name``) somebody subscribed to,
        at any rate (``simulation.ticks`` and ``simulation.ticks@5``)."""
        return self.by_family.get(name, set())

    def anyone_unsubscribed(self) -> bool:
        return bool(self.everything)
