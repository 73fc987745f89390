"""Statistics as data: the pieces every service's ``metrics()`` snapshot is built from.

A service keeps plain integer counters where they are cheap to bump (the hot path) and, on
request, copies them into a frozen dataclass: the *snapshot*. Log lines are rendered from a
snapshot by pure functions; tests and exporters read the snapshot itself. Taking one never
does I/O.

Failures are counted by errno name (``"ECONNREFUSED"``) in an :class:`ErrorCounts`, whose
snapshot is a read-only mapping.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

UNKNOWN_ERROR = "EUNKNOWN"  # an OSError without an errno (a library's own exception)


def errno_name(exc: OSError) -> str:
    """``exc``'s errno as its symbolic name; a timeout without an errno counts as ETIMEDOUT."""
    if exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    if isinstance(exc, TimeoutError):  # socket.timeout from settimeout() carries no errno
        return "ETIMEDOUT"
    return UNKNOWN_ERROR


class ErrorCounts:
    """Failures by errno name; counted on error paths only, so a dict is cheap enough."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def add(self, exc: OSError) -> str:
        """Count ``exc``; returns its name."""
        name = errno_name(exc)
        self._counts[name] = self._counts.get(name, 0) + 1
        return name

    def snapshot(self) -> Mapping[str, int]:
        """A read-only copy, names sorted (stable output for renderers)."""
        return MappingProxyType(dict(sorted(self._counts.items())))


def format_counts(counts: Mapping[str, int]) -> str:
    """``ECONNREFUSED=2 ETIMEDOUT=1``, or ``none``, for status lines."""
    return " ".join(f"{name}={count}" for name, count in counts.items()) or "none"


def flatten(snapshot: Any, prefix: str = "") -> dict[str, float]:
    """A snapshot as ``dotted.counter.name -> number``, for exporters and quick looks.

    Nested snapshots and mappings are joined with dots; sequences of per-conversation or
    per-session entries are indexed by position. Non-numeric fields are left out.
    """
    out: dict[str, float] = {}
    if dataclasses.is_dataclass(snapshot) and not isinstance(snapshot, type):
        items = ((f.name, getattr(snapshot, f.name)) for f in dataclasses.fields(snapshot))
    elif isinstance(snapshot, Mapping):
        items = snapshot.items()
    elif isinstance(snapshot, (tuple, list)):
        items = enumerate(snapshot)
    else:
        return out
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = int(value)
        elif isinstance(value, (int, float)):
            out[name] = value
        else:
            out.update(flatten(value, name + "."))
    return out
