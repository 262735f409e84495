"""manage_existing / unmanage (volumes and snapshots) of the Ember driver:
the pure decisions table-tested, then the driver against real agents (a
paired lab; drills need a data dir that can reflink, so those labs run on
a loop-mounted XFS), then a real Cinder with a second backend for the DR
site's agent: `cinder manage` of an agent volume and of a DR drill
volume, the data read back through a Cinder attachment, `cinder unmanage`
leaving the agent volume intact.

Where a driver test has no Cinder database (conftest's drivers are
built without one), `_my_cinder_volumes`/`_my_cinder_snapshots` are given
the Cinder objects that stand for "already managed"; the real-Cinder
tests run the real database query."""
import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest
from cinder import exception
from cinder.objects import fields

from cinder_services import Cinder, start_or_report
from conftest import bin_dir, make_driver, require, snapshot, volume, volume_type
from ember_cinder import manage
from ember_cinder import replication
from ember_cinder._proto import control_pb2 as pb
from ember_cinder.manage import AgentVolume

GiB = 1 << 30
MiB = 1 << 20


# ---- helpers ----------------------------------------------------------------

def ctl(lab, site, *args, check=True):
    out = subprocess.run([lab["ctl"], "--api", lab[site]["api"], *args],
                         capture_output=True, text=True)
    if check:
        assert out.returncode == 0, f"emberctl {' '.join(args)}: {out.stderr}"
    return out


def qemu_io(uri, cmd, read_only=False):
    require("qemu-io")
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else []) + ["-c", cmd, uri]
    return subprocess.run(args, capture_output=True, text=True)


def write(uri, pattern, offset="0", length="1M"):
    out = qemu_io(uri, f"write -P {pattern} {offset} {length}")
    assert out.returncode == 0 and "wrote" in out.stdout, out.stderr + out.stdout


def holds(uri, pattern, offset="0", length="1M"):
    out = qemu_io(uri, f"read -P {pattern} {offset} {length}", read_only=True)
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout


def libnbd_read(uri, offset, length):
    """Bytes read with python3-libnbd (Debian's, so the system python)."""
    require("/usr/bin/python3")
    code = ("import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); "
            "sys.stdout.buffer.write(h.pread(int(sys.argv[3]), int(sys.argv[2])))")
    out = subprocess.run(["/usr/bin/python3", "-c", code, uri, str(offset), str(length)],
                         capture_output=True)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out.stdout


def agent_volume(client, name):
    return client.raw("GetVolume", pb.GetVolumeRequest(name=name)).volume


def agent_has(client, name):
    names = [v.name for v in client.raw("ListVolumes", pb.ListVolumesRequest()).volumes]
    return name in names


def wait_in_sync(lab, site, name, timeout=60):
    deadline = time.time() + timeout
    while True:
        s = json.loads(ctl(lab, site, "replica", "status", name, "--json").stdout)
        if s.get("state") == "in-sync" and s.get("lag_bytes") == 0:
            return s
        assert time.time() < deadline, f"{name} not in sync: {s}"
        time.sleep(0.2)


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def no_db(drv, volumes=(), snapshots=()):
    """Stands in for Cinder's database: these objects are this backend's."""
    drv._my_cinder_volumes = lambda ctxt: list(volumes)
    drv._my_cinder_snapshots = lambda ctxt: list(snapshots)
    return drv


def dr_driver(lab, **kw):
    """A driver for the DR site (site-b's agent; site-a its replication
    target), as the runbook's DR backend is configured."""
    return make_driver(lab, endpoint=lab["site-b"]["api"],
                       devices=[{"backend_id": "site-a", "endpoint": lab["site-a"]["api"]}],
                       **kw)


def adopt(vol, update):
    """Applies a manage model update to a fake volume, as Cinder does."""
    for k, v in update.items():
        setattr(vol, k, v)
    return vol


@contextlib.contextmanager
def xfs_dir(size="3G"):
    """A loop-mounted XFS (reflink=1, mkfs.xfs's default): drills need a
    data dir that can reflink."""
    require("mkfs.xfs")
    base = tempfile.mkdtemp(prefix="ember-shim-xfs-")
    img, mnt = os.path.join(base, "fs.img"), os.path.join(base, "mnt")
    os.mkdir(mnt)
    subprocess.run(["truncate", "-s", size, img], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", img], check=True)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def xfs_lab():
    """A paired lab whose data dirs are on XFS."""
    with xfs_dir() as mnt:
        d = os.path.join(mnt, "lab")
        os.mkdir(d)
        emberctl = str(bin_dir() / "emberctl")
        subprocess.run([emberctl, "lab", "up", "--dir", d, "--detach", "--size", "16M"],
                       check=True, capture_output=True)
        sites = json.loads(pathlib.Path(d, "lab.json").read_text())["sites"]
        try:
            yield {"dir": d, "ctl": emberctl, **sites}
        finally:
            subprocess.run([emberctl, "lab", "down", "--dir", d], capture_output=True)


def replicated_1g(lab, name, pattern):
    """A 1 GiB volume on site-a replicated to site-b, `pattern` in its first
    MiB, in sync."""
    ctl(lab, "site-a", "volume", "create", name, "--size", "1G")
    ctl(lab, "site-a", "replica", "enable", name, "--peer", "site-b", "--mode", "async",
        "--rpo", "30s")
    write(f"nbd://{lab['site-a']['nbd']}/{name}", pattern)
    wait_in_sync(lab, "site-a", name)


def start_drill(lab, volume_name, drill):
    """`emberctl replica drill start VOL --name NAME --json` on the DR site
    (the issue's contract: name, volume, point, nbd_uri)."""
    out = ctl(lab, "site-b", "replica", "drill", "start", volume_name, "--name", drill,
              "--json", check=False)
    if out.returncode != 0 and "unrecognized subcommand" in out.stderr:
        pytest.fail("emberctl has no `replica drill start` (issue 13 item 4): "
                    f"{out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert {"name", "volume", "point", "nbd_uri"} <= set(d), d
    assert d["name"] == drill and d["volume"] == volume_name, d
    return d


# ---- pure decisions -----------------------------------------------------------

NO_REPL = replication.VolumeSpec(enabled=False, mode="async", rpo_seconds=30,
                                 rpo_policy="alert")
ASYNC = replication.VolumeSpec(enabled=True, mode="async", rpo_seconds=30, rpo_policy="alert")
SYNC = replication.VolumeSpec(enabled=True, mode="sync", rpo_seconds=0, rpo_policy="alert")
REF = {"source-name": "v"}


@pytest.mark.parametrize("ref, complaint", [
    ({}, "source-name is missing"),
    ({"source-id": "v"}, "use --id-type source-name"),
    ("v", "must be {'source-name': NAME}"),
    (None, "must be {'source-name': NAME}"),
    ({"source-name": ""}, "must name an agent volume"),
    ({"source-name": "  "}, "must name an agent volume"),
    ({"source-name": 7}, "must name an agent volume"),
])
def test_a_reference_without_a_source_name_is_invalid(ref, complaint):
    with pytest.raises(exception.ManageExistingInvalidReference) as e:
        manage.source_name(ref)
    assert complaint in str(e.value)


def test_a_source_name_is_trimmed():
    assert manage.source_name({"source-name": " drill-1 "}) == "drill-1"


@pytest.mark.parametrize("size_bytes, gib", [
    (0, 1), (1, 1), (16 * MiB, 1), (GiB, 1), (GiB + 1, 2), (5 * GiB, 5),
])
def test_sizes_round_up_to_whole_gib(size_bytes, gib):
    assert manage.size_gib(size_bytes) == gib


@pytest.mark.parametrize("vol, targets, spec, failed_over, expected", [
    # plain volumes: as the type says
    (AgentVolume("v", GiB), {"site-b"}, NO_REPL, False, "disabled"),
    (AgentVolume("v", GiB), {"site-b"}, ASYNC, False, "enable"),
    (AgentVolume("v", GiB), set(), NO_REPL, False, "disabled"),
    # a drill volume may be managed, never replicated
    (AgentVolume("v", GiB, origin="drill:x@newest"), {"site-a"}, NO_REPL, False, "disabled"),
    (AgentVolume("v", GiB, origin="drill:x@newest"), {"site-a"}, ASYNC, False,
     exception.ManageExistingVolumeTypeMismatch),
    # replicated primaries keep their replication
    (AgentVolume("v", GiB, role="primary", peer_site="site-b", mode="async"),
     {"site-b"}, NO_REPL, False, "enabled"),
    (AgentVolume("v", GiB, role="primary", peer_site="site-b", mode="async"),
     {"site-b"}, ASYNC, False, "enabled"),
    (AgentVolume("v", GiB, role="primary", peer_site="site-b", mode="async"),
     {"site-b"}, SYNC, False, exception.ManageExistingVolumeTypeMismatch),
    (AgentVolume("v", GiB, role="primary", peer_site="site-c", mode="async"),
     {"site-b"}, NO_REPL, False, exception.ManageExistingInvalidReference),
    # refused outright
    (None, {"site-b"}, NO_REPL, False, exception.ManageExistingInvalidReference),
    (AgentVolume("v", GiB, role="secondary", peer_site="site-a"), {"site-a"}, NO_REPL,
     False, exception.ManageExistingInvalidReference),
    (AgentVolume("v", GiB, role="weird"), {"site-b"}, NO_REPL, False,
     exception.ManageExistingInvalidReference),
    # a failed-over backend replicates nothing new
    (AgentVolume("v", GiB), {"site-b"}, ASYNC, True, exception.ManageExistingVolumeTypeMismatch),
    (AgentVolume("v", GiB), {"site-b"}, NO_REPL, True, "disabled"),
])
def test_replication_decision(vol, targets, spec, failed_over, expected):
    if isinstance(expected, str):
        assert manage.replication_decision(REF, vol, targets, spec, failed_over) == expected
    else:
        with pytest.raises(expected):
            manage.replication_decision(REF, vol, targets, spec, failed_over)


def test_a_secondary_is_refused_with_the_way_out():
    with pytest.raises(exception.ManageExistingInvalidReference) as e:
        manage.replication_decision(
            REF, AgentVolume("db", GiB, role="secondary", peer_site="site-a"),
            {"site-a"}, NO_REPL, False)
    assert "secondary of site-a" in str(e.value)
    assert "emberctl replica drill start db" in str(e.value)


def test_a_volume_already_managed_is_refused():
    manage.check_not_managed("v", {"w": "id-1"})
    with pytest.raises(exception.ManageExistingAlreadyManaged) as e:
        manage.check_not_managed("v", {"v": "id-2"})
    assert "id-2" in str(e.value)


def test_manageable_volumes_say_what_is_safe():
    vols = [AgentVolume("a", GiB), AgentVolume("b", 16 * MiB, origin="drill:x@p1"),
            AgentVolume("c", 2 * GiB, role="secondary", peer_site="site-a"),
            AgentVolume("d", GiB, role="primary", peer_site="site-b", mode="sync")]
    got = {e["reference"]["source-name"]: e
           for e in manage.manageable_volumes(vols, {"a": "cid-a"})}
    assert (got["a"]["safe_to_manage"], got["a"]["reason_not_safe"],
            got["a"]["cinder_id"]) == (False, "already managed", "cid-a")
    assert (got["b"]["safe_to_manage"], got["b"]["size"], got["b"]["extra_info"]) == \
        (True, 1, {"origin": "drill:x@p1"})
    assert got["c"]["safe_to_manage"] is False
    assert got["c"]["reason_not_safe"] == "replication secondary of site-a"
    assert (got["d"]["safe_to_manage"], got["d"]["extra_info"]) == \
        (True, {"replication": "sync to site-b"})
    assert got["a"]["extra_info"] is None


def test_manageable_snapshots_need_a_managed_volume():
    got = manage.manageable_snapshots(
        [("v", "s1", GiB, "cid-v"), ("v", "s2", GiB, "cid-v"), ("w", "s3", GiB, None)],
        {("v", "s1"): "sid-1"})
    by = {e["reference"]["source-name"]: e for e in got}
    assert (by["s1"]["safe_to_manage"], by["s1"]["cinder_id"]) == (False, "sid-1")
    assert by["s2"]["safe_to_manage"] is True
    assert by["s2"]["source_reference"] == {"source-name": "v"}
    assert by["s3"]["safe_to_manage"] is False and "w" in by["s3"]["reason_not_safe"]


def test_the_agent_name_is_the_adopted_one_when_there_is_one(ctx):
    vol = volume(ctx)
    assert manage.agent_volume_name(vol) == vol.name == f"volume-{vol.id}"
    vol.provider_id = "drill-7"
    assert manage.agent_volume_name(vol) == "drill-7"
    snap = snapshot(ctx, vol)
    assert manage.agent_snapshot_name(snap) == snap.name
    snap.provider_id = "nightly"
    assert manage.agent_snapshot_name(snap) == "nightly"


# ---- the driver against real agents ----------------------------------------------

def test_an_agent_volume_is_managed_used_through_every_path_and_unmanaged_intact(lab, ctx):
    name = unique("ext")
    ctl(lab, "site-a", "volume", "create", name, "--size", "16M")
    write(f"nbd://{lab['site-a']['nbd']}/{name}", "0x3c")
    drv = no_db(make_driver(lab))
    vol = volume(ctx, size=1, vtype=volume_type(ctx))
    ref = {"source-name": name}

    assert drv.manage_existing_get_size(vol, ref) == 1
    update = drv.manage_existing(vol, ref)
    assert update["provider_id"] == name
    assert update["replication_status"] == fields.ReplicationStatus.DISABLED
    adopt(vol, update)
    # Grown to the whole GiB Cinder records, data kept.
    assert agent_volume(drv._agent, name).size_bytes == GiB
    info = drv.initialize_connection(vol, {})
    assert info["data"]["export_name"] == name
    uri = info["data"]["nbd_uri"]
    assert uri == f"nbd://{lab['site-a']['nbd']}/{name}"
    assert libnbd_read(uri, 0, MiB) == b"\x3c" * MiB
    assert not agent_has(drv._agent, vol.name), "a volume-<id> appeared on the agent"

    # Snapshot, volume from snapshot, clone, extend: all by the agent name.
    snap = snapshot(ctx, vol)
    drv.create_snapshot(snap)
    snaps = drv._agent.raw("ListSnapshots", pb.ListSnapshotsRequest(volume=name)).snapshots
    assert [s.name for s in snaps] == [snap.name]
    write(uri, "0x4d")
    from_snap = volume(ctx, size=1, vtype=volume_type(ctx))
    drv.create_volume_from_snapshot(from_snap, snap)
    assert holds(drv.initialize_connection(from_snap, {})["data"]["nbd_uri"], "0x3c")
    clone = volume(ctx, size=1, vtype=volume_type(ctx))
    drv.create_cloned_volume(clone, vol)
    assert holds(drv.initialize_connection(clone, {})["data"]["nbd_uri"], "0x4d")
    drv.extend_volume(vol, 2)
    assert agent_volume(drv._agent, name).size_bytes == 2 * GiB

    # manageable-list knows it is managed now (and by whom).
    listed = {e["reference"]["source-name"]: e for e in
              drv.get_manageable_volumes([vol], None, 1000, 0, ["size"], ["asc"])}
    assert listed[name]["cinder_id"] == vol.id and not listed[name]["safe_to_manage"]
    assert listed[clone.name]["safe_to_manage"], "an unmanaged volume is not listed as safe"

    # Managing it a second time is refused, and changes nothing.
    twice = volume(ctx, size=2, vtype=volume_type(ctx))
    no_db(drv, volumes=[vol])
    with pytest.raises(exception.ManageExistingAlreadyManaged):
        drv.manage_existing(twice, ref)

    drv.unmanage(vol)
    assert agent_volume(drv._agent, name).size_bytes == 2 * GiB
    assert holds(uri, "0x4d"), "unmanage touched the agent volume"

    drv.delete_snapshot(snap)
    assert not drv._agent.raw("ListSnapshots",
                              pb.ListSnapshotsRequest(volume=name)).snapshots
    for v in (from_snap, clone):
        drv.delete_volume(v)
    # Deleting a managed volume deletes the agent volume by its agent name.
    drv.delete_volume(vol)
    assert not agent_has(drv._agent, name)


def test_bad_references_get_the_right_exceptions_and_nothing_changes(lab, ctx):
    name = unique("ext")
    ctl(lab, "site-a", "volume", "create", name, "--size", "16M")
    drv = no_db(make_driver(lab))
    plain = volume_type(ctx)

    def refused(exc, ref, drv=drv, vtype=plain, complaint=""):
        with pytest.raises(exc) as e:
            drv.manage_existing(volume(ctx, vtype=vtype), ref)
        assert complaint in str(e.value)

    refused(exception.ManageExistingInvalidReference, {}, complaint="source-name is missing")
    refused(exception.ManageExistingInvalidReference, {"source-id": name},
            complaint="--id-type source-name")
    refused(exception.ManageExistingInvalidReference, {"source-name": "no-such-volume"},
            complaint="no such volume")
    with pytest.raises(exception.ManageExistingInvalidReference):
        drv.manage_existing_get_size(volume(ctx), {"source-name": "no-such-volume"})
    # The lab's demo volume is replicated site-a -> site-b: on the DR site
    # it is a secondary.
    refused(exception.ManageExistingInvalidReference, {"source-name": "demo"},
            drv=no_db(dr_driver(lab)), complaint="secondary of site-a")
    # On site-a, for a backend without site-b as a replication_device.
    refused(exception.ManageExistingInvalidReference, {"source-name": "demo"},
            drv=no_db(make_driver(lab, devices=[])), complaint="replicated to site-b")
    sync = volume_type(ctx, replication_enabled="<is> True",
                       **{"ember:replication_mode": "sync"})
    refused(exception.ManageExistingVolumeTypeMismatch, {"source-name": "demo"},
            vtype=sync, complaint="replicates async")
    other = volume(ctx)
    other.provider_id = name
    refused(exception.ManageExistingAlreadyManaged, {"source-name": name},
            drv=no_db(make_driver(lab), volumes=[other]))
    # Nothing was grown, replicated or lost.
    assert agent_volume(drv._agent, name).size_bytes == 16 * MiB
    with pytest.raises(exception.VolumeBackendAPIException):
        drv._agent.call("GetReplicationStatus",
                        pb.GetReplicationStatusRequest(volume=name), "status")
    assert agent_has(drv._primary, "demo") and agent_has(drv._clients["site-b"], "demo")
    ctl(lab, "site-a", "volume", "delete", name)


def test_a_managed_volume_of_a_replicated_type_replicates_and_fails_over_by_agent_name(
        own_lab, ctx):
    lab = own_lab
    drv = no_db(make_driver(lab))
    repl = volume_type(ctx, replication_enabled="<is> True",
                       **{"ember:replication_mode": "async"})
    # A plain agent volume managed with a replicated type is replicated
    # now, under its agent name.
    name = unique("ext")
    ctl(lab, "site-a", "volume", "create", name, "--size", "1G")
    fresh = adopt(volume(ctx, vtype=repl), drv.manage_existing(
        volume(ctx, vtype=repl), {"source-name": name}))
    assert fresh.replication_status == fields.ReplicationStatus.ENABLED
    s = drv._primary.raw("GetReplicationStatus",
                         pb.GetReplicationStatusRequest(volume=name)).status
    assert (s.role, s.peer_site) == ("primary", "site-b")

    # The already replicated demo volume keeps its replication.
    demo = volume(ctx, vtype=repl)
    adopt(demo, drv.manage_existing(demo, {"source-name": "demo"}))
    assert demo.replication_status == fields.ReplicationStatus.ENABLED
    write(f"nbd://{lab['site-a']['nbd']}/demo", "0x5e")
    wait_in_sync(lab, "site-a", "demo")
    active, updates, _ = drv.failover_host(ctx, [demo], "site-b")
    assert active == "site-b"
    assert updates == [{"volume_id": demo.id, "updates": {
        "replication_status": fields.ReplicationStatus.FAILED_OVER}}]
    assert json.loads(ctl(lab, "site-b", "replica", "status", "demo",
                          "--json").stdout)["role"] == "primary"
    uri = drv.initialize_connection(demo, {})["data"]["nbd_uri"]
    assert uri == f"nbd://{lab['site-b']['nbd']}/demo" and holds(uri, "0x5e")


def test_a_split_brain_of_a_managed_volume_is_reported_under_its_cinder_id(own_lab, ctx):
    """get_replication_error_status maps the agent name back to the Cinder
    volume (staged as in test_driver: pause, write, force-promote the
    peer, resume)."""
    lab = own_lab
    drv = make_driver(lab)
    repl = volume_type(ctx, replication_enabled="<is> True")
    name = unique("ext")
    ctl(lab, "site-a", "volume", "create", name, "--size", "1G")
    vol = volume(ctx, vtype=repl)
    no_db(drv)
    adopt(vol, drv.manage_existing(vol, {"source-name": name}))
    no_db(drv, volumes=[vol])
    wait_in_sync(lab, "site-a", name)
    ctl(lab, "site-a", "replica", "pause", name)
    write(f"nbd://{lab['site-a']['nbd']}/{name}", "0xaa")
    ctl(lab, "site-b", "replica", "promote", name, "--force")
    ctl(lab, "site-a", "replica", "resume", name)
    deadline = time.time() + 30
    while json.loads(ctl(lab, "site-a", "replica", "status", name,
                         "--json").stdout)["state"] != "split-brain":
        assert time.time() < deadline, "no split-brain"
        time.sleep(0.2)
    assert drv.get_replication_error_status(ctx, []) == ([], [{
        "volume_id": vol.id, "replication_status": fields.ReplicationStatus.ERROR}])


def test_an_agent_snapshot_is_managed_used_and_unmanaged(lab, ctx):
    name = unique("ext")
    ctl(lab, "site-a", "volume", "create", name, "--size", "1G")
    write(f"nbd://{lab['site-a']['nbd']}/{name}", "0x61")
    ctl(lab, "site-a", "snapshot", "create", name, "nightly")
    write(f"nbd://{lab['site-a']['nbd']}/{name}", "0x62")
    drv = no_db(make_driver(lab))
    vol = volume(ctx, vtype=volume_type(ctx))
    adopt(vol, drv.manage_existing(vol, {"source-name": name}))
    snap = snapshot(ctx, vol)

    for ref, complaint in (({}, "source-name is missing"),
                           ({"source-name": "weekly"}, "has no snapshot weekly")):
        with pytest.raises(exception.ManageExistingInvalidReference) as e:
            drv.manage_existing_snapshot(snap, ref)
        assert complaint in str(e.value)
    listed = drv.get_manageable_snapshots([], None, 1000, 0, ["size"], ["asc"])
    nightly = [e for e in listed if e["source_reference"] == {"source-name": name}]
    assert [e["reference"] for e in nightly] == [{"source-name": "nightly"}], listed

    ref = {"source-name": "nightly"}
    assert drv.manage_existing_snapshot_get_size(snap, ref) == 1
    adopt(snap, drv.manage_existing_snapshot(snap, ref))
    assert snap.provider_id == "nightly"
    other = snapshot(ctx, vol)
    no_db(drv, volumes=[vol], snapshots=[snap])
    with pytest.raises(exception.ManageExistingAlreadyManaged):
        drv.manage_existing_snapshot(other, ref)

    restored = volume(ctx, vtype=volume_type(ctx))
    drv.create_volume_from_snapshot(restored, snap)
    assert holds(drv.initialize_connection(restored, {})["data"]["nbd_uri"], "0x61")
    drv.unmanage_snapshot(snap)
    snaps = drv._agent.raw("ListSnapshots", pb.ListSnapshotsRequest(volume=name)).snapshots
    assert [s.name for s in snaps] == ["nightly"], "unmanage touched the snapshot"
    drv.delete_snapshot(snap)  # by its agent name
    assert not drv._agent.raw("ListSnapshots",
                              pb.ListSnapshotsRequest(volume=name)).snapshots
    drv.delete_volume(restored)
    drv.delete_volume(vol)


def test_a_drill_volume_is_managed_on_the_dr_backend_and_its_writes_stay_there(xfs_lab, ctx):
    lab = xfs_lab
    source = unique("db")
    replicated_1g(lab, source, "0x2a")
    drill_name = unique("drill")
    drill = start_drill(lab, source, drill_name)
    drv = no_db(dr_driver(lab))
    ref = {"source-name": drill_name}
    # A drill is never replicated: a replicated type is refused.
    with pytest.raises(exception.ManageExistingVolumeTypeMismatch):
        drv.manage_existing(volume(ctx, vtype=volume_type(
            ctx, replication_enabled="<is> True")), ref)
    vol = volume(ctx, vtype=volume_type(ctx))
    assert drv.manage_existing_get_size(vol, ref) == 1
    adopt(vol, drv.manage_existing(vol, ref))
    assert vol.replication_status == fields.ReplicationStatus.DISABLED
    uri = drv.initialize_connection(vol, {})["data"]["nbd_uri"]
    assert uri == drill["nbd_uri"]
    assert libnbd_read(uri, 0, MiB) == b"\x2a" * MiB, "the drill lacks the replicated data"
    write(uri, "0x99")
    for site in ("site-a", "site-b"):
        assert holds(f"nbd://{lab[site]['nbd']}/{source}", "0x2a"), \
            f"a drill write reached {site}"
    drv.unmanage(vol)
    assert holds(uri, "0x99"), "unmanage touched the drill"
    ctl(lab, "site-b", "replica", "drill", "stop", drill_name)
    assert not agent_has(drv._agent, drill_name)

    # Deleting a managed drill volume stops the drill: volume and record.
    other = unique("drill")
    start_drill(lab, source, other)
    vol = volume(ctx, vtype=volume_type(ctx))
    adopt(vol, drv.manage_existing(vol, {"source-name": other}))
    drv.delete_volume(vol)
    assert not agent_has(drv._agent, other)
    listed = json.loads(ctl(lab, "site-b", "replica", "drill", "list", "--json").stdout)
    assert other not in json.dumps(listed), listed
    assert not os.path.exists(os.path.join(lab["dir"], "site-b", "replicas", "drills",
                                           f"{other}.json")), "the drill record was left"
    drv.delete_volume(vol)  # gone already: success
    start_drill(lab, source, other)  # the name is free again
    ctl(lab, "site-b", "replica", "drill", "stop", other)


def test_the_ransomware_runbook_drill_from_a_point_manage_then_fail_over_to_it(xfs_lab, ctx):
    """driver-shim/README.md "recover from ransomware", at the driver:
    a point before the damage, a drill from it managed on the DR backend
    and read, then `replica promote --force --at POINT` and failover_host,
    which leaves that volume on the point."""
    lab = xfs_lab
    drv = no_db(make_driver(lab))
    vol = volume(ctx, vtype=volume_type(ctx, replication_enabled="<is> True"))
    vol.replication_status = drv.create_volume(vol)["replication_status"]
    name = vol.name
    a_uri = f"nbd://{lab['site-a']['nbd']}/{name}"
    write(a_uri, "0x11")
    wait_in_sync(lab, "site-a", name)
    ctl(lab, "site-a", "replica", "point", "create", name, "--name", "before", "--json")
    deadline = time.time() + 30
    while "before" not in [p["name"] for p in json.loads(ctl(
            lab, "site-b", "replica", "points", name, "--json").stdout)]:
        assert time.time() < deadline, "the point never showed on the secondary"
        time.sleep(0.2)
    write(a_uri, "0xee")  # the attack, replicated
    wait_in_sync(lab, "site-a", name)

    rescue = unique("rescue")
    out = ctl(lab, "site-b", "replica", "drill", "start", name, "--at", "before",
              "--name", rescue, "--json")
    assert json.loads(out.stdout)["point"] == "before"
    dr = no_db(dr_driver(lab))
    copy = volume(ctx, vtype=volume_type(ctx))
    adopt(copy, dr.manage_existing(copy, {"source-name": rescue}))
    assert holds(dr.initialize_connection(copy, {})["data"]["nbd_uri"], "0x11"), \
        "the drill from the point before the damage is damaged"
    dr.delete_volume(copy)  # stops the drill

    ctl(lab, "site-b", "replica", "promote", name, "--force", "--at", "before")
    active, updates, _ = drv.failover_host(ctx, [vol], "site-b")
    assert updates == [{"volume_id": vol.id, "updates": {
        "replication_status": fields.ReplicationStatus.FAILED_OVER}}]
    b_uri = drv.initialize_connection(vol, {})["data"]["nbd_uri"]
    assert b_uri == f"nbd://{lab['site-b']['nbd']}/{name}"
    assert holds(b_uri, "0x11"), "failover_host moved the volume off the chosen point"


# ---- a real Cinder with a DR-site backend ----------------------------------------

class DrCinder(Cinder):
    """The e2e Cinder plus a second backend, ember-dr, for site-b's agent
    (replication target site-a), exporting by NBD URI."""

    dr_backend = "e2e@ember-dr"
    dr_pool = "e2e@ember-dr#ember-dr"

    def write_conf(self):
        super().write_conf()
        with open(self.conf) as f:
            text = f.read()
        text = text.replace("enabled_backends = ember-a\n",
                            "enabled_backends = ember-a,ember-dr\n")
        text += f"""
[ember-dr]
volume_driver = ember_cinder.driver.EmberDriver
volume_backend_name = ember-dr
ember_agent_endpoint = {self.lab['site-b']['api']}
replication_device = backend_id:site-a,endpoint:{self.lab['site-a']['api']}
ember_export_mode = nbd
"""
        with open(self.conf, "w") as f:
            f.write(text)

    def start(self):
        super().start()
        deadline = time.time() + 120
        while self.dr_pool not in self.cli("get-pools", check=False).stdout:
            assert time.time() < deadline, f"no pool {self.dr_pool}: {self.log('volume')}"
            time.sleep(1)


@pytest.fixture(scope="module")
def cinder(xfs_lab):
    c = start_or_report(DrCinder(xfs_lab))
    c.cli("type-create", "ember-dr-plain")
    yield c
    c.stop()


def _rows(table):
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("Property", ""):
            yield cells


def show(cinder, name):
    out = cinder.cli("show", name, check=False)
    return dict(_rows(out.stdout)) if out.returncode == 0 else None


def volume_log(cinder):
    """cinder-volume's whole log (Cinder.log keeps only the tail)."""
    with open(os.path.join(cinder.dir, "volume.log"), errors="replace") as f:
        return f.read()


def settled(cinder, name, timeout=90):
    """The volume's row once it leaves 'managing'."""
    deadline = time.time() + timeout
    while True:
        s = show(cinder, name)
        if s and s["status"] not in ("managing", "creating"):
            return s
        assert time.time() < deadline, f"{name} still managing: {s}"
        time.sleep(1)


def cinder_manage(cinder, source, name):
    cinder.cli("manage", "--id-type", "source-name", "--name", name,
               "--volume-type", "ember-dr-plain", cinder.dr_pool, source)
    return settled(cinder, name)


def attach_nbd(cinder, volume_id):
    """An attachment through the attachments API (what Nova does); the DR
    backend's connection info carries the NBD URI."""
    out = cinder.cli("attachment-create", "--connect", "True", "--initiator",
                     "iqn.2026-11.org.ember:dr", "--ip", "127.0.0.1", "--host", "dr-test",
                     "--mode", "rw", volume_id, version="3.54")
    return dict(_rows(out.stdout))


def unmanage(cinder, name, volume_id):
    cinder.cli("unmanage", volume_id)
    deadline = time.time() + 60
    while show(cinder, volume_id) is not None:
        assert time.time() < deadline, f"{name} still in Cinder after unmanage"
        time.sleep(1)


def test_cinder_manage_reads_an_agent_volume_and_unmanage_leaves_it(xfs_lab, cinder):
    lab = xfs_lab
    name = unique("dr-plain")
    ctl(lab, "site-b", "volume", "create", name, "--size", "1G")
    b_uri = f"nbd://{lab['site-b']['nbd']}/{name}"
    write(b_uri, "0x17")

    vol = cinder_manage(cinder, name, "managed-plain")
    assert vol["status"] == "available", (vol, cinder.log("volume"))
    assert vol["size"] == "1" and vol["os-vol-host-attr:host"] == cinder.dr_pool, vol
    conn = attach_nbd(cinder, vol["id"])
    assert conn["driver_volume_type"] == "nbd" and conn["nbd_uri"] == b_uri, conn
    assert libnbd_read(conn["nbd_uri"], 0, MiB) == b"\x17" * MiB
    cinder.cli("attachment-delete", conn["attachment_id"], version="3.54")
    assert settled(cinder, vol["id"])["status"] == "available"

    # manageable-list (the driver against Cinder's database) knows it, the
    # demo secondary (not safe) and a primary of site-b (safe, replicated).
    primary = unique("dr-primary")
    ctl(lab, "site-b", "volume", "create", primary, "--size", "16M")
    ctl(lab, "site-b", "replica", "enable", primary, "--peer", "site-a", "--mode", "async")
    listed = cinder.cli("manageable-list", cinder.dr_backend).stdout
    row = next((line for line in listed.splitlines() if f"'{name}'" in line), "")
    assert "already managed" in row and vol["id"] in row, listed
    assert "replication secondary of site-a" in listed, listed
    row = next((line for line in listed.splitlines() if f"'{primary}'" in line), "")
    assert "True" in row and "async to site-a" in row, listed
    ctl(lab, "site-b", "replica", "disable", primary, "--delete-secondary")
    ctl(lab, "site-b", "volume", "delete", primary)

    # An agent snapshot of it, managed and unmanaged.
    ctl(lab, "site-b", "snapshot", "create", name, "nightly")
    cinder.cli("snapshot-manage", "--id-type", "source-name", "--name", "managed-snap",
               vol["id"], "nightly")
    deadline = time.time() + 60
    while True:
        snap = dict(_rows(cinder.cli("snapshot-show", "managed-snap").stdout))
        if snap["status"] not in ("creating", "managing"):
            break
        assert time.time() < deadline, snap
        time.sleep(1)
    assert snap["status"] == "available", (snap, volume_log(cinder)[-3000:])
    cinder.cli("snapshot-unmanage", snap["id"])
    deadline = time.time() + 60
    while cinder.cli("snapshot-show", snap["id"], check=False).returncode == 0:
        assert time.time() < deadline, "the snapshot stayed in Cinder"
        time.sleep(1)
    assert "nightly" in ctl(lab, "site-b", "snapshot", "list", name).stdout, \
        "snapshot-unmanage touched the agent snapshot"

    # Managed twice: the second one fails in the driver (error_managing,
    # which the API shows as error).
    again = cinder_manage(cinder, name, "managed-twice")
    assert again["status"] == "error", again
    assert "already managed" in volume_log(cinder)
    # A replication secondary (the lab's demo volume on site-b) is refused.
    secondary = cinder_manage(cinder, "demo", "managed-secondary")
    assert secondary["status"] == "error", secondary
    assert "secondary of site-a" in volume_log(cinder)
    # An unknown name likewise.
    unknown = cinder_manage(cinder, "no-such-volume", "managed-unknown")
    assert unknown["status"] == "error", unknown
    assert "no such volume" in volume_log(cinder)

    unmanage(cinder, "managed-plain", vol["id"])
    assert holds(b_uri, "0x17"), "cinder unmanage touched the agent volume"
    for v in (again, secondary, unknown):
        cinder.cli("delete", v["id"])  # error_managing rows only: no agent call
    assert holds(b_uri, "0x17")
    ctl(lab, "site-b", "volume", "delete", name)


def test_cinder_manage_of_a_drill_volume_on_the_dr_backend(xfs_lab, cinder):
    lab = xfs_lab
    source = unique("db")
    replicated_1g(lab, source, "0x3e")
    drill_name = unique("drill")
    drill = start_drill(lab, source, drill_name)

    vol = cinder_manage(cinder, drill_name, "drill-under-test")
    assert vol["status"] == "available", (vol, cinder.log("volume"))
    assert vol["replication_status"] == "disabled", vol
    conn = attach_nbd(cinder, vol["id"])
    assert conn["nbd_uri"] == drill["nbd_uri"], conn
    assert libnbd_read(conn["nbd_uri"], 0, MiB) == b"\x3e" * MiB
    write(conn["nbd_uri"], "0x77", "1M")  # a test instance writes
    cinder.cli("attachment-delete", conn["attachment_id"], version="3.54")
    settled(cinder, vol["id"])

    unmanage(cinder, "drill-under-test", vol["id"])
    assert holds(drill["nbd_uri"], "0x3e") and holds(drill["nbd_uri"], "0x77", "1M"), \
        "cinder unmanage touched the drill volume"
    for site in ("site-a", "site-b"):
        assert not holds(f"nbd://{lab[site]['nbd']}/{source}", "0x77", "1M"), \
            f"a drill write reached {site}"
    ctl(lab, "site-b", "replica", "drill", "stop", drill_name)
