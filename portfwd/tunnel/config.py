"""Settings of the tunnel security layer (docs/PROTOCOL.md, "Constants"), sans-IO.

Kept apart from session.py, which re-exports them, so the state machine's module holds only the
state machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import crypto
from .wire import UINT32_MAX, Carries, PacketType

REKEY_SEQ_THRESHOLD = 0xFFF00000  # send_seq at which a rekey starts (seed default)
REKEY_TIMEOUT_MS = 5000  # ms without REKEY_ACK before closing (seed default)
REKEY_GRACE_MS = 5000  # ms the previous epoch's receive key stays usable after a switch


@dataclass(frozen=True)
class TunnelConfig:
    """Settings of the tunnel security layer; the driver builds it from flags and env vars."""

    psk: bytes | None = None  #: 32-byte PSK (-K); None = plaintext mode (seed)
    rekey_seq_threshold: int = REKEY_SEQ_THRESHOLD  #: send_seq that triggers a rekey (packets)
    rekey_timeout_ms: int = REKEY_TIMEOUT_MS  #: ms from REKEY_INIT to closing without REKEY_ACK
    rekey_retry_ms: int = 500  #: ms between REKEY_INIT retransmissions while waiting
    rekey_grace_ms: int = REKEY_GRACE_MS  #: ms the previous epoch's receive key still opens
    #: late packets; at least rekey_timeout_ms (checked) so a responder still hears an initiator
    #: whose ACK was lost
    replay_window: int = 2048  #: anti-replay window width (packets); docs/PROTOCOL.md "Anti-replay"
    handshake_timeout_ms: int = 10000  #: ms the client waits for WELCOME and the server's
    #: answer to its PING; ms a server session waits for the client's first sealed packet
    #: (at most idle_timeout_ms)
    confirm_delay_ms: int = 10  #: ms a confirming PING (the client's after the WELCOME, the
    #: server's after the client's first sealed packet) waits for stream data to carry the news
    handshake_retry_ms: int = 250  #: ms before the first HELLO retransmission (then doubles)
    handshake_retry_max_ms: int = 2000  #: ms cap of the HELLO retransmission interval
    keepalive_interval_ms: int = 10000  #: ms of send silence after which a PING goes out
    idle_timeout_ms: int = 30000  #: ms without an authenticated packet before closing
    timestamp_window_ms: int = 30000  #: ms of clock difference a HELLO timestamp may have
    hello_cache_size: int = 65536  #: entries in the server's HELLO replay cache (size bound)
    rate_table_size: int = 4096  #: source prefixes tracked by the cookie-lane budgets (LRU)
    hello_verify_rate_per_s: float = 2000.0  #: new sessions per second from HELLOs without a
    #: cookie; beyond, a valid HELLO without a valid cookie gets one instead (0 = unlimited)
    cookie_reply_rate_per_s: float = 10000.0  #: COOKIE replies per second at most
    cookie_hello_rate_per_s: float = 5000.0  #: HELLOs with a valid cookie verified per second
    #: per source prefix
    max_pending_payloads: int = 4096  #: payloads queued before the handshake completes
    initial_send_seq: int = 0  #: send_seq of epoch 0 (tests of the wraparound guard)
    carries: int = Carries.STREAM  #: what conversations carry (HELLO byte 62): both ends agree

    def __post_init__(self) -> None:
        if self.psk is not None and len(self.psk) != crypto.PSK_SIZE:
            raise ValueError(f"PSK must be {crypto.PSK_SIZE} bytes, got {len(self.psk)}")
        if not 1 <= self.rekey_seq_threshold <= UINT32_MAX:
            raise ValueError("rekey_seq_threshold must be in 1..0xFFFFFFFF")
        if not 0 <= self.initial_send_seq <= UINT32_MAX:
            raise ValueError("initial_send_seq must be in 0..0xFFFFFFFF")
        for name in ("rekey_timeout_ms", "rekey_retry_ms", "handshake_timeout_ms",
                     "handshake_retry_ms", "handshake_retry_max_ms", "keepalive_interval_ms",
                     "idle_timeout_ms", "replay_window", "hello_cache_size", "rate_table_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("rekey_grace_ms", "timestamp_window_ms", "max_pending_payloads",
                     "confirm_delay_ms",
                     "hello_verify_rate_per_s",
                     "cookie_reply_rate_per_s", "cookie_hello_rate_per_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.rekey_grace_ms < self.rekey_timeout_ms:
            # A responder whose REKEY_ACK was lost must still open the initiator's repeated
            # REKEY_INIT under the old key until the initiator gives up.
            raise ValueError(f"rekey_grace_ms ({self.rekey_grace_ms}) must be at least "
                             f"rekey_timeout_ms ({self.rekey_timeout_ms})")

    @property
    def payload_type(self) -> int:
        """The packet type of payloads: DATAGRAM in kcpudp's datagram mode (no KCP), else DATA
        (each payload a KCP datagram)."""
        return int(PacketType.DATAGRAM if self.carries == Carries.DATAGRAMS else PacketType.DATA)

    @property
    def plaintext(self) -> bool:
        """Plaintext mode (no ``-K``, seed): no AEAD tag, no secrecy, no integrity."""
        return self.psk is None
