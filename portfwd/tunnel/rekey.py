"""Rekeying of a TunnelSession (seed "AEAD Rekeying", docs/PROTOCOL.md "Rekeying"), sans-IO.

A mixin of ``TunnelSession``, kept in its own module so that the session's module stays one
concern at a time: these methods read and write the session's state (``_crypto``, ``_win``,
``_send_seq``, ``_rekey_*``) and seal through its ``_seal_raw``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import events
from .replay import ReplayWindow
from .wire import UINT32_MAX, MalformedPacket, PacketType, pack_epoch, unpack_epoch

# The session's logger: the seed's rekey log lines ("rekey trigger", "epoch switch", ...) are
# the state machine's, wherever the code that writes them lives.
logger = logging.getLogger("portfwd.tunnel.session")

CLOSE_REKEY_TIMEOUT = "rekey timeout"
CLOSE_WRAPAROUND = "send_seq wraparound guard"

_INIT, _ACK = int(PacketType.REKEY_INIT), int(PacketType.REKEY_ACK)


class Rekeying:
    """Initiator and responder of the epoch switch; see TunnelSession for the state."""

    _crypto: Any
    _win: ReplayWindow
    _win_prev: ReplayWindow | None
    _send_seq: int
    _rekey_in_progress: bool
    _rekey_deadline: int
    _rekey_retry_at: int
    _events: Any
    config: Any
    conv: int
    dropped_malformed: int
    dropped_stale: int
    # TunnelSession's methods these call (declared, not defined: the session provides them).
    _seal_raw: Callable[..., bool]  # (ptype, body, to=None)
    _terminate: Callable[..., None]  # (reason, by_peer=, send_close=)
    _refresh_fast_path: Callable[[], None]

    def _start_rekey(self, now: int) -> None:
        cp = self._crypto
        if cp.epoch >= UINT32_MAX:
            self._terminate(CLOSE_WRAPAROUND, by_peer=False, send_close=True)
            return
        cp.prepare_next()
        self._rekey_in_progress = True
        self._rekey_deadline = now + self.config.rekey_timeout_ms
        self._rekey_retry_at = now + self.config.rekey_retry_ms
        logger.info("rekey trigger conv=%d epoch=%d->%d send_seq=%d deadline=%d",
                    self.conv, cp.epoch, cp.epoch + 1, self._send_seq, self._rekey_deadline)
        self._events.append(events.RekeyStarted(cp.epoch, self._send_seq, self._rekey_deadline))
        # seed: REKEY_INIT under the current key, AAD = header (type + conv + send_seq)
        self._seal_raw(_INIT, pack_epoch(cp.epoch + 1))

    def _switch_epoch(self, now: int) -> None:
        """seed "Epoch switch": next key -> key, epoch++, send_seq = 0, reset the window."""
        cp = self._crypto
        cp.update_key(now)
        self._send_seq = 0
        self._win_prev = self._win  # old-epoch packets in flight keep their own window
        self._win = ReplayWindow(self.config.replay_window)
        self._rekey_in_progress = False
        self._refresh_fast_path()
        logger.info("epoch switch conv=%d -> epoch=%d", self.conv, cp.epoch)
        self._events.append(events.EpochSwitched(cp.epoch))

    def _rekey_timer(self, now: int) -> bool:
        """A rekey is in progress and the timer fired: retransmit or give up; False if the
        session closed."""
        if now >= self._rekey_deadline:
            # seed "Timeout": close to avoid stalling and potential nonce exhaustion
            logger.info("rekey timeout, closing conv=%d", self.conv)
            self._terminate(CLOSE_REKEY_TIMEOUT, by_peer=False, send_close=True)
            return False
        if now >= self._rekey_retry_at:
            # A lost REKEY_INIT must not kill the session: repeat it (fresh seq, same key).
            self._rekey_retry_at = now + self.config.rekey_retry_ms
            self._seal_raw(_INIT, pack_epoch(self._crypto.epoch + 1))
        return True

    def _receive_rekey_init(self, body: bytes, seq: int, old_epoch: bool, now: int) -> None:
        try:
            target = unpack_epoch(body)
        except MalformedPacket:
            self.dropped_malformed += 1
            return
        logger.info("recv REKEY_INIT conv=%d seq=%d", self.conv, seq)
        cp = self._crypto
        if not old_epoch and target == cp.epoch + 1:
            if cp.epoch >= UINT32_MAX:
                self._terminate(CLOSE_WRAPAROUND, by_peer=False, send_close=True)
                return
            # seed: the responder switches after sending REKEY_ACK under the next key, seq 0;
            # sealing it right after the switch is the same bytes (send_seq = 0, next key).
            self._switch_epoch(now)
            self._seal_raw(_ACK, pack_epoch(cp.epoch))
        elif old_epoch and target == cp.epoch:
            # The initiator is still repeating REKEY_INIT: our ACK was lost.  Seq 0 of this
            # epoch is spent, so re-acknowledge with the next send_seq (never reuse a nonce).
            self._seal_raw(_ACK, pack_epoch(cp.epoch))
        else:
            self.dropped_stale += 1
