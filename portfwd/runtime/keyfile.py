"""Reading a tunnel key from a file (``--psk-file``, config key ``psk_file``).

The file holds the 32-byte PSK as 64 hex digits (surrounding whitespace ignored), like
WireGuard's key files; it must not be readable by group or others: a key anybody on the host
can read protects nothing, so such a file is refused rather than warned about (ssh's rule for
private keys).
"""

from __future__ import annotations

import os
import stat

from portfwd.runtime.options import PSK_SIZE, ConfigError

MAX_KEY_FILE = 4096  # bytes read at most: a key file is 64 digits and a newline


def read_psk_file(path: str, label: str, field: str = "psk_file") -> bytes:
    """The key in ``path``; raises ConfigError (named by ``label``) for a missing, unreadable,
    loosely permitted or malformed file. Never echoes the file's content."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(field, f"{label}: cannot read {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(field, f"{label}: {path} is not a regular file")
        if mode & 0o077:
            raise ConfigError(field, f"{label}: {path} is readable or writable by group or "
                              f"others (mode {stat.S_IMODE(mode):04o}): chmod 600 it")
        raw = os.read(fd, MAX_KEY_FILE)
    except OSError as exc:
        raise ConfigError(field, f"{label}: cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    text = raw.decode("ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text) if len(text) == 2 * PSK_SIZE else None
    except ValueError:
        key = None
    if key is None:
        raise ConfigError(field, f"{label}: {path} must hold 64 hex digits (a {PSK_SIZE}-byte "
                          f"key)")
    return key
