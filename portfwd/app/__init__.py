"""portfwd: many forwarding rules in one process, from a TOML config file, reloaded on SIGHUP."""
