"""Real etcd servers for the central-RD tests: one member or a cluster of
three on loopback (or on given addresses), each with a data directory of
its own, started from Debian's ``etcd-server`` and stopped after."""

import os
import shutil
import socket
import subprocess
import time

import pytest

ETCD = shutil.which("etcd")
ETCDCTL = shutil.which("etcdctl")


def need_etcd():
    if ETCD is None or ETCDCTL is None:
        pytest.skip("needs etcd and etcdctl (Debian's etcd-server and etcd-client; .ci/run installs them)")


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Member:
    def __init__(self, name, host, client_port, peer_port, data_dir):
        self.name, self.host = name, host
        self.client_port, self.peer_port = client_port, peer_port
        self.data_dir = data_dir
        self.proc = None

    @property
    def endpoint(self):
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self):
        return f"http://{self.host}:{self.peer_port}"


class Cluster:
    """``size`` etcd members; ``argv_prefix`` runs them elsewhere (a
    namespace: ``["ip", "netns", "exec", NAME]``)."""

    def __init__(self, tmp_path, size=1, host="127.0.0.1", argv_prefix=()):
        need_etcd()
        self.argv_prefix = list(argv_prefix)
        self.members = [Member(f"m{i}", host, free_port(), free_port(), tmp_path / f"etcd-m{i}")
                        for i in range(size)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        self.token = f"dmm-test-{os.getpid()}-{time.monotonic_ns()}"

    @property
    def endpoints(self):
        return [m.endpoint for m in self.members]

    def urls(self):
        return [f"http://{e}" for e in self.endpoints]

    def start(self, member=None, new=True):
        for m in [member] if member is not None else self.members:
            url = f"http://{m.endpoint}"
            argv = [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
                    "--listen-client-urls", url, "--advertise-client-urls", url,
                    "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                    "--initial-cluster", self.initial, "--initial-cluster-token", self.token,
                    "--initial-cluster-state", "new" if new else "existing",
                    "--heartbeat-interval", "50", "--election-timeout", "500"]
            log = open(str(m.data_dir) + ".log", "ab")
            m.proc = subprocess.Popen(self.argv_prefix + argv, stdout=log, stderr=subprocess.STDOUT)
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout=20):
        live = [m for m in self.members if m.proc is not None and m.proc.poll() is None]
        deadline = time.monotonic() + timeout
        while True:
            out = self.ctl("endpoint", "health", endpoints=[m.endpoint for m in live], check=False)
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not become healthy: {out.stdout} {out.stderr}")
            time.sleep(0.1)

    def stop(self, member=None):
        for m in [member] if member is not None else self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.terminate()
                try:
                    m.proc.wait(10)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait()
            m.proc = None

    def ctl(self, *args, endpoints=None, user=None, check=True, stdin=None):
        argv = self.argv_prefix + [ETCDCTL, "--endpoints", ",".join(endpoints or self.endpoints),
                                   "--dial-timeout", "2s", "--command-timeout", "5s"]
        if user:
            argv += ["--user", user]
        out = subprocess.run(argv + list(args), capture_output=True, text=True, input=stdin,
                             env=dict(os.environ, ETCDCTL_API="3"), timeout=30)
        if check and out.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {out.stderr.strip()}")
        return out

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
