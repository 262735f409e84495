//! `emberd`, the Ember agent, as a library: [`run`] wires the volume store,
//! the NBD listeners and the gRPC control API, and drains them on shutdown.
//! `main.rs` only parses flags, sets up logging and signals.

pub mod config;
mod control;
mod drills;
mod metrics;
mod points;
mod registry;
mod server;

pub use config::Config;
pub use server::{Listeners, run};
