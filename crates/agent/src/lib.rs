//! `emberd`, the Ember agent, as a library: [`run`] wires the volume store,
//! the NBD listeners and the gRPC control API, and drains them on shutdown.
//! `main.rs` only parses flags, sets up logging and signals.

mod authz;
pub mod config;
mod control;
mod drills;
mod listen_policy;
mod metrics;
pub mod nbd_policy;
mod points;
mod registry;
mod server;
mod verify_reply;

pub use config::Config;
pub use server::{Listeners, run};
