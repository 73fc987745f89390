"""tcpfwd: the TCP forwarder service, its relay pump and its command line."""
