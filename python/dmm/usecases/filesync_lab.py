"""Use case 1 of DESIGN.md section 7: protocol routing for a file-sync service.

One server and three clients in the lab's ``filesync`` topology (clients
``internet``, ``inter-dc`` and ``intra-dc``, each behind its own emulated
link). Every client uploads a file and downloads it back with the
unmodified program :mod:`dmm.usecases.filesync`, twice:

* ``kernel``: plain ``python -m dmm.usecases.filesync``, kernel TCP for all;
* ``dmm``: the same program under ``dmm run`` with one
  config for every process (:func:`dmm.lab.configs.fillp_routes_toml`): the internet link's prefix goes to a FillP
  instance, everything else stays on kernel TCP.

Each client talks to the server's address on its own link (``10.201.i.1``),
so routes by destination prefix tell the clients apart. The server under
dmm is one process with one listening socket on 0.0.0.0 that spans the
kernel and the FillP instance (``[listen]``): internet clients arrive over
FillP on the UDP port of the same number, the others over kernel TCP.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmm.lab import Lab
from dmm.lab import netns as nsu
from dmm.lab.configs import fillp_routes_toml

__all__ = ["ClientRun", "make_file", "run"]

APP = "dmm.usecases.filesync"
#: The client that goes over FillP under dmm; the others stay on the kernel.
FILLP_CLIENT = "internet"
PORT = 9000


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
    #: What ``dmm route explain`` said for the client's connection (dmm mode).
    explain: str = ""
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


def _start_server(lab: Lab, mode: str, config: Path, bind: str, directory: Path) -> tuple[Any, dict]:
    proc = lab.popen("server", _python(mode, config, APP, "serve", "--bind", bind, "--port", str(PORT),
                                       "--dir", str(directory)),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("{"):
        proc.kill()
        raise RuntimeError(f"filesync server ({mode}, {bind}) did not start: {proc.stderr.read()[-2000:]}")
    return proc, json.loads(line)


def _client(lab: Lab, mode: str, config: Path, client: str, *argv: str, timeout: float) -> dict[str, Any]:
    done = lab.exec(client, _python(mode, config, APP, *argv), capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": done.stderr.strip()[-2000:]}
    return json.loads(lines[-1])


def _server_records(proc: Any) -> list[dict]:
    proc.kill()
    out, _ = proc.communicate(timeout=10)
    return [json.loads(ln) for ln in out.splitlines() if ln.startswith("{") and "peer" in ln]


def run(size: int, workdir: Path, modes: tuple[str, ...] = ("kernel", "dmm"), rate_control: str = "bbr",
        tcp_cc: str | None = None, timeout: float = 600, progress: Any = None) -> dict[str, Any]:
    """Runs the use case; returns per-mode client runs, listeners and link info.

    ``tcp_cc`` sets kernel TCP's congestion control in every node (default:
    the system's). ``progress``, if given, is called with a short status string.
    """
    say = progress or (lambda text: None)
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"size": size, "rate_control": rate_control, "runs": [], "listeners": {}}
    with Lab("filesync") as lab:
        links = {name: lab.describe()["links"][name]["params"] for name in lab.links}
        fillp_net = lab.server_address(FILLP_CLIENT).rsplit(".", 1)[0] + ".0/24"
        config = workdir / "dmm.toml"
        config.write_text(fillp_routes_toml([fillp_net], rate_control, listen_on_both=True))
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
            servers = [_start_server(lab, mode, config, "0.0.0.0", store)]
            out["listeners"][mode] = [info for _, info in servers]
            runs = []
            for client in lab.links:
                src = workdir / f"{client}-{mode}.bin"
                expected = make_file(src, size)
                server = lab.server_address(client)
                run_ = ClientRun(client, mode, server, expected_sha256=expected)
                if mode == "dmm":
                    run_.explain = lab.exec(client, [sys.executable, "-m", "dmm", "--config", str(config), "route",
                                                     "explain", f"{server}:{PORT}"],
                                            capture_output=True, text=True).stdout.strip()
                say(f"{mode}: {client} PUT {size / 1e6:g} MB")
                run_.put = _client(lab, mode, config, client, "put", server, str(PORT), str(src), timeout=timeout)
                say(f"{mode}: {client} GET {size / 1e6:g} MB")
                back = workdir / f"{client}-{mode}.back"
                run_.get = _client(lab, mode, config, client, "get", server, str(PORT), src.name, str(back),
                                   timeout=timeout)
                src.unlink()
                back.unlink(missing_ok=True)
                runs.append(run_)
            records = [r for proc, _ in servers for r in _server_records(proc)]
            for run_ in runs:
                run_.server_stacks = [r["stack"] for r in records if r["peer"].split(":")[0] ==
                                      lab.address(run_.client)]
            out["runs"] += runs
            out[f"server_records_{mode}"] = records
    return out
