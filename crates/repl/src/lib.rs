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
//! Replication (shipping writes, resync) builds on these links.

mod error;
mod listener;
mod registry;
mod service;
mod tls;
mod version;

pub use error::{ReplError, Result};
pub use listener::serve_peers;
pub use registry::{LinkMeasurement, PeerInfo, PeerRegistry, PeerState};
pub use service::{Identity, PeerService};
pub use tls::PeerTls;
pub use version::ProtocolVersion;
