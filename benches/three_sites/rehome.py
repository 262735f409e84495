#!/usr/bin/python3
"""Issue 14's re-homing benchmark: bytes resent to the async target after a
forced promotion of the sync target under load, against volume size.

Per volume size (1 GiB and 4 GiB; --quick: 64 MiB and 256 MiB), a fresh
three-site lab (`emberctl lab up --sites 3`): site-a replicates the volume
sync to site-b and async to site-c; fio writes 4 KiB random writes (QD4)
over the same 32 MiB region for the same time on every size; site-a is
killed (-9) while fio runs; site-b is force-promoted and re-homes site-c.
Reported per size: site-c's `resync_bytes_sent` under site-b, the changed
region, the volume size, and whether site-b re-homed by the common mark.

Target: resent <= changed bytes (the 32 MiB region) + activity-log window,
independent of volume size. The window is 0 here: the re-homing resend is
the union of the two targets' applied-block sets since their newest common
mark, exact in memory (only a crash of the *target* widens its set, by 256
blocks per run); the activity-log window (al_extent x al_extents, 2 GiB by
default) only widens the *old primary's* change set when it returns.

usage: benches/three_sites/rehome.py [--quick] [--runtime S] [--bin-dir DIR] [--dir DIR]
--quick (a CI smoke; works with debug binaries): small volumes, 2 s of
writes; asserts the target and that site-c equals site-b. Needs: emberd
and emberctl, fio, cmp.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(ROOT, "benches", "repl"))
from compare import run  # noqa: E402

MIB = 1 << 20
REGION = 32 * MIB


class Lab:
    """A detached three-site lab (`emberctl lab up --sites 3`)."""

    def __init__(self, bins, tmp):
        self.ctl_bin = os.path.join(bins, "emberctl")
        for b in (self.ctl_bin, os.path.join(bins, "emberd")):
            if not os.access(b, os.X_OK):
                raise RuntimeError(f"{b} missing: cargo build --bins (--release for numbers)")
        self.dir = tmp
        run(self.ctl_bin, "lab", "up", "--sites", "3", "--dir", self.dir, "--detach",
            "--size", "16M")
        self.up = True
        with open(os.path.join(self.dir, "lab.json")) as f:
            self.lab = json.load(f)

    def ctl(self, site, *args, check=True):
        out = run(self.ctl_bin, "--api", self.lab["sites"][site]["api"], "--json", *args,
                  check=check)
        return json.loads(out) if out.strip() else None

    def uri(self, site, vol):
        return f"nbd://{self.lab['sites'][site]['nbd']}/{vol}"

    def data_file(self, site, vol):
        return os.path.join(self.dir, site, "volumes", vol, "data.img")

    def wait(self, site, vol, what, pred, timeout=300):
        deadline = time.time() + timeout
        s = None
        while time.time() < deadline:
            try:
                s = self.ctl(site, "replica", "status", vol)
            except RuntimeError:
                s = None  # mid role change
            if s is not None and pred(s):
                return s
            time.sleep(0.1)
        raise RuntimeError(f"{vol} on {site}: {what} not reached within {timeout} s: {s}")

    def down(self):
        if self.up:
            run(self.ctl_bin, "lab", "down", "--dir", self.dir, check=False)
            self.up = False


def in_sync(s, peers):
    got = {t["peer"]: t for t in s.get("targets", [])}
    return (set(peers) <= set(got)
            and all(got[p]["state"] == "in-sync" and got[p]["lag_bytes"] == 0 for p in peers))


def marks_held(lab, site, vol):
    path = os.path.join(lab.dir, site, "replicas", "secondary", "marks", f"{vol}.json")
    try:
        with open(path) as f:
            return len(json.load(f).get("marks", []))
    except (OSError, ValueError):
        return 0


def one_size(bins, parent, size, runtime):
    tmp = tempfile.mkdtemp(prefix="ember-rehome-", dir=parent)
    lab = None
    vol = "rh"
    try:
        lab = Lab(bins, os.path.join(tmp, "lab"))
        lab.ctl("site-a", "volume", "create", vol, "--size", f"{size // MIB}M")
        lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-b", "--mode", "sync")
        lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-c", "--mode", "async",
                "--rpo", "60s")
        lab.wait("site-a", vol, "both targets in sync", lambda s: in_sync(s, ["site-b", "site-c"]))
        # Marks move with writes: a little traffic until both targets hold one.
        deadline = time.time() + 60
        while not all(marks_held(lab, s, vol) for s in ("site-b", "site-c")):
            if time.time() > deadline:
                raise RuntimeError("no common mark held within 60 s")
            run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 4k", lab.uri("site-a", vol))
        fio = subprocess.Popen(
            ["fio", "--name=load", "--ioengine=nbd", f"--uri={lab.uri('site-a', vol)}",
             "--rw=randwrite", "--bs=4k", "--iodepth=4", f"--size={REGION}", "--time_based",
             f"--runtime={runtime * 3}", "--output-format=json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(runtime)
        os.kill(lab.lab["sites"]["site-a"]["pid"], signal.SIGKILL)
        fio.wait(timeout=60)
        t0 = time.time()
        p = lab.ctl("site-b", "replica", "promote", vol, "--force")
        s = lab.wait("site-b", vol, "site-c re-homed",
                     lambda s: s["role"] == "primary" and in_sync(s, ["site-c"]))
        took = time.time() - t0
        sent = next(t["resync_bytes_sent"] for t in s["targets"] if t["peer"] == "site-c")
        with open(os.path.join(lab.dir, "site-b", "replicas", "audit.log")) as f:
            by_mark = "since common mark" in f.read()
        run("cmp", lab.data_file("site-b", vol), lab.data_file("site-c", vol))
        return {"size_bytes": size, "changed_region_bytes": REGION, "resent_bytes": sent,
                "by_common_mark": by_mark, "generation": p["generation"],
                "rehome_seconds": round(took, 2)}
    finally:
        if lab is not None:
            lab.down()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small volumes: the CI smoke")
    ap.add_argument("--runtime", type=int, default=10, help="seconds of writes before the kill")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--dir", default=None, help="parent of the temp work dirs")
    a = ap.parse_args()
    sizes = [1 << 30, 4 << 30]
    if a.quick:
        sizes, a.runtime = [64 * MIB, 256 * MIB], 2
    for tool in ["fio", "cmp", "qemu-io"]:
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")
    print(f"load before: {os.getloadavg()}", flush=True)
    rows = []
    for size in sizes:
        r = one_size(os.path.abspath(a.bin_dir), a.dir, size, a.runtime)
        rows.append(r)
        print(f"rehome: volume {size / MIB:6.0f} MiB, {a.runtime} s of 4k randwrite over "
              f"{REGION / MIB:.0f} MiB: resent {r['resent_bytes'] / MIB:6.2f} MiB to site-c "
              f"(by common mark: {r['by_common_mark']}, {r['rehome_seconds']} s), "
              f"site-c == site-b", flush=True)
    print(f"load after: {os.getloadavg()}")
    met = all(r["resent_bytes"] <= r["changed_region_bytes"] and r["by_common_mark"]
              for r in rows)
    print(json.dumps({"runtime_s": a.runtime, "rows": rows, "target_met": met}, indent=1))
    if not met:
        print("FAIL: re-homing resent more than the changed bytes, or not by a common mark",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
