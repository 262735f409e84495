//! Ember benchmarks. Micro-benchmarks live in `benches/benches/`; the
//! end-to-end NBD comparison against qemu-nbd is `benches/fio/compare.py`,
//! with results in `benches/RESULTS.md`.
