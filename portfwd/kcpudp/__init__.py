"""kcpudp: UDP datagrams through the encrypted KCP tunnel (kcpudp-client, kcpudp-server)."""
