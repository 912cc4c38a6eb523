"""Tests of CPython's suites that fail on a stack by design, with the reason.

kind -> {test id: why}. ``tests/test_conformance.py`` fails on any other
test that passes with the stdlib and not on the stack, and on an entry here
that passes (a stale one). Each reason is also a row of the README's table
of differences.
"""

_SOCKET = "test.test_socket."

_SENDBUF = ("the whole 10 MiB file fits in FillP's send buffer on loopback (up to 16 MiB, sized from the path), "
            "so no send blocks for the 10 ms timeout; the kernel's buffers hold about 4 MiB")

_SSL = ("ssl wrap_socket() on a user-space socket: OpenSSL reads and writes the fd itself, which is a readiness "
        "eventfd (ENOTSOCK); the test's TLS server thread runs on the stack")

EXCLUDED = {
    "fillp": {
        _SOCKET + "SendfileUsingSendTest.testWithTimeoutTriggeredSend": _SENDBUF,
        _SOCKET + "SendfileUsingSendfileTest.testWithTimeoutTriggeredSend": _SENDBUF,
        "test.test_asyncio.test_streams.StreamTests.test_open_connection_no_loop_ssl": _SSL,
    },
    "smoltcp": {
        "test.test_asyncio.test_streams.StreamTests.test_open_connection_no_loop_ssl": _SSL,
    },
    "memory": {
        _SOCKET + "CreateServerFunctionalTest.test_dual_stack_client_v4":
            "a memory instance's IPv6 listener takes no IPv4 connections (the worked-example stack keeps one "
            "family per listener)",
        _SOCKET + "NetworkConnectionBehaviourTest.testOutsideTimeout":
            "a send to a peer that closed fails at once with EPIPE: a memory connection has no wire on which "
            "a first send could still succeed before the reset comes back",
        "test.test_asyncio.test_streams.StreamTests.test_open_connection_no_loop_ssl": _SSL,
    },
}

#: Tests not run at all on a kind because they can hang there: open bugs,
#: counted as excluded. kind -> {test id: why}.
HANGS: dict = {}
