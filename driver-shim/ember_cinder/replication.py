"""Replication settings: `replication_device` entries and volume-type specs.

`replication_device` (repeatable in the backend's section) reaches the driver
as dicts of strings, split by Cinder on ',' then on the first ':'::

    replication_device = backend_id:site-b,endpoint:unix:/run/ember-b/api.sock,mode:async,rpo_seconds:30

`backend_id` is the peer's Ember site name (what `emberctl peer add` paired).
`availability_zone` (optional) is the Cinder availability zone that site
serves; a volume type picks targets by zone (below).
`endpoint` is the peer agent's control API (`unix:/path` or `host:port`, with
`tls_ca`, `tls_cert` and `tls_key` for mutual TLS); the driver needs it to
promote the secondaries there on failover.

Volume-type extra specs the driver reads (scoped `ember:`, which the
scheduler ignores):

- `ember:replication_mode` = `sync` | `async` — an exact value, never a
  substring test (`'<in> sync'` would also match `async`);
- `ember:rpo_seconds` = N — the RPO target stored with the replica;
- `ember:rpo_policy` = `alert` | `throttle` | `escalate`;
- `ember:replication_target_az` = `AZ[,AZ…]` — replicate only to the
  `replication_device` entries in these availability zones (the type's
  "target availability zone"); a zone no entry serves fails the create.

Replication itself is switched on by Cinder's `replication_enabled='<is> True'`.
A volume of a replicated type is replicated to every `replication_device`
(Cinder's contract, doc/source/contributor/replication.rst) unless
`ember:replication_target_az` narrows the list. Each target keeps the `mode`
and `rpo_seconds` of its entry (a metro entry `mode:sync`, a far one
`mode:async`); `ember:replication_mode` / `ember:rpo_seconds` in the type
override them for every target of its volumes.
"""
import dataclasses

from cinder import exception

MODES = ("sync", "async")
POLICIES = ("alert", "throttle", "escalate")


@dataclasses.dataclass(frozen=True)
class Target:
    """One replication target: a paired Ember site."""

    backend_id: str
    endpoint: str
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    mode: str = "async"
    rpo_seconds: int = 30
    availability_zone: str = ""


def _invalid(value, reason):
    return exception.InvalidConfigurationValue(
        option="replication_device", value=f"{value} ({reason})")


def parse_devices(devices):
    """Parses `replication_device` entries into Targets.

    Raises InvalidConfigurationValue naming the entry and what is wrong.
    """
    targets = []
    seen = set()
    for raw in devices or []:
        if not isinstance(raw, dict):
            raise _invalid(raw, "not a list of key:value pairs")
        dev = {str(k).strip(): str(v).strip() for k, v in raw.items()}
        backend_id = dev.get("backend_id", "")
        if not backend_id:
            raise _invalid(raw, "backend_id is missing")
        if backend_id == "default":
            raise _invalid(raw, "'default' names the primary; pick another backend_id")
        if backend_id in seen:
            raise _invalid(raw, f"backend_id {backend_id} appears twice")
        seen.add(backend_id)
        endpoint = dev.get("endpoint", "")
        if not endpoint:
            raise _invalid(raw, "endpoint is missing")
        if not endpoint.startswith("unix:"):
            host, sep, port = endpoint.split("://", 1)[-1].rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise _invalid(raw, f"endpoint {endpoint!r} is not unix:/path or host:port")
        mode = dev.get("mode", "async")
        if mode not in MODES:
            raise _invalid(raw, f"mode {mode!r} is not sync or async")
        rpo = dev.get("rpo_seconds", "30" if mode == "async" else "0")
        if not rpo.isdigit():
            raise _invalid(raw, f"rpo_seconds {rpo!r} is not a whole number")
        tls = {k: dev.get(k, "") for k in ("tls_ca", "tls_cert", "tls_key")}
        if any(tls.values()) and not all(tls.values()):
            raise _invalid(raw, "tls_ca, tls_cert and tls_key go together")
        zone = dev.get("availability_zone", "")
        if zone and (any(c.isspace() for c in zone) or "," in zone):
            # A zone is one word: the type's spec lists zones with commas.
            raise _invalid(raw, f"availability_zone {zone!r} is not one zone name")
        targets.append(Target(backend_id=backend_id, endpoint=endpoint,
                              mode=mode, rpo_seconds=int(rpo),
                              availability_zone=zone, **tls))
    return targets


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
    """What a volume type asks of replication."""

    enabled: bool
    mode: str
    rpo_seconds: int
    rpo_policy: str


def volume_spec(extra_specs, target):
    """Reads a volume type's extra specs (dict, may be empty) against the
    target's defaults. Raises InvalidInput for a spec the driver cannot
    honour, so a bad type fails at create, not silently."""
    specs = extra_specs or {}
    enabled = str(specs.get("replication_enabled", "")).strip().lower() in (
        "<is> true", "true")
    mode = specs.get("ember:replication_mode", target.mode if target else "async")
    if mode not in MODES:
        raise exception.InvalidInput(
            reason=f"ember:replication_mode must be sync or async, not {mode!r}")
    rpo = str(specs.get("ember:rpo_seconds", target.rpo_seconds if target else 30))
    if not rpo.isdigit():
        raise exception.InvalidInput(
            reason=f"ember:rpo_seconds must be a whole number, not {rpo!r}")
    policy = specs.get("ember:rpo_policy", "alert")
    if policy not in POLICIES:
        raise exception.InvalidInput(
            reason=f"ember:rpo_policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    return VolumeSpec(enabled=enabled, mode=mode, rpo_seconds=int(rpo), rpo_policy=policy)


TARGET_AZ_SPEC = "ember:replication_target_az"


def target_zones(targets):
    """The availability zones the targets serve, sorted, without blanks:
    what the backend reports as `replication_target_azs`."""
    return sorted({t.availability_zone for t in targets if t.availability_zone})


def select_targets(targets, extra_specs):
    """The targets a volume of this type replicates to: all of them, or
    those in the zones `ember:replication_target_az` names. Raises
    InvalidInput naming a zone no target serves, so such a type fails at
    create rather than replicating somewhere else."""
    wanted = str((extra_specs or {}).get(TARGET_AZ_SPEC, "")).strip()
    if not wanted:
        return list(targets)
    # Accept the scheduler's '<in> az' form too: an admin may reuse the
    # value of a capabilities filter.
    if wanted.startswith("<in>"):
        wanted = wanted[len("<in>"):]
    zones = [z.strip() for z in wanted.split(",") if z.strip()]
    if not zones:
        raise exception.InvalidInput(
            reason=f"{TARGET_AZ_SPEC} {wanted!r} names no availability zone")
    known = target_zones(targets)
    missing = [z for z in zones if z not in known]
    if missing:
        raise exception.InvalidInput(
            reason=f"{TARGET_AZ_SPEC} asks for availability zone(s) "
                   f"{', '.join(missing)}, but this backend's replication_device "
                   f"entries serve {', '.join(known) or 'no zone'}")
    return [t for t in targets if t.availability_zone in zones]

