"""A program written against the stdlib socket API, with dmm.socket in its
place: mypy must accept it as it accepts the stdlib (tests/test_typing.py)."""

import selectors

import dmm.socket as socket


def fetch(host: str, port: int, timeout: float = 5.0) -> bytes:
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    family, kind, proto, _canon, addr = infos[0]
    s: socket.socket = socket.socket(family, kind, proto)
    s.settimeout(timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s.connect(addr)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        chunks: list[bytes] = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except socket.timeout:
        return b""
    finally:
        s.close()


def serve_once(port: int) -> tuple[str, int]:
    with socket.create_server(("127.0.0.1", port), reuse_port=True) as srv:
        sel = selectors.DefaultSelector()
        sel.register(srv, selectors.EVENT_READ)
        sel.select(1.0)
        conn, peer = srv.accept()
        with conn:
            buf = bytearray(16)
            n = conn.recv_into(buf)
            conn.sendall(memoryview(buf)[:n])
            fd: int = conn.fileno()
            assert fd >= 0
        host, got = peer[0], peer[1]
        return str(host), int(got)


def pair() -> bytes:
    a, b = socket.socketpair()
    with a, b:
        a.send(b"x", socket.MsgFlag.MSG_DONTWAIT)
        return b.recv(1)


def names() -> str:
    kind: socket.AddressFamily = socket.AddressFamily.AF_INET
    return f"{kind.name} {socket.gethostname()} {socket.has_ipv6}"


def connect(addr: tuple[str, int]) -> socket.socket:
    return socket.create_connection(addr, timeout=2.0)


def routed() -> str | None:
    # dmm's additions to the stdlib's socket.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, stack="kernel", properties={"bulk": "yes"})
    with s:
        counters: dict[str, int] = s.dmm_counters()
        assert isinstance(counters, dict)
        return s.dmm_stack
