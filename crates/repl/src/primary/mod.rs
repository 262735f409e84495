//! The primary side of replication: the write journal, the link a volume
//! reports its writes to, and the session that ships them.

pub(crate) mod journal;
pub(crate) mod link;
pub(crate) mod session;
