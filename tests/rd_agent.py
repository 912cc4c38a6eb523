"""One dmm process playing a host in the multi-host central-RD tests.

Started (in a namespace) as ``python rd_agent.py CONFIG.toml``; reads one
JSON command per line on stdin and answers one JSON line on stdout, so a
test drives several hosts' processes step by step:

* ``{"op": "serve", "port": P}``: listens on ``0.0.0.0:P`` as the config
  says; each client sends a 4-byte length and that many bytes and gets
  back the name of the stack it arrived on;
* ``{"op": "send", "address": A, "port": P, "size": N}``: one connection,
  N bytes; answers the stack the server saw, this side's stack, seconds;
* ``{"op": "load", "address": A, "port": P}`` then ``{"op": "unload"}``:
  small connections back to back in a thread until unloaded; answers how
  many succeeded and the errors of those that did not;
* ``{"op": "decide", "address": A, "port": P}``: the routing decision;
* ``{"op": "facts", ...}``, ``{"op": "path", "address": A}``,
  ``{"op": "counters"}``, ``{"op": "central"}``: what this process knows.
"""

import json
import sys
import threading
import time

import dmm.policy
import dmm.runtime
import dmm.socket as dsocket
from dmm import config


def serve(port):
    listener = dsocket.socket()
    listener.setsockopt(dsocket.SOL_SOCKET, dsocket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(128)

    def answer(conn):
        with conn:
            head = b""
            while len(head) < 4:
                part = conn.recv(4 - len(head))
                if not part:
                    return
                head += part
            left = int.from_bytes(head, "big")
            while left > 0:
                part = conn.recv(min(left, 1 << 16))
                if not part:
                    return
                left -= len(part)
            conn.sendall(conn.dmm_stack.encode())

    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return {"port": port}


def send(address, port, size, timeout=30):
    t0 = time.monotonic()
    with dsocket.create_connection((address, port), timeout=timeout) as c:
        c.sendall(size.to_bytes(4, "big") + bytes(size))
        reply = b""
        while part := c.recv(64):
            reply += part
        return {"server_stack": reply.decode(), "stack": c.dmm_stack, "seconds": time.monotonic() - t0}


class Load:
    """Connections back to back until stopped; every failure kept."""

    def __init__(self, address, port):
        self.address, self.port = address, port
        self.ok, self.errors, self.stacks = 0, [], {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            try:
                got = send(self.address, self.port, 100, timeout=10)
                self.ok += 1
                self.stacks[got["stack"]] = self.stacks.get(got["stack"], 0) + 1
            except OSError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        return {"ok": self.ok, "errors": self.errors, "stacks": self.stacks}


def main():
    path = sys.argv[1]
    dmm.runtime.configure(config.load(path))
    rt = dmm.runtime.get()
    load = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "serve":
                out = serve(**cmd)
            elif op == "send":
                out = send(**cmd)
            elif op == "load":
                load = Load(**cmd)
                out = {}
            elif op == "unload":
                out = load.finish()
            elif op == "decide":
                req = dmm.policy.Request(role="connect", family=2, type=1, address=cmd["address"], port=cmd["port"])
                o = rt.decide(req)
                out = {"stack": o.stack, "candidates": list(o.candidates), "first_choices": o.first_choices,
                       "source": o.source, "reason": o.reason}
            elif op == "facts":
                facts = rt.negotiator.facts(cmd["address"], cmd["port"])
                out = {p: {"speaks": f.speaks, "source": f.source} for p, f in facts.items()}
            elif op == "path":
                est = rt.path_for(cmd["address"])
                out = None if est is None else {"rtt_ms": est.rtt_ms, "loss": est.loss, "samples": est.samples}
            elif op == "counters":
                out = rt.negotiator.counts()
            elif op == "central":
                out = rt.central.status()
            else:
                out = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # the test reads the error
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
