"""Per-connection policy cores (sans-IO): the PROXY protocol codec, allow/deny lists and
the destination selector."""
