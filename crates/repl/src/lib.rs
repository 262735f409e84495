//! Links between agents of different sites.
//!
//! - [`PeerTls`]: certificate, key and CA for mutual TLS (rustls; the peer
//!   listener accepts only clients whose certificate the CA signed).
//! - [`serve_peers`]: the peer listener; every refused handshake is logged
//!   with the remote address and rustls' reason.
//! - [`PeerService`]: the `ember.repl.v1.EmberPeer` service (Hello, Ping, Sink).
//! - [`PeerRegistry`]: paired peers persisted in the data dir, with pairing
//!   (Hello), RTT and throughput measurement.
//!
//! - [`Replication`]: replicas this agent is primary for (journal, sessions,
//!   initial sync, catch-up, verify) and [`SecondarySet`], the volumes it
//!   holds for its peers (staging log, atomic batches).

mod audit;
mod budget;
mod bulk;
mod drill;
mod error;
mod events;
mod faults;
mod fencing;
mod frame;
mod hashes;
mod listener;
mod manager;
mod plan;
mod primary;
mod registry;
mod secondary;
mod service;
mod throttle;
mod tls;
mod version;

pub use budget::{
    BudgetUsage, DEFAULT_BUDGET_CAP, MIN_BUDGET, MemoryBudget, default_budget, give_memory_back,
    memory_budget, trim,
};
pub use drill::{DrillError, DrillInfo};
pub use error::{ReplError, Result};
pub use events::{Event, EventBus, EventKind};
pub use faults::Faults;
pub use listener::serve_peers;
pub use manager::{
    DEFAULT_JOURNAL_BYTES, DrillRequest, EnableRequest, GroupMember, GroupPromoteReport,
    GroupStatus, GroupTargetStatus, MAX_RPO_SECONDS, Mismatch, PromoteReport, ReplicaStatus,
    Replication, SYNC_RTT_MAX_US, TargetCapability, TargetStatus, VerifyReport, worst_report,
};
pub use manager::{PointSettings, PointTarget};
pub use primary::link::{Mode, PeerLossPolicy};
pub use primary::rpo::RpoPolicy;
pub use registry::{LinkMeasurement, LinkRates, PeerInfo, PeerRegistry, PeerState};
pub use secondary::points::{PointListing, PointsReport, default_space_cap};
pub use secondary::{SecondarySet, SecondaryStatus};
pub use service::{Identity, PeerService};
pub use tls::PeerTls;
pub use version::ProtocolVersion;
