"""What every tool shares: addresses, options, daemon life cycle, logs, sockets, greenlet pool,
accept loop."""
