"""Configuration: good files load, bad ones name the file, line and field."""

import os
import subprocess
import sys
import textwrap

import pytest

import dmm.runtime
from dmm import config
from dmm.config import ConfigError


def parse(text):
    return config.parse(textwrap.dedent(text), "cfg.toml")


def test_builtin_default_is_kernel_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load()
    assert cfg.builtin and [s.name for s in cfg.stacks] == ["kernel"] and cfg.routes == ()


def test_dmm_config_env_then_local_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dmm.toml").write_text('[[stack]]\nname = "local"\nkind = "kernel"\n')
    assert config.load().stacks[0].name == "local"
    other = tmp_path / "other.toml"
    other.write_text('[[stack]]\nname = "fromenv"\nkind = "kernel"\n')
    monkeypatch.setenv("DMM_CONFIG", str(other))
    assert config.load().stacks[0].name == "fromenv"
    assert dmm.runtime.configure(None).order == ["fromenv"]


def test_full_example_parses():
    cfg = parse("""
        [[stack]]
        name = "kernel"
        kind = "kernel"

        [[stack]]
        name = "mp"
        kind = "kernel"
        protocol = "mptcp"
        io = "uring"

        [[route]]
        to = "10.0.0.0/8"
        ports = "80-443"
        type = "stream"
        role = "connect"
        priority = 3
        stacks = ["mp", "kernel"]

        [[route]]
        to = "::/0"
        ports = 53
        stacks = ["kernel"]

        [listen]
        stacks = ["kernel", "mp"]
    """)
    assert cfg.stack("mp").protocol == "mptcp" and cfg.stack("mp").io == "uring"
    r = cfg.routes[0]
    assert (r.to, r.ports, r.type, r.role, r.priority, r.stacks) == ("10.0.0.0/8", (80, 443), "stream", "connect", 3, ("mp", "kernel"))
    assert cfg.routes[1].ports == (53, 53)
    assert cfg.listen == ("kernel", "mp")
    assert r.line == 12


BAD = [
    # (text, line, field, words in the message)
    ('[[stack]]\nname = "k"\nkind = "warp"\n', 3, "stack[0].kind", "expected one of kernel"),
    ('[[stack]]\nname = "k"\nkind = "smoltcp"\naddress = "10.7.0.2/24"\n', 1, "stack[0].device", "TAP device name"),
    ('[[stack]]\nname = "k"\nkind = "smoltcp"\ndevice = "tap:this-name-is-too-long"\naddress = "10.7.0.2/24"\n', 4,
     "stack[0].device", "at most 15"),
    ('[[stack]]\nname = "k"\nkind = "smoltcp"\ndevice = "d0"\n', 1, "stack[0].address", "prefix length"),
    ('[[stack]]\nname = "k"\nkind = "smoltcp"\ndevice = "d0"\naddress = "10.7.0.2"\n', 5, "stack[0].address", "prefix length"),
    ('[[stack]]\nname = "k"\nkind = "smoltcp"\ndevice = "d0"\naddress = "10.7.0.2/24"\ngateway = "fd00::1"\n', 6,
     "stack[0].gateway", "per family"),
    ('[[stack]]\nname = "k"\nkind = "smoltcp"\ndevice = "d0"\naddress = "10.7.0.2/24"\nmtu = 70000\n', 6, "stack[0].mtu", "1280"),
    ('[[stack]]\nname = "k"\nkind = "smoltcp"\ndevice = "d0"\naddress = "10.7.0.2/24"\nmac = "zz"\n', 6, "stack[0].mac", "MAC"),
    ('[[stack]]\nname = "k"\nkind = "smoltcp"\ndevice = "d0"\naddress = "10.7.0.2/24"\nrate_control = "bbr"\n', 6,
     "stack[0].rate_control", "does not apply to a smoltcp stack"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\nprotocol = "sctp"\n', 4, "stack[0].protocol", "'tcp' or 'mptcp'"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\nspeed = 3\n', 4, "stack[0].speed", "unknown field"),
    ('[[stack]]\nname = "9k"\nkind = "kernel"\n', 2, "stack[0].name", "expected a name"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\n[[stack]]\nname = "k"\nkind = "kernel"\n', 4, "stack[1].name", "already"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\n\n[[route]]\nto = "10.0.0.1/8"\nstacks = ["k"]\n', 6, "route[0].to", "host bits"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\n\n[[route]]\nto = "10.0.0.0/8"\nstacks = ["x"]\n', 7, "route[0].stacks", "no stack is named 'x'"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\n\n[[route]]\nto = "10.0.0.0/8"\nstacks = "k"\n', 7, "route[0].stacks", "non-empty list"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\n\n[[route]]\nto = "10.0.0.0/8"\nstacks = ["k"]\nports = "90-80"\n', 8, "route[0].ports", "range"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\n\n[[route]]\nto = "10.0.0.0/8"\nstacks = ["k"]\nrole = "serve"\n', 8, "route[0].role", "'connect'"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\n\n[[route]]\nto = "0.0.0.0/0"\nwhen = { rtt_ms = "~ 30" }\nstacks = ["k"]\n', 7, "route[0].when.rtt_ms", "expected an operator"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\n\n[listen]\nstacks = ["z"]\n', 6, "listen.stacks", "no stack is named 'z'"),
    ('[[stack]]\nname = "k"\nkind = = "kernel"\n', 3, "syntax", "not valid TOML"),
    ('[routes]\nx = 1\n', 1, "routes", "unknown section"),
    ('[[stack]]\nname = "w"\nkind = "fillp"\nfixed_rate = "100mbit"\n', 4, "stack[0].fixed_rate",
     'applies only with rate_control = "fixed"'),
    ('[[stack]]\nname = "w"\nkind = "fillp"\nrate_control = "fixed"\nfixed_rate = "100mb"\n', 5, "stack[0].fixed_rate",
     '"100mbit"'),
    ('[[stack]]\nname = "w"\nkind = "fillp"\nrate_control = "fixed"\nfixed_rate = "-3mbit"\n', 5, "stack[0].fixed_rate",
     "expected a rate"),
    ('[[stack]]\nname = "w"\nkind = "fillp"\nrate_control = "fixed"\nfixed_rate = 100\n', 5, "stack[0].fixed_rate",
     "500 kbit/s"),
    ('[[stack]]\nname = "w"\nkind = "fillp"\nrate_control = "fixed"\nfixed_rate = "200gbit"\n', 5, "stack[0].fixed_rate",
     "100 gbit/s"),
    ('[[stack]]\nname = "w"\nkind = "fillp"\nrate_control = "fixed"\nfixed_rate = true\n', 5, "stack[0].fixed_rate",
     "expected a rate"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\nfixed_rate = "1gbit"\n', 4, "stack[0].fixed_rate",
     "does not apply to a kernel stack"),
    ('', None, "stack", "at least one"),
]


@pytest.mark.parametrize("value,bits", [
    ('"100mbit"', 100_000_000),
    ('"2.5gbit"', 2_500_000_000),
    ('"800kbit"', 800_000),
    ('"10 MBIT"', 10_000_000),
    ("40000000", 40_000_000),
])
def test_fillp_fixed_rate(value, bits):
    cfg = parse(f"""
        [[stack]]
        name = "wan"
        kind = "fillp"
        rate_control = "fixed"
        fixed_rate = {value}
    """)
    assert cfg.stack("wan").fixed_rate == bits


def test_fillp_fixed_rate_defaults_to_the_core():
    cfg = parse("""
        [[stack]]
        name = "wan"
        kind = "fillp"
        rate_control = "fixed"
    """)
    assert cfg.stack("wan").fixed_rate is None


@pytest.mark.parametrize("text,line,fld,words", BAD)
def test_bad_config_names_file_line_field(text, line, fld, words):
    with pytest.raises(ConfigError) as info:
        config.parse(text, "cfg.toml")
    err = info.value
    assert (err.path, err.line, err.field) == ("cfg.toml", line, fld)
    assert words in str(err)
    assert str(err).startswith(f"cfg.toml:{line}: {fld}:" if line else f"cfg.toml: {fld}:")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        config.load(tmp_path / "missing.toml")


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[stack]]\nname = "k\xe9rnel"\nkind = "kernel"\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert (info.value.line, info.value.field) == (2, "file")
    assert "not UTF-8" in str(info.value) and str(info.value).startswith(f"{path}:2: file:")


FIXED_4MBIT = ('[[stack]]\nname = "wan"\nkind = "fillp"\nrate_control = "fixed"\nfixed_rate = "4mbit"\n'
               '[[route]]\nto = "127.0.0.0/8"\nstacks = ["wan"]\n[listen]\nstacks = ["wan"]\n')


def test_fillp_fixed_rate_reaches_the_core():
    # 4 Mbit/s is 500 kB/s: 1.5 MB cannot arrive in under 3 s (2 s allows
    # for bursts); at the core's default fixed rate (10 Mbit/s) it would take
    # 1.2 s. A lower bound only: a slow machine cannot break it.
    import socket as stdsocket
    import threading
    import time

    import dmm.socket as dsocket

    dmm.runtime.configure(config.parse(FIXED_4MBIT, "<test>"))
    try:
        srv = dsocket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        assert srv.dmm_stack == "wan"
        size, got = 1_500_000, {}

        def server():
            conn, _ = srv.accept()
            with conn:
                got["n"] = sum(len(p) for p in iter(lambda: conn.recv(1 << 16), b""))

        t = threading.Thread(target=server)
        t.start()
        start = time.monotonic()
        with dsocket.create_connection(("127.0.0.1", srv.getsockname()[1])) as c:
            c.sendall(b"r" * size)
            c.shutdown(stdsocket.SHUT_WR)
            t.join(60)
        elapsed = time.monotonic() - start
        srv.close()
    finally:
        dmm.runtime.configure(config.parse(config.DEFAULT_TOML, "<default>"))
    assert got.get("n") == size
    assert elapsed >= 2.0, elapsed


def test_fillp_stack_refuses_a_zero_fixed_rate():
    from dmm import _core
    with pytest.raises(ValueError, match="fixed_rate"):
        _core.parse_stack("fillp", {"rate_control": "fixed", "address": "127.0.0.1", "fixed_rate": 0})


BROKEN_EVERYWHERE = """\
[[stack]]
name = "kernel"
kind = "kernel"
bogus = 1

[[stack]]
name = "f"
kind = "fillp"
mtu = "big"

[[route]]
to = "10.0.0.0/33"
stacks = ["f"]

[[route]]
to = "10.0.0.0/8"
stacks = ["ghost"]

[listen]
stacks = ["nope"]

[weird]
"""


def test_every_broken_table_of_a_file_is_reported_at_once():
    with pytest.raises(config.ConfigErrors) as info:
        config.parse(BROKEN_EVERYWHERE, "cfg.toml")
    got = [(e.line, e.field) for e in info.value.errors]
    assert got == [(4, "stack[0].bogus"), (9, "stack[1].mtu"), (12, "route[0].to"), (17, "route[1].stacks"),
                   (20, "listen.stacks"), (22, "weird")]
    lines = str(info.value).splitlines()
    assert len(lines) == 6 and lines[0].startswith("cfg.toml:4: stack[0].bogus:")
    # The stack that failed its check keeps its name: no "no stack named 'f'".
    assert "'f'" not in str(info.value)


def test_a_config_error_is_an_oserror_at_a_programs_first_socket_call(tmp_path):
    bad = tmp_path / "dmm.toml"
    bad.write_text(BROKEN_EVERYWHERE)
    program = ("import dmm.socket as socket\n"
               "try:\n"
               "    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
               "except OSError as exc:\n"
               "    print(type(exc).__name__, len(str(exc).splitlines()))\n")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, DMM_CONFIG=str(bad)))
    assert out.stdout.strip() == "ConfigErrors 6", out.stderr


def test_the_cli_prints_each_config_error_on_its_own_line(tmp_path):
    bad = tmp_path / "dmm.toml"
    bad.write_text(BROKEN_EVERYWHERE)
    out = subprocess.run([sys.executable, "-m", "dmm", "--config", str(bad), "stacks"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith(f"dmm: {bad}:") for line in lines), out.stderr


SMOLTCP_ON_A_NEW_TAP = """\
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "lan"
kind = "smoltcp"
device = "dmmnocap0"
address = ["10.99.0.2/24"]
"""


def test_a_smoltcp_stack_without_the_right_to_open_a_tap_is_a_config_error(tmp_path):
    cfg = tmp_path / "dmm.toml"
    cfg.write_text(SMOLTCP_ON_A_NEW_TAP)
    program = ("import dmm.socket as socket\n"
               "try:\n"
               "    socket.create_connection(('10.99.0.1', 9), timeout=1)\n"
               "except OSError as exc:\n"
               "    print(type(exc).__name__, exc.errno, exc, sep='|')\n")
    # As root, the child runs without CAP_NET_ADMIN (dropped from its
    # bounding set before exec); otherwise it never had it.
    drop = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"] if os.geteuid() == 0 else []
    out = subprocess.run([*drop, sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, DMM_CONFIG=str(cfg)))
    kind, errno, message = out.stdout.strip().split("|")
    assert (kind, errno) == ("ConfigError", "1"), out.stderr
    assert message.startswith(f"{cfg}:5: stack[1].device: stack 'lan' (smoltcp) cannot be opened: ")
    assert "dmmnocap0" in message and "CAP_NET_ADMIN" in message
