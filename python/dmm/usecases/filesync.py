"""A minimal file-sync service: a server that stores files, a client that
uploads and downloads them, checked with sha256.

It knows nothing of dmm: it uses the stdlib ``socket`` module only, so
``dmm run -m dmm.usecases.filesync ...`` can route its sockets without a
change to it (use case 1 of DESIGN.md section 7).

Protocol, one request per connection:

* ``PUT <name> <size>\\n`` + ``size`` bytes -> ``OK <size> <sha256>\\n``
* ``GET <name>\\n`` -> ``OK <size> <sha256>\\n`` + ``size`` bytes
* anything wrong -> ``ERR <reason>\\n``

Commands (each prints one JSON line per transfer)::

    python -m dmm.usecases.filesync serve --bind 0.0.0.0 --port 9000 --dir /srv/files
    python -m dmm.usecases.filesync put HOST PORT FILE
    python -m dmm.usecases.filesync get HOST PORT NAME OUTFILE

The JSON carries ``stack``: the dmm stack instance that carried the
connection when the program runs under dmm (``sock.dmm_stack``), else
``null``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from pathlib import Path

__all__ = ["get", "put", "serve"]

CHUNK = 1 << 18


def _stack(sock: socket.socket) -> str | None:
    # Only a dmm socket has the attribute: the program stays plain stdlib.
    return getattr(sock, "dmm_stack", None)


def _read_line(sock: socket.socket, limit: int = 1024) -> str:
    """Reads one ``\\n``-terminated line, a byte at a time (headers are tiny
    and nothing of the body may be consumed)."""
    out = bytearray()
    while not out.endswith(b"\n"):
        b = sock.recv(1)
        if not b:
            raise ConnectionError("connection closed in the middle of a header")
        out += b
        if len(out) > limit:
            raise ConnectionError("header too long")
    return out[:-1].decode()


def _send_file(sock: socket.socket, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            sock.sendall(chunk)


def _recv_to_file(sock: socket.socket, path: Path, size: int) -> str:
    """Receives exactly ``size`` bytes into ``path``; returns their sha256."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    with path.open("wb") as f:
        while got < size:
            n = sock.recv_into(buf, min(CHUNK, size - got))
            if not n:
                raise ConnectionError(f"connection closed after {got} of {size} bytes")
            digest.update(view[:n])
            f.write(view[:n])
            got += n
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_name(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad file name {name!r}")
    return name


def _handle(conn: socket.socket, peer: tuple, directory: Path) -> None:
    start = time.monotonic()
    record = {"peer": f"{peer[0]}:{peer[1]}", "stack": _stack(conn)}
    try:
        words = _read_line(conn).split()
        if len(words) == 3 and words[0] == "PUT":
            name, size = _safe_name(words[1]), int(words[2])
            digest = _recv_to_file(conn, directory / name, size)
            conn.sendall(f"OK {size} {digest}\n".encode())
        elif len(words) == 2 and words[0] == "GET":
            path = directory / _safe_name(words[1])
            size, digest = path.stat().st_size, _sha256(path)
            conn.sendall(f"OK {size} {digest}\n".encode())
            _send_file(conn, path)
            # Wait for the client to close: a user-space stack's data lives
            # in this process, and the client knows when it has it all.
            conn.recv(1)
        else:
            raise ValueError(f"bad request {' '.join(words)[:80]!r}")
        record.update(op=words[0], name=words[1], bytes=size, sha256=digest)
    except (OSError, ValueError) as exc:
        record["error"] = str(exc)
        try:
            conn.sendall(f"ERR {exc}\n".encode())
        except OSError:
            pass
    finally:
        conn.close()
    record["seconds"] = time.monotonic() - start
    print(json.dumps(record), flush=True)


def serve(bind: str, port: int, directory: Path) -> None:
    """Serves files from ``directory`` on ``bind:port``, a thread per connection."""
    directory.mkdir(parents=True, exist_ok=True)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(16)
    # Under dmm a listener may span several stacks (``dmm_stacks``).
    stacks = list(getattr(srv, "dmm_stacks", ()))
    print(json.dumps({"listening": f"{bind}:{port}", "stack": _stack(srv), "stacks": stacks}), flush=True)
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=_handle, args=(conn, peer, directory), daemon=True).start()


def _request(host: str, port: int, header: str) -> tuple[socket.socket, float]:
    start = time.monotonic()
    sock = socket.create_connection((host, port), timeout=60)
    sock.sendall(header.encode())
    return sock, start


def _reply(sock: socket.socket) -> tuple[int, str]:
    words = _read_line(sock).split()
    if len(words) != 3 or words[0] != "OK":
        raise ConnectionError(f"server said: {' '.join(words)}")
    return int(words[1]), words[2]


def put(host: str, port: int, path: Path, timeout: float = 600) -> dict:
    """Uploads ``path``; returns what happened (bytes, seconds, checksums, stack)."""
    size, digest = path.stat().st_size, _sha256(path)
    sock, start = _request(host, port, f"PUT {path.name} {size}\n")
    with sock:
        sock.settimeout(timeout)
        _send_file(sock, path)
        got, server_digest = _reply(sock)
        elapsed = time.monotonic() - start
        return {"op": "PUT", "name": path.name, "bytes": size, "seconds": elapsed, "sha256": digest,
                "ok": got == size and server_digest == digest, "stack": _stack(sock)}


def get(host: str, port: int, name: str, out: Path, timeout: float = 600) -> dict:
    """Downloads ``name`` into ``out``; returns what happened."""
    sock, start = _request(host, port, f"GET {name}\n")
    with sock:
        sock.settimeout(timeout)
        size, server_digest = _reply(sock)
        digest = _recv_to_file(sock, out, size)
        elapsed = time.monotonic() - start
        return {"op": "GET", "name": name, "bytes": size, "seconds": elapsed, "sha256": digest,
                "ok": digest == server_digest, "stack": _stack(sock)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="filesync", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, default=9000)
    s.add_argument("--dir", type=Path, required=True)
    u = sub.add_parser("put", help="upload a file")
    u.add_argument("host")
    u.add_argument("port", type=int)
    u.add_argument("file", type=Path)
    g = sub.add_parser("get", help="download a file")
    g.add_argument("host")
    g.add_argument("port", type=int)
    g.add_argument("name")
    g.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.bind, args.port, args.dir)
        return 0
    result = put(args.host, args.port, args.file) if args.cmd == "put" else \
        get(args.host, args.port, args.name, args.out)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
