"""Cinder's replication workflow for the Ember driver: failover_host and
failback, active/active failover, freeze/thaw, replication error status and
group replication — each a promotion of Ember secondaries (volumes or
consistency groups) on the target site.

A mixin of `EmberDriver`: it uses the driver's agent clients (`_primary`,
`_clients`, `_targets`, `_active_backend_id`) and configuration.
"""
import time

import grpc
from cinder import exception
from cinder.objects import fields
from oslo_log import log as logging

from ember_cinder import errors
from ember_cinder.client import pb
from ember_cinder.manage import agent_volume_name

LOG = logging.getLogger(__name__)

# How long failover_host waits for the other targets to follow the
# promoted site (a forced promotion re-homes them in the background, about
# a second each); past it the failover still succeeds, and says so.
REHOME_WAIT_SECONDS = 60.0
REHOME_POLL_SECONDS = 0.5


def rehome_pending(expected, states):
    """The (volume, site) pairs of `expected` not yet following their new
    primary: `states` maps (volume, site) to that site's replica status (or
    None when it answered nothing), `expected` maps (volume, site) to the
    promoted site. A pure function: the waiting loop's only decision."""
    pending = []
    for (volume, site), primary in sorted(expected.items()):
        s = states.get((volume, site))
        if s is None or s.role != "secondary" or s.peer_site != primary:
            pending.append((volume, site))
    return pending


class ReplicationMixin:
    """failover_host, failback, group replication."""

    # ---- replication ------------------------------------------------------

    def _status(self, client, name):
        try:
            return client.raw("GetReplicationStatus",
                              pb.GetReplicationStatusRequest(volume=name)).status
        except Exception:  # not replicated there, or the agent is down
            return None

    def _planned_or_forced(self, client, method, request, what):
        """Runs a planned promotion (zero loss: the old primary drains).
        Only when the old primary cannot be reached (UNAVAILABLE or a
        deadline) is the promotion forced; any other refusal — split-brain,
        an inconsistent copy, a group not at one point — is raised, never
        overridden. Returns (response, forced)."""
        timeout = 4 * (self.configuration.safe_get("ember_rpc_timeout") or 30.0)
        try:
            return client.raw(method, request, timeout=timeout), False
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                grpc.StatusCode.DEADLINE_EXCEEDED):
                raise errors.translate(e, what) from None
            LOG.warning("Planned %s failed, the old primary is unreachable (%s); "
                        "forcing it", what, e.details())
        request.force = True
        return client.call(method, request, f"forced {what}", timeout=timeout), True

    def _promote_on(self, client, name, where):
        """Promotes `name` on `client`'s site (see _planned_or_forced)."""
        r, _ = self._planned_or_forced(
            client, "PromoteReplica", pb.PromoteReplicaRequest(volume=name, force=False),
            f"promotion of {name} on {where}")
        return r

    def _promote_group_on(self, client, name, where):
        """Promotes Ember group `name` on `client`'s site (see
        _planned_or_forced); forced, every member lands on the group's one
        point, which is logged."""
        r, forced = self._planned_or_forced(
            client, "PromoteGroup", pb.PromoteGroupRequest(name=name, force=False),
            f"promotion of group {name} on {where}")
        if forced:
            LOG.warning("Group %s force-promoted on %s: writes after %d (unix ns) are lost",
                        name, where, r.recovery_point_unix_ns)
        return r

    def _promote_groups(self, client, groups, where, status):
        """Promotes each replicated group on `client`'s site; returns
        Cinder's group updates (`status`, or failover-error per group)."""
        updates = []
        for g in groups or []:
            result = status
            try:
                self._promote_group_on(client, self._group_name(g), where)
            except exception.VolumeBackendAPIException as e:
                LOG.error("Promotion of group %s on %s failed: %s", g.id, where, e)
                result = fields.ReplicationStatus.FAILOVER_ERROR
            updates.append({"group_id": g.id, "updates": {"replication_status": result}})
        return updates

    def _choose_target(self, volumes):
        """No target named: the one with the least lag over these volumes
        (reachable targets only)."""
        lags = {}
        for v in volumes:
            s = self._status(self._primary, agent_volume_name(v))
            if s is not None:
                lags[s.peer_site] = max(lags.get(s.peer_site, 0.0), s.lag_seconds)
        best, best_lag = None, None
        for backend_id, client in self._clients.items():
            try:
                client.raw("GetCapabilities", pb.GetCapabilitiesRequest(), timeout=5)
            except Exception:
                continue
            lag = lags.get(backend_id, 0.0)
            if best is None or lag < best_lag:
                best, best_lag = backend_id, lag
        if best is None:
            raise exception.InvalidReplicationTarget(
                reason="no replication target is reachable")
        return best

    def _holds_replica(self, client, name):
        """Whether `client`'s site holds a copy of `name` it can promote (a
        secondary, or already the primary after an interrupted failover).
        A volume whose type narrowed its targets to other zones has none
        there."""
        try:
            s = client.raw("GetReplicationStatus",
                           pb.GetReplicationStatusRequest(volume=name)).status
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            # Unreachable or failing: let the promotion try and report
            # failover-error, rather than call the volume unreplicated.
            return True
        return s.role in ("secondary", "primary")

    def _rehome_expected(self, names, promoted_on):
        """(volume, other target) → `promoted_on` for every other target
        that holds a copy of a volume about to be promoted there."""
        expected = {}
        for backend_id, client in self._clients.items():
            if backend_id == promoted_on:
                continue
            for name in names:
                s = self._status(client, name)
                if s is not None and s.role == "secondary":
                    expected[(name, backend_id)] = promoted_on
        return expected

    def _wait_rehomed(self, expected, timeout=None, poll=REHOME_POLL_SECONDS):
        """Waits (bounded) until every other target in `expected` follows
        the promoted site, so that failover_host returns with the volumes
        protected again. A timeout is logged, never raised: the promotion
        stands and the agents keep re-homing in the background."""
        timeout = REHOME_WAIT_SECONDS if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending = list(expected)
        while True:
            states = {(v, site): self._status(self._clients[site], v)
                      for v, site in pending}
            pending = rehome_pending({k: expected[k] for k in pending}, states)
            if not pending:
                if expected:
                    LOG.info("Failover: %d other target copies follow the new primary",
                             len(expected))
                return True
            if time.monotonic() >= deadline:
                LOG.warning("Failover: after %.0f s, %d other target copies do not follow "
                            "the new primary yet (%s); the agents keep re-homing them",
                            timeout, len(pending),
                            ", ".join(f"{v} on {site}" for v, site in pending))
                return False
            time.sleep(poll)

    def failover_host(self, context, volumes, secondary_id=None, groups=None):
        if secondary_id == "default":
            return self._failback(volumes, groups)
        if secondary_id is None:
            secondary_id = self._choose_target(volumes)
        if secondary_id == self._active_backend_id:
            raise exception.InvalidReplicationTarget(
                reason=f"already failed over to {secondary_id}")
        if secondary_id not in self._targets:
            raise exception.InvalidReplicationTarget(
                reason=f"{secondary_id} is not a replication_device backend_id "
                       f"(configured: {', '.join(self._targets) or 'none'})")
        # Failed over already (X), now to Y: the agents re-home, so Y's
        # copy is promoted the same way and X becomes one of its targets.
        client = self._clients[secondary_id]
        # The other targets holding these volumes now: once promoted on
        # secondary_id, each must follow it (waited for below).
        expected = self._rehome_expected(
            [agent_volume_name(v) for v in volumes], secondary_id)
        # Groups first, so their members land on one point; a member's own
        # promotion below then finds it primary already.
        group_updates = self._promote_groups(client, groups, secondary_id,
                                             fields.ReplicationStatus.FAILED_OVER)
        volume_updates = []
        for v in volumes:
            if (v.replication_status not in (fields.ReplicationStatus.ENABLED,
                                             fields.ReplicationStatus.FAILED_OVER)
                    or not self._holds_replica(client, agent_volume_name(v))):
                # Not replicated, or not to this target (its type picked
                # other zones): it stays behind, unusable until failback.
                volume_updates.append({"volume_id": v.id, "updates": {"status": "error"}})
                continue
            try:
                r = self._promote_on(client, agent_volume_name(v), secondary_id)
            except exception.VolumeBackendAPIException as e:
                LOG.error("Failover of %s to %s failed: %s", agent_volume_name(v),
                          secondary_id, e)
                volume_updates.append({"volume_id": v.id, "updates": {
                    "replication_status": fields.ReplicationStatus.FAILOVER_ERROR}})
                continue
            if r.forced:
                LOG.warning("%s force-promoted on %s: writes after recovery point "
                            "%d (unix ns) are lost", agent_volume_name(v), secondary_id,
                            r.recovery_point_unix_ns)
            volume_updates.append({"volume_id": v.id, "updates": {
                "replication_status": fields.ReplicationStatus.FAILED_OVER}})
        # One update per volume, in order.
        promoted = {agent_volume_name(v) for v, u in zip(volumes, volume_updates)
                    if u["updates"].get("replication_status")
                    == fields.ReplicationStatus.FAILED_OVER}
        self._wait_rehomed({k: p for k, p in expected.items() if k[0] in promoted})
        self._active_backend_id = secondary_id
        return secondary_id, volume_updates, group_updates

    def _failback(self, volumes, groups):
        if not self._active_backend_id:
            raise exception.InvalidReplicationTarget(
                reason="not failed over: nothing to fail back")
        group_updates = self._promote_groups(self._primary, groups, "the primary site",
                                             fields.ReplicationStatus.ENABLED)
        volume_updates = []
        for v in volumes:
            if v.replication_status != fields.ReplicationStatus.FAILED_OVER:
                continue
            try:
                self._promote_on(self._primary, agent_volume_name(v), "the primary site")
            except exception.VolumeBackendAPIException as e:
                LOG.error("Failback of %s failed: %s", agent_volume_name(v), e)
                volume_updates.append({"volume_id": v.id, "updates": {
                    "replication_status": fields.ReplicationStatus.FAILOVER_ERROR}})
                continue
            volume_updates.append({"volume_id": v.id, "updates": {
                "replication_status": fields.ReplicationStatus.ENABLED}})
        self._active_backend_id = None
        return "default", volume_updates, group_updates

    def failover(self, context, volumes, secondary_id=None, groups=None):
        # Active/active: do the work, switch over in failover_completed.
        active = self._active_backend_id
        result = self.failover_host(context, volumes, secondary_id, groups)
        self._active_backend_id = active
        return result

    def failover_completed(self, context, active_backend_id=None):
        self._active_backend_id = (None if active_backend_id in (None, "", "default")
                                   else active_backend_id)

    def freeze_backend(self, context):
        # Cinder refuses management calls while frozen; the agents keep
        # serving and replicating. Nothing to do here.
        return True

    def thaw_backend(self, context):
        return True

    def get_replication_error_status(self, context, groups):
        """Replicas the agent reports split-brain or fenced: Cinder marks
        them in error until an admin resolves them (emberctl replica
        demote --discard-local on the loser)."""
        broken = [s for s in self._agent.raw("ListReplications",
                                             pb.ListReplicationsRequest()).replications
                  if s.state in ("split-brain", "fenced")]
        ids = {}
        if any(not s.volume.startswith("volume-") for s in broken):
            # A managed volume keeps its agent name: only Cinder's database
            # knows which volume it is.
            try:
                ids = self._managed_map(self._my_cinder_volumes(context))
            except Exception as e:
                LOG.warning("Ember: cannot map agent names to Cinder volumes: %s", e)
        volume_updates = []
        for s in broken:
            LOG.error("Replica %s is %s: %s", s.volume, s.state, s.last_error)
            vid = ids.get(s.volume)
            if vid is None and s.volume.startswith("volume-"):
                vid = s.volume[len("volume-"):]
            if vid is not None:
                volume_updates.append({
                    "volume_id": vid,
                    "replication_status": fields.ReplicationStatus.ERROR})
        return [], volume_updates

    # ---- group replication (consistency groups) ---------------------------
    # A Cinder group of a type with consistent_group_replication_enabled is
    # an Ember consistency group named group-<id>: its volumes replicate
    # with one write order and fail over to one point.

    @staticmethod
    def _group_name(group):
        return f"group-{group.id}"

    def enable_replication(self, context, group, volumes):
        target = self._default_target()
        if target is None:
            raise exception.InvalidInput(reason="this backend has no replication_device")
        name = self._group_name(group)
        self._agent.call("CreateGroup", pb.CreateGroupRequest(
            name=name, peer_site=target.backend_id), f"create group {name}")
        volume_updates = []
        for v in volumes:
            member = agent_volume_name(v)
            self._agent.call("AddToGroup", pb.GroupMemberRequest(
                group=name, volume=member), f"add {member} to {name}")
            volume_updates.append({"id": v.id, "replication_status":
                                   fields.ReplicationStatus.ENABLED})
        return {"replication_status": fields.ReplicationStatus.ENABLED}, volume_updates

    def disable_replication(self, context, group, volumes):
        name = self._group_name(group)
        volume_updates = []
        for v in volumes:
            try:
                member = agent_volume_name(v)
                self._agent.call("RemoveFromGroup", pb.GroupMemberRequest(
                    group=name, volume=member), f"remove {member} from {name}")
            except exception.VolumeBackendAPIException as e:
                LOG.warning("Group %s: %s", name, e)
            volume_updates.append({"id": v.id, "replication_status":
                                   fields.ReplicationStatus.ENABLED})
        self._agent.call("DeleteGroup", pb.DeleteGroupRequest(name=name),
                         f"delete group {name}")
        return {"replication_status": fields.ReplicationStatus.DISABLED}, volume_updates

    def failover_replication(self, context, group, volumes, secondary_backend_id=None):
        """Promotes the whole Ember group on the target site (or back on
        this one for 'default'): planned when the current primary answers,
        forced otherwise — every member lands on the group's one point."""
        name = self._group_name(group)
        back = secondary_backend_id == "default"
        if back:
            client, where = self._primary, "the primary site"
        else:
            backend_id = secondary_backend_id or next(iter(self._targets), None)
            if backend_id not in self._targets:
                raise exception.InvalidReplicationTarget(
                    reason=f"{backend_id} is not a replication_device backend_id")
            client, where = self._clients[backend_id], backend_id
        self._promote_group_on(client, name, where)
        status = (fields.ReplicationStatus.ENABLED if back
                  else fields.ReplicationStatus.FAILED_OVER)
        return ({"replication_status": status},
                [{"id": v.id, "replication_status": status} for v in volumes])
