"""Key schedule and AEAD: published vectors, deterministic per-epoch derivation (seed "Tests":
test_aead), and every sealed packet of a real session cross-checked against pycryptodome."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest
from Crypto.Cipher import ChaCha20_Poly1305
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from tunnel_helpers import pack_header, reference_nonce, unpack_header

from portfwd.tunnel import crypto, wire
from portfwd.tunnel.events import DatagramReceived
from portfwd.tunnel.handshake import HandshakeAcceptor
from portfwd.tunnel.session import OVERHEAD, TunnelConfig, TunnelSession

PSK = bytes.fromhex("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")

# RFC 8439 section 2.8.2, "Example and Test Vector for AEAD_CHACHA20_POLY1305".
RFC8439_KEY = bytes.fromhex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
RFC8439_NONCE = bytes.fromhex("070000004041424344454647")  # constant 07000000 || IV 4041..47
RFC8439_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
RFC8439_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
RFC8439_CIPHERTEXT = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116"
)
RFC8439_TAG = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")

# RFC 5869 Appendix A.1, "Test Case 1" (HKDF-SHA256).
RFC5869_IKM = bytes.fromhex("0b" * 22)
RFC5869_SALT = bytes.fromhex("000102030405060708090a0b0c")
RFC5869_INFO = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
RFC5869_PRK = bytes.fromhex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
RFC5869_OKM = bytes.fromhex(
    "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
)


def test_rfc8439_aead_vector_through_packet_key() -> None:
    # With nonce base = the RFC nonce and (epoch, seq) = (0, 0) the packet nonce is the RFC nonce.
    key = crypto.PacketKey(RFC8439_KEY, RFC8439_NONCE, epoch=0)
    sealed = key.seal(0, RFC8439_AAD, RFC8439_PLAINTEXT)
    assert sealed == RFC8439_CIPHERTEXT + RFC8439_TAG
    assert key.open(0, RFC8439_AAD, sealed) == RFC8439_PLAINTEXT


def test_rfc8439_vector_pycryptodome_agrees() -> None:
    cipher = ChaCha20_Poly1305.new(key=RFC8439_KEY, nonce=RFC8439_NONCE)
    cipher.update(RFC8439_AAD)
    ciphertext, tag = cipher.encrypt_and_digest(RFC8439_PLAINTEXT)
    assert (ciphertext, tag) == (RFC8439_CIPHERTEXT, RFC8439_TAG)


def test_rfc5869_hkdf_vector() -> None:
    prk = crypto.hkdf_extract(RFC5869_SALT, RFC5869_IKM)
    assert prk == RFC5869_PRK
    assert crypto.hkdf_expand(prk, RFC5869_INFO, 42) == RFC5869_OKM


def test_open_rejects_tampering() -> None:
    key = crypto.PacketKey(RFC8439_KEY, RFC8439_NONCE, epoch=0)
    sealed = key.seal(7, b"hdr", b"payload")
    assert key.open(7, b"hdr", sealed) == b"payload"
    assert key.open(8, b"hdr", sealed) is None  # other seq, other nonce
    assert key.open(7, b"hdX", sealed) is None  # AAD covers the header
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    assert key.open(7, b"hdr", flipped) is None


DH = b"d" * 32  # stands in for an X25519 result where only the key schedule is under test


def test_epoch_keys_are_deterministic() -> None:
    secret = crypto.session_secret(PSK, b"c" * 32, b"s" * 32, DH)
    again = crypto.session_secret(PSK, b"c" * 32, b"s" * 32, DH)
    assert secret == again
    for epoch in (0, 1, 2, 0xFFFFFFFF):
        assert crypto.derive_epoch_keys(secret, 7, epoch, crypto.C2S) == \
            crypto.derive_epoch_keys(again, 7, epoch, crypto.C2S)


def test_epochs_directions_convs_and_shares_give_different_keys() -> None:
    secret = crypto.session_secret(PSK, b"c" * 32, b"s" * 32, DH)
    keys = set()
    bases = set()
    for epoch in range(8):
        for direction in (crypto.C2S, crypto.S2C):
            for conv in (1, 2):
                key, base = crypto.derive_epoch_keys(secret, conv, epoch, direction)
                assert len(key) == 32 and len(base) == 12
                keys.add(key)
                bases.add(base)
    assert len(keys) == len(bases) == 8 * 2 * 2
    other = crypto.session_secret(PSK, b"c" * 32, b"t" * 32, DH)
    assert other != secret
    assert crypto.session_secret(bytes(32), b"c" * 32, b"s" * 32, DH) != secret
    # The same PSK and shares with another DH result: other keys (what forward secrecy rests on).
    assert crypto.session_secret(PSK, b"c" * 32, b"s" * 32, b"e" * 32) != secret


def test_key_schedule_matches_cryptography_hkdf() -> None:
    # An independent HKDF implementation, with the labels docs/PROTOCOL.md specifies.
    cs, ss, conv, epoch = bytes(range(32)), bytes(range(32, 64)), 0x01020304, 5
    dh = bytes(range(64, 96))
    secret = crypto.session_secret(PSK, cs, ss, dh)
    info = b"portfwd/2 key s2c" + conv.to_bytes(4, "big") + epoch.to_bytes(4, "big")
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=cs + ss, info=info).derive(PSK + dh)
    assert crypto.derive_epoch_keys(secret, conv, epoch, crypto.S2C)[0] == okm
    info = b"portfwd/2 nonce s2c" + conv.to_bytes(4, "big") + epoch.to_bytes(4, "big")
    nonce = HKDFExpand(algorithm=hashes.SHA256(), length=12, info=info).derive(secret)
    assert crypto.derive_epoch_keys(secret, conv, epoch, crypto.S2C)[1] == nonce
    hs = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"portfwd/2 handshake",
              info=b"portfwd/2 handshake mac").derive(PSK)
    assert crypto.handshake_mac_key(PSK) == hs


def test_key_share_matches_cryptography_x25519() -> None:
    # RFC 7748 section 6.1 (Diffie-Hellman test vector).
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    a, b = crypto.KeyShare(alice), crypto.KeyShare(bob)
    assert a.public == bytes.fromhex(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert a.exchange(b.public) == b.exchange(a.public) == shared
    assert a.exchange(bytes(32)) is None  # a low-order point yields no secret


def test_handshake_macs_are_labelled() -> None:
    # A WELCOME's MAC input can never be taken for a HELLO's: each starts with its own label.
    key = crypto.handshake_mac_key(PSK)
    assert crypto.HELLO_LABEL != crypto.WELCOME_LABEL
    assert crypto.HandshakeMac(key)(crypto.HELLO_LABEL, b"x") != \
        crypto.HandshakeMac(key)(crypto.WELCOME_LABEL, b"x")


def test_nonce_low_32_bits_carry_send_seq() -> None:
    base = bytes(12)
    assert reference_nonce(base, 0, 5) == bytes(11) + b"\x05"
    assert reference_nonce(base, 3, 0xFFFFFFFE) == bytes(4) + b"\x00\x00\x00\x03\xff\xff\xff\xfe"
    base = bytes(range(1, 13))
    nonces = {reference_nonce(base, e, s) for e in range(4) for s in range(64)}
    assert len(nonces) == 4 * 64


def test_crypto_pair_update_key_keeps_previous_for_grace() -> None:
    secret = crypto.session_secret(PSK, b"c" * 32, b"s" * 32, DH)
    client = crypto.CryptoPair(PSK, secret, 9, is_client=True, grace_ms=100)
    server = crypto.CryptoPair(PSK, secret, 9, is_client=False, grace_ms=100)
    old = client.send.seal(0, b"h", b"late")
    client.update_key(now=0)
    server.update_key(now=0)
    assert client.epoch == server.epoch == 1
    assert server.recv.open(0, b"h", client.send.seal(0, b"h", b"x")) == b"x"
    assert server.recv.open(0, b"h", old) is None
    assert server.prev_usable(99)
    assert server.recv_prev.open(0, b"h", old) == b"late"
    assert not server.prev_usable(100)
    assert server.recv_prev is None


# --- every sealed datagram of a real session, against pycryptodome ------------------------------

def _pycryptodome_seal(key: bytes, nonce: bytes, header: bytes, body: bytes) -> bytes:
    cipher = ChaCha20_Poly1305.new(key=key, nonce=nonce)
    cipher.update(header)
    ciphertext, tag = cipher.encrypt_and_digest(body)
    return header + ciphertext + tag


def _pycryptodome_open(key: bytes, nonce: bytes, datagram: bytes) -> bytes:
    cipher = ChaCha20_Poly1305.new(key=key, nonce=nonce)
    cipher.update(datagram[:wire.HEADER_SIZE])
    return cipher.decrypt_and_verify(datagram[wire.HEADER_SIZE:-16], datagram[-16:])


def _independent_keys(secret: bytes, conv: int, epoch: int,
                      direction: bytes) -> tuple[bytes, bytes]:
    suffix = direction + conv.to_bytes(4, "big") + epoch.to_bytes(4, "big")
    key = HKDFExpand(algorithm=hashes.SHA256(), length=32, info=b"portfwd/2 key " + suffix)
    nonce = HKDFExpand(algorithm=hashes.SHA256(), length=12, info=b"portfwd/2 nonce " + suffix)
    return key.derive(secret), nonce.derive(secret)


def test_every_sealed_packet_matches_pycryptodome() -> None:
    rng = random.Random(8439)
    config = TunnelConfig(psk=PSK, rekey_seq_threshold=40)
    conv = 0xCAFE0001
    drawn: list[bytes] = []  # the client's random bytes: its X25519 private key is among them

    def client_random(n: int) -> bytes:
        drawn.append(rng.randbytes(n))
        return drawn[-1]

    client = TunnelSession.client(config, conv, "server", 0, 1_000_000, client_random)
    acceptor = HandshakeAcceptor(config, rng.randbytes)
    [hello] = client.datagrams_to_send(0)
    server = acceptor.accept(hello, "client", 0, 1_000_000)
    assert server is not None
    assert server.datagrams_to_send(0) == []
    [(welcome, to)] = server.probes_to_send()
    assert to == "client"
    client.receive_datagram(welcome, "server", 0)
    client_share = wire.unpack_hello(hello).client_share
    server_share = wire.unpack_welcome(welcome).server_share
    # The session secret needs the PSK *and* the X25519 result, here computed independently
    # from the client's private key; the PSK and the recorded shares alone give other keys.
    [private] = [d for d in drawn if len(d) == 32 and X25519PrivateKey.from_private_bytes(
        d).public_key().public_bytes_raw() == client_share]
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(server_share))
    secret = crypto.session_secret(PSK, client_share, server_share, shared)
    assert crypto.session_secret(PSK, client_share, server_share, b"") != secret
    checked = {}
    expected_seq = {crypto.C2S: 0, crypto.S2C: 0}
    epoch_of = {crypto.C2S: 0, crypto.S2C: 0}
    for step in range(300):
        now = step
        sent = {}
        for side, direction in ((client, crypto.C2S), (server, crypto.S2C)):
            payload = rng.randbytes(rng.randrange(0, 1400))
            side.send_datagram(payload)
            sent[direction] = payload
        for side, peer, direction in ((client, server, crypto.C2S),
                                      (server, client, crypto.S2C)):
            for datagram in side.datagrams_to_send(now):
                header = unpack_header(datagram)
                if header.seq == 0 and header.ptype is not wire.PacketType.REKEY_INIT \
                        and expected_seq[direction] != 0:
                    epoch_of[direction] += 1  # the sender switched epoch
                    expected_seq[direction] = 0
                assert header.seq == expected_seq[direction]
                expected_seq[direction] += 1
                key, base = _independent_keys(secret, conv, epoch_of[direction], direction)
                assert header.phase == epoch_of[direction] & 1
                nonce = reference_nonce(base, epoch_of[direction], header.seq)
                body = _pycryptodome_open(key, nonce, datagram)
                assert _pycryptodome_seal(key, nonce, datagram[:9], body) == datagram
                if header.ptype is wire.PacketType.DATA:
                    assert body == sent[direction]
                    assert len(datagram) == len(body) + OVERHEAD
                checked[header.ptype] = checked.get(header.ptype, 0) + 1
                peer.receive_datagram(datagram, "client" if side is client else "server", now)
        while (event := server.next_event()) is not None:
            if isinstance(event, DatagramReceived):
                assert event.data == sent[crypto.C2S]
    assert checked[wire.PacketType.DATA] == 600
    assert checked[wire.PacketType.REKEY_INIT] >= 1
    assert checked[wire.PacketType.REKEY_ACK] >= 1
    assert epoch_of[crypto.C2S] >= 5 and epoch_of[crypto.S2C] >= 5
    client.close()
    [close] = client.datagrams_to_send(300)
    assert unpack_header(close).ptype is wire.PacketType.CLOSE


def test_psk_holder_who_recorded_a_handshake_cannot_open_its_packets() -> None:
    """Forward secrecy and per-client key separation: with the PSK, the recorded HELLO and
    WELCOME and a key pair of its own, another client still derives other keys."""
    rng = random.Random(7748)
    config = TunnelConfig(psk=PSK)
    client = TunnelSession.client(config, 0xCAFE0002, "server", 0, 1_000_000, rng.randbytes)
    [hello] = client.datagrams_to_send(0)
    server = HandshakeAcceptor(config, rng.randbytes).accept(hello, "client", 0, 1_000_000)
    assert server is not None
    [(welcome, _)] = server.probes_to_send()
    client.receive_datagram(welcome, "server", 0)
    client.send_datagram(b"secret payload")
    recorded = client.datagrams_to_send(0)  # the DATA, which also confirms: no PING needed
    assert len(recorded) == 1
    for datagram in recorded:
        server.receive_datagram(datagram, "client", 0)
    assert [e.data for e in iter(server.next_event, None)
            if isinstance(e, DatagramReceived)] == [b"secret payload"]
    client_share = wire.unpack_hello(hello).client_share
    server_share = wire.unpack_welcome(welcome).server_share
    eavesdropper = crypto.KeyShare(rng.randbytes(32))
    guesses = [b"", bytes(32), eavesdropper.exchange(server_share),
               eavesdropper.exchange(client_share)]
    for dh in guesses:
        secret = crypto.session_secret(PSK, client_share, server_share, dh)
        pair = crypto.CryptoPair(PSK, secret, 0xCAFE0002, is_client=False, grace_ms=0)
        data = recorded[0]
        assert pair.recv.open(unpack_header(data).seq, data[:wire.HEADER_SIZE],
                              data[wire.HEADER_SIZE:]) is None


@pytest.mark.parametrize("size", [0, 1, 1350, 65507 - OVERHEAD])
def test_data_overhead_is_25_bytes(size: int) -> None:
    assert OVERHEAD == 25
    key = crypto.PacketKey(bytes(32), bytes(12), 0)
    header = pack_header(wire.PacketType.DATA, 0, 1, 2)
    assert len(header + key.seal(2, header, bytes(size))) == size + OVERHEAD


def test_handshake_mac_is_hmac_sha256_truncated() -> None:
    key = crypto.handshake_mac_key(PSK)
    parts = (crypto.HELLO_LABEL, bytes(range(112)))
    reference = hmac.new(key, b"".join(parts), hashlib.sha256).digest()[:16]
    assert crypto.HandshakeMac(key)(*parts) == reference
    assert crypto.HandshakeMac(key)(b"".join(parts)) == reference  # parts only concatenate
