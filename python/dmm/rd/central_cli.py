"""``dmm rd push|status|ls`` for central RD: one short etcd session each,
with the endpoints, prefix and credentials of the config's ``[rd]``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..config import Config, ConfigError, RDSpec, parse_policy
from .central import REQUEST_TIMEOUT
from .central_schema import Malformed, parse_ad, parse_key, parse_path, policy_key

__all__ = ["ls", "push", "status"]


def push(cfg: Config, path: str) -> int:
    """Checks the policy in ``path`` against this config's stacks and
    stores it; every running dmm process applies it within a second."""
    spec = _spec(cfg)
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"dmm: {path}: cannot be read: {exc}") from None
    try:
        routes, adaptive = parse_policy(text, path, [s.name for s in cfg.stacks])
    except ConfigError as exc:
        raise SystemExit(f"dmm: {exc}") from None

    async def put(client: Any) -> int:
        reply = await client.put(policy_key(spec.prefix).encode(), text.encode())
        return reply.header.revision

    endpoint, revision = _session(spec, put)
    extra = ", [adaptive]" if adaptive is not None else ""
    print(f"pushed {path} ({len(routes)} route{'s' if len(routes) != 1 else ''}{extra}) to "
          f"{policy_key(spec.prefix)} at {endpoint}: revision {revision}")
    return 0


def status(cfg: Config) -> int:
    """The backend, the member that answered, the revision and the entries."""
    spec = _spec(cfg)

    async def read(client: Any) -> tuple[Any, Any]:
        return await client.status(), await client.get_prefix(spec.prefix.encode(), keys_only=True)

    try:
        endpoint, (st, keys) = _session(spec, read)
    except SystemExit as exc:
        print(f"backend: etcd {', '.join(spec.central)}\nconnected: no ({exc})")
        return 1
    kinds = {"ad": 0, "path": 0, "policy": 0, "other": 0}
    for kv in keys:
        try:
            kinds[parse_key(spec.prefix, kv.key.decode("utf-8", "replace")).kind] += 1
        except Malformed:
            kinds["other"] += 1
    print(f"backend: etcd {st.version} ({', '.join(spec.central)})")
    print(f"connected: yes, to {endpoint} (leader {st.leader.id if hasattr(st.leader, 'id') else st.leader})")
    print(f"revision: {keys.header.revision if hasattr(keys, 'header') else '?'}")
    print(f"entries under {spec.prefix}: {kinds['ad']} advertisements, {kinds['path']} path estimates, "
          f"policy {'set' if kinds['policy'] else 'not set'}, {kinds['other']} other keys")
    return 0


def ls(cfg: Config) -> int:
    """Every advertisement, shared path estimate and the policy."""
    spec = _spec(cfg)

    async def read(client: Any) -> Any:
        return await client.get_prefix(spec.prefix.encode())

    endpoint, kvs = _session(spec, read)
    print(f"central RD {', '.join(spec.central)} ({endpoint}), prefix {spec.prefix}")
    ads, paths, policy, bad = [], [], None, 0
    for kv in kvs:
        key = kv.key.decode("utf-8", "replace")
        try:
            k = parse_key(spec.prefix, key)
            if k.kind == "ad":
                ads.append(parse_ad(k, kv.value))
            elif k.kind == "path":
                paths.append((k.name, k.host, parse_path(k, kv.value)))
            else:
                policy = (kv.value.decode("utf-8", "replace"), kv.mod_revision)
        except Malformed:
            bad += 1
    print(f"advertisements: {len(ads)}")
    for ad in sorted(ads, key=lambda a: (a.host, a.port)):
        protos = ", ".join(f"{p}:{n}" for p, n in ad.protocols)
        print(f"  {ad.host}  {', '.join(ad.addresses)} port {ad.port}  {protos}  stacks {', '.join(ad.stacks)}  "
              f"pid {ad.pid}")
    print(f"shared path estimates: {len(paths)}")
    now = time.time()
    for name, host, agg in sorted(paths, key=lambda p: (p[0], p[1])):
        est = agg.estimate(name, now, cfg.paths.half_life)
        print(f"  {name:<20} from {host}: {est.describe() if est else 'faded out'}")
    if policy is None:
        print("policy: none")
    else:
        print(f"policy (revision {policy[1]}):")
        for line in policy[0].splitlines():
            print(f"  | {line}")
    if bad:
        print(f"{bad} malformed entries ignored")
    return 0


def _spec(cfg: Config) -> RDSpec:
    if cfg.rd is None or not cfg.rd.central:
        raise SystemExit(f"dmm: {cfg.path}: no [rd] central endpoints: central RD is not configured")
    return cfg.rd


def _session(spec: RDSpec, op: Any) -> tuple[str, Any]:
    """Runs ``op(client)`` against the first endpoint that answers."""
    try:
        import aetcd
    except ImportError:
        raise SystemExit("dmm: central RD needs the etcd client: pip install 'dmm[central]'") from None

    async def attempt(endpoint: str) -> Any:
        host, _, port = endpoint.rpartition(":")
        client = aetcd.Client(host=host, port=int(port), username=spec.user, password=spec.password,
                              timeout=REQUEST_TIMEOUT)
        try:
            return await asyncio.wait_for(op(client), REQUEST_TIMEOUT * 2)
        finally:
            try:
                await client.close()
            except Exception:
                pass

    errors = []
    for endpoint in spec.central:
        try:
            return endpoint, asyncio.run(attempt(endpoint))
        except Exception as exc:  # try the next member
            errors.append(f"{endpoint}: {type(exc).__name__}: {exc}".rstrip(": "))
    raise SystemExit("dmm: no etcd endpoint answered (" + "; ".join(errors) + ")")
