"""portfwd: many forwarding rules in one process, from a TOML config file.

Usage:
  portfwd run [-d] [-p <pidfile>] [-w <n>] <config.toml>
  portfwd check <config.toml>
  portfwd -h | --help
  portfwd --version

Commands:
  run      start every rule of the file; SIGHUP reloads the file, SIGINT, SIGTERM and
           SIGQUIT stop gracefully (stop accepting, drain connections for 5 s)
  check    validate the file, resolve its addresses, print its rules; exit 0, or 2 and one
           error line

Options:
  -d             run in background (daemonize)
  -p <pidfile>   write PID to file
  -w <n>         worker processes (as the file's top-level workers key), 0 = one per
                 CPU; a reload then starts new workers while the old ones drain
  -h --help      show help
  --version      show the version

The file's tables are [[tcp]], [[udp]], [[kcptcp-client]] and [[kcptcp-server]] rules (keys:
listen, to, name and the tool's long flag names, e.g. connect_timeout, psk_file), an optional
[defaults] table of rule keys, and top-level process settings (pidfile, daemonize, workers).
See contrib/portfwd.example.toml.
"""

from __future__ import annotations

import sys

from portfwd.app.generations import Generations, process_workers
from portfwd.app.load import LoadedConfig, absolute, read_config
from portfwd.app.rules import EXPORTED
from portfwd.app.supervisor import Supervisor, bind_all
from portfwd.runtime import daemon
from portfwd.runtime.config import process_config
from portfwd.runtime.environment import read_environment
from portfwd.runtime.options import Options, parse_args, run_tool

PROG = "portfwd"
CLI_PROCESS_FIELDS = {"daemonize": "-d", "pidfile": "-p", "workers": "-w"}  # field -> docopt key


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(PROG, __doc__, argv)
        path = args["<config.toml>"]
        env = read_environment()
        loaded = read_config(path, env)
        if args["check"]:
            return check(loaded)
        file_options = loaded.file.process
        values, labels = dict(file_options.values), dict(file_options.labels)
        for field, key in CLI_PROCESS_FIELDS.items():
            if args[key]:  # the command line wins over the file
                values[field], labels[field] = args[key], key
        process = process_config(Options(values, labels), env)
        if process_workers(loaded, process) > 1:
            generations = Generations(PROG, absolute(path), path, env, loaded, process)
            return daemon.run(PROG, generations.pool, process, reload=generations.reload,
                              kinds=EXPORTED)
        supervisor = Supervisor(absolute(path), path, env, loaded, bind_all(loaded))
        return daemon.run(PROG, supervisor, process, reload=supervisor.reload, kinds=EXPORTED)

    return run_tool(PROG, body)


def check(loaded: LoadedConfig) -> int:
    """``portfwd check``: the rules as resolved, warnings on stderr."""
    for warning in loaded.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    for rule in loaded.rules:
        print(rule.describe())  # no key is ever printed: only kinds, names, addresses
    print(f"{len(loaded.rules)} listeners: configuration OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
