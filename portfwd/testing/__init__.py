"""Code only the tests and the it_kcp harness use: a threaded echo server, the harness."""
