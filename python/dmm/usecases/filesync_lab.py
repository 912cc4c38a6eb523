"""Use case 1 of DESIGN.md section 7: protocol routing for a file-sync service.

One server and three clients in the lab's ``filesync`` topology (clients
``internet``, ``inter-dc`` and ``intra-dc``, each behind its own emulated
link). Every client uploads a file and downloads it back with the
unmodified program :mod:`dmm.usecases.filesync`, in two modes:

* ``kernel``: plain ``python -m dmm.usecases.filesync``, kernel TCP for all;
* ``dmm``: the same program under ``dmm run`` with one config for every
  process. With ``routing="adaptive"`` (:func:`dmm.lab.configs.adaptive_toml`)
  there is no route at all: the adaptive policy picks the stack of each
  connection from what earlier connections measured on the path, kept in
  each node's own L-RD store (``state``), as on separate hosts. With
  ``routing="routes"`` (:func:`dmm.lab.configs.fillp_routes_toml`) the
  internet link's prefix goes to a FillP instance by a hand-written route.

Each client talks to the server's address on its own link (``10.201.i.1``),
so the clients' paths are told apart by destination. The server under dmm is
one process with one listening socket on 0.0.0.0 that spans the kernel and
the FillP instance (``[listen]``): a client arrives over FillP on the UDP
port of the same number, or over kernel TCP.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dmm.lab import Lab
from dmm.lab import netns as nsu
from dmm.lab.configs import adaptive_toml, fillp_routes_toml

__all__ = ["ClientRun", "Watch", "make_file", "run"]

APP = "dmm.usecases.filesync"
#: The client the hand-written route sends over FillP (``routing="routes"``).
FILLP_CLIENT = "internet"
PORT = 9000

#: Called while a transfer runs: ``(mode, client, op, bytes so far, size)``.
Watch = Callable[[str, str, str, int, int], None]


def make_file(path: Path, size: int) -> str:
    """Writes ``size`` random bytes to ``path``; returns their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


@dataclass
class ClientRun:
    """One client's upload and download in one mode."""

    client: str
    mode: str
    server: str
    put: dict[str, Any] = field(default_factory=dict)
    get: dict[str, Any] = field(default_factory=dict)
    #: What ``dmm route explain`` says for the client's next connection once
    #: its transfers are done (dmm mode).
    explain: str = ""
    #: The client's L-RD estimate of its path to the server once its
    #: transfers are done (``dmm paths --json``; dmm mode, if any).
    path: Optional[dict[str, Any]] = None
    #: The stacks the server saw for this client's two connections.
    server_stacks: list[str | None] = field(default_factory=list)
    expected_sha256: str = ""

    @property
    def ok(self) -> bool:
        """Both transfers complete, checksums equal end to end."""
        return (self.put.get("ok") is True and self.get.get("ok") is True
                and self.put.get("sha256") == self.get.get("sha256") == self.expected_sha256)


def _python(mode: str, config: Path, *argv: str) -> list[str]:
    if mode == "kernel":
        return [sys.executable, "-m", *argv]
    return [sys.executable, "-m", "dmm", "--config", str(config), "run", "-m", *argv]


def _env(state: Path, node: str) -> dict[str, str]:
    """The environment of a dmm process in ``node``: its own L-RD store."""
    return dict(os.environ, DMM_RD_DIR=str(state / f"lrd-{node}"))


def _start_server(lab: Lab, mode: str, config: Path, bind: str, directory: Path,
                  env: Optional[dict[str, str]] = None) -> tuple[Any, dict]:
    proc = lab.popen("server", _python(mode, config, APP, "serve", "--bind", bind, "--port", str(PORT),
                                       "--dir", str(directory)),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("{"):
        proc.kill()
        raise RuntimeError(f"filesync server ({mode}, {bind}) did not start: {proc.stderr.read()[-2000:]}")
    return proc, json.loads(line)


def _client(lab: Lab, mode: str, config: Path, client: str, *argv: str, timeout: float,
            env: Optional[dict[str, str]] = None, progress: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Runs one client command; ``progress`` is called every 0.1 s meanwhile."""
    proc = lab.popen(client, _python(mode, config, APP, *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True, env=env)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if progress:
            progress()
        try:
            proc.wait(0.1)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": err.strip()[-2000:] or f"no result (exit {proc.returncode})"}
    return json.loads(lines[-1])


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _server_records(proc: Any) -> list[dict]:
    proc.kill()
    out, _ = proc.communicate(timeout=10)
    return [json.loads(ln) for ln in out.splitlines() if ln.startswith("{") and "peer" in ln]


def _dmm_config(routing: str, lab: Lab, rate_control: str, tcp_cc: Optional[str]) -> str:
    if routing == "adaptive":
        return adaptive_toml(rate_control, congestion=tcp_cc)
    if routing == "routes":
        fillp_net = lab.server_address(FILLP_CLIENT).rsplit(".", 1)[0] + ".0/24"
        return fillp_routes_toml([fillp_net], rate_control, listen_on_both=True)
    raise ValueError(f"routing must be 'adaptive' or 'routes', not {routing!r}")


def run(size: int, workdir: Path, modes: tuple[str, ...] = ("kernel", "dmm"), rate_control: str = "bbr",
        tcp_cc: Optional[str] = None, timeout: float = 600, progress: Any = None, routing: str = "routes",
        state: Optional[Path] = None, watch: Optional[Watch] = None) -> dict[str, Any]:
    """Runs the use case once; returns per-mode client runs, listeners and link info.

    ``tcp_cc`` sets kernel TCP's congestion control in every node (default:
    the system's); under adaptive routing the policy is told it too.
    ``routing`` picks the dmm config (see the module docstring). ``state``
    holds each node's L-RD store (default: under ``workdir``); pass the same
    directory to several runs and what one run measured guides the next.
    ``progress``, if given, is called with a short status string; ``watch``
    with the bytes moved so far while each transfer runs.
    """
    say = progress or (lambda text: None)
    workdir.mkdir(parents=True, exist_ok=True)
    state = state or workdir / "state"
    state.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"size": size, "rate_control": rate_control, "routing": routing, "runs": [],
                           "listeners": {}}
    with Lab("filesync") as lab:
        links = {name: lab.describe()["links"][name]["params"] for name in lab.links}
        config = workdir / "dmm.toml"
        config.write_text(_dmm_config(routing, lab, rate_control, tcp_cc))
        out["config"] = config.read_text()
        out["links"] = links
        if tcp_cc:
            for node in lab.nodes:
                nsu.route_congctl(lab.netns(node), tcp_cc)
            out["tcp_congestion_control"] = f"{tcp_cc} (per route)"
        else:
            out["tcp_congestion_control"] = lab.exec(
                "server", ["sysctl", "-n", "net.ipv4.tcp_congestion_control"], capture_output=True, text=True
            ).stdout.strip()
        for mode in modes:
            store = workdir / f"server-{mode}"
            servers = [_start_server(lab, mode, config, "0.0.0.0", store, env=_env(state, "server"))]
            out["listeners"][mode] = [info for _, info in servers]
            runs = [_sync(lab, mode, config, client, size, workdir, store, state, timeout, say, watch)
                    for client in lab.links]
            records = [r for proc, _ in servers for r in _server_records(proc)]
            for run_ in runs:
                run_.server_stacks = [r["stack"] for r in records if r["peer"].split(":")[0] ==
                                      lab.address(run_.client)]
            out["runs"] += runs
            out[f"server_records_{mode}"] = records
    return out


def _sync(lab: Lab, mode: str, config: Path, client: str, size: int, workdir: Path, store: Path, state: Path,
          timeout: float, say: Callable[[str], None], watch: Optional[Watch]) -> ClientRun:
    """One client's PUT and GET in one mode."""
    src = workdir / f"{client}-{mode}.bin"
    back = workdir / f"{client}-{mode}.back"
    expected = make_file(src, size)
    server = lab.server_address(client)
    env = _env(state, client)
    run_ = ClientRun(client, mode, server, expected_sha256=expected)

    def watcher(op: str, path: Path) -> Optional[Callable[[], None]]:
        return None if watch is None else (lambda: watch(mode, client, op, _size_of(path), size))

    say(f"{mode}: {client} PUT {size / 1e6:g} MB")
    run_.put = _client(lab, mode, config, client, "put", server, str(PORT), str(src), timeout=timeout, env=env,
                       progress=watcher("put", store / src.name))
    say(f"{mode}: {client} GET {size / 1e6:g} MB")
    run_.get = _client(lab, mode, config, client, "get", server, str(PORT), src.name, str(back),
                       timeout=timeout, env=env, progress=watcher("get", back))
    src.unlink()
    back.unlink(missing_ok=True)
    (store / src.name).unlink(missing_ok=True)
    if mode == "dmm":
        dmm = [sys.executable, "-m", "dmm", "--config", str(config)]
        run_.explain = lab.exec(client, [*dmm, "route", "explain", f"{server}:{PORT}"], capture_output=True,
                                text=True, env=env).stdout.strip()
        listed = lab.exec(client, [*dmm, "paths", "--json"], capture_output=True, text=True, env=env)
        try:
            run_.path = next((e for e in json.loads(listed.stdout) if e.get("key") == server), None)
        except ValueError:
            run_.path = None
    return run_
