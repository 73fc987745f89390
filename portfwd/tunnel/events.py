"""Events a ``TunnelSession`` hands to its driver through ``next_event()`` (aioquic's model).

Each is a small frozen dataclass; the driver drains them after every input and timer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ConnectionClosed reasons the session gives (the driver may add its own).
CLOSE_LOCAL = "closed locally"
CLOSE_BY_PEER = "closed by peer"
CLOSE_HANDSHAKE_TIMEOUT = "handshake timeout"
CLOSE_PEER_SILENT = "peer silent"


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """The session is authenticated and keyed (client: valid WELCOME; server: the client's first
    authenticated packet, which proves it holds the keys).

    The server-side driver dials the target only after this (docs/SECURITY.md, "No target dial
    before the client proved its keys").
    """

    conv: int  #: conversation id of the session


@dataclass(frozen=True, slots=True)
class DatagramReceived:
    """One authenticated, non-replayed DATA payload (one KCP datagram) arrived."""

    data: bytes  #: the opaque payload, exactly as the peer passed it to ``send_datagram``


@dataclass(frozen=True, slots=True)
class FecReceived:
    """One authenticated, non-replayed FEC body (a parity shard or a loss report) arrived."""

    data: bytes  #: the body, for ``tunnel/fec.py`` (``FecChannel.fec_received``)


@dataclass(frozen=True, slots=True)
class PeerAddressChanged:
    """The peer answered a path challenge from a new address; datagrams now go there."""

    old: Any  #: previous peer address (as given to ``receive_datagram``)
    new: Any  #: the new peer address


@dataclass(frozen=True, slots=True)
class RekeyStarted:
    """This side crossed the rekey threshold and sent REKEY_INIT (seed "AEAD Rekeying")."""

    epoch: int  #: the current epoch (the rekey moves to ``epoch + 1``)
    send_seq: int  #: send_seq at the trigger
    deadline_ms: int  #: absolute time (ms) at which the session closes without a REKEY_ACK


@dataclass(frozen=True, slots=True)
class EpochSwitched:
    """Both directions now use the keys of ``epoch`` (seed "Epoch switch")."""

    epoch: int  #: the new epoch number


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The session is over; no more datagrams will be accepted, only a final CLOSE may be sent."""

    reason: str  #: one of the ``CLOSE_*`` reasons in ``portfwd.tunnel.session``
    by_peer: bool  #: True when the peer sent an authenticated CLOSE


Event = (
    HandshakeCompleted | DatagramReceived | FecReceived | PeerAddressChanged | RekeyStarted
    | EpochSwitched | ConnectionClosed
)
