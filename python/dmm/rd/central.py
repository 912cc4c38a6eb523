"""Central RD on etcd: what every host's listeners accept on, what paths
look like from each host, and the policy an operator sets in one place.

One background thread per process (``dmm-central``) runs an asyncio loop
with the etcd client (aetcd, gRPC). A session with an etcd member:

1. authenticates (``[rd] user``/``password``), grants the process a lease
   (``lease_ttl_s``) and reads everything under the prefix;
2. publishes this process's listeners on the lease, so they vanish within
   the TTL once the process dies or loses the network;
3. watches the prefix from the revision it read: advertisements become
   facts that negotiation reads, other hosts' path estimates a fallback of
   the local ones, and the policy key a live policy for every runtime
   attached (:meth:`dmm.runtime.Runtime.apply_policy`);
4. keeps the lease alive and, every second, writes this host's path
   estimates that changed (at most one write per prefix per 10 s per host).

Any failure (a member down, a partition, a restart) ends the session: the
thread logs once, tries the next endpoint with backoff, and the next
session re-reads the state and re-publishes. ``connect()`` never waits on
etcd: it reads this process's cache (:meth:`CentralRD.facts`); only before
the first sync has completed or failed does it wait, ``[rd] timeout_ms`` at
most. Values are checked as a config file is (:mod:`.central_schema`); a
bad one is ignored and counted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import socket
import threading
import time
import weakref
from typing import Any, Optional

from ..config import ConfigError, RDSpec, parse_policy
from .central_schema import (Advertisement, Key, Malformed, ad_key, ad_value, parse_ad, parse_key, parse_path,
                             path_key, path_value, policy_key)
from .paths import Aggregate, Estimate, keys_for

__all__ = ["Advertised", "CentralRD", "get_central", "host_addresses"]

log = logging.getLogger("dmm.central")

#: A host writes its estimate toward one prefix at most this often, seconds.
PATH_WRITE_EVERY = 10.0
#: Reconnect backoff: the first wait and the longest, seconds.
BACKOFF = (0.1, 5.0)
#: The longest one etcd request may take before the session counts as lost.
REQUEST_TIMEOUT = 2.0


class Advertised:
    """An advertisement in central RD, read as a fact about ``address:port``."""

    __slots__ = ("speaks", "host", "pid")
    source = "central"
    rtt_ms = None

    def __init__(self, speaks: bool, host: str, pid: int):
        self.speaks = speaks
        self.host = host
        self.pid = pid

    def describe(self) -> str:
        return f"advertised in central RD by {self.host} pid {self.pid}"


class CentralRD:
    """This process's view of central RD and the thread that keeps it."""

    def __init__(self, spec: RDSpec, rd: Any):
        import aetcd  # noqa: F401  (fail here, with the runtime's message, if absent)

        self.spec = spec
        self.rd = rd
        self.prefix = spec.prefix
        self.host = spec.host or _safe_host(socket.gethostname())
        self.endpoints = list(spec.central)
        self.counters: collections.Counter = collections.Counter()
        # The cache (written by the thread, read anywhere: every dict is
        # replaced, never changed in place, so readers see one or the other).
        self._ads: dict[str, Advertisement] = {}
        self._facts: dict[tuple[str, int], dict[str, Advertised]] = {}
        self._paths: dict[str, dict[str, Aggregate]] = {}
        self.policy: Optional[tuple[str, int]] = None  # (text, revision)
        self.revision = 0
        self.connected = False
        self.endpoint: Optional[str] = None
        #: Set by the first sync, or by the first failure to sync.
        self._cold = threading.Event()
        self.synced = threading.Event()
        # This process's own entries, published on every session.
        self._own: dict[str, bytes] = {}
        self._own_lock = threading.Lock()
        self._runtimes: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._dirty: Optional[asyncio.Event] = None
        self._stop = False
        self._down_logged = False
        self._thread = threading.Thread(target=self._run, name="dmm-central", daemon=True)
        self._thread.start()

    # -- what connect() reads (any thread, no I/O) ----------------------------

    def facts(self, address: str, port: int) -> dict[str, Advertised]:
        """What central RD says ``address:port`` accepts on, by protocol."""
        if not self._cold.is_set():
            self.counters["cold_waits"] += 1
            self._cold.wait(self.spec.timeout)
        return self._facts.get((address, port), {})

    def path_estimate(self, address: str, prefix_v4: int, prefix_v6: int, half_life: float) -> Optional[Estimate]:
        """Other hosts' estimate toward ``address``'s prefix, merged."""
        keys = keys_for(address, prefix_v4, prefix_v6)
        now = time.time()
        for key in keys[1:]:  # prefixes only: hosts share no per-address entries
            by_host = self._paths.get(key)
            if not by_host:
                continue
            total = Aggregate(updated=now)
            for host, agg in by_host.items():
                if host == self.host:
                    continue
                a = agg.decayed(now, half_life)
                total = Aggregate(total.rtt_sum + a.rtt_sum, total.rtt_w + a.rtt_w, total.loss_sum + a.loss_sum,
                                  total.loss_w + a.loss_w, total.rate_sum + a.rate_sum, total.rate_w + a.rate_w,
                                  total.samples + a.samples, max(total.updated, a.updated) if total.samples
                                  else a.updated)
            est = total.estimate(key, now, half_life) if total.samples else None
            if est is not None:
                return est
        return None

    # -- what this process publishes (any thread) -----------------------------

    def advertise(self, address: str, port: int, protocols: list[tuple[str, int]], stacks: tuple[str, ...]) -> None:
        """Publishes a listener of this process (on its lease)."""
        addresses = host_addresses() if address in ("0.0.0.0", "::", "") else [address]
        if address == "0.0.0.0":
            addresses = [a for a in addresses if ":" not in a]
        if not addresses:
            return
        ad = Advertisement(self.host, tuple(addresses), port, tuple(protocols), tuple(stacks), os.getpid())
        with self._own_lock:
            self._own[ad_key(self.prefix, self.host, address, port, os.getpid())] = ad_value(ad)
        self._kick()

    def withdraw(self, address: str, port: int) -> None:
        """Removes a listener of this process (it closed)."""
        with self._own_lock:
            self._own[ad_key(self.prefix, self.host, address, port, os.getpid())] = b""
        self._kick()

    def attach(self, runtime: Any) -> None:
        """Gives ``runtime`` the central policy now and whenever it changes."""
        self._runtimes.add(runtime)
        policy = self.policy
        if policy is not None:
            self._apply(runtime, *policy)

    def status(self) -> dict[str, Any]:
        """For ``dmm rd status``: backend, connection, revision, entries."""
        return {"backend": "etcd", "endpoints": self.endpoints, "endpoint": self.endpoint,
                "connected": self.connected, "host": self.host, "prefix": self.prefix, "revision": self.revision,
                "advertisements": len(self._ads), "path_prefixes": len(self._paths),
                "policy_revision": self.policy[1] if self.policy else None, "counters": dict(self.counters)}

    def advertisements(self) -> list[Advertisement]:
        """Every advertisement as last seen."""
        return list(self._ads.values())

    def shared_paths(self) -> dict[str, dict[str, Aggregate]]:
        """Every host's shared estimates, by prefix, as last seen."""
        return dict(self._paths)

    def stop(self) -> None:
        """Ends the thread (its lease then expires)."""
        self._stop = True
        self._kick()

    # -- the thread -----------------------------------------------------------

    def _kick(self) -> None:
        loop, dirty = self._loop, self._dirty
        if loop is not None and dirty is not None:
            try:
                loop.call_soon_threadsafe(dirty.set)
            except RuntimeError:  # the loop is gone (process exiting)
                pass

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._dirty = asyncio.Event()
        try:
            loop.run_until_complete(self._main())
        except Exception:  # the thread must not take the process down
            log.exception("dmm: central RD stopped")
        finally:
            self._cold.set()

    async def _main(self) -> None:
        backoff = BACKOFF[0]
        i = random.randrange(len(self.endpoints))
        while not self._stop:
            endpoint = self.endpoints[i % len(self.endpoints)]
            started = time.monotonic()
            try:
                await self._session(endpoint)
            except Exception as exc:  # any failure ends the session; knowledge stays
                self.counters["session_failures"] += 1
                if not self._down_logged:
                    self._down_logged = True
                    log.warning("dmm: central RD at %s unavailable (%s: %s); routing on local knowledge, "
                                "reconnecting", endpoint, type(exc).__name__, exc)
            self.connected = False
            self._cold.set()
            if time.monotonic() - started > 10:
                backoff = BACKOFF[0]
            i += 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, BACKOFF[1])

    async def _session(self, endpoint: str) -> None:
        import aetcd

        host, _, port = endpoint.rpartition(":")
        client = aetcd.Client(host=host, port=int(port), username=self.spec.user, password=self.spec.password,
                              timeout=REQUEST_TIMEOUT,
                              options={"grpc.keepalive_time_ms": 5000, "grpc.keepalive_timeout_ms": 2000})
        try:
            await asyncio.wait_for(client.connect(), REQUEST_TIMEOUT)
            lease = await client.lease(self.spec.lease_ttl)
            snapshot = await client.get_prefix(self.prefix.encode())
            self._load(snapshot, snapshot.header.revision)
            self.endpoint, self.connected = endpoint, True
            self.synced.set()
            self._cold.set()
            if self._down_logged:
                self._down_logged = False
                log.warning("dmm: central RD at %s reachable again (revision %d)", endpoint, self.revision)
            self.counters["sessions"] += 1
            published: dict[str, bytes] = {}
            watch = await client.watch_prefix(self.prefix.encode(), start_revision=self.revision + 1)
            tasks = [asyncio.ensure_future(self._follow(watch)),
                     asyncio.ensure_future(self._keep_alive(client, lease.id)),
                     asyncio.ensure_future(self._publish(client, lease.id, published))]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()  # raises what ended it
                if not self._stop:
                    raise ConnectionError("the watch ended")
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if self._stop:
                    await asyncio.wait_for(client.revoke_lease(lease.id), REQUEST_TIMEOUT)
        finally:
            try:
                await asyncio.wait_for(client.close(), REQUEST_TIMEOUT)
            except Exception:
                pass

    async def _keep_alive(self, client: Any, lease_id: int) -> None:
        while not self._stop:
            await asyncio.sleep(self.spec.lease_ttl / 3)
            reply = await asyncio.wait_for(client.refresh_lease(lease_id), REQUEST_TIMEOUT)
            if reply is None or reply.TTL <= 0:
                raise ConnectionError("the lease expired")

    async def _publish(self, client: Any, lease_id: int, published: dict[str, bytes]) -> None:
        """Writes this process's entries that changed, on every kick and
        every second (path estimates)."""
        assert self._dirty is not None
        while not self._stop:
            self._dirty.clear()
            with self._own_lock:
                own = dict(self._own)
            for key, value in own.items():
                if published.get(key) == value:
                    continue
                if value:
                    await client.put(key.encode(), value, lease=lease_id)
                else:
                    await client.delete(key.encode())
                    with self._own_lock:
                        if self._own.get(key) == b"":
                            del self._own[key]
                published[key] = value
            await self._publish_paths(client)
            try:
                await asyncio.wait_for(self._dirty.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def _publish_paths(self, client: Any) -> None:
        now = time.time()
        half_life = self.rd.paths_spec.half_life
        for key, agg in list(self.rd._paths.items()):
            if "/" not in key or agg.samples == 0:
                continue  # addresses stay on the host; prefixes are shared
            seen = self._paths.get(key, {}).get(self.host)
            if seen is not None and (now - seen.updated < PATH_WRITE_EVERY or seen.samples == agg.samples):
                continue  # written lately (by any process of this host), or nothing new
            value = path_value(agg.decayed(now, half_life))
            await client.put(path_key(self.prefix, self.host, key).encode(), value)
            self.counters["paths_written"] += 1

    async def _follow(self, watch: Any) -> None:
        async for event in watch:
            kv = event.kv
            self.revision = max(self.revision, kv.mod_revision)
            if event.kind == "PUT":  # an EventKind (a str enum)
                self._put(kv.key.decode("utf-8", "replace"), kv.value, kv.mod_revision)
            else:
                self._delete(kv.key.decode("utf-8", "replace"))
            self._changed()

    # -- the cache (thread) ---------------------------------------------------

    def _load(self, snapshot: Any, revision: int) -> None:
        """Replaces the cache with a full read of the prefix."""
        self._ads, self._paths = {}, {}
        policy_seen = False
        for kv in snapshot:
            key = kv.key.decode("utf-8", "replace")
            policy_seen |= key == policy_key(self.prefix)
            self._put(key, kv.value, kv.mod_revision, rebuild=False)
        if not policy_seen and self.policy is not None:
            self._set_policy(None)
        self.revision = revision
        self._rebuild_facts()
        self._changed()

    def _put(self, key: str, value: bytes, revision: int, rebuild: bool = True) -> None:
        try:
            k = parse_key(self.prefix, key)
            if k.kind == "policy":
                self._set_policy((value.decode("utf-8"), revision))
            elif k.kind == "ad":
                ads = dict(self._ads)
                ads[key] = parse_ad(k, value)
                self._ads = ads
                if rebuild:
                    self._rebuild_facts()
            else:
                by_host = dict(self._paths.get(k.name, {}))
                by_host[k.host] = parse_path(k, value)
                paths = dict(self._paths)
                paths[k.name] = by_host
                self._paths = paths
        except (Malformed, UnicodeDecodeError) as exc:
            self._malformed(key, exc)

    def _delete(self, key: str) -> None:
        try:
            k = parse_key(self.prefix, key)
        except Malformed:
            return
        if k.kind == "policy":
            self._set_policy(None)
        elif k.kind == "ad" and key in self._ads:
            ads = dict(self._ads)
            del ads[key]
            self._ads = ads
            self._rebuild_facts()
        elif k.kind == "path" and k.host in self._paths.get(k.name, {}):
            by_host = {h: a for h, a in self._paths[k.name].items() if h != k.host}
            paths = dict(self._paths)
            if by_host:
                paths[k.name] = by_host
            else:
                del paths[k.name]
            self._paths = paths

    def _malformed(self, key: str, exc: Exception) -> None:
        if self.counters["malformed"] < 10:  # a flood is logged only at first
            log.warning("dmm: central RD: ignoring %s: %s", key, exc)
        self.counters["malformed"] += 1

    def _rebuild_facts(self) -> None:
        facts: dict[tuple[str, int], dict[str, Advertised]] = {}
        for ad in self._ads.values():
            offered = {("tcp" if p == "mptcp" else p) for p, p_port in ad.protocols if p_port == ad.port}
            for address in ad.addresses:
                group = facts.setdefault((address, ad.port), {})
                for proto in ("tcp", "fillp"):
                    if proto in offered or proto not in group:
                        group[proto] = Advertised(proto in offered, ad.host, ad.pid)
        self._facts = facts

    def _changed(self) -> None:
        """What decisions depend on changed: memos start over."""
        self.rd.version += 1
        self.rd.paths_version += 1

    def _set_policy(self, policy: Optional[tuple[str, int]]) -> None:
        self.policy = policy
        for rt in list(self._runtimes):
            self._apply(rt, *(policy or ("", self.revision)))

    def _apply(self, runtime: Any, text: str, revision: int) -> None:
        """Puts policy ``text`` (revision ``revision``) in force in
        ``runtime``; a bad one is refused and logged, the last good one
        stays."""
        origin = f"{policy_key(self.prefix)}@{revision}"
        try:
            routes, adaptive = parse_policy(text, origin, list(runtime.order))
            runtime.apply_policy(routes, adaptive, f"central policy {origin}" if text else "")
        except ConfigError as exc:
            # Logged before counted: whoever sees the count finds the reason.
            log.error("dmm: central policy refused, the last good one stays in force: %s", exc)
            self.counters["policies_refused"] += 1
            return
        self.counters["policies_applied"] += 1


def host_addresses() -> list[str]:
    """This host's (this network namespace's) addresses, loopback and
    link-local left out: where a wildcard listener is reached."""
    out: list[str] = []
    try:
        with open("/proc/self/net/fib_trie") as f:
            lines = f.read().splitlines()
        for prev, line in zip(lines, lines[1:]):
            if line.strip() == "/32 host LOCAL":
                addr = prev.strip().removeprefix("|-- ")
                if not addr.startswith("127.") and addr not in out:
                    out.append(addr)
    except OSError:
        pass
    try:
        with open("/proc/self/net/if_inet6") as f:
            for line in f:
                hexaddr, _idx, _plen, scope, *_ = line.split()
                if int(scope, 16) == 0:  # global scope only
                    out.append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexaddr)))
    except (OSError, ValueError):
        pass
    return out


def _safe_host(name: str) -> str:
    """A host name usable in a key (the first label, other characters as '-')."""
    label = name.split(".")[0] or "host"
    cleaned = "".join(c if c.isalnum() or c in "_-" else "-" for c in label)[:63]
    return cleaned if cleaned[:1].isalnum() else "h" + cleaned[:62]


_centrals: dict[tuple, CentralRD] = {}
_centrals_lock = threading.Lock()


def get_central(spec: RDSpec, rd: Any) -> CentralRD:
    """The process's :class:`CentralRD` for these endpoints, prefix, user
    and host (one per process, shared by runtimes built one after the
    other); the L-RD ``rd`` then reads it."""
    key = (spec.central, spec.prefix, spec.user, spec.host, os.getpid())
    with _centrals_lock:
        central = _centrals.get(key)
        if central is None:
            try:
                central = _centrals[key] = CentralRD(spec, rd)
            except ImportError as exc:
                raise ConfigError("[rd] central", spec.line, "rd.central",
                                  f"needs the etcd client: pip install 'dmm[central]' ({exc})") from None
        rd.central = central
        return central
