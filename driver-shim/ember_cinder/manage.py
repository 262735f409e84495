"""Bringing existing agent volumes and snapshots under Cinder (`cinder
manage`, `cinder snapshot-manage`) and letting them go again (`unmanage`):
a DR drill volume on the DR site's agent, a volume made with `emberctl`,
or one a previous Cinder forgot.

Naming. A volume Cinder created is called `volume.name` (`volume-<id>`)
on the agent. An adopted volume keeps the name it has on the agent: other
tools (`emberctl replica drill stop NAME`, replication, scripts) know it by
that name, and the agent has no rename. So the driver records the agent
name in the volume's `provider_id` and every driver path asks
`agent_volume_name(volume)`; `provider_id` (unlike `provider_location`,
which Cinder's target helpers overwrite with the iSCSI location) is set
only by drivers, and a migration swaps it together with the name, so it
always follows the data. Snapshots likewise (`agent_snapshot_name`).

The decisions (is this reference acceptable, which replication status
does the adopted volume get, what does `manageable-list` show) are pure
functions over plain facts (`AgentVolume`), table-tested without an agent;
`ManageMixin` gathers the facts and applies them.
"""
import dataclasses
import math

import grpc
from cinder import context as cinder_context
from cinder import exception
from cinder import objects
from cinder.objects import fields
from cinder.volume import volume_utils
from oslo_log import log as logging

from ember_cinder import errors
from ember_cinder import replication
from ember_cinder.client import pb

LOG = logging.getLogger(__name__)
GiB = 1 << 30
#: The one key of a manage reference the driver reads: the agent's name
#: for the volume (or, for snapshot-manage, the snapshot).
SOURCE_NAME = "source-name"
#: `Volume.origin` prefix the agent gives a DR drill volume
#: (`drill:VOL@POINT`): writable, never replicated.
DRILL_ORIGIN = "drill:"


def agent_volume_name(volume):
    """The agent's name for a Cinder volume: the adopted name when it was
    managed (`provider_id`), else Cinder's own `volume-<id>`."""
    return getattr(volume, "provider_id", None) or volume.name


def agent_snapshot_name(snapshot):
    """The agent's name for a Cinder snapshot (see agent_volume_name)."""
    return getattr(snapshot, "provider_id", None) or snapshot.name


def size_gib(size_bytes):
    """Whole GiB Cinder records for `size_bytes` (rounded up; at least 1,
    Cinder's smallest volume)."""
    return max(1, math.ceil(size_bytes / GiB))


@dataclasses.dataclass(frozen=True)
class AgentVolume:
    """What the agent says about one of its volumes: its size, its origin
    (`drill:…`, `snapshot:…` or empty) and, when it is replicated, its
    role (`primary`/`secondary`), peer site and mode."""

    name: str
    size_bytes: int
    origin: str = ""
    role: str = ""
    peer_site: str = ""
    mode: str = ""

    @property
    def is_drill(self):
        """A DR drill's volume (`emberctl replica drill start`)."""
        return self.origin.startswith(DRILL_ORIGIN)


def _invalid(ref, reason):
    return exception.ManageExistingInvalidReference(existing_ref=ref, reason=reason)


def source_name(ref):
    """The agent name a manage reference names.

    Raises ManageExistingInvalidReference for anything but a dict with a
    non-empty string `source-name` (a `source-id` is refused: agent volumes
    have no ids other than their names)."""
    if not isinstance(ref, dict):
        raise _invalid(ref, "the reference must be {'source-name': NAME}")
    name = ref.get(SOURCE_NAME)
    if name is None:
        hint = (" (Ember volumes are known by name: use --id-type source-name)"
                if "source-id" in ref else "")
        raise _invalid(ref, f"source-name is missing{hint}")
    if not isinstance(name, str) or not name.strip():
        raise _invalid(ref, "source-name must name an agent volume")
    return name.strip()


def replication_decision(ref, vol, targets, spec, failed_over):
    """Checks an agent volume for adoption and decides its replication.

    `vol` is the AgentVolume (None: the agent has no such volume), `targets`
    the backend ids of this backend's replication_device entries, `spec` the
    new Cinder volume's `replication.VolumeSpec`, `failed_over` whether the
    backend runs on a target site now.

    Returns `"enabled"` (replicated already, to one of our targets),
    `"enable"` (to be replicated now, as a create of this type would) or
    `"disabled"`. Raises ManageExistingInvalidReference for an unknown
    volume, a secondary or a volume replicated to a site this backend does
    not know, and ManageExistingVolumeTypeMismatch when the type asks for a
    replication the volume cannot have."""
    if vol is None:
        raise _invalid(ref, "the agent has no such volume (emberctl volume list)")
    if vol.role == "secondary":
        raise _invalid(
            ref, f"{vol.name} is a replication secondary of {vol.peer_site}: it is "
                 "read-only and follows its primary. Manage it on the backend of "
                 f"{vol.peer_site}'s agent, or start a drill (emberctl replica drill "
                 f"start {vol.name} --name NAME) and manage the drill volume")
    if vol.role == "primary":
        if vol.peer_site not in targets:
            raise _invalid(
                ref, f"{vol.name} is replicated to {vol.peer_site}, which is not a "
                     "replication_device of this backend: Cinder could not fail it over")
        if spec.enabled and spec.mode != vol.mode:
            raise exception.ManageExistingVolumeTypeMismatch(
                reason=f"{vol.name} replicates {vol.mode} but the volume type asks "
                       f"for {spec.mode}")
        return fields.ReplicationStatus.ENABLED
    if vol.role:
        raise _invalid(ref, f"{vol.name} has replication role {vol.role!r}; "
                            "resolve it with emberctl replica status first")
    if not spec.enabled:
        return fields.ReplicationStatus.DISABLED
    if vol.is_drill:
        raise exception.ManageExistingVolumeTypeMismatch(
            reason=f"{vol.name} is a DR drill volume ({vol.origin}), whose writes "
                   "must never reach another site: manage it with a volume type "
                   "that does not enable replication")
    if failed_over:
        raise exception.ManageExistingVolumeTypeMismatch(
            reason="the backend is failed over; replicated volumes wait for failback")
    return "enable"


def check_not_managed(name, managed):
    """Raises ManageExistingAlreadyManaged when a Cinder volume of this
    backend already stands for agent volume `name`; `managed` maps agent
    names to Cinder ids."""
    if name in managed:
        raise exception.ManageExistingAlreadyManaged(
            volume_ref=f"{name} (Cinder volume {managed[name]})")


def manageable_volumes(vols, managed):
    """`get_manageable_volumes` entries (before paging) for the agent's
    volumes `vols` (AgentVolume), given `managed` (agent name -> Cinder id
    of this backend's volumes)."""
    entries = []
    for v in vols:
        reason = None
        if v.name in managed:
            reason = "already managed"
        elif v.role == "secondary":
            reason = f"replication secondary of {v.peer_site}"
        # Cinder's ManageableVolume wants a dict of strings here.
        extra = {"origin": v.origin} if v.origin else {}
        if v.role == "primary":
            extra["replication"] = f"{v.mode} to {v.peer_site}"
        entries.append({
            "reference": {SOURCE_NAME: v.name},
            "size": size_gib(v.size_bytes),
            "safe_to_manage": reason is None,
            "reason_not_safe": reason,
            "cinder_id": managed.get(v.name),
            "extra_info": extra or None,
        })
    return entries


def manageable_snapshots(snaps, managed):
    """`get_manageable_snapshots` entries (before paging): `snaps` are
    (volume agent name, snapshot name, size_bytes, volume's Cinder id or
    None) tuples, `managed` maps (volume, snapshot) agent names to Cinder
    snapshot ids."""
    entries = []
    for vol, snap, size_bytes, vol_cinder_id in snaps:
        cinder_id = managed.get((vol, snap))
        reason = None
        if cinder_id:
            reason = "already managed"
        elif vol_cinder_id is None:
            reason = f"its volume {vol} is not managed by this backend"
        entries.append({
            "reference": {SOURCE_NAME: snap},
            "size": size_gib(size_bytes),
            "safe_to_manage": reason is None,
            "reason_not_safe": reason,
            "cinder_id": cinder_id,
            "extra_info": None,
            "source_reference": {SOURCE_NAME: vol},
        })
    return entries


class ManageMixin:
    """manage_existing and friends for `EmberDriver` (uses its `_agent`,
    `_targets`, `_active_backend_id`, `_replicate`, `host`, `cluster_name`)."""

    # ---- facts ------------------------------------------------------------

    def _agent_volume(self, name):
        """AgentVolume for `name` from the active agent, or None when the
        agent has no such volume. Other failures raise (translated)."""
        try:
            v = self._agent.raw("GetVolume", pb.GetVolumeRequest(name=name)).volume
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise errors.translate(e, f"look up {name}") from None
        return self._with_replication(v)

    def _with_replication(self, v):
        """AgentVolume of the agent's `v` (a pb.Volume), with its role."""
        try:
            s = self._agent.raw("GetReplicationStatus",
                                pb.GetReplicationStatusRequest(volume=v.name)).status
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: not replicated
                raise errors.translate(e, f"replication status of {v.name}") from None
            s = None
        return AgentVolume(name=v.name, size_bytes=v.size_bytes, origin=v.origin,
                           role=s.role if s else "", peer_site=s.peer_site if s else "",
                           mode=s.mode if s else "")

    def _my_filters(self):
        # The volume manager's own notion of "my volumes" (_get_my_volumes).
        return ({"cluster_name": self.cluster_name} if self.cluster_name
                else {"host": self.host})

    def _my_cinder_volumes(self, ctxt):
        """This backend's Cinder volumes, from Cinder's database."""
        return objects.VolumeList.get_all(ctxt, filters=self._my_filters())

    def _my_cinder_snapshots(self, ctxt):
        """This backend's Cinder snapshots, from Cinder's database."""
        return objects.SnapshotList.get_all(ctxt, filters=self._my_filters())

    @staticmethod
    def _managed_map(cinder_volumes, but=None):
        """{agent name: Cinder id} of `cinder_volumes`, leaving out `but`
        (the volume being managed, already a row of its own)."""
        return {agent_volume_name(v): v.id for v in cinder_volumes
                if but is None or v.id != but.id}

    # ---- volumes ----------------------------------------------------------

    def manage_existing_get_size(self, volume, existing_ref):
        """Size in whole GiB, rounded up (manage_existing then grows the
        agent volume to it, so Cinder's size is the export's size)."""
        name = source_name(existing_ref)
        vol = self._agent_volume(name)
        if vol is None:
            raise _invalid(existing_ref, "the agent has no such volume "
                                         "(emberctl volume list)")
        return size_gib(vol.size_bytes)

    def manage_existing(self, volume, existing_ref):
        """Adopts agent volume `source-name` under its own name (recorded in
        provider_id); refuses secondaries, volumes managed already and
        replication the type cannot have (see replication_decision)."""
        name = source_name(existing_ref)
        vol = self._agent_volume(name)
        specs = volume.volume_type.extra_specs if volume.volume_type else {}
        spec = replication.volume_spec(specs, self._default_target())
        status = replication_decision(existing_ref, vol, set(self._targets), spec,
                                      bool(self._active_backend_id))
        check_not_managed(name, self._managed_map(
            self._my_cinder_volumes(volume._context), but=volume))
        wanted = size_gib(vol.size_bytes) * GiB
        if wanted != vol.size_bytes:
            # Cinder sizes are whole GiB and it copies whole GiB (migration,
            # backup): the export must be as big as Cinder believes.
            LOG.info("Ember: growing %s from %d bytes to %d GiB to manage it",
                     name, vol.size_bytes, wanted // GiB)
            self._agent.call("ResizeVolume", pb.ResizeVolumeRequest(
                name=name, size_bytes=wanted), f"grow {name} to {wanted // GiB} GiB")
        update = {"provider_id": name, "provider_location": f"ember:{name}"}
        if status == "enable":
            # Same path as a create of this type; provider_id is not saved
            # yet, so the name is passed explicitly.
            update.update(self._replicate(volume, name=name))
        else:
            update["replication_status"] = status
        LOG.info("Ember: %s (%s) now managed as Cinder volume %s", name,
                 vol.origin or "no origin", volume.id)
        return update

    def _stop_if_drill(self, volume):
        """For an adopted volume that is a DR drill's: stops the drill (its
        volume and its drill record, the one-step delete) and returns True.
        Anything else: False, and the caller deletes as usual."""
        if not getattr(volume, "provider_id", None):
            return False  # Cinder made it: never a drill
        name = agent_volume_name(volume)
        vol = self._agent_volume(name)
        if vol is None or not vol.is_drill:
            return False
        self._agent.call("StopDrill", pb.StopDrillRequest(name=name),
                         f"stop drill {name}")
        LOG.info("Ember: drill %s (%s) stopped with its Cinder volume %s",
                 name, vol.origin, volume.id)
        return True

    def unmanage(self, volume):
        """Leaves the agent volume as it is (the manager has removed the
        export); it keeps its agent name and any replication."""
        LOG.info("Ember: Cinder volume %s unmanaged; agent volume %s kept",
                 volume.id, agent_volume_name(volume))

    def get_manageable_volumes(self, cinder_volumes, marker, limit, offset,
                               sort_keys, sort_dirs):
        """The active agent's volumes for `cinder manageable-list`."""
        listed = self._agent.call("ListVolumes", pb.ListVolumesRequest(),
                                  "list volumes").volumes
        vols = [self._with_replication(v) for v in listed]
        entries = manageable_volumes(vols, self._managed_map(cinder_volumes))
        return volume_utils.paginate_entries_list(entries, marker, limit, offset,
                                                  sort_keys, sort_dirs)

    # ---- snapshots --------------------------------------------------------

    def _agent_snapshot(self, snapshot, existing_ref):
        """(agent volume name, snapshot name, size_bytes) of the snapshot a
        snapshot-manage reference names, on the snapshot's volume."""
        snap = source_name(existing_ref)
        vol = agent_volume_name(snapshot.volume)
        try:
            listed = self._agent.raw("ListSnapshots",
                                     pb.ListSnapshotsRequest(volume=vol)).snapshots
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise _invalid(existing_ref, f"the agent has no volume {vol}") from None
            raise errors.translate(e, f"list snapshots of {vol}") from None
        for s in listed:
            if s.name == snap:
                return vol, snap, s.size_bytes
        raise _invalid(existing_ref, f"{vol} has no snapshot {snap} "
                                     f"(emberctl snapshot list {vol})")

    def manage_existing_snapshot_get_size(self, snapshot, existing_ref):
        """The snapshot's size in whole GiB, rounded up."""
        return size_gib(self._agent_snapshot(snapshot, existing_ref)[2])

    def manage_existing_snapshot(self, snapshot, existing_ref):
        """Adopts an agent snapshot of the snapshot's volume under its own
        name (recorded in provider_id)."""
        vol, snap, _ = self._agent_snapshot(snapshot, existing_ref)
        for s in self._my_cinder_snapshots(snapshot._context):
            if s.id != snapshot.id and (agent_volume_name(s.volume),
                                        agent_snapshot_name(s)) == (vol, snap):
                raise exception.ManageExistingAlreadyManaged(
                    volume_ref=f"{vol}@{snap} (Cinder snapshot {s.id})")
        return {"provider_id": snap}

    def unmanage_snapshot(self, snapshot):
        """Leaves the agent snapshot as it is."""
        LOG.info("Ember: Cinder snapshot %s unmanaged; agent snapshot %s@%s kept",
                 snapshot.id, agent_volume_name(snapshot.volume),
                 agent_snapshot_name(snapshot))

    def get_manageable_snapshots(self, cinder_snapshots, marker, limit, offset,
                                 sort_keys, sort_dirs):
        """The snapshots of the active agent's volumes, for
        `cinder snapshot-manageable-list`."""
        try:
            # Which agent volumes are Cinder volumes here (a snapshot is
            # adopted onto its volume's Cinder volume).
            volumes = self._managed_map(
                self._my_cinder_volumes(cinder_context.get_admin_context()))
        except Exception as e:  # the database unreachable: list, mark none safe
            LOG.warning("Ember: cannot list this backend's volumes: %s", e)
            volumes = {}
        managed = {(agent_volume_name(s.volume), agent_snapshot_name(s)): s.id
                   for s in cinder_snapshots}
        snaps = []
        for v in self._agent.call("ListVolumes", pb.ListVolumesRequest(),
                                  "list volumes").volumes:
            for s in self._agent.call("ListSnapshots", pb.ListSnapshotsRequest(
                    volume=v.name), f"list snapshots of {v.name}").snapshots:
                snaps.append((v.name, s.name, s.size_bytes, volumes.get(v.name)))
        entries = manageable_snapshots(snaps, managed)
        return volume_utils.paginate_entries_list(entries, marker, limit, offset,
                                                  sort_keys, sort_dirs)
