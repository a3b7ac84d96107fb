"""worldhost: a plugin-based world server on Trio.

Everything a plugin imports comes from here::

    from host import Action, Context, Invalid, Role, SliceSpec, hookimpl

The names live in their own modules (``host.actions``, ``host.api``,
``host.hookspecs``, ``state.slices``); those import paths keep working.
"""

from host.actions import Action as Action
from host.actions import ActionError as ActionError
from host.actions import BadRequest as BadRequest
from host.actions import Conflict as Conflict
from host.actions import Context as Context
from host.actions import Forbidden as Forbidden
from host.actions import Invalid as Invalid
from host.actions import NotFound as NotFound
from host.actions import RateLimited as RateLimited
from host.actions import Role as Role
from host.api import AppliedAction as AppliedAction
from host.api import HostAPI as HostAPI
from host.api import ImportStep as ImportStep
from host.api import SessionInfo as SessionInfo
from host.hookspecs import hookimpl as hookimpl
from host.hookspecs import hookspec as hookspec
from state.slices import KeyedSlice as KeyedSlice
from state.slices import SliceSpec as SliceSpec
from state.slices import ValueSlice as ValueSlice

__version__ = "0.1.0"

__all__ = [
    "Action", "ActionError", "AppliedAction", "BadRequest", "Conflict", "Context", "Forbidden",
    "HostAPI", "ImportStep", "Invalid", "KeyedSlice", "NotFound", "RateLimited", "Role", "SessionInfo",
    "SliceSpec", "ValueSlice", "hookimpl", "hookspec",
]
