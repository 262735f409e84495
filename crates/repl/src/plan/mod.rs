//! Decisions as pure functions: records in, a decision out, no I/O and no
//! clock (callers pass `now`). The executors (`secondary::points`,
//! `manager::points`) only carry decisions out, so every situation is a
//! table row in a unit test before it is code.
//!
//! Recovery-point decisions live in `points`; who resends what to whom
//! after a promotion of one of several targets in `rehome`.

pub(crate) mod points;
pub(crate) mod rehome;
