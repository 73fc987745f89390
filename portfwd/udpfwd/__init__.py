"""udpfwd: the UDP forwarder service and its command line (its session table is
portfwd.runtime.session_table, shared with kcpudp)."""
