//! Agent-to-agent protocol versions. One line per bump, never reuse a number.

/// Versions of the `ember.repl.v1` wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum ProtocolVersion {
    /// Pairing: Hello with identities and capabilities, Ping, Sink.
    V1 = 1,
    /// Replication: OpenReplica, CloseReplica, ReadHashes, Replicate.
    V2 = 2,
    /// Failover: generations (fencing), Demote, Promote, divergent ranges.
    V3 = 3,
    /// Consistency groups: group commits (`BatchCommit.group_size`).
    V4 = 4,
    /// ResizeReplica: a replicated volume grows on both sides.
    V5 = 5,
    /// Recovery points: the schedule in `OpenReplica`, `CreatePoint`.
    V6 = 6,
    /// Several targets per volume with forced re-homing: `AnnounceMark`
    /// (common marks), `GetRehomeRecord`.
    V7 = 7,
}

impl ProtocolVersion {
    /// The newest version this build speaks.
    pub const CURRENT: Self = Self::V7;
    /// Every version this build can speak, oldest first.
    pub const SUPPORTED: &'static [u32] = &[1, 2, 3, 4, 5, 6, 7];
    /// The oldest version that can replicate.
    pub const REPLICATION: u32 = 2;
    /// The oldest version that can promote and demote.
    pub const FAILOVER: u32 = 3;
    /// The oldest version that can replicate consistency groups.
    pub const GROUPS: u32 = 4;
    /// The oldest version that can grow a replicated volume.
    pub const RESIZE: u32 = 5;
    /// The oldest version that can take recovery points.
    pub const POINTS: u32 = 6;
    /// The oldest version a second (or further) target of a volume needs:
    /// forced re-homing relies on the marks it announces and records.
    pub const MULTI_TARGET: u32 = 7;

    /// The highest version both sides support.
    pub fn negotiate(theirs: &[u32]) -> Option<u32> {
        Self::SUPPORTED
            .iter()
            .rev()
            .copied()
            .find(|v| theirs.contains(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_highest_common_version_or_none() {
        assert_eq!(ProtocolVersion::negotiate(&[1, 8]), Some(1));
        assert_eq!(ProtocolVersion::negotiate(&[1, 2]), Some(2));
        assert_eq!(ProtocolVersion::negotiate(&[2, 3, 4]), Some(4));
        assert_eq!(ProtocolVersion::negotiate(&[4, 5, 6]), Some(6));
        assert_eq!(ProtocolVersion::negotiate(&[4, 5]), Some(5));
        assert_eq!(ProtocolVersion::negotiate(&[2, 3]), Some(3));
        assert_eq!(ProtocolVersion::negotiate(&[6, 7]), Some(7));
        assert_eq!(ProtocolVersion::negotiate(&[5, 6]), Some(6));
        assert_eq!(ProtocolVersion::negotiate(&[8, 9]), None);
        assert_eq!(ProtocolVersion::negotiate(&[]), None);
    }
}
