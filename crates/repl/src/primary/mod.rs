//! The primary side of replication: the write journal, the link a volume
//! reports its writes to, the session that ships them, and RPO enforcement.

pub(crate) mod group;
pub(crate) mod journal;
pub(crate) mod link;
pub(crate) mod rpo;
pub(crate) mod session;
pub(crate) mod targets;
