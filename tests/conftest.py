"""Shared test helpers. The ``worldhost`` fixture comes from host.testing (pytest11)."""

from __future__ import annotations

import json
from typing import Any

import cbor2


def frame(message: str | bytes) -> dict[str, Any]:
    """Decode one frame the host sent, JSON or CBOR."""
    return json.loads(message) if isinstance(message, str) else cbor2.loads(message)
