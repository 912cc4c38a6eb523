"""Wrong uses of dmm.socket that mypy must reject, as it rejects them on the
stdlib's socket (tests/test_typing.py checks each line's error)."""

import dmm.socket as socket

socket.socket(stack=3)  # E: stack
socket.create_connection("example.org:80")  # E: address
n: str = socket.socket().send(b"x")  # E: send returns int
socket.socket().dmm_stacks.append("x")  # E: a tuple
