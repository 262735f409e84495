#!/usr/bin/env bash
# Builds the release binaries an operator installs: target/release/emberd and
# a static-pie target/release/emberctl.
#
# Why emberctl is linked statically: it is a short-lived process run once per
# admin or script call, and on this class of machine loading its three shared
# libraries costs more than its own work — `emberctl --version` takes 0.60 ms
# of CPU dynamically linked and 0.31 ms static-pie, and a whole
# `emberctl snapshot create` falls from ~1.9x to ~1.5x a `cp --reflink`
# (benches/RESULTS.md, issue 13, "Run 12"). emberd is long-running and stays
# dynamically linked.
#
# `cargo rustc` passes the flag to the final emberctl crate only: std and
# every dependency are the ones `cargo build` compiled, and glibc's static
# archives (libc6-dev) do the rest. It cannot go in .cargo/config.toml:
# rustflags there reach proc-macro crates, which cannot be built with
# crt-static. Lookups of host names still use the host's NSS modules, so the
# binary belongs on a host with the glibc it was built against (as a
# distribution package is): rebuild it with glibc updates.
#
# EMBER_PROFILE=dev builds the same way without optimisation (the test
# command uses that to check the static link keeps working).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${EMBER_PROFILE:-release}
cargo build --profile "$profile" --locked --bin emberd
cargo rustc --profile "$profile" --locked -p ember-ctl --bin emberctl \
  -- -C target-feature=+crt-static
