"""udpfwd: the UDP forwarder service, its session table and its command line."""
