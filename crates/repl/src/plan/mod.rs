//! Decisions as pure functions: records in, a decision out, no I/O and no
//! clock (callers pass `now`). The executors (`secondary::points`,
//! `manager::points`) only carry decisions out, so every situation is a
//! table row in a unit test before it is code.
//!
//! Only recovery-point decisions live here so far (`points`).

pub(crate) mod points;
