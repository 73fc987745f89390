"""kcptcp-client and kcptcp-server: gevent drivers for tunnel conversations, the two services
and their command lines."""
