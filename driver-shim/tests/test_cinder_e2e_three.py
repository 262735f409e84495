"""Three sites through a real Cinder (issue 14): cinder-api, -scheduler and
-volume (cinder_services.Cinder) with one Ember backend whose two
`replication_device` entries are in two availability zones: site-b (metro,
sync) and site-c (far, async), on a three-site lab of its own.

A type without a zone replicates to both sites, a type pinned to the far
zone only there; the pool reports `replication_count` 2 and both zones;
`cinder failover-host --backend_id site-b` promotes the volume replicated
there and site-c keeps replicating from site-b (the pinned volume has no
replica on site-b and goes to error); failback to `default` brings site-a
back as primary with everything written on either side."""
import pytest

from cinder_services import (holds, qemu_io, replica_state, running_cinder, service, show,
                             volume_status, wait_for)
from conftest import _lab, require


@pytest.fixture(scope="module")
def lab3_e2e():
    """A lab of this module's own: the test fails its sites over."""
    yield from _lab(sites=3)


@pytest.fixture(scope="module")
def cinder3(lab3_e2e):
    require("qemu-io")
    lab = lab3_e2e
    devices = [
        {"backend_id": "site-b", "endpoint": lab["site-b"]["api"], "mode": "sync",
         "availability_zone": "metro"},
        {"backend_id": "site-c", "endpoint": lab["site-c"]["api"], "mode": "async",
         "rpo_seconds": "30", "availability_zone": "far"},
    ]
    yield from running_cinder(lab, devices)


def pool_capabilities(cinder):
    out = cinder.cli("get-pools", "--detail")
    caps = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2:
            caps[cells[0]] = cells[1]
    return caps


def targets(lab, site, volume):
    return {t["peer"]: t for t in replica_state(lab, site, volume).get("targets", [])}


def all_in_sync(lab, site, volume):
    t = targets(lab, site, volume)
    return t if t and all(x["state"] == "in-sync" and x["lag_bytes"] == 0
                          for x in t.values()) else None


def test_two_zones_failover_to_the_metro_site_keeps_the_far_one_then_back(lab3_e2e, cinder3):
    lab, cinder = lab3_e2e, cinder3
    caps = pool_capabilities(cinder)
    assert caps.get("replication_count") == "2", caps
    assert "far" in caps.get("replication_target_azs", "") \
        and "metro" in caps.get("replication_target_azs", ""), caps

    cinder.cli("type-create", "ember-both")
    cinder.cli("type-key", "ember-both", "set", "replication_enabled=<is> True")
    cinder.cli("type-create", "ember-far")
    cinder.cli("type-key", "ember-far", "set", "replication_enabled=<is> True",
               "ember:replication_target_az=far")
    cinder.cli("create", "--volume-type", "ember-both", "--name", "e3-both", "1")
    cinder.cli("create", "--volume-type", "ember-far", "--name", "e3-far", "1")
    both = volume_status(cinder, "e3-both", "available")
    far = volume_status(cinder, "e3-far", "available")
    assert both["status"] == "available" and far["status"] == "available", (both, far)
    assert both["replication_status"] == "enabled", both
    name, far_name = f"volume-{both['id']}", f"volume-{far['id']}"

    # Unpinned: both sites, each in its device's mode; pinned: far only.
    t = targets(lab, "site-a", name)
    assert sorted(t) == ["site-b", "site-c"], t
    assert t["site-b"]["mode"] == "sync" and t["site-c"]["mode"] == "async", t
    assert sorted(targets(lab, "site-a", far_name)) == ["site-c"]
    assert replica_state(lab, "site-b", far_name) == {}, "a far-only volume reached site-b"

    uri = {s: f"nbd://{lab[s]['nbd']}/{name}" for s in ("site-a", "site-b", "site-c")}
    assert qemu_io(uri["site-a"], "write -P 0x5a 0 1M").returncode == 0
    wait_for("both targets in sync", lambda: all_in_sync(lab, "site-a", name))

    cinder.cli("failover-host", cinder.backend, "--backend_id", "site-b")
    svc = wait_for("failed over", lambda: (
        lambda s: s if s["replication_status"] == "failed-over" else None)(service(cinder)))
    assert svc["active_backend_id"] == "site-b", svc
    assert show(cinder, "e3-both")["replication_status"] == "failed-over"
    assert show(cinder, "e3-far")["status"] == "error", "a volume without a replica on site-b"
    assert replica_state(lab, "site-b", name)["role"] == "primary"
    # failover_host returned only once site-c followed site-b.
    c_state = replica_state(lab, "site-c", name)
    assert c_state.get("role") == "secondary" and c_state.get("peer") == "site-b", c_state
    # site-c now replicates from site-b (re-homed, not copied again).
    assert "site-c" in targets(lab, "site-b", name), replica_state(lab, "site-b", name)
    assert holds(uri["site-b"], "0x5a", "0"), "the promoted site lacks the data"
    assert qemu_io(uri["site-b"], "write -P 0x6b 1M 1M").returncode == 0
    synced = wait_for("site-b's targets in sync", lambda: all_in_sync(lab, "site-b", name))
    assert synced["site-c"]["resync_bytes_sent"] <= 4 << 20, synced
    assert holds(uri["site-c"], "0x6b", "1M"), "a write on site-b did not reach site-c"

    cinder.cli("failover-host", cinder.backend, "--backend_id", "default")
    wait_for("failed back", lambda: (
        lambda s: s if s["replication_status"] == "enabled" else None)(service(cinder)))
    assert show(cinder, "e3-both")["replication_status"] == "enabled"
    assert replica_state(lab, "site-a", name)["role"] == "primary"
    assert holds(uri["site-a"], "0x5a", "0") and holds(uri["site-a"], "0x6b", "1M"), \
        "the original primary lacks data written before or after the failover"
    assert qemu_io(uri["site-a"], "write -P 0x01 2M 4k").returncode == 0
    assert sorted(targets(lab, "site-a", name)) == ["site-b", "site-c"], \
        replica_state(lab, "site-a", name)
