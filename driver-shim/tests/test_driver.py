"""The Ember Cinder driver against two real agents (a paired lab) and the
real cinder 29.0.0 package: every driver method, stats keys and types,
replication_device parsing, failover of a mix of replicated and
non-replicated volumes, failback, and group replication."""
import subprocess
import time
import uuid

import pytest
from cinder import exception
from cinder.objects import fields

from conftest import make_driver, require, snapshot, volume, volume_type
from ember_cinder._proto import control_pb2 as pb

GiB = 1 << 30


def qemu_io(uri, *cmds, read_only=False):
    require("qemu-io")
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    return subprocess.run(args + [uri], capture_output=True, text=True)


def write(uri, pattern, offset="0", length="64k"):
    out = qemu_io(uri, f"write -P {pattern} {offset} {length}")
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout, out.stdout


def holds(uri, pattern, offset="0", length="64k"):
    out = qemu_io(uri, f"read -P {pattern} {offset} {length}", read_only=True)
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout


def uri_of(drv, vol):
    return drv.initialize_connection(vol, {})["data"]["nbd_uri"]


def status(client, name):
    return client.raw("GetReplicationStatus",
                      pb.GetReplicationStatusRequest(volume=name)).status


def wait_in_sync(client, name, timeout=60):
    deadline = time.time() + timeout
    while True:
        s = status(client, name)
        if s.role == "primary" and s.state == "in-sync" and s.lag_bytes == 0:
            return s
        assert time.time() < deadline, f"{name} not in sync: {s}"
        time.sleep(0.2)


def test_stats_report_replication_capabilities(lab):
    drv = make_driver(lab)
    stats = drv.get_volume_stats(refresh=True)
    assert stats["backend_state"] == "up"
    assert stats["volume_backend_name"] == "ember-a"
    assert stats["vendor_name"] == "Ember"
    assert stats["driver_version"] == drv.VERSION
    assert isinstance(stats["total_capacity_gb"], float) and stats["total_capacity_gb"] > 0
    assert 0 < stats["free_capacity_gb"] <= stats["total_capacity_gb"]
    assert stats["replication_enabled"] is True
    assert stats["replication_targets"] == ["site-b"]
    assert stats["replication_count"] == 1
    # Loopback: sync is possible, so the lowest RPO is 0.
    assert stats["replication_type"] == ["async", "sync"]
    assert stats["replication_rpo_min_seconds"] == 0
    assert isinstance(stats["replication_rpo_max_seconds"], int)
    assert stats["replication_rpo_max_seconds"] > 30
    assert stats["consistent_group_replication_enabled"] is True
    assert stats["replication_status"] == fields.ReplicationStatus.ENABLED
    # Cinder's own check that the replication methods are implemented.
    assert drv.supports_replication_feature("v2.1")
    assert drv.supports_replication_feature("a/a")


def test_an_unreachable_agent_reports_the_backend_down_instead_of_raising(lab, tmp_path):
    drv = make_driver(lab, endpoint=f"unix:{tmp_path}/nothing.sock")
    stats = drv.get_volume_stats(refresh=True)
    assert stats["backend_state"] == "down"
    assert stats["total_capacity_gb"] == 0


@pytest.mark.parametrize("device, complaint", [
    ({"endpoint": "unix:/x"}, "backend_id is missing"),
    ({"backend_id": "site-b"}, "endpoint is missing"),
    ({"backend_id": "site-b", "endpoint": "no-port"}, "not unix:/path or host:port"),
    ({"backend_id": "site-b", "endpoint": "host:99999"}, "not unix:/path or host:port"),
    ({"backend_id": "site-b", "endpoint": "unix:/x", "mode": "semi"}, "not sync or async"),
    ({"backend_id": "site-b", "endpoint": "unix:/x", "rpo_seconds": "soon"}, "whole number"),
    ({"backend_id": "site-b", "endpoint": "h:1", "tls_ca": "/ca"}, "go together"),
    ({"backend_id": "default", "endpoint": "unix:/x"}, "names the primary"),
])
def test_odd_replication_devices_are_refused_with_the_reason(lab, device, complaint):
    with pytest.raises(exception.InvalidConfigurationValue) as e:
        make_driver(lab, devices=[device])
    assert complaint in str(e.value)


def test_volume_snapshot_clone_extend_and_export(lab, ctx):
    drv = make_driver(lab)
    plain = volume_type(ctx)
    vol = volume(ctx, size=1, vtype=plain)
    update = drv.create_volume(vol)
    assert update["replication_status"] == fields.ReplicationStatus.DISABLED
    assert update["provider_location"] == f"ember:{vol.name}"
    # Created twice (a retried RPC) is the same volume.
    drv.create_volume(vol)
    uri = uri_of(drv, vol)
    info = drv.initialize_connection(vol, {"host": "compute-1"})
    assert info["driver_volume_type"] == "nbd"
    assert info["data"]["export_name"] == vol.name
    write(uri, "0x5a")
    drv.create_export(ctx, vol, {})
    drv.ensure_export(ctx, vol)

    snap = snapshot(ctx, vol)
    drv.create_snapshot(snap)
    write(uri, "0x66")  # after the snapshot

    from_snap = volume(ctx, size=2, vtype=plain)
    drv.create_volume_from_snapshot(from_snap, snap)
    assert holds(uri_of(drv, from_snap), "0x5a"), "the snapshot's data is missing"
    size = drv._agent.raw("GetVolume", pb.GetVolumeRequest(name=from_snap.name)).volume.size_bytes
    assert size == 2 * GiB, "a volume from a 1 GiB snapshot was not grown to 2 GiB"

    clone = volume(ctx, size=1, vtype=plain)
    drv.create_cloned_volume(clone, vol)
    assert holds(uri_of(drv, clone), "0x66")

    drv.extend_volume(vol, 3)
    size = drv._agent.raw("GetVolume", pb.GetVolumeRequest(name=vol.name)).volume.size_bytes
    assert size == 3 * GiB
    assert holds(uri, "0x66"), "extend lost data"

    drv.terminate_connection(vol, {})
    drv.remove_export(ctx, vol)
    drv.delete_snapshot(snap)
    drv.delete_snapshot(snap)  # missing is success
    for v in (vol, from_snap, clone):
        drv.delete_volume(v)
        drv.delete_volume(v)  # missing is success
    with pytest.raises(exception.VolumeBackendAPIException):
        drv._agent.call("GetVolume", pb.GetVolumeRequest(name=vol.name), "look up")


def test_bad_requests_get_cinder_exceptions(lab, ctx):
    drv = make_driver(lab)
    bad = volume_type(ctx, replication_enabled="<is> True",
                      **{"ember:replication_mode": "<in> sync"})
    with pytest.raises(exception.InvalidInput) as e:
        drv.create_volume(volume(ctx, vtype=bad))
    assert "sync or async" in str(e.value)
    vol = volume(ctx, size=2, vtype=volume_type(ctx))
    drv.create_volume(vol)
    with pytest.raises(exception.VolumeBackendAPIException) as e:
        drv.extend_volume(vol, 1)  # shrinking
    assert "Ember agent" in str(e.value)
    drv.delete_volume(vol)


def test_failover_of_a_mix_then_failback(lab, ctx):
    drv = make_driver(lab)
    repl = volume_type(ctx, replication_enabled="<is> True",
                       **{"ember:replication_mode": "async", "ember:rpo_seconds": "15"})
    rvol = volume(ctx, vtype=repl)
    update = drv.create_volume(rvol)
    assert update["replication_status"] == fields.ReplicationStatus.ENABLED
    rvol.replication_status = update["replication_status"]
    s = status(drv._primary, rvol.name)
    assert (s.mode, s.rpo_seconds, s.peer_site) == ("async", 15, "site-b")
    plain = volume(ctx, vtype=volume_type(ctx))
    plain.replication_status = drv.create_volume(plain)["replication_status"]
    write(uri_of(drv, rvol), "0x11")
    wait_in_sync(drv._primary, rvol.name)
    # Extending a replicated volume grows its secondary too.
    drv.extend_volume(rvol, 2)
    for client in (drv._primary, drv._clients["site-b"]):
        got = client.raw("GetVolume", pb.GetVolumeRequest(name=rvol.name)).volume
        assert got.size_bytes == 2 * GiB, f"{client.endpoint}: {got.size_bytes}"

    # No target named: the driver picks the reachable one with least lag.
    active, vol_updates, group_updates = drv.failover_host(ctx, [rvol, plain])
    assert active == "site-b"
    assert group_updates == []
    by_id = {u["volume_id"]: u["updates"] for u in vol_updates}
    assert by_id[rvol.id] == {"replication_status": fields.ReplicationStatus.FAILED_OVER}
    assert by_id[plain.id] == {"status": "error"}
    rvol.replication_status = fields.ReplicationStatus.FAILED_OVER

    # The promoted secondary serves the data and takes writes.
    b_uri = uri_of(drv, rvol)
    assert lab["site-b"]["nbd"] in b_uri, f"{b_uri} is not served by site-b"
    assert status(drv._clients["site-b"], rvol.name).role == "primary"
    assert holds(b_uri, "0x11")
    write(b_uri, "0x22", "1M")
    with pytest.raises(exception.InvalidReplicationTarget):
        drv.failover_host(ctx, [rvol], "site-b")  # already failed over

    # A restarted cinder-volume comes back with the target's id.
    again = make_driver(lab, active_backend_id="site-b")
    assert again._agent is again._clients["site-b"]

    wait_in_sync(drv._clients["site-b"], rvol.name)
    active, vol_updates, _ = drv.failover_host(ctx, [rvol, plain], "default")
    assert active == "default"
    assert vol_updates == [{"volume_id": rvol.id, "updates": {
        "replication_status": fields.ReplicationStatus.ENABLED}}]
    a_uri = uri_of(drv, rvol)
    assert holds(a_uri, "0x11") and holds(a_uri, "0x22", "1M")
    assert status(drv._primary, rvol.name).role == "primary"
    drv.delete_volume(rvol)
    drv.delete_volume(plain)


def test_failover_to_an_unknown_target_is_refused(lab, ctx):
    drv = make_driver(lab)
    with pytest.raises(exception.InvalidReplicationTarget):
        drv.failover_host(ctx, [], "site-z")
    with pytest.raises(exception.InvalidReplicationTarget):
        drv.failover_host(ctx, [], "default")  # not failed over


def test_group_replication_fails_over_and_back_as_one(lab, ctx):
    from cinder import objects
    drv = make_driver(lab)
    repl = volume_type(ctx, replication_enabled="<is> True")
    vols = []
    for _ in range(2):
        v = volume(ctx, vtype=repl)
        v.replication_status = drv.create_volume(v)["replication_status"]
        vols.append(v)
    group = objects.Group(context=ctx, id=str(uuid.uuid4()))
    model, updates = drv.enable_replication(ctx, group, vols)
    assert model == {"replication_status": fields.ReplicationStatus.ENABLED}
    assert [u["id"] for u in updates] == [v.id for v in vols]
    g = drv._primary.raw("GetGroupStatus", pb.GetGroupStatusRequest(
        name=f"group-{group.id}")).status
    assert sorted(m.volume for m in g.members) == sorted(v.name for v in vols)
    for i, v in enumerate(vols):
        write(uri_of(drv, v), f"0x{0x30 + i:x}")
    for v in vols:
        wait_in_sync(drv._primary, v.name)

    model, _ = drv.failover_replication(ctx, group, vols, "site-b")
    assert model == {"replication_status": fields.ReplicationStatus.FAILED_OVER}
    b = drv._clients["site-b"].raw("GetGroupStatus", pb.GetGroupStatusRequest(
        name=f"group-{group.id}")).status
    assert b.role == "primary" and len(b.members) == 2
    model, _ = drv.failover_replication(ctx, group, vols, "default")
    assert model == {"replication_status": fields.ReplicationStatus.ENABLED}
    a = drv._primary.raw("GetGroupStatus", pb.GetGroupStatusRequest(
        name=f"group-{group.id}")).status
    assert a.role == "primary"
    for i, v in enumerate(vols):
        assert holds(uri_of(drv, v), f"0x{0x30 + i:x}")
    model, _ = drv.disable_replication(ctx, group, vols)
    assert model == {"replication_status": fields.ReplicationStatus.DISABLED}
    for v in vols:
        drv.delete_volume(v)
    assert drv.get_replication_error_status(ctx, []) == ([], [])


def test_active_active_failover_switches_only_when_completed(lab, ctx):
    drv = make_driver(lab)
    assert drv.freeze_backend(ctx) is True
    assert drv.thaw_backend(ctx) is True
    active, updates, _ = drv.failover(ctx, [], "site-b")
    assert (active, updates) == ("site-b", [])
    assert drv._agent is drv._primary, "failover() switched before failover_completed()"
    drv.failover_completed(ctx, "site-b")
    assert drv._agent is drv._clients["site-b"]
    drv.failover_completed(ctx, "default")
    assert drv._agent is drv._primary


def test_failover_when_the_primary_site_is_gone_is_forced(own_lab, ctx):
    import os
    import signal
    drv = make_driver(own_lab)
    repl = volume_type(ctx, replication_enabled="<is> True")
    vol = volume(ctx, vtype=repl)
    vol.replication_status = drv.create_volume(vol)["replication_status"]
    write(uri_of(drv, vol), "0x77")
    wait_in_sync(drv._primary, vol.name)
    os.kill(own_lab["site-a"]["pid"], signal.SIGKILL)
    assert drv.get_volume_stats(refresh=True)["backend_state"] == "down"

    active, updates, _ = drv.failover_host(ctx, [vol], "site-b")
    assert active == "site-b"
    assert updates == [{"volume_id": vol.id, "updates": {
        "replication_status": fields.ReplicationStatus.FAILED_OVER}}]
    s = status(drv._clients["site-b"], vol.name)
    assert s.role == "primary"
    assert s.recovery_point_unix_ns > 0, "a forced promotion reports its recovery point"
    assert holds(uri_of(drv, vol), "0x77")


def test_a_split_brain_replica_is_reported_to_cinder_until_resolved(own_lab, ctx):
    """Split-brain staged for real: replication paused, a write on site-a,
    site-b force-promoted, replication resumed; both sides hold writes the
    other lacks and the agents refuse to pick a winner."""
    def ctl(site, *args):
        out = subprocess.run([own_lab["ctl"], "--api", own_lab[site]["api"], *args],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    drv = make_driver(own_lab)
    vol = volume(ctx, vtype=volume_type(ctx, replication_enabled="<is> True"))
    drv.create_volume(vol)
    wait_in_sync(drv._primary, vol.name)
    assert drv.get_replication_error_status(ctx, []) == ([], [])

    ctl("site-a", "replica", "pause", vol.name)
    write(uri_of(drv, vol), "0xaa")
    ctl("site-b", "replica", "promote", vol.name, "--force")
    ctl("site-a", "replica", "resume", vol.name)
    deadline = time.time() + 30
    while status(drv._primary, vol.name).state != "split-brain":
        assert time.time() < deadline, status(drv._primary, vol.name)
        time.sleep(0.2)

    stats = drv.get_volume_stats(refresh=True)
    assert stats["replication_status"] == fields.ReplicationStatus.ERROR, stats
    assert drv.get_replication_error_status(ctx, []) == ([], [{
        "volume_id": vol.id, "replication_status": fields.ReplicationStatus.ERROR}])

    # The admin names the loser: site-a's write is discarded, site-a
    # follows site-b, and Cinder no longer hears of an error.
    ctl("site-a", "replica", "demote", vol.name, "--discard-local")
    assert drv.get_replication_error_status(ctx, []) == ([], [])
    assert drv.get_volume_stats(refresh=True)["replication_status"] == \
        fields.ReplicationStatus.ENABLED
