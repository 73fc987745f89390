"""The ORIGIN stream record (tunnel.origin, tunnel.stream): the client's address carried inside
the authenticated tunnel, on a virtual clock with the conversation harness of
test_conversation."""

from __future__ import annotations

import pytest

from portfwd.tunnel.origin import MalformedOrigin, Origin, pack_origin, unpack_origin
from portfwd.tunnel.stream import CLOSE_BAD_RECORD

try:
    from test_conversation import Net
except ImportError:  # pragma: no cover - run as a package
    from .test_conversation import Net

V4 = Origin(("192.0.2.7", 40000), ("127.0.0.1", 8080))


@pytest.mark.parametrize("origin, size", [
    (V4, 14),
    (Origin(("2001:db8::7", 1), ("::1", 65535)), 38),
])
def test_origin_roundtrip(origin, size):
    record = pack_origin(origin)
    assert len(record) == size and record[0] == 0x02
    assert unpack_origin(record) == origin


def test_v4_mapped_and_mixed_families():
    mapped = Origin(("::ffff:192.0.2.7", 5), ("::ffff:127.0.0.1", 6))
    assert unpack_origin(pack_origin(mapped)) == Origin(("192.0.2.7", 5), ("127.0.0.1", 6))
    mixed = unpack_origin(pack_origin(Origin(("192.0.2.7", 5), ("::1", 6))))
    assert mixed.destination == ("::1", 6) and mixed.source[1] == 5
    assert mixed.source[0] in ("::ffff:192.0.2.7", "::ffff:c000:207")


@pytest.mark.parametrize("record", [b"", b"\x02", b"\x02\x05" + bytes(12), b"\x02\x04" + bytes(11),
                                    b"\x02\x06" + bytes(12), b"\x00\x04" + bytes(12)])
def test_malformed_origin(record):
    with pytest.raises(MalformedOrigin):
        unpack_origin(record)


def test_server_reads_the_origin_then_the_stream_intact():
    net = Net(seed=1)
    net.client.conv.send_origin(V4)
    net.client.write(b"hello through the tunnel", eof=True)
    net.server.write(b"", eof=True)
    net.run_to_close()
    assert net.server.conv.origin == V4
    assert bytes(net.server.received) == b"hello through the tunnel"
    assert net.server.conv.bytes_received == len(b"hello through the tunnel")


def test_poll_origin_without_one_keeps_the_first_record_for_read():
    net = Net(seed=2)
    net.server.reading = False
    net.client.write(b"no origin here")
    net.run(lambda: net.server.conv is not None and net.server.conv.readable)
    conv = net.server.conv
    assert conv.poll_origin() and conv.origin is None
    assert conv.readable  # the stashed DATA record
    assert conv.read() == b"no origin here"


def test_poll_origin_waits_for_the_first_record():
    net = Net(seed=3)
    net.client.conv.send_origin(V4)
    net.server.reading = False
    net.run(lambda: net.server.conv is not None and net.server.conv.established)
    conv = net.server.conv
    net.run(lambda: conv.poll_origin())
    assert conv.origin == V4


def test_origin_after_data_is_refused_locally_and_closes_the_peer():
    net = Net(seed=4)
    net.client.write(b"data first")
    net.run(lambda: net.server.received == bytearray(b"data first"))
    with pytest.raises(ValueError):
        net.client.conv.send_origin(V4)
    net.client.conv.kcp.send(pack_origin(V4))  # a misbehaving (authenticated) client
    net.client.conv._kick = True
    net.run(lambda: net.server.closed_at is not None)
    assert net.server.close_event.reason == CLOSE_BAD_RECORD
    assert net.server.conv.malformed_records == 1 and net.server.conv.origin is None
