"""End to end with a real Cinder (cinder_services.Cinder: RabbitMQ,
cinder-api with noauth, cinder-scheduler, cinder-volume running this
driver), driven by python-cinderclient's `cinder` CLI against the two-site
lab: a replicated volume type and a volume, data written through the
volume's NBD export, failover-host to the secondary site, the same data
read from the promoted secondary, more written there, failback, everything
read on the original primary. A non-replicated volume in the mix goes to
error on failover, and the scheduler refuses a type whose RPO no backend
can meet. An attachment made through Cinder's attachments API (what Nova
does) reaches the volume over iSCSI from Cinder's tgtadm target, and comes
back after a storage-host "reboot"."""
import json
import os
import signal
import socket
import subprocess

import pytest

from cinder_services import (holds, qemu_io, replica_state, running_cinder, service, show,
                             table_rows, volume_status, wait_for)
from conftest import require


@pytest.fixture(scope="module")
def cinder(lab):
    require("qemu-io")
    yield from running_cinder(lab)


def test_failover_host_and_failback_through_a_real_cinder(lab, cinder):
    cinder.cli("type-create", "ember-async")
    cinder.cli("type-key", "ember-async", "set", "replication_enabled=<is> True",
               "ember:replication_mode=async", "ember:rpo_seconds=30")
    cinder.cli("type-create", "ember-plain")
    cinder.cli("create", "--volume-type", "ember-async", "--name", "e2e-repl", "1")
    cinder.cli("create", "--volume-type", "ember-plain", "--name", "e2e-plain", "1")
    repl = volume_status(cinder, "e2e-repl", "available")
    plain = volume_status(cinder, "e2e-plain", "available")
    assert repl["status"] == "available" and plain["status"] == "available"
    assert repl["replication_status"] == "enabled", repl
    assert plain["replication_status"] == "disabled", plain
    name = f"volume-{repl['id']}"
    a_uri = f"nbd://{lab['site-a']['nbd']}/{name}"
    b_uri = f"nbd://{lab['site-b']['nbd']}/{name}"

    out = qemu_io(a_uri, "write -P 0x5a 0 1M")
    assert out.returncode == 0, out.stderr
    wait_for("the replica in sync", lambda: (
        lambda s: s.get("state") == "in-sync" and s.get("lag_bytes") == 0)(
            replica_state(lab, "site-a", name)))

    cinder.cli("failover-host", cinder.backend, "--backend_id", "site-b")
    svc = wait_for("failed over", lambda: (
        lambda s: s if s["replication_status"] == "failed-over" else None)(service(cinder)))
    assert svc["active_backend_id"] == "site-b", svc
    assert show(cinder, "e2e-repl")["replication_status"] == "failed-over"
    assert show(cinder, "e2e-plain")["status"] == "error", "a non-replicated volume survived failover"
    assert replica_state(lab, "site-b", name)["role"] == "primary"
    assert holds(b_uri, "0x5a", "0"), "the promoted secondary lacks the data"
    out = qemu_io(b_uri, "write -P 0x6b 1M 1M")
    assert out.returncode == 0, out.stderr

    cinder.cli("failover-host", cinder.backend, "--backend_id", "default")
    wait_for("failed back", lambda: (
        lambda s: s if s["replication_status"] == "enabled" else None)(service(cinder)))
    assert show(cinder, "e2e-repl")["replication_status"] == "enabled"
    assert replica_state(lab, "site-a", name)["role"] == "primary"
    assert holds(a_uri, "0x5a", "0") and holds(a_uri, "0x6b", "1M"), \
        "the original primary lacks data written before or after the failover"
    out = qemu_io(a_uri, "write -P 0x01 2M 4k")
    assert out.returncode == 0, "the failed-back primary refuses writes"


def test_the_scheduler_refuses_a_type_whose_rpo_no_backend_can_meet(cinder):
    # The backend can hold at most 86400 s (the agent's cap): a type asking
    # for more cannot be placed.
    cinder.cli("type-create", "ember-impossible")
    cinder.cli("type-key", "ember-impossible", "set", "replication_enabled=<is> True",
               "capabilities:replication_rpo_max_seconds=>= 100000")
    cinder.cli("create", "--volume-type", "ember-impossible", "--name", "e2e-never", "1")
    s = volume_status(cinder, "e2e-never", "available")
    assert s["status"] == "error", s
    assert s["os-vol-host-attr:host"] in ("None", ""), s
    messages = cinder.cli("message-list").stdout
    assert "Could not find any available weighted backend" in messages, messages


def group_show(cinder, name):
    return {row[0]: row[1] for row in table_rows(cinder.cli("group-show", name).stdout)}


def test_group_replication_through_a_real_cinder(lab, cinder):
    """A Cinder group of a consistency-group type: its volumes replicate as
    one Ember consistency group and fail over and back together."""
    cinder.cli("type-create", "ember-cg-vols")
    cinder.cli("type-key", "ember-cg-vols", "set", "replication_enabled=<is> True",
               "ember:replication_mode=async")
    cinder.cli("group-type-create", "ember-cg")
    cinder.cli("group-type-key", "ember-cg", "set",
               "consistent_group_replication_enabled=<is> True")
    cinder.cli("group-create", "--name", "e2e-group", "ember-cg", "ember-cg-vols")
    group = wait_for("the group", lambda: (
        lambda g: g if g["status"] == "available" else None)(group_show(cinder, "e2e-group")))
    names = []
    for i in range(2):
        cinder.cli("create", "--group-id", group["id"], "--volume-type", "ember-cg-vols",
                   "--name", f"e2e-member-{i}", "1")
        v = volume_status(cinder, f"e2e-member-{i}", "available")
        assert v["status"] == "available", v
        names.append(f"volume-{v['id']}")
    cinder.cli("group-enable-replication", "e2e-group")
    wait_for("group replication enabled", lambda: group_show(
        cinder, "e2e-group")["replication_status"] == "enabled")
    for i, name in enumerate(names):
        out = qemu_io(f"nbd://{lab['site-a']['nbd']}/{name}", f"write -P 0x{0x40 + i:x} 0 1M")
        assert out.returncode == 0, out.stderr
    ember_group = f"group-{group['id']}"
    status = subprocess.run([lab["ctl"], "--api", lab["site-a"]["api"], "group", "status",
                             ember_group, "--json"], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert sorted(m["volume"] for m in json.loads(status.stdout)["members"]) == sorted(names)
    for name in names:
        wait_for(f"{name} in sync", lambda name=name: (
            lambda s: s.get("state") == "in-sync" and s.get("lag_bytes") == 0)(
                replica_state(lab, "site-a", name)))

    cinder.cli("group-failover-replication", "e2e-group", "--secondary-backend-id", "site-b")
    wait_for("the group failed over", lambda: group_show(
        cinder, "e2e-group")["replication_status"] == "failed-over")
    for i, name in enumerate(names):
        assert replica_state(lab, "site-b", name)["role"] == "primary"
        assert holds(f"nbd://{lab['site-b']['nbd']}/{name}", f"0x{0x40 + i:x}", "0")

    cinder.cli("group-failover-replication", "e2e-group", "--secondary-backend-id", "default")
    wait_for("the group failed back", lambda: group_show(
        cinder, "e2e-group")["replication_status"] == "enabled")
    for i, name in enumerate(names):
        assert replica_state(lab, "site-a", name)["role"] == "primary"
        assert holds(f"nbd://{lab['site-a']['nbd']}/{name}", f"0x{0x40 + i:x}", "0")


def attach(cinder, volume_id):
    """Nova's half of an attach, through the attachments API: returns
    the connection info cinder-volume answered. No server id: Cinder lets
    only Nova itself (a service token) delete a server's attachment, and
    there is no Nova here."""
    out = cinder.cli("attachment-create", "--connect", "True",
                     "--initiator", "iqn.2026-11.org.ember:e2e", "--ip", "127.0.0.1",
                     "--host", socket.gethostname(), "--mode", "rw",
                     volume_id, version="3.54")
    return dict(table_rows(out.stdout))


def target_listed(iqn):
    out = subprocess.run(["tgtadm", "--lld", "iscsi", "--op", "show", "--mode", "target"],
                         capture_output=True, text=True)
    return iqn in out.stdout


def test_an_attachment_reaches_the_volume_through_cinders_iscsi_target(lab, cinder):
    from iscsi_initiator import Lun

    cinder.cli("type-create", "ember-attach")
    cinder.cli("type-key", "ember-attach", "set", "replication_enabled=<is> True",
               "ember:replication_mode=async")
    cinder.cli("create", "--volume-type", "ember-attach", "--name", "e2e-attach", "1")
    vol = volume_status(cinder, "e2e-attach", "available")
    assert vol["status"] == "available", vol
    name = f"volume-{vol['id']}"
    a_uri = f"nbd://{lab['site-a']['nbd']}/{name}"
    b_uri = f"nbd://{lab['site-b']['nbd']}/{name}"
    assert qemu_io(a_uri, "write -P 0x71 0 1M").returncode == 0

    conn = attach(cinder, vol["id"])
    assert conn["driver_volume_type"] == "iscsi", conn
    assert conn["target_portal"] == f"127.0.0.1:{cinder.tgt_port}", conn
    assert conn["target_iqn"].endswith(name) and conn["auth_method"] == "CHAP", conn
    assert conn["nbd_uri"] == a_uri, conn
    assert target_listed(conn["target_iqn"])
    lun = Lun(conn)
    try:
        assert lun.read(0, 1 << 20) == b"\x71" * (1 << 20), "iSCSI reads other data than NBD wrote"
        lun.write(2 << 20, b"\x72" * (1 << 20))
        lun.flush()
    finally:
        lun.close()
    assert holds(a_uri, "0x72", "2M"), "a write over iSCSI is not on the agent"
    wait_for("replication to catch up", lambda: (
        lambda s: s.get("state") == "in-sync" and s.get("lag_bytes") == 0)(
        replica_state(lab, "site-a", name)))
    assert holds(b_uri, "0x72", "2M"), "a write over iSCSI did not replicate"
    with pytest.raises(RuntimeError):
        Lun({**conn, "auth_password": "not-the-password"})  # CHAP holds

    # The storage host "reboots": the attachment dies, tgtd comes back
    # empty, and cinder-volume's start (ensure_export for in-use volumes)
    # must bring the same target back on a fresh attachment.
    cinder.cli("attachment-complete", conn["attachment_id"], version="3.54")
    assert show(cinder, "e2e-attach")["status"] == "in-use"
    with open(os.path.join(cinder.attach_dir, f"{name}.json")) as f:
        os.kill(json.load(f)["pid"], signal.SIGKILL)
    cinder.restart("tgtd")
    assert not target_listed(conn["target_iqn"])
    cinder.restart("volume")

    def reads_back():
        try:
            again = Lun(conn)
        except RuntimeError:
            return None
        try:
            return again.read(2 << 20, 1 << 20) == b"\x72" * (1 << 20) or "wrong data"
        finally:
            again.close()
    assert wait_for("the target after the restart", reads_back, timeout=120) is True

    cinder.cli("attachment-delete", conn["attachment_id"], version="3.54")
    assert volume_status(cinder, "e2e-attach", "available")["status"] == "available"
    assert not target_listed(conn["target_iqn"]), "detach left the iSCSI target"
    assert not os.path.exists(os.path.join(cinder.attach_dir, f"{name}.json"))
    assert holds(a_uri, "0x71", "0") and holds(a_uri, "0x72", "2M")
    cinder.cli("delete", "e2e-attach")
