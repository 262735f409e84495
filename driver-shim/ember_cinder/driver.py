"""Cinder volume driver for Ember: volumes, snapshots, clones and
replication through the control API of the storage host's `emberd`
(the replication workflow itself is in `ember_cinder.failover`).

The backend's own agent (`ember_agent_endpoint`) serves the volumes; each
`replication_device` names a paired Ember site and that site's agent, which
holds the secondaries and is where failover promotes them.

Snapshots, clones and volumes from snapshots are single agent calls
(CreateSnapshot, CreateVolume with `clone_of_volume` / `from_snapshot`): the
driver never copies data on this host. The agent makes them copy-on-write
(FICLONE) where its data directory can reflink (XFS, btrfs) and sparse
copies elsewhere.

Volumes made outside Cinder (a DR drill on the DR site's agent, anything
`emberctl` made) can be adopted with `cinder manage` under their agent
name: `ember_cinder.manage`. Every path below therefore asks
`agent_volume_name(volume)` rather than `volume.name`.
"""
import socket

from cinder import exception
from cinder import interface
from cinder.objects import fields
from cinder.volume import driver
from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import importutils

from ember_cinder import attach
from ember_cinder import replication
from ember_cinder.client import AgentClient, pb
from ember_cinder.failover import ReplicationMixin
from ember_cinder.manage import ManageMixin, agent_snapshot_name, agent_volume_name

LOG = logging.getLogger(__name__)
GiB = 1 << 30

ember_opts = [
    cfg.StrOpt("ember_agent_endpoint",
               default="unix:/run/ember/api.sock",
               help="Control API of this storage host's emberd: unix:/path "
                    "(the agent's default socket) or host:port (then set the "
                    "ember_tls_* options for mutual TLS)."),
    cfg.StrOpt("ember_tls_ca", default="",
               help="CA certificate (PEM) that signed the agent's API "
                    "certificate; enables mutual TLS for host:port endpoints."),
    cfg.StrOpt("ember_tls_cert", default="",
               help="Client certificate (PEM) presented to the agent."),
    cfg.StrOpt("ember_tls_key", default="",
               help="Private key (PEM) of ember_tls_cert."),
    cfg.FloatOpt("ember_rpc_timeout", default=30.0, min=1.0,
                 help="Seconds before a call to an agent is abandoned. "
                      "Promotions get four times this (a planned switchover "
                      "drains the old primary)."),
    cfg.IntOpt("ember_rpc_retries", default=3, min=0,
               help="Retries of an idempotent call (create, delete, resize, "
                    "status, planned promotion) when the agent is "
                    "unreachable. Other calls are never retried."),
    cfg.StrOpt("ember_export_mode", default="target",
               choices=[("target", "attach the agent's export on this host "
                                   "and export it with Cinder's target_helper "
                                   "(tgtadm, lioadm, nvmet): what Nova uses"),
                        ("local", "attach on this host and hand compute the "
                                  "local device (compute on this host only)"),
                        ("nbd", "no host attach: connection info carries only "
                                "the agent's NBD URI (QEMU-native clients)")],
               help="How volumes reach their consumers. Every mode also "
                    "puts the agent's nbd_uri in the connection info."),
    cfg.StrOpt("ember_host_attach", default="nbd-client",
               choices=[("nbd-client", "kernel NBD, /dev/nbdN; needs the "
                                       "nbd module"),
                        ("nbdfuse", "libnbd's FUSE file; no kernel module, "
                                    "tgtadm only, slower")],
               help="How this host attaches an agent's export for the "
                    "target and local export modes."),
    cfg.StrOpt("ember_attach_dir", default="$state_path/ember",
               help="Records of host attachments (and nbdfuse mount points). "
                    "The shipped rootwrap filters expect "
                    "/var/lib/cinder/ember."),
]

CONF = cfg.CONF
CONF.register_opts(ember_opts, group="backend_defaults")



def _bytes(gib):
    return int(gib) * GiB


@interface.volumedriver
class EmberDriver(ManageMixin, ReplicationMixin, driver.VolumeDriver):
    """Ember block-replication agent as a Cinder backend.

    Version history:
        0.1.0 - volumes, snapshots, clones, extend, stats with replication
                capabilities, per-volume replication, failover_host and
                failback, consistency-group replication.
        0.2.0 - exports for Nova: the agent's export attached on this host
                (nbd-client or nbdfuse) and exported by Cinder's target
                helper; local and nbd export modes.
        0.3.0 - manage_existing / unmanage of agent volumes (DR drill
                volumes included) and snapshots under their agent names
                (provider_id), manageable-list; every path honours the
                adopted name.
    """

    VERSION = "0.3.0"
    CI_WIKI_NAME = "Ember_CI"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(ember_opts)
        # After a failover and a restart Cinder hands the target's id back.
        self._active_backend_id = kwargs.get("active_backend_id") or None
        self._primary = None
        self._targets = {}
        self._clients = {}
        self._attacher = None
        self.export_mode = self.configuration.safe_get("ember_export_mode") or "target"
        self.target_driver = None
        self.protocol = "NBD"
        if self.export_mode == "target":
            # The LVM driver's way: the target helper does the transport.
            helper = self.configuration.safe_get("target_helper")
            if (self.configuration.safe_get("ember_host_attach") == "nbdfuse"
                    and helper != "tgtadm"):
                raise exception.InvalidConfigurationValue(
                    option="ember_host_attach",
                    value="nbdfuse makes a file, which only target_helper = "
                          "tgtadm can export; use nbd-client")
            if helper not in self.target_mapping:
                raise exception.InvalidConfigurationValue(option="target_helper",
                                                          value=helper)
            self.target_driver = importutils.import_object(
                self.target_mapping[helper], configuration=self.configuration,
                executor=self._execute)
            self.protocol = (self.target_driver.storage_protocol
                             or self.target_driver.protocol)
        elif self.export_mode == "local":
            self.protocol = "local"

    @staticmethod
    def get_driver_options():
        return ember_opts

    # ---- set-up -----------------------------------------------------------

    def _client(self, endpoint, ca="", cert="", key=""):
        conf = self.configuration
        return AgentClient(endpoint, tls_ca=ca or None, tls_cert=cert or None,
                           tls_key=key or None,
                           timeout=conf.safe_get("ember_rpc_timeout") or 30.0,
                           retries=conf.safe_get("ember_rpc_retries") or 0)

    def do_setup(self, context):
        conf = self.configuration
        targets = replication.parse_devices(conf.safe_get("replication_device"))
        self._targets = {t.backend_id: t for t in targets}
        try:
            self._primary = self._client(
                conf.safe_get("ember_agent_endpoint"),
                conf.safe_get("ember_tls_ca"), conf.safe_get("ember_tls_cert"),
                conf.safe_get("ember_tls_key"))
            self._clients = {
                t.backend_id: self._client(t.endpoint, t.tls_ca, t.tls_cert, t.tls_key)
                for t in targets}
        except (ValueError, OSError) as e:
            raise exception.InvalidConfigurationValue(
                option="ember_agent_endpoint", value=str(e))
        if self.export_mode != "nbd":
            self._attacher = attach.HostAttacher(
                conf.safe_get("ember_host_attach") or "nbd-client",
                conf.safe_get("ember_attach_dir"), execute=self._execute)
        if self._active_backend_id and self._active_backend_id not in self._targets:
            raise exception.InvalidConfigurationValue(
                option="active_backend_id",
                value=f"{self._active_backend_id} (not a replication_device backend_id)")

    def check_for_setup_error(self):
        # Configuration errors were raised by do_setup. An unreachable agent
        # is not one: stats report the backend down until it answers.
        if self._primary is None:
            raise exception.VolumeDriverException(message="do_setup did not run")

    @property
    def _agent(self):
        """The agent that serves the volumes now: this host's, or the
        target's after a failover."""
        if self._active_backend_id:
            return self._clients[self._active_backend_id]
        return self._primary

    def _default_target(self):
        return next(iter(self._targets.values()), None)

    # ---- stats ------------------------------------------------------------

    def _update_volume_stats(self):
        backend_name = (self.configuration.safe_get("volume_backend_name")
                        or "Ember")
        stats = {
            "volume_backend_name": backend_name,
            "vendor_name": "Ember",
            "driver_version": self.VERSION,
            "storage_protocol": self.protocol,
            "total_capacity_gb": 0,
            "free_capacity_gb": 0,
            "reserved_percentage": self.configuration.safe_get("reserved_percentage") or 0,
            "thin_provisioning_support": True,
            "thick_provisioning_support": False,
            "multiattach": False,
            # A host attachment has the size it was made with: grow a
            # volume while it is detached.
            "online_extend_support": False,
            "consistent_group_snapshot_enabled": False,
            "consistent_group_replication_enabled": bool(self._targets),
            "replication_enabled": bool(self._targets),
            # Every volume of a replicated type goes to every target (a
            # type's ember:replication_target_az may narrow it to fewer).
            "replication_targets": list(self._targets),
            "replication_count": len(self._targets),
            # For types: capabilities:replication_target_azs='<in> az3'
            # places them only on backends with a target in that zone.
            "replication_target_azs": replication.target_zones(
                self._targets.values()),
            "replication_type": [],
            "backend_state": "down",
        }
        try:
            caps = self._agent.raw("GetCapabilities", pb.GetCapabilitiesRequest())
        except Exception as e:  # any failure: the backend is down, not the driver
            LOG.warning("Ember agent %s unreachable for stats: %s",
                        self._agent.endpoint, e)
            self._stats = stats
            return
        stats["backend_state"] = "up"
        stats["total_capacity_gb"] = round(caps.capacity_total_bytes / GiB, 2)
        stats["free_capacity_gb"] = round(caps.capacity_free_bytes / GiB, 2)
        known = {t.site: t for t in caps.replication_targets}
        mins, maxs, types = [], [], set()
        for backend_id in self._targets:
            t = known.get(backend_id)
            if t is None or t.state != "connected":
                continue
            types.add("async")
            if t.sync_possible:
                types.add("sync")
            mins.append(t.min_rpo_seconds)
            maxs.append(t.max_rpo_seconds)
        stats["replication_type"] = sorted(types)
        # 'error' makes Cinder ask get_replication_error_status which
        # volumes to mark (split-brain or fenced replicas).
        stats["replication_status"] = (
            fields.ReplicationStatus.ENABLED if self._targets
            else fields.ReplicationStatus.DISABLED)
        try:
            replicas = self._agent.raw("ListReplications",
                                       pb.ListReplicationsRequest()).replications
            if any(r.state in ("split-brain", "fenced") for r in replicas):
                stats["replication_status"] = fields.ReplicationStatus.ERROR
        except Exception as e:
            LOG.warning("Ember agent %s: cannot list replicas: %s", self._agent.endpoint, e)
        # Cinder has no standard RPO key: these two are numbers the
        # scheduler compares with '<= N' / '>= N' in volume-type specs.
        if mins:
            stats["replication_rpo_min_seconds"] = min(mins)
            stats["replication_rpo_max_seconds"] = max(maxs)
        self._stats = stats

    # ---- volumes ----------------------------------------------------------

    def _check_replication(self, volume):
        """Refuses, before anything is made, a volume whose type asks for
        replication this backend cannot give (no target, or a target zone
        no replication_device serves)."""
        specs = volume.volume_type.extra_specs if volume.volume_type else {}
        if not replication.volume_spec(specs, self._default_target()).enabled:
            return
        if not self._targets:
            raise exception.InvalidInput(
                reason="the volume type enables replication but this backend "
                       "has no replication_device")
        replication.select_targets(self._targets.values(), specs)

    def _replicate(self, volume, name=None):
        """Enables replication of `volume` (agent name `name`, default
        agent_volume_name) to every target its type selects, when its type
        asks for replication; returns the model update."""
        name = name or agent_volume_name(volume)
        specs = volume.volume_type.extra_specs if volume.volume_type else {}
        spec = replication.volume_spec(specs, self._default_target())
        if not spec.enabled:
            return {"replication_status": fields.ReplicationStatus.DISABLED}
        if not self._targets:
            raise exception.InvalidInput(
                reason="the volume type enables replication but this backend "
                       "has no replication_device")
        # Checked before anything is enabled: a type naming a zone no
        # target serves fails the create with nothing half-made.
        targets = replication.select_targets(self._targets.values(), specs)
        if self._active_backend_id:
            raise exception.InvalidInput(
                reason="the backend is failed over; new replicated volumes "
                       "wait for failback")
        for target in targets:
            # Per target: the type's explicit mode/RPO, else the entry's.
            spec = replication.volume_spec(specs, target)
            self._agent.call("EnableReplication", pb.EnableReplicationRequest(
                volume=name, peer_site=target.backend_id,
                mode=(pb.REPLICATION_MODE_SYNC if spec.mode == "sync"
                      else pb.REPLICATION_MODE_ASYNC),
                rpo_seconds=spec.rpo_seconds,
                rpo_policy=getattr(pb, f"RPO_POLICY_{spec.rpo_policy.upper()}")),
                f"enable replication of {name} to {target.backend_id}")
        return {"replication_status": fields.ReplicationStatus.ENABLED}

    def _finish_create(self, volume, created_size_bytes):
        if _bytes(volume.size) > created_size_bytes:
            self._agent.call("ResizeVolume", pb.ResizeVolumeRequest(
                name=volume.name, size_bytes=_bytes(volume.size)),
                f"grow {volume.name} to {volume.size} GiB")
        update = {"provider_location": f"ember:{volume.name}"}
        update.update(self._replicate(volume))
        return update

    def create_volume(self, volume):
        self._check_replication(volume)
        r = self._agent.call("CreateVolume", pb.CreateVolumeRequest(
            name=volume.name, size_bytes=_bytes(volume.size)),
            f"create {volume.name}")
        return self._finish_create(volume, r.volume.size_bytes)

    def create_volume_from_snapshot(self, volume, snapshot):
        self._check_replication(volume)
        source, snap = agent_volume_name(snapshot.volume), agent_snapshot_name(snapshot)
        r = self._agent.call("CreateVolume", pb.CreateVolumeRequest(
            name=volume.name, size_bytes=_bytes(snapshot.volume_size),
            from_snapshot=pb.SnapshotRef(volume=source, snapshot=snap)),
            f"create {volume.name} from {source}@{snap}")
        return self._finish_create(volume, r.volume.size_bytes)

    def create_cloned_volume(self, volume, src_vref):
        self._check_replication(volume)
        source = agent_volume_name(src_vref)
        r = self._agent.call("CreateVolume", pb.CreateVolumeRequest(
            name=volume.name, size_bytes=_bytes(src_vref.size),
            clone_of_volume=source),
            f"clone {source} as {volume.name}")
        return self._finish_create(volume, r.volume.size_bytes)

    def delete_volume(self, volume):
        # An adopted DR drill volume is stopped as a drill (record too).
        if self._stop_if_drill(volume):
            return
        # Replication first (its secondary goes too); both calls succeed
        # for what is already gone.
        name = agent_volume_name(volume)
        self._agent.call("DisableReplication", pb.DisableReplicationRequest(
            volume=name, delete_secondary=True),
            f"disable replication of {name}")
        self._agent.call("DeleteVolume", pb.DeleteVolumeRequest(name=name),
                         f"delete {name}")

    def extend_volume(self, volume, new_size):
        # A replicated volume's secondary grows first, inside the agent.
        name = agent_volume_name(volume)
        self._agent.call("ResizeVolume", pb.ResizeVolumeRequest(
            name=name, size_bytes=_bytes(new_size)),
            f"extend {name} to {new_size} GiB")

    def create_snapshot(self, snapshot):
        # One agent call, copy-on-write where the agent's file system can
        # reflink: no data passes through this host.
        vol = agent_volume_name(snapshot.volume)
        self._agent.call("CreateSnapshot", pb.CreateSnapshotRequest(
            volume=vol, name=snapshot.name),
            f"snapshot {vol}@{snapshot.name}")

    def delete_snapshot(self, snapshot):
        vol, snap = agent_volume_name(snapshot.volume), agent_snapshot_name(snapshot)
        self._agent.call("DeleteSnapshot", pb.DeleteSnapshotRequest(
            volume=vol, name=snap), f"delete snapshot {vol}@{snap}")

    # ---- exports ----------------------------------------------------------
    # The agent serves every volume over NBD all the time. In the target and
    # local modes this host attaches that export (ember_cinder.attach) and,
    # for target, Cinder's target helper exports the local path to the
    # compute host, which attaches with os-brick as for LVM.

    def _nbd_uri(self, volume):
        name = agent_volume_name(volume)
        r = self._agent.call("GetVolume", pb.GetVolumeRequest(name=name),
                             f"look up {name}")
        return r.volume.nbd_uri, r.volume.size_bytes

    # Host attachments are keyed by the Cinder name (volume-<id>), like the
    # target helper's IQN; only the agent calls use the agent's name.
    def _attach_here(self, volume):
        uri, size = self._nbd_uri(volume)
        if uri.startswith("nbds://"):
            # The agent's NBD listener requires TLS ([nbd_tls]); the host
            # attach helpers here speak plaintext NBD only.
            raise attach.AttachError(
                volume=volume.name,
                reason=f"the agent serves NBD over TLS only ({uri}); use "
                       "ember_export_mode = nbd, whose clients (QEMU, libnbd) "
                       "present a client certificate")
        try:
            return self._attacher.attach(volume.name, uri, size)
        except ValueError as e:
            raise attach.AttachError(volume=volume.name, reason=str(e))

    def create_export(self, context, volume, connector):
        if self.export_mode == "nbd":
            return None
        path = self._attach_here(volume)
        if self.export_mode == "local":
            return None
        try:
            info = self.target_driver.create_export(context, volume, path)
        except Exception:
            self._attacher.detach(volume.name)
            raise
        return {"provider_location": info["location"],
                "provider_auth": info["auth"]}

    def ensure_export(self, context, volume):
        if self.export_mode == "nbd":
            return None
        path = self._attach_here(volume)
        if self.export_mode == "local":
            return None
        return self.target_driver.ensure_export(context, volume, path)

    def remove_export(self, context, volume):
        if self.export_mode == "nbd":
            return None
        if self.export_mode == "target":
            self.target_driver.remove_export(context, volume)
        self._attacher.detach(volume.name)
        return None

    def validate_connector(self, connector):
        if self.export_mode == "target":
            return self.target_driver.validate_connector(connector)
        return True

    def initialize_connection(self, volume, connector):
        """Connection info for os-brick (target: the helper's iSCSI/NVMe-oF
        properties; local: the device on this host); every mode adds the
        agent's nbd_uri for QEMU-native attach."""
        uri, _ = self._nbd_uri(volume)
        if self.export_mode == "target":
            info = self.target_driver.initialize_connection(volume, connector)
        elif self.export_mode == "local":
            host = (connector or {}).get("host")
            if host and host != socket.gethostname():
                raise exception.InvalidConnectorException(
                    missing=f"compute host {host} is not this storage host "
                            f"({socket.gethostname()}): ember_export_mode = "
                            "local only serves a co-located compute")
            path = self._attacher.path(volume.name)
            if path is None:
                raise attach.AttachError(volume=volume.name,
                                         reason="not attached (create_export first)")
            info = {"driver_volume_type": "local", "data": {"device_path": path}}
        else:
            # With [nbd_tls] on the agent the URI is nbds://: the client
            # must run TLS with a certificate the agent's allow-list admits
            # (QEMU tls-creds-x509 / libnbd ?tls-certificates=DIR).
            info = {"driver_volume_type": "nbd",
                    "data": {"export_name": agent_volume_name(volume),
                             "access_mode": "rw",
                             "tls": uri.startswith("nbds://")}}
        info["data"].update({"nbd_uri": uri, "volume_id": volume.id})
        return info

    def terminate_connection(self, volume, connector, **kwargs):
        if self.export_mode == "target":
            self.target_driver.terminate_connection(volume, connector, **kwargs)
        return None
