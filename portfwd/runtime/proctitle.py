"""Keep a key given on the command line out of ``ps``: the process title is rewritten at start.

``-K <hex>`` is in /proc/<pid>/cmdline, which every local user can read, from exec until
:func:`hide_secret_arguments` runs (the interpreter's start-up, a fraction of a second). The
title becomes the tool's name and its arguments with every secret replaced, as nginx and
PostgreSQL set titles of their own (setproctitle rewrites the argv area the kernel shows).
PORTFWD_PSK never reaches the command line at all.
"""

from __future__ import annotations

import os
import sys

import setproctitle

from portfwd.runtime.options import redacted

SECRET_ON_COMMAND_LINE = ("-K puts the key where every local user can read it (ps, "
                          "/proc/<pid>/cmdline) until start-up hides it; set PORTFWD_PSK instead")


def hide_secret_arguments(argv: list[str]) -> bool:
    """Rewrite the process title if ``argv`` holds a secret; True when it did."""
    if redacted(argv) == argv:
        return False
    shown = redacted(sys.argv[1:])
    setproctitle.setproctitle(" ".join([os.path.basename(sys.argv[0]), *shown]))
    return True
