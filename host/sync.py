"""What clients are told about the server and their world: ``server.info`` on
connect, ``sync_state`` after a session opens, resumes, joins or leaves, and
again to a world's sessions whenever its phase or process summary changes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from host import __version__
from host.config import Config
from host.messages import Effects, Signal
from host.plugins import Registry
from host.sessions import Session
from host.world import World
from host.worlds import Worlds

PROTOCOL = 1
SUMMARY_KEYS = frozenset({"phase", "processes"})  # a change of these re-sends sync_state
RECENT = 15  # sessions listed in sync_state


class ClientView:
    """Builds what clients are told; keeps, per world, the summary last sent."""

    def __init__(self, config: Config, registry: Registry, worlds: Worlds) -> None:
        self.config = config
        self.registry = registry
        self.worlds = worlds
        self._last_summary: dict[str, dict[str, Any]] = {}
        # world id -> plugin -> (slices its summary fields were computed from, those
        # fields): after an action only the plugins that read what it changed are asked
        self._parts: dict[str, dict[str, tuple[set[str], dict[str, Any]]]] = {}
        self._reads: dict[str, frozenset[str]] = {}  # world id -> every slice its parts read

    def _contributions(self, world: World | None) -> dict[str, Any]:
        """Every plugin's ``server_info``, merged: the server's plugins, then the
        world's."""
        merged: dict[str, Any] = {"phase": "onboarding"}
        for _, extra, _ in self._ask(self.worlds.lobby, "server"):
            merged.update(extra)
        if world is not None:
            parts = self._parts[world.id] = {}
            for name, extra, reads in self._ask(world, "world"):
                parts[name] = (reads, _summary_fields(extra))
                merged.update(extra)
            self._reads[world.id] = _all_reads(parts)
        return merged

    def _ask(self, world: World, scope: str,
             skip: Callable[[str], bool] = lambda name: False
             ) -> Iterator[tuple[str, dict[str, Any], set[str]]]:
        """Each plugin of ``scope`` (but those ``skip`` names), in order: its
        ``server_info`` and the slices the summary fields of it came from (those it
        read, if it contributes to them or contributes nothing, as it might begin to)."""
        registry = world.registry
        for impl in reversed(self.registry.pm.hook.server_info.get_hookimpls()):
            name = impl.plugin_name
            if registry.scope.get(name, "world") != scope or skip(name):
                continue
            read: set[str] = set()
            world.api.reads = read
            try:
                extra: dict[str, Any] = impl.function(host=world.api) or {}  # type: ignore[assignment]
            finally:
                world.api.reads = None
            yield name, extra, (read if not extra or not SUMMARY_KEYS.isdisjoint(extra) else set())

    def server_info(self) -> dict[str, Any]:
        default_id = self.worlds.default_id()
        world = self.worlds.loaded.get(default_id) if default_id is not None else None
        info: dict[str, Any] = {
            "protocol": PROTOCOL,
            "version": __version__,
            "world_id": default_id,
            "plugins": list(self.registry.plugin_names),
            "actions": sorted(n for n, a in self.registry.actions.items() if not a.internal),
            "auth": self.config.host.auth,
            "limits": {"max_frame_bytes": self.config.host.limits.max_frame_bytes},
        }
        info.update(self._contributions(world))
        info["worlds"] = self.worlds.listing()
        recovered = {**(self.worlds.lobby.recovered or {}),
                     **((world.recovered or {}) if world is not None else {})}
        if self.worlds.quarantined:
            recovered["worlds_quarantined"] = dict(self.worlds.quarantined)
        if recovered:
            info["recovered"] = recovered
        return info

    def sync_state(self, session: Session) -> dict[str, Any]:
        world = self.worlds.loaded.get(session.world) if session.world else None
        slices = []
        if world is not None:
            for name, s in world.slices.slices.items():
                data = s.data()
                slices.append({"name": name, "version": s.spec.version, "keyed": s.spec.keyed,
                               "size": len(data) if s.spec.keyed else 1})
        people = world.audience.values() if world is not None else [session]
        ordered = sorted(people, key=lambda s: s.last_active, reverse=True)[:RECENT]
        admin = session.role == "admin"
        state = {
            "session": {"id": session.id, "name": session.name, "role": session.role},
            "world_id": session.world,
            "generation": world.generation if world is not None else 0,
            "plugins": list(self.registry.plugin_names),
            "slices": slices,
            "sessions": [{"name": s.name, "role": s.role, "last_active": s.last_active,
                          "connected": s.overview()["connected"],
                          **({"id": s.id} if admin else {})} for s in ordered],
            "worlds": self.worlds.listing(),
        }
        state.update(self._contributions(world))
        return state

    def _summary(self, world: World, changed: list[str] | None = None) -> dict[str, Any] | None:
        """The phase and process summary (server plugins', then the world's); after
        an action that changed ``changed``, asking only the world's plugins that
        read one of them (None when there is none to ask)."""
        parts = self._parts.get(world.id)
        if parts is None or changed is None:
            contributions = self._contributions(world)
            return {k: contributions.get(k) for k in SUMMARY_KEYS}
        stale = {name for name, (reads, _) in parts.items() if not reads.isdisjoint(changed)}
        if not stale:
            return None
        for name, extra, reads in self._ask(world, "world", lambda n: n not in stale):
            parts[name] = (reads, _summary_fields(extra))
        self._reads[world.id] = _all_reads(parts)
        merged: dict[str, Any] = {"phase": "onboarding"}
        for _, extra, _ in self._ask(self.worlds.lobby, "server"):
            merged.update(_summary_fields(extra))
        for _, fields in parts.values():
            merged.update(fields)
        return {k: merged.get(k) for k in SUMMARY_KEYS}

    def remember_summary(self, world: World) -> None:
        self._last_summary[world.id] = self._summary(world)  # type: ignore[assignment]

    def after_change(self, world: World, effects: Effects, changed: list[str]) -> None:
        """Send ``sync_state`` again to a world's sessions when its phase or process
        summary changed (the parts of it that actions change)."""
        reads = self._reads.get(world.id)
        if reads is not None and reads.isdisjoint(changed):
            return  # (most actions: nothing the summary was computed from)
        summary = self._summary(world, changed)
        if summary is None or summary == self._last_summary.get(world.id):
            return
        self._last_summary[world.id] = summary
        for session in list(world.audience.values()):
            effects.outputs.append((session, Signal("sync_state", self.sync_state(session))))


def _all_reads(parts: dict[str, tuple[set[str], dict[str, Any]]]) -> frozenset[str]:
    return frozenset().union(*(reads for reads, _ in parts.values()))


def _summary_fields(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k in SUMMARY_KEYS}
