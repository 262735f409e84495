#!/usr/bin/env bash
# Ember's main job on an embedded default: builds release binaries and starts
# a local lab (emberd + a demo volume), with a live status view. Ctrl-C stops.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-release.sh
exec ./target/release/emberctl lab up --dir "${EMBER_LAB_DIR:-lab}" "$@"
