"""Several replication targets per backend (issue 14): every volume of a
replicated type goes to every `replication_device`, unless its type's
`ember:replication_target_az` narrows the list to the devices in those
availability zones; stats report the targets and their zones truthfully.

The first tests are pure (parsing and target selection); the others run the
real driver against a real three-site lab (three emberd processes, every two
paired over mutual TLS) and the real cinder package."""
import pytest
from cinder import exception
from cinder.objects import fields

from conftest import make_driver, volume, volume_type
from ember_cinder import failover, replication
from ember_cinder._proto import control_pb2 as pb


def devices(lab3, **zones):
    """replication_device entries for site-b (metro, sync) and site-c (far,
    async), with the availability zones given (default metro/far)."""
    zones = {"site-b": "metro", "site-c": "far", **zones}
    return [
        {"backend_id": "site-b", "endpoint": lab3["site-b"]["api"], "mode": "sync",
         "availability_zone": zones["site-b"]},
        {"backend_id": "site-c", "endpoint": lab3["site-c"]["api"], "mode": "async",
         "rpo_seconds": "20", "availability_zone": zones["site-c"]},
    ]


T = replication.Target
PAIR = [T("b", "unix:/b", mode="sync", availability_zone="metro"),
        T("c", "unix:/c", availability_zone="far"),
        T("d", "unix:/d")]


@pytest.mark.parametrize("spec, picked", [
    (None, ["b", "c", "d"]),                       # no spec: every target
    ("", ["b", "c", "d"]),
    ("far", ["c"]),
    ("metro,far", ["b", "c"]),
    (" far , metro ", ["b", "c"]),
    ("<in> far", ["c"]),                            # the scheduler's form
])
def test_a_type_picks_its_targets_by_zone(spec, picked):
    specs = {} if spec is None else {"ember:replication_target_az": spec}
    assert [t.backend_id for t in replication.select_targets(PAIR, specs)] == picked


@pytest.mark.parametrize("spec, complaint", [
    ("nowhere", "nowhere"),
    ("far,moon", "moon"),
    (",", "names no availability zone"),
])
def test_a_zone_no_target_serves_is_refused_naming_it(spec, complaint):
    with pytest.raises(exception.InvalidInput) as e:
        replication.select_targets(PAIR, {"ember:replication_target_az": spec})
    assert complaint in str(e.value)
    if complaint != "names no availability zone":
        assert "far, metro" in str(e.value)  # what the backend does serve


class _S:
    def __init__(self, role, peer_site):
        self.role, self.peer_site = role, peer_site


@pytest.mark.parametrize("states, pending", [
    ({}, [("v", "c"), ("w", "c")]),                              # nobody answered
    ({("v", "c"): _S("secondary", "a"), ("w", "c"): _S("secondary", "b")},
     [("v", "c")]),                                             # v still follows a
    ({("v", "c"): _S("secondary", "b"), ("w", "c"): _S("secondary", "b")}, []),
    ({("v", "c"): _S("primary", "b"), ("w", "c"): None},
     [("v", "c"), ("w", "c")]),                                 # not a follower
])
def test_failover_waits_until_every_other_target_follows_the_new_primary(states, pending):
    expected = {("v", "c"): "b", ("w", "c"): "b"}
    assert failover.rehome_pending(expected, states) == pending


def test_zones_are_parsed_and_reported_once_each():
    targets = replication.parse_devices([
        {"backend_id": "b", "endpoint": "unix:/b", "availability_zone": "az2"},
        {"backend_id": "c", "endpoint": "unix:/c", "availability_zone": "az3"},
        {"backend_id": "d", "endpoint": "unix:/d", "availability_zone": "az3"},
        {"backend_id": "e", "endpoint": "unix:/e"},
    ])
    assert [t.availability_zone for t in targets] == ["az2", "az3", "az3", ""]
    assert replication.target_zones(targets) == ["az2", "az3"]
    with pytest.raises(exception.InvalidConfigurationValue):
        replication.parse_devices([{"backend_id": "b", "endpoint": "unix:/b",
                                    "availability_zone": "az2;az3 x"}])


def targets_of(client, name):
    s = client.raw("GetReplicationStatus",
                   pb.GetReplicationStatusRequest(volume=name)).status
    return {t.peer_site: t for t in s.targets}


def test_a_replicated_type_goes_to_every_device_in_its_mode(lab3, ctx):
    drv = make_driver(lab3, devices=devices(lab3))
    drv._update_volume_stats()
    stats = drv._stats
    assert stats["replication_targets"] == ["site-b", "site-c"]
    assert stats["replication_count"] == 2
    assert stats["replication_target_azs"] == ["far", "metro"]
    assert stats["replication_type"] == ["async", "sync"]

    vol = volume(ctx, vtype=volume_type(ctx, replication_enabled="<is> True"))
    assert drv.create_volume(vol)["replication_status"] == fields.ReplicationStatus.ENABLED
    got = targets_of(drv._primary, vol.name)
    assert sorted(got) == ["site-b", "site-c"]
    assert got["site-b"].mode == "sync" and got["site-c"].mode == "async"
    # Both secondaries exist, each on its own site. Enabling returns once
    # the targets are recorded; each target's session then creates its
    # secondary on its own (an async one can be a moment behind), so wait
    # for both to be in sync before asking the sites.
    wait_in_sync(drv._primary, vol.name)
    for site in ("site-b", "site-c"):
        s = drv._clients[site].raw("GetReplicationStatus",
                                   pb.GetReplicationStatusRequest(volume=vol.name)).status
        assert s.role == "secondary", f"{site}: {s}"

    # Deleting the volume removes every target and both secondaries.
    drv.delete_volume(vol)
    for site in ("site-b", "site-c"):
        listed = drv._clients[site].raw("ListVolumes", pb.ListVolumesRequest()).volumes
        assert vol.name not in [v.name for v in listed], site


def test_a_type_naming_a_zone_replicates_only_there(lab3, ctx):
    drv = make_driver(lab3, devices=devices(lab3))
    far = volume_type(ctx, replication_enabled="<is> True",
                      **{"ember:replication_target_az": "far"})
    vol = volume(ctx, vtype=far)
    drv.create_volume(vol)
    assert sorted(targets_of(drv._primary, vol.name)) == ["site-c"]
    listed = drv._clients["site-b"].raw("ListVolumes", pb.ListVolumesRequest()).volumes
    assert vol.name not in [v.name for v in listed]
    drv.delete_volume(vol)


def test_a_type_naming_a_zone_without_a_device_fails_at_create(lab3, ctx):
    drv = make_driver(lab3, devices=devices(lab3))
    moon = volume_type(ctx, replication_enabled="<is> True",
                       **{"ember:replication_target_az": "moon"})
    vol = volume(ctx, vtype=moon)
    with pytest.raises(exception.InvalidInput) as e:
        drv.create_volume(vol)
    assert "moon" in str(e.value) and "far, metro" in str(e.value)
    # Refused before anything was made.
    listed = drv._primary.raw("ListVolumes", pb.ListVolumesRequest()).volumes
    assert vol.name not in [v.name for v in listed]


def status(client, name):
    return client.raw("GetReplicationStatus",
                      pb.GetReplicationStatusRequest(volume=name)).status


def wait_in_sync(client, name, timeout=30):
    import time
    deadline = time.monotonic() + timeout
    while True:
        s = status(client, name)
        if s.targets and all(t.state == "in-sync" and t.lag_bytes == 0 for t in s.targets):
            return s
        assert time.monotonic() < deadline, f"{name} not in sync: {s}"
        time.sleep(0.1)


def test_failover_to_any_target_keeps_the_others_then_x_to_y_then_back(own_lab3, ctx):
    """failover_host(site-b) promotes the volumes with a replica there and
    the far site follows site-b without a copy; a volume of a far-only type
    has no replica on site-b and goes to error; a second failover (site-b
    to site-c) works; failback to default brings site-a back as primary."""
    import subprocess
    from conftest import require
    require("qemu-io")
    lab = own_lab3
    drv = make_driver(lab, devices=devices(lab))
    both = volume(ctx, vtype=volume_type(ctx, replication_enabled="<is> True"))
    both.replication_status = drv.create_volume(both)["replication_status"]
    far = volume(ctx, vtype=volume_type(ctx, replication_enabled="<is> True",
                                        **{"ember:replication_target_az": "far"}))
    far.replication_status = drv.create_volume(far)["replication_status"]

    def io(uri, *cmds, ro=False):
        out = subprocess.run(["qemu-io", "-f", "raw", *(["-r"] if ro else []),
                              *sum((["-c", c] for c in cmds), []), uri],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, \
            out.stdout + out.stderr
        return out

    def uri(client, name):
        return client.raw("GetVolume", pb.GetVolumeRequest(name=name)).volume.nbd_uri

    a, b, c = drv._primary, drv._clients["site-b"], drv._clients["site-c"]
    io(uri(a, both.name), "write -P 0x11 0 1M")
    wait_in_sync(a, both.name)

    active, updates, _ = drv.failover_host(ctx, [both, far], "site-b")
    assert active == "site-b"
    by_id = {u["volume_id"]: u["updates"] for u in updates}
    assert by_id[both.id] == {"replication_status": fields.ReplicationStatus.FAILED_OVER}
    assert by_id[far.id] == {"status": "error"}  # no replica on site-b
    both.replication_status = fields.ReplicationStatus.FAILED_OVER
    s = status(b, both.name)
    assert s.role == "primary"
    # site-c now follows site-b (and site-a too, as the old primary), by
    # the time failover_host returned: it waits for the re-homing.
    assert "site-c" in {t.peer_site for t in s.targets}, s
    sc = status(c, both.name)
    assert sc.role == "secondary" and sc.peer_site == "site-b", sc
    io(uri(b, both.name), "read -P 0x11 0 1M", "write -P 0x22 1M 1M")
    s = wait_in_sync(b, both.name)
    resent = {t.peer_site: t.resync_bytes_sent for t in s.targets}
    io(uri(c, both.name), "read -P 0x22 1M 1M", ro=True)  # site-c's secondary

    # A second failover, site-b to site-c: no failback needed first.
    active, updates, _ = drv.failover_host(ctx, [both], "site-c")
    assert active == "site-c"
    assert updates[0]["updates"] == {"replication_status": fields.ReplicationStatus.FAILED_OVER}
    assert status(c, both.name).role == "primary"
    io(uri(c, both.name), "read -P 0x22 1M 1M", "write -P 0x33 2M 1M")
    wait_in_sync(c, both.name)

    # Back to site-a.
    active, updates, _ = drv.failover_host(ctx, [both], "default")
    assert active == "default"
    assert updates[0]["updates"] == {"replication_status": fields.ReplicationStatus.ENABLED}
    s = status(a, both.name)
    assert s.role == "primary"
    io(uri(a, both.name), "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x33 2M 1M")
    # Re-homing never copied the volume again (1 GiB): at most what changed.
    assert all(v <= 4 << 20 for v in resent.values()), resent


def test_a_forced_failover_returns_once_the_other_target_follows_the_new_primary(own_lab3, ctx):
    """site-a killed: failover_host(site-b) force-promotes, and site-b
    re-homes site-c in the background (about a second later); the driver
    waits for it, so when failover_host returns site-c already follows
    site-b."""
    import json
    import os
    import signal
    import time
    lab = own_lab3
    drv = make_driver(lab, devices=devices(lab))
    vol = volume(ctx, vtype=volume_type(ctx, replication_enabled="<is> True"))
    vol.replication_status = drv.create_volume(vol)["replication_status"]
    a, c = drv._primary, drv._clients["site-c"]
    wait_in_sync(a, vol.name)
    # site-b must have heard of site-c from site-a (announced once a
    # second): a forced promotion re-homes only the targets it knows of.
    ring = os.path.join(lab["dir"], "site-b", "replicas", "secondary", "marks",
                        f"{vol.name}.json")
    deadline = time.monotonic() + 30
    while not (os.path.exists(ring) and len(json.load(open(ring))["siblings"]) == 2):
        assert time.monotonic() < deadline, "site-b never learned of site-c"
        time.sleep(0.1)
    os.kill(lab["site-a"]["pid"], signal.SIGKILL)

    active, updates, _ = drv.failover_host(ctx, [vol], "site-b")
    assert active == "site-b"
    assert updates[0]["updates"] == {
        "replication_status": fields.ReplicationStatus.FAILED_OVER}, updates
    assert status(drv._clients["site-b"], vol.name).recovery_point_unix_ns > 0, "not forced"
    sc = status(c, vol.name)
    assert sc.role == "secondary" and sc.peer_site == "site-b", sc
