"""The ``dmm`` command.

::

    dmm run app.py [args...]      run a program with its sockets on dmm
    dmm run -m module [args...]   the same for a module
    dmm demo [filesync|web|loopback]
                                  file sync in the lab, kernel TCP against dmm
                                  (as root), a dual-mode web server (root), or
                                  three stacks over loopback
    dmm stacks                    the configured stack instances
    dmm routes                    the routing rules
    dmm route explain HOST:PORT   which stack a connection would use, and why
    dmm rd [ls | forget]          this host's L-RD: listeners, what peers speak
    dmm paths [ls | forget]       what connections measured, per destination
    dmm lab up PROFILE | down | exec NODE -- CMD | status | set | serve
                                  namespaces joined by the link emulator
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]


def _runtime(args):
    from . import runtime
    from .config import ConfigError

    try:
        return runtime.configure(args.config) if args.config else runtime.get()
    except ConfigError as exc:
        raise config_exit(exc) from None


def config_exit(exc: Exception) -> SystemExit:
    """The exit for a bad config: each of its errors on a line of its own."""
    return SystemExit("\n".join(f"dmm: {line}" for line in str(exc).splitlines()))


def cmd_run(args) -> int:
    from .patch import patch_all

    if args.config:
        os.environ["DMM_CONFIG"] = args.config
    _runtime(args)  # fail early on a bad config, before the program starts
    if not args.module and not args.args:
        raise SystemExit("dmm run: give a script path or -m MODULE")
    patch_all()
    if args.stats:
        _exit_on_sigterm()
    try:
        if args.module:
            sys.argv = [args.module] + args.args
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            script, rest = args.args[0], args.args[1:]
            sys.argv = [script] + rest
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
            runpy.run_path(script, run_name="__main__")
    finally:
        if args.stats:
            _write_stats(args.stats)
    return 0


def _exit_on_sigterm() -> None:
    """Makes SIGTERM unwind like ``sys.exit``, so ``--stats`` is written when
    a service manager stops the program (unless the program sets its own
    handler)."""
    import signal

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _write_stats(path: str) -> None:
    """Writes every stack's counters as JSON (``dmm run --stats``), and under
    ``"negotiation"`` the races, wins, fallbacks and discovery counts."""
    import json

    from . import runtime
    from .socket import stack_counters

    stats: dict = stack_counters()
    rt = runtime.get()
    if rt.negotiator is not None and "negotiation" not in stats:
        stats["negotiation"] = rt.negotiator.counts()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1, sort_keys=True)


def cmd_stacks(args) -> int:
    rt = _runtime(args)
    print(f"config: {rt.config.path}")
    width = max(len(n) for n in rt.order)
    for name in rt.order:
        inst = rt.stacks[name]
        counts = ", ".join(f"{k}={v}" for k, v in inst.counters().items())
        print(f"  {name:<{width}}  {inst.describe()}  [{counts}]")
    return 0


def cmd_routes(args) -> int:
    rt = _runtime(args)
    print(f"config: {rt.config.path}")
    for r in rt.routes:
        where = f"  (line {r.line})" if r.line else ""
        print(f"  route[{r.index}]  {r.describe()}{where}")
    if rt.config.listen:
        print(f"  [listen]  -> {', '.join(rt.config.listen)}")
    if rt.adaptive is not None:
        a = rt.adaptive
        print(f"  adaptive  -> {a.kernel}, or {a.lossy} where it is faster than {a.congestion} (stream connects)")
    print(f"  default   -> {rt.order[0]}")
    return 0


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SystemExit(f"dmm route explain: expected HOST:PORT (IPv6 as [::1]:80), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def cmd_route_explain(args) -> int:
    import socket

    from . import policy, runtime

    rt = _runtime(args)
    host, port = _split_hostport(args.target)
    kind = socket.SOCK_DGRAM if args.udp else socket.SOCK_STREAM
    role = "listen" if args.listen else ("sendto" if args.udp else "connect")
    try:
        infos = socket.getaddrinfo(host, port, 0, kind)
    except socket.gaierror as exc:
        raise SystemExit(f"dmm route explain: cannot resolve {host!r}: {exc}") from None
    family, _, _, _, addr = infos[0]
    props = dict(p.split("=", 1) for p in args.prop)
    request = policy.Request(role=role, family=family, type=kind, address=addr[0], port=port,
                             host=None if runtime.is_ip(host) else host, properties=props)
    outcome = rt.decide(request, args.stack, explain=True)
    print(f"{role} {addr[0]}:{port}" + (f" ({host})" if request.host else "") + f" {'udp' if args.udp else 'tcp'}")
    print(f"  -> {outcome.stack}")
    print(f"  decided by: {outcome.source}: {outcome.reason}")
    for line in outcome.trace:
        print(f"  note: {line}")
    if role == "connect" and len(outcome.candidates) > 1:
        delay = rt.negotiator.attempt_delay(addr[0], port, outcome.candidates[0])
        how = "race them" if outcome.race else "try them in turn"
        print(f"  candidates: {', '.join(outcome.candidates)}: a connect now would {how}, "
              f"the next after {delay * 1000:.0f} ms or at once on a refusal")
    elif role == "connect":
        print(f"  candidates: {outcome.stack} alone: a connect now goes straight to it")
    return 0


def _age(t: float) -> str:
    import time

    s = time.time() - t
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _store(args, command: str):
    """The host's L-RD store as the config names it, and its directory."""
    from .config import RDSpec
    from .rd import Store, default_dir

    rt = _runtime(args)
    spec = rt.config.rd or RDSpec()
    path = (os.path.expanduser(spec.store) if spec.store else str(default_dir()))
    try:
        return rt, path, Store(os.path.join(path, "lrd.sqlite"))
    except Exception as exc:  # sqlite3.Error, OSError
        raise SystemExit(f"dmm {command}: the store in {path} cannot be read: {exc}") from None


def cmd_paths(args) -> int:
    import time

    from .rd.paths import live_estimates

    rt, path, store = _store(args, "paths")
    try:
        if args.paths_command == "forget":
            store.forget_paths()
            print(f"L-RD {path}: path knowledge forgotten")
            return 0
        spec = rt.config.paths
        live = live_estimates(store.paths(), time.time(), spec.half_life)
        if args.json:
            import dataclasses
            import json

            print(json.dumps([dataclasses.asdict(e) for e in live]))
            return 0
        print(f"L-RD {path}: {len(live)} path estimates (half-life {spec.half_life:g} s)")
        for est in live:
            print(f"  {est.describe()}")
    finally:
        store.close()
    return 0


def cmd_rd(args) -> int:
    import time

    if args.rd_command in ("push", "status", "central"):
        from .config import ConfigError, load
        from .rd import central_cli

        try:
            cfg = load(args.config)
        except ConfigError as exc:
            raise config_exit(exc) from None
        if args.rd_command == "push":
            if not args.file:
                raise SystemExit("dmm: rd push: name the policy file (TOML: [[route]] and [adaptive])")
            return central_cli.push(cfg, args.file)
        return central_cli.status(cfg) if args.rd_command == "status" else central_cli.ls(cfg)
    _rt, path, store = _store(args, "rd")
    try:
        if args.rd_command == "forget":
            store.forget()
            print(f"L-RD {path}: peer knowledge forgotten")
            return 0
        store.prune_dead()
        print(f"L-RD {path}")
        listeners = store.listeners()
        print(f"listeners on this host: {len(listeners)}")
        for lst in sorted(listeners, key=lambda x: (x.port, x.address)):
            protos = ", ".join(f"{p}:{n}" for p, n in lst.protocols)
            print(f"  {lst.address}:{lst.port}  {protos}  stacks {', '.join(lst.stacks)}  pid {lst.pid}, "
                  f"for {_age(lst.since)}")
        peers = store.peers()
        print(f"what peers speak: {len(peers)} facts")
        now = time.time()
        for f in sorted(peers, key=lambda x: (x.address, x.port, x.protocol)):
            rtt = f", connect {f.rtt_ms:.1f} ms" if f.rtt_ms else ""
            print(f"  {f.address}:{f.port}  {f.protocol:<6} {'yes' if f.speaks else 'no ':<3}  from {f.source}, "
                  f"{_age(f.learned)} ago, {int(f.expires - now)} s left{rtt}")
    finally:
        store.close()
    if _rt.config.rd is not None and _rt.config.rd.central:
        from .rd import central_cli

        print()
        return central_cli.ls(_rt.config)
    return 0


def cmd_demo(args) -> int:
    from .usecases import filesync_demo

    why = filesync_demo.available()
    which = args.which or ("loopback" if why else "filesync")
    if which == "web":
        from .usecases import web_demo

        return web_demo.run()
    if which == "filesync":
        if why:
            print(f"dmm demo filesync: {why}", file=sys.stderr)
            return 2
        size = int((args.size if args.size is not None else 4) * 10 ** 6)
        return filesync_demo.run(size=size, rounds=args.rounds, out=Path(args.out))
    from .demo import run_demo

    if args.which is None:
        print(f"(the file-sync lab demo did not run: {why}; as root, `dmm demo` runs it)\n")
    return run_demo(size_mib=int(args.size if args.size is not None else 64), config=args.config)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="dmm", description="Run sockets over several network stacks, routed per connection.")
    p.add_argument("--version", action="version", version=f"dmm {__version__}")
    p.add_argument("--config", help="config file (default: $DMM_CONFIG, ./dmm.toml, built-in)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a Python program with its sockets on dmm")
    run.add_argument("-m", dest="module", help="run a library module as a script")
    run.add_argument("--stats", metavar="FILE",
                     help="write every stack's counters as JSON to FILE when the program ends (also on Ctrl-C)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="script and its arguments")
    run.set_defaults(func=cmd_run)

    sub.add_parser("stacks", help="list the stack instances").set_defaults(func=cmd_stacks)
    sub.add_parser("routes", help="list the routing rules").set_defaults(func=cmd_routes)

    route = sub.add_parser("route", help="routing tools")
    rsub = route.add_subparsers(dest="route_command", metavar="SUBCOMMAND", required=True)
    explain = rsub.add_parser("explain", help="which stack a socket to HOST:PORT would use, and why")
    explain.add_argument("target", metavar="HOST:PORT")
    explain.add_argument("--udp", action="store_true", help="a datagram socket (role sendto)")
    explain.add_argument("--listen", action="store_true", help="a listening socket bound to HOST:PORT")
    explain.add_argument("--stack", help="a per-socket override")
    explain.add_argument("--prop", action="append", default=[], metavar="KEY=VALUE", help="an application property")
    explain.set_defaults(func=cmd_route_explain)

    rd = sub.add_parser("rd", help="resource discovery: this host's store (L-RD) and central RD (etcd)")
    rd.add_argument("rd_command", nargs="?", choices=("ls", "forget", "central", "status", "push"), default="ls",
                    help="ls: listeners and learned peers (default); forget: drop what peers speak; "
                         "central: central RD's advertisements, shared paths and policy; status: central RD's "
                         "backend, connection, revision and entries; push FILE: store a central policy")
    rd.add_argument("file", nargs="?", help="push: the policy file ([[route]] and [adaptive] of a dmm.toml)")
    rd.set_defaults(func=cmd_rd)

    paths = sub.add_parser("paths", help="what connections measured on the way to each destination")
    paths.add_argument("paths_command", nargs="?", choices=("ls", "forget"), default="ls",
                       help="ls: estimates per address and prefix (default); forget: drop them")
    paths.add_argument("--json", action="store_true", help="print the estimates as a JSON list")
    paths.set_defaults(func=cmd_paths)

    demo = sub.add_parser("demo", help="file sync in the lab, kernel TCP against dmm (as root); else a loopback demo")
    demo.add_argument("which", nargs="?", choices=("filesync", "web", "loopback"),
                      help="filesync: use case 1 in the lab (root; the default as root); web: use case 2, one "
                           "web server socket on the kernel and smoltcp (root); loopback: three stacks in one "
                           "process (the default otherwise)")
    demo.add_argument("--size", type=float, help="MB per transfer (filesync, default 4) or MiB per client "
                                                  "(loopback, default 64)")
    demo.add_argument("--rounds", type=int, default=3, help="filesync rounds per scenario (default 3)")
    demo.add_argument("--out", default="dmm-demo", help="where filesync writes its table and plot (default ./dmm-demo)")
    demo.set_defaults(func=cmd_demo)

    from .lab.cli import add_subcommands

    add_subcommands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)
