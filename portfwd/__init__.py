"""portfwd: user-space TCP/UDP port forwarding services on gevent."""

__version__ = "0.1.0"
