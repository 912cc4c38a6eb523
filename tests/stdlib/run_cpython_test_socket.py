"""Runs CPython's own test_socket, optionally with dmm patched in, and prints
one line per test that did not pass: ``<outcome> <test id>``.

    python tests/stdlib/run_cpython_test_socket.py [--dmm]

The pytest wrapper (tests/test_cpython_suite.py) runs it twice, with and
without dmm, and requires that dmm adds no failure of its own.
"""

import sys
import unittest

# Hangs in this VM for the stdlib too (no vsock transport): not about dmm.
EXCLUDED = ("VSOCK",)


def main() -> int:
    if "--dmm" in sys.argv:
        import dmm

        dmm.patch_all()
    from test import test_socket

    suite = unittest.TestSuite()
    for test in unittest.defaultTestLoader.loadTestsFromModule(test_socket):
        for case in getattr(test, "_tests", [test]):
            if not any(word in case.id() for word in EXCLUDED):
                suite.addTest(case)
    result = unittest.TextTestRunner(stream=open("/dev/null", "w"), verbosity=0).run(suite)
    for kind, items in (("FAIL", result.failures), ("ERROR", result.errors)):
        for case, _tb in items:
            print(kind, case.id())
    print("RAN", result.testsRun, "SKIPPED", len(result.skipped), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
