"""Configuration: good files load, bad ones name the file, line and field."""

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
    ('[[stack]]\nname = "k"\nkind = "kernel"\n\n[[route]]\nto = "0.0.0.0/0"\nwhen = { rtt_ms = ">= 30" }\nstacks = ["k"]\n', 7, "route[0].when", "not collect"),
    ('[[stack]]\nname = "k"\nkind = "kernel"\n\n[listen]\nstacks = ["z"]\n', 6, "listen.stacks", "no stack is named 'z'"),
    ('[[stack]]\nname = "k"\nkind = = "kernel"\n', 3, "syntax", "not valid TOML"),
    ('[routes]\nx = 1\n', 1, "routes", "unknown section"),
    ('', None, "stack", "at least one"),
]


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
