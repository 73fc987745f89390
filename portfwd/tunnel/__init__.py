"""The tunnel protocol, sans-IO: wire codecs, key schedule, anti-replay, session (handshake,
AEAD, rekey), the handshake acceptor and the stream layer; imports only ``portfwd.kcp``."""
