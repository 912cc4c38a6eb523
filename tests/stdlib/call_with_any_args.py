"""Calls every public method of dmm sockets with arguments hypothesis makes up.

Run by ``tests/test_socket_args.py`` in a child process per stack kind (the
config comes from ``DMM_CONFIG``), so that a crash (a Rust panic that
aborts, a segfault) is seen as the child's death, not as a dead test run.
Each example opens a fresh connected pair (and an unconnected socket) and
makes one call on one of them: it may return anything or raise OSError,
TypeError, ValueError, OverflowError or MemoryError (the stdlib's own
``recv(2**62)``), never anything else. Prints ``OK <examples>`` at the end.
"""

import math
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmm.socket as socket

ALLOWED = (OSError, TypeError, ValueError, OverflowError, MemoryError)

#: Methods and how many positional arguments to try them with.
METHODS = {
    "send": (1, 3), "sendall": (1, 3), "sendto": (1, 4), "sendmsg": (0, 5), "recv": (0, 3),
    "recv_into": (0, 4), "recvfrom": (0, 3), "recvfrom_into": (0, 4), "recvmsg": (0, 4),
    "recvmsg_into": (0, 4), "setsockopt": (2, 5), "getsockopt": (1, 4), "settimeout": (0, 2),
    "setblocking": (0, 2), "shutdown": (0, 2), "bind": (0, 2), "connect": (0, 2), "connect_ex": (0, 2),
    "listen": (0, 2), "accept": (0, 1), "getsockname": (0, 1), "getpeername": (0, 1), "fileno": (0, 1),
    "dup": (0, 1), "detach": (0, 1), "close": (0, 1), "gettimeout": (0, 1), "makefile": (0, 3),
}

numbers = st.one_of(
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, 1, -1, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63, 2 ** 64, socket.SOL_SOCKET, socket.IPPROTO_TCP,
                     socket.SO_REUSEADDR, socket.TCP_NODELAY, socket.SO_RCVBUF, socket.SO_LINGER, socket.MSG_PEEK,
                     socket.MSG_DONTWAIT, socket.SHUT_RDWR, socket.SOL_DMM, socket.DMM_STACK]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -0.0, 0.001]),
)
buffers = st.one_of(st.binary(max_size=70000), st.binary(max_size=64).map(bytearray),
                    st.binary(max_size=64).map(memoryview), st.sampled_from([b"", bytearray(0)]))
hosts = st.sampled_from(["127.0.0.1", "::1", "0.0.0.0", "", "localhost", "256.1.1.1", "::ffff:127.0.0.1",
                         "fe80::1%lo", "\x00", "a" * 300, "10.255.255.1"])
addresses = st.one_of(st.tuples(hosts, numbers), st.tuples(hosts, numbers, numbers, numbers), st.tuples(hosts),
                      st.tuples(numbers, numbers), hosts)
leaves = st.one_of(st.none(), st.booleans(), numbers, buffers, hosts, addresses, st.text(max_size=8))
args = st.one_of(leaves, st.lists(leaves, max_size=3), st.lists(buffers, max_size=3),
                 st.lists(st.tuples(numbers, numbers, buffers), max_size=2))

calls = st.sampled_from(sorted(METHODS)).flatmap(
    lambda name: st.tuples(st.just(name), st.lists(args, min_size=METHODS[name][0], max_size=METHODS[name][1])))

listener = socket.create_server(("127.0.0.1", 0))
listener.settimeout(5)
made = 0


def fresh_pair():
    c = socket.create_connection(listener.getsockname(), timeout=5)
    s, _ = listener.accept()
    return c, s


@settings(max_examples=int(sys.argv[1]) if len(sys.argv) > 1 else 150, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(call=calls, target=st.sampled_from(["client", "server", "unconnected"]))
def test_any_arguments(call, target):
    global made
    name, values = call
    c, s = fresh_pair()
    u = socket.socket()
    sock = {"client": c, "server": s, "unconnected": u}[target]
    try:
        sock.settimeout(0.05)  # a call that would block returns soon
        try:
            getattr(sock, name)(*values)
        except ALLOWED:
            pass
        made += 1
    finally:
        for x in (c, s, u):
            try:
                x.close()
            except OSError:
                pass


if __name__ == "__main__":
    test_any_arguments()
    print("OK", made)
