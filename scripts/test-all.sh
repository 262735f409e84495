#!/usr/bin/env bash
# Runs every Ember test on a fresh Debian machine: installs the real NBD
# clients the integration tests drive, builds, runs unit, property and
# integration tests, and ends with one "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."

# tgt (userspace iSCSI target) and libiscsi-dev (the test initiator builds
# against it) are for the Cinder driver's attach tests; xfsprogs makes the
# loop-mounted reflink file systems of the copy-on-write tests; prometheus
# brings promtool for the alerting-rule tests; tmux drives `emberctl top`.
packages=(qemu-utils libnbd-bin python3-libnbd nbdkit fio nbd-client rsync iperf3 python3-prometheus-client
  rabbitmq-server tgt libiscsi-dev xfsprogs prometheus tmux)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export CARGO_TERM_COLOR=never
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
log=$(mktemp)
status=0
# Benches are compiled and run once as tests so they cannot rot.
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
cargo bench -p ember-benches --locked -- --test 2>&1 | tee -a "$log" || status=$?
# Benchmark scripts end to end at toy sizes (debug binaries): proves they
# run; the numbers in benches/RESULTS.md come from release runs.
smoke() {
  local name=$1; shift
  local out
  out=$(mktemp)
  # A hang fails the smoke (the scale smoke once deadlocked) instead of CI.
  if timeout 900 /usr/bin/python3 "$@" --quick --bin-dir target/debug >"$out" 2>&1; then
    grep -v '^[ {}]' "$out" || true
    echo "$name bench smoke: 1 passed" | tee -a "$log"
  else
    cat "$out"
    echo "$name bench smoke: 1 failed" | tee -a "$log"
    status=1
  fi
  rm -f "$out"
}
# The Cinder driver shim's venv: the real cinder 29.0.0 and the shim
# installed from source (its gRPC stubs generated from proto/ by the pinned
# grpcio-tools). Made before the smokes: the snapshot benchmark times the
# driver's own gRPC path with it.
venv=target/shim-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "./driver-shim[test]"
smoke repl benches/repl/compare.py
smoke rpo benches/rpo/adherence.py
smoke failback benches/rpo/failback.py
smoke snap benches/snap/compare.py
smoke points benches/points/overhead.py
smoke scale benches/scale/scale.py
smoke three_sites benches/three_sites/latency.py
smoke three_sites_rehome benches/three_sites/rehome.py

# The Cinder driver shim, tested against real agents and a real Cinder.
(cd driver-shim/tests && EMBER_BIN_DIR="$PWD/../../target/debug" \
  "../../$venv/bin/python" -m pytest -q -p no:cacheprovider .) 2>&1 | tee -a "$log" || status=$?

# The installed emberctl is static-pie (scripts/build-release.sh). Built the
# same way at the dev profile, it must have no program interpreter and work:
# a version, a refused connection, a host name through glibc's NSS.
static_cli() {
  local ctl=target/debug/emberctl out
  out=$(EMBER_PROFILE=dev ./scripts/build-release.sh 2>&1) || { echo "$out"; return 1; }
  if readelf -l "$ctl" | grep -q INTERP; then echo "$ctl is dynamically linked"; return 1; fi
  out=$("$ctl" --version) || return 1
  [[ $out == "ember-ctl "* ]] || { echo "$out"; return 1; }
  out=$("$ctl" --api unix:/nonexistent/api.sock status 2>&1) && return 1
  grep -q 'cannot reach the agent' <<<"$out" || { echo "$out"; return 1; }
  out=$("$ctl" --api http://localhost:1 status 2>&1) && return 1
  grep -q 'cannot reach the agent at http://localhost:1' <<<"$out" || { echo "$out"; return 1; }
}
if static_cli; then
  echo "static emberctl: 1 passed" | tee -a "$log"
else
  echo "static emberctl: 1 failed" | tee -a "$log"
  status=1
fi

passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
rm -f "$log"
echo "${passed} passed, ${failed} failed"
if [ "$status" -ne 0 ] || [ "$failed" -ne 0 ]; then exit 1; fi
