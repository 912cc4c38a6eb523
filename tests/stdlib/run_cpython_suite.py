"""Runs one of CPython's own test modules, optionally with dmm patched in, and
prints one JSON line per test: ``{"id": ..., "outcome": ...}`` (``pass``,
``fail``, ``error``, ``skip``).

    python tests/stdlib/run_cpython_suite.py SUITE [--dmm] [--only SUBSTRING ...] [--skip TEST_ID ...]

SUITE is ``socket`` (``test.test_socket``), ``selectors``
(``test.test_selectors``) or ``asyncio_streams``
(``test.test_asyncio.test_streams``). With ``--dmm`` the stdlib is patched
(``dmm.patch_all()``) under whatever config ``$DMM_CONFIG`` names, which is
how the conformance suite forces every stream socket onto one stack. The
pytest wrapper (``tests/test_conformance.py``) compares runs with and
without dmm.
"""

import faulthandler
import importlib
import json
import sys
import unittest

#: Seconds one test may take before the run dumps every thread's stack and
#: exits: a hang then names its test (the wrapper reports the tests that
#: never ran) instead of eating the wrapper's whole timeout.
TEST_TIMEOUT = 120

SUITES = {
    "socket": "test.test_socket",
    "selectors": "test.test_selectors",
    "asyncio_streams": "test.test_asyncio.test_streams",
}

# Hangs in this VM for the stdlib too (no vsock transport): not about dmm.
EXCLUDED = ("VSOCK",)


class Recorder(unittest.TextTestResult):
    """Prints each test's outcome as it ends (a hang still leaves the rest)."""

    def startTest(self, test):
        super().startTest(test)
        print(f"start {test.id()}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)

    def stopTest(self, test):
        faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)

    def _emit(self, test, outcome):
        print(json.dumps({"id": test.id(), "outcome": outcome}), flush=True)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._emit(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._emit(test, "fail")
        print(self._exc_info_to_string(err, test), file=sys.stderr)

    def addError(self, test, err):
        super().addError(test, err)
        self._emit(test, "error")
        print(self._exc_info_to_string(err, test), file=sys.stderr)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._emit(test, "skip")

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._emit(test, "pass")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._emit(test, "fail")


def cases(suite):
    """Every test case in ``suite``, flattened."""
    if isinstance(suite, unittest.TestSuite):
        for item in suite:
            yield from cases(item)
    else:
        yield suite


def warm_up():
    """One stream connection over loopback through the patched module, so
    that the threads dmm starts once per process (the reactor, the L-RD
    writer, stack drivers) are running before the first test: the suite
    counts threads around each test and would take them for the test's."""
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    cli.sendall(b"x")
    conn.recv(1)
    for s in (cli, conn, srv):
        s.close()


def main() -> int:
    args = sys.argv[1:]
    if not args or args[0] not in SUITES:
        print(__doc__, file=sys.stderr)
        return 2
    only = [args[i + 1] for i, a in enumerate(args) if a == "--only"]
    skip = {args[i + 1] for i, a in enumerate(args) if a == "--skip"}
    if "--dmm" in args:
        import dmm

        dmm.patch_all()
        warm_up()
    module = importlib.import_module(SUITES[args[0]])
    suite = unittest.TestSuite()
    for case in cases(unittest.defaultTestLoader.loadTestsFromModule(module)):
        if any(word in case.id() for word in EXCLUDED):
            continue
        if only and not any(word in case.id() for word in only):
            continue
        if case.id() in skip:
            continue
        suite.addTest(case)
    runner = unittest.TextTestRunner(stream=open("/dev/null", "w"), verbosity=0, resultclass=Recorder)
    result = runner.run(suite)
    print("RAN", result.testsRun, "SKIPPED", len(result.skipped), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
