"""The environment variables the tools honour: read and validated here, in one place, at start.

Each variable's name is its field and its label in a ConfigError, so a bad value is reported
like a bad flag (``<prog>: error: ...``, exit 2) before anything starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from portfwd.runtime.options import ConfigError, Options

NO_SPLICE = "PORTFWD_NO_SPLICE"  # 1: tcpfwd relays through userspace copies (tests, bench)
NO_GSO = "PORTFWD_NO_GSO"  # 1: udpfwd sends one datagram per syscall (tests, bench)
LOGLEVEL = "PORTFWD_LOGLEVEL"  # numeric logging level of the root logger (10 = DEBUG)
REKEY_SEQ_THRESHOLD = "PORTFWD_REKEY_SEQ_THRESHOLD"  # kcptcp: send_seq that starts a rekey
REKEY_TIMEOUT_MS = "PORTFWD_REKEY_TIMEOUT_MS"  # kcptcp: ms without REKEY_ACK before closing
PSK = "PORTFWD_PSK"  # kcptcp: the key as 64 hex digits, kept out of ps (unlike -K)
SHARED_LISTENER = "PORTFWD_SHARED_LISTENER"  # 1: TCP -w workers share one listener (bench)
REKEY_SEQ_MAX = 0xFFFFFFFF  # packets: send_seq is a u32
REKEY_TIMEOUT_MAX_MS = 3600_000  # ms


@dataclass(frozen=True)
class Environment:
    """What the environment asks for; None = variable unset, the tool's default applies."""

    no_splice: bool = False  # PORTFWD_NO_SPLICE set to anything but "" or "0"
    no_gso: bool = False  # PORTFWD_NO_GSO set to anything but "" or "0"
    log_level: int | None = None  # PORTFWD_LOGLEVEL
    rekey_seq_threshold: int | None = None  # packets, 1..0xFFFFFFFF
    rekey_timeout_ms: int | None = None  # ms, 1..3600000
    psk: bytes | None = field(default=None, repr=False)  # PORTFWD_PSK: 32 bytes
    shared_listener: bool = False  # PORTFWD_SHARED_LISTENER: one TCP listener for all workers


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """Validate the variables of ``environ`` (default: this process's environment)."""
    env = os.environ if environ is None else environ
    return Environment(
        no_splice=_switch(env, NO_SPLICE),
        no_gso=_switch(env, NO_GSO),
        log_level=_log_level(env),
        rekey_seq_threshold=_number(env, REKEY_SEQ_THRESHOLD, 1, REKEY_SEQ_MAX),
        rekey_timeout_ms=_number(env, REKEY_TIMEOUT_MS, 1, REKEY_TIMEOUT_MAX_MS),
        psk=Options({"psk": env.get(PSK)}, {"psk": PSK}).psk("psk"),
        shared_listener=_switch(env, SHARED_LISTENER),
    )


def _switch(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "") not in ("", "0")


def _number(env: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    """An integer in any base Python spells (``0x...`` for thresholds), in ``[lo, hi]``."""
    raw = env.get(name)
    if raw is None:
        return None
    try:
        value = int(raw, 0)
    except ValueError:
        raise ConfigError(name, f"{name} expects a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(name, f"{name} must be {lo}-{hi}, got {value}")
    return value


def _log_level(env: Mapping[str, str]) -> int | None:
    raw = env.get(LOGLEVEL)
    if raw is None:
        return None
    try:
        return int(raw)  # base 10, as logging levels are written
    except ValueError:
        raise ConfigError(LOGLEVEL, f"{LOGLEVEL} expects a number, got {raw!r}") from None
