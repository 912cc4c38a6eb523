"""One config per stack kind that forces every stream socket onto it.

The conformance suite (``tests/test_conformance.py``) runs the socket
contract and CPython's own suites under each. Every config also declares a
plain kernel stack, so what the forced stack cannot carry (datagrams on
FillP, AF_UNIX everywhere) goes where it would in a real deployment, and so
routing always runs: no config here takes the single-kernel fast path.
"""

import socket

KERNEL = """
[[stack]]
name = "kernel"
kind = "kernel"
"""

#: kind -> the forced stacks: name -> their ``[[stack]]`` keys. Each is
#: named after the kind (``fillp6`` is FillP's IPv6 instance: a FillP
#: instance's UDP sockets are of one family). smoltcp runs on a loopback
#: link (its own addresses only, no TAP device, no root).
FORCED = {
    "kernel": {"routed": 'kind = "kernel"'},
    "uring": {"uring": 'kind = "kernel"\nio = "uring"'},
    "mptcp": {"mptcp": 'kind = "kernel"\nprotocol = "mptcp"'},
    "fillp": {"fillp": 'kind = "fillp"', "fillp6": 'kind = "fillp"\naddress = "::"'},
    "smoltcp": {"smoltcp": 'kind = "smoltcp"\ndevice = "loopback"\naddress = ["127.0.0.1/8", "::1/128"]'},
    "memory": {"memory": 'kind = "memory"'},
}


def _forcing(stacks):
    """The config text that declares ``stacks`` and sends every stream
    socket (connects and listeners) to them."""
    names = ", ".join(f'"{n}"' for n in stacks)
    declared = "".join(f'[[stack]]\nname = "{n}"\n{keys}\n' for n, keys in stacks.items())
    return f'{declared}[[route]]\ntype = "stream"\nstacks = [{names}]\n[listen]\nstacks = [{names}]\n'


#: kind -> the config's stacks and rules beyond the plain kernel stack.
CONFIGS = {kind: _forcing(stacks) for kind, stacks in FORCED.items()}

#: The stack names a socket of each kind may report in ``dmm_stack``.
STACK_NAMES = {kind: set(stacks) for kind, stacks in FORCED.items()}


#: (kind, suite) -> {"passed", "run", "excluded"}: filled by the conformance
#: tests, printed by conftest's terminal summary.
RESULTS = {}


def toml(kind):
    """The whole config text for ``kind``."""
    return KERNEL + CONFIGS[kind]


def unavailable(kind):
    """Why ``kind`` cannot run on this machine, or ``None``."""
    if kind == "mptcp":
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262).close()
        except OSError as exc:
            return f"MPTCP sockets are refused here: {exc}"
    return None
