"""``dmm lab``: a lab that outlives the command that built it.

``lab up PROFILE`` starts a background daemon (``lab serve``) that holds the
emulator threads; it writes ``/run/dmm-lab/NAME.json`` once the lab is ready
and answers ``lab status`` / ``lab set`` on ``/run/dmm-lab/NAME.sock``
(one JSON request and one JSON reply per connection). ``lab down`` sends it
SIGTERM; the daemon tears the lab down on SIGTERM and SIGINT, and ``down``
deletes any namespace the state file names that is still there.

The top-level ``dmm`` command mounts these with :func:`add_subcommands`;
``python -m dmm.lab.cli lab ...`` works on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import netns as nsu
from .profiles import describe

__all__ = ["add_subcommands", "main"]

STATE_DIR = Path(os.environ.get("DMM_LAB_DIR", "/run/dmm-lab"))


def _paths(name: str) -> tuple[Path, Path, Path]:
    if not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"lab name must be letters, digits, '-' or '_', got {name!r}")
    return STATE_DIR / f"{name}.json", STATE_DIR / f"{name}.sock", STATE_DIR / f"{name}.log"


def _read_state(name: str) -> dict[str, Any] | None:
    state_path = _paths(name)[0]
    try:
        return json.loads(state_path.read_text())
    except FileNotFoundError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _request(name: str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    sock_path = _paths(name)[1]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(json.dumps(req).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    reply = json.loads(data)
    if "error" in reply:
        raise SystemExit(f"lab {name}: {reply['error']}")
    return reply


# -- the daemon ------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Builds the lab, publishes its state, serves requests until signalled."""
    from .topology import Lab

    state_path, sock_path, _ = _paths(args.name)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    lab = Lab(args.profile, args.params, realtime=args.realtime, device=args.device)
    try:
        lab.start()
        sock_path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(sock_path))
        server.listen(8)
        server.settimeout(0.2)
        state = {"name": args.name, "pid": os.getpid(), **lab.describe()}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.rename(state_path)
        print(f"lab {args.name} up: {json.dumps(state)}", flush=True)
        while not stopping:
            try:
                conn, _ = server.accept()
            except (socket.timeout, InterruptedError):
                continue
            with conn:
                _serve_one(lab, conn)
        server.close()
    finally:
        print(f"lab {args.name}: tearing down", flush=True)
        try:
            lab.close()
        finally:
            sock_path.unlink(missing_ok=True)
            state_path.unlink(missing_ok=True)
    return 0


def _serve_one(lab: Any, conn: socket.socket) -> None:
    conn.settimeout(5)
    try:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        req = json.loads(data)
        if req.get("cmd") == "stats":
            reply: dict[str, Any] = {"stats": lab.stats(), "params": {n: lab.params(n) for n in lab.links}}
        elif req.get("cmd") == "set":
            lab.set_params(req["link"], req["params"], req.get("direction", "both"),
                           replace=bool(req.get("replace")))
            reply = {"params": lab.params(req["link"])}
        else:
            reply = {"error": f"unknown request {req!r}"}
    except (ValueError, KeyError, OSError, nsu.LabError) as exc:
        reply = {"error": str(exc)}
    try:
        conn.sendall(json.dumps(reply).encode())
    except OSError:
        pass


# -- the commands ----------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    """Starts the daemon and waits until the lab is ready (or failed)."""
    state = _read_state(args.name)
    if state and _alive(state["pid"]):
        print(f"lab {args.name} is already up (pid {state['pid']}); 'lab down' first", file=sys.stderr)
        return 1
    # Check the profile and parameters here, so errors reach the user's terminal.
    from .topology import Topology

    try:
        Topology.from_profile(args.profile, args.params).check()
    except (ValueError, nsu.LabError) as exc:
        print(f"lab up: {exc}", file=sys.stderr)
        return 2
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state_path, _, log_path = _paths(args.name)
    state_path.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "dmm.lab.cli", "lab", "serve", args.profile, "--name", args.name,
            "--realtime", str(args.realtime), "--device", args.device]
    if args.params:
        argv += ["--params", args.params]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if state_path.exists():
            state = json.loads(state_path.read_text())
            print(f"lab {args.name} up ({state['profile']}), daemon pid {proc.pid}")
            _print_nodes(state)
            return 0
        if proc.poll() is not None:
            print(f"lab up failed; daemon log {log_path}:\n{log_path.read_text()}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    proc.terminate()
    print(f"lab up: not ready after {args.timeout}s; see {log_path}", file=sys.stderr)
    return 1


def _print_nodes(state: dict[str, Any]) -> None:
    for node, info in state["nodes"].items():
        print(f"  {node:10} {info['address']:12} {info.get('address6', ''):16} netns {info['netns']}")
    for link, info in state["links"].items():
        print(f"  link {link:10} {info['params'] or '(no impairment)'}")


def cmd_down(args: argparse.Namespace) -> int:
    """Stops the daemon; deletes whatever it left behind."""
    state = _read_state(args.name)
    if state is None:
        print(f"lab {args.name} is not up")
        return 0
    pid = state["pid"]
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    # The daemon removes these itself; after a SIGKILL or a crash it cannot.
    for info in state["nodes"].values():
        nsu.delete_netns(info["netns"])
    for path in _paths(args.name):
        path.unlink(missing_ok=True)
    print(f"lab {args.name} down")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    """Replaces this process with CMD running in NODE's namespace."""
    state = _read_state(args.name)
    if state is None:
        print(f"lab {args.name} is not up", file=sys.stderr)
        return 1
    if args.node not in state["nodes"]:
        print(f"no node {args.node!r} (nodes: {', '.join(state['nodes'])})", file=sys.stderr)
        return 1
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("lab exec: no command given (lab exec NODE -- CMD...)", file=sys.stderr)
        return 2
    argv = nsu.exec_argv(state["nodes"][args.node]["netns"], cmd)
    os.execvp(argv[0], argv)


def cmd_status(args: argparse.Namespace) -> int:
    """Prints the nodes, parameters and counters of a running lab."""
    state = _read_state(args.name)
    if state is None or not _alive(state["pid"]):
        print(f"lab {args.name} is not up")
        return 1 if state else 0
    print(f"lab {args.name}: {state['profile']}, daemon pid {state['pid']}")
    _print_nodes(state)
    reply = _request(args.name, {"cmd": "stats"})
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    cols = ["frames_in", "frames_out", "dropped_loss", "dropped_queue", "duplicated", "late_p99_us"]
    print(f"  {'link':10} {'dir':5}" + "".join(f"{c:>14}" for c in cols))
    for link, dirs in reply["stats"].items():
        for d, s in dirs.items():
            print(f"  {link:10} {d:5}" + "".join(f"{s[c]:>14}" for c in cols))
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    """Changes one link's parameters in a running lab."""
    reply = _request(args.name, {"cmd": "set", "link": args.link, "params": args.params,
                                 "direction": args.direction, "replace": args.replace})
    print(json.dumps(reply["params"], indent=2))
    return 0


def add_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``lab`` with ``up``, ``down``, ``exec``, ``status``, ``set``, ``serve``."""
    lab = subparsers.add_parser("lab", help="network namespaces joined by emulated links",
                                description="Profiles:\n" + describe(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = lab.add_subparsers(dest="lab_command", metavar="SUBCOMMAND", required=True)

    def named(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--name", default="default", help="which lab (default: default)")
        return p

    up = named(sub.add_parser("up", help="build a lab and keep it running in the background"))
    up.add_argument("profile", help="internet, inter-dc, intra-dc, perfect, filesync or custom")
    up.add_argument("--params", help="link parameters added to the profile, e.g. 'delay=5ms,loss=0'")
    up.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the lab")
    for p in (up, serve := sub.add_parser("serve", help="run a lab in the foreground (what 'up' starts)")):
        p.add_argument("--realtime", type=int, default=10,
                       help="SCHED_FIFO priority of the relay threads (default 10; 0: normal scheduling)")
        p.add_argument("--device", choices=["tap", "veth"], default="tap", help="emulator device mechanism")
    up.set_defaults(func=cmd_up)

    named(serve)
    serve.add_argument("profile")
    serve.add_argument("--params")
    serve.set_defaults(func=cmd_serve)

    down = named(sub.add_parser("down", help="tear the lab down"))
    down.add_argument("--timeout", type=float, default=10.0)
    down.set_defaults(func=cmd_down)

    ex = named(sub.add_parser("exec", help="run a command in a node: lab exec NODE -- CMD..."))
    ex.add_argument("node")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)

    st = named(sub.add_parser("status", help="nodes, parameters and counters"))
    st.add_argument("--json", action="store_true", help="raw counters as JSON")
    st.set_defaults(func=cmd_status)

    se = named(sub.add_parser("set", help="change a link's parameters while it runs"))
    se.add_argument("link")
    se.add_argument("params")
    se.add_argument("--direction", choices=["up", "down", "both"], default="both")
    se.add_argument("--replace", action="store_true", help="unnamed parameters back to defaults")
    se.set_defaults(func=cmd_set)
    return lab


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dmm.lab.cli lab ...``."""
    parser = argparse.ArgumentParser(prog="dmm")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_subcommands(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except nsu.LabError as exc:
        print(f"dmm lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
