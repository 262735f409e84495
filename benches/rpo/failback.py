#!/usr/bin/env python3
"""Failback cost benchmark (issue 5): bytes moved vs volume size.

For each volume size, on a two-site lab (`emberctl lab`):
1. site-a replicates a volume (a quarter of it random data) to site-b,
   async, until in sync;
2. site-a is frozen (SIGSTOP: a site that looks dead, sockets and all)
   and site-b is force-promoted (generation 2);
3. 1 % of the volume is rewritten on site-b;
4. site-a resumes (SIGCONT), meets the newer generation, is fenced and
   demoted, hands over its change set, and site-b resends the union of
   both change sets.

Reports, per size, the bytes examined and sent by the failback resync
against the volume size and the 1 % changed, and the time to converge.
The peer to beat is a full copy: any failback that moves the volume.

usage: failback.py [--bin-dir target/release] [--sizes 1G,2G,4G] [--quick]
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benches", "repl"))
from compare import Lab, run, size_arg  # noqa: E402  (the lab driver both benchmarks share)

MIB = 1 << 20


def wait(lab, site, vol, pred, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = lab.ctl(site, "replica", "status", vol)
        if pred(s):
            return s
        time.sleep(0.05)
    raise RuntimeError(f"{vol} on {site}: condition not reached: {s}")


def in_sync(s):
    return s["role"] == "primary" and s["state"] == "in-sync" and s["lag_bytes"] == 0


def one(lab, tmp, size, n):
    vol = f"fb{n}"
    rng = random.Random(n)
    img = os.path.join(tmp, "fill.img")
    with open(img, "wb") as f:
        f.truncate(size)
        for c in rng.sample(range(size // MIB), size // MIB // 4):
            f.seek(c * MIB)
            f.write(os.urandom(MIB))
    lab.ctl("site-a", "volume", "create", vol, "--size", str(size))
    run("nbdcopy", "--destination-is-zero", img, lab.uri("site-a", vol))
    os.remove(img)
    lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-b", "--mode", "async")
    wait(lab, "site-a", vol, in_sync)
    a_pid = lab.lab["sites"]["site-a"]["pid"]
    os.kill(a_pid, signal.SIGSTOP)
    try:
        p = lab.ctl("site-b", "replica", "promote", vol, "--force")
        assert p["generation"] == 2, p
        changed = size // 100 // MIB * MIB
        cmds = []
        for c in rng.sample(range(size // MIB), changed // MIB):
            cmds += ["-c", f"write -P {c % 251} {c * MIB} 1M"]
        run("qemu-io", "-f", "raw", *cmds, lab.uri("site-b", vol))
    finally:
        os.kill(a_pid, signal.SIGCONT)
    t0 = time.time()
    s = wait(lab, "site-b", vol,
             lambda s: in_sync(s) and lab.ctl("site-a", "replica", "status", vol)["role"] == "secondary")
    took = time.time() - t0
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                          lab.uri("site-a", vol), lab.uri("site-b", vol)], capture_output=True)
    if cmp.returncode != 0:
        raise RuntimeError(f"sites differ after failback: {cmp.stdout}{cmp.stderr}")
    sent = s["resync_bytes_sent"]
    examined = sent + s["resync_bytes_skipped"]
    lab.ctl("site-b", "replica", "disable", vol, "--delete-secondary")
    lab.ctl("site-b", "volume", "delete", vol)
    return {"size": size, "changed": changed, "examined": examined, "sent": sent, "seconds": took}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--sizes", default="1G,2G,4G")
    ap.add_argument("--quick", action="store_true", help="one 128 MiB volume: checks the script")
    a = ap.parse_args()
    for tool in ["qemu-io", "qemu-img", "nbdcopy"]:
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")
    sizes = [128 * MIB] if a.quick else [size_arg(x) for x in a.sizes.split(",")]
    tmp = tempfile.mkdtemp(prefix="ember-failback-bench-")
    lab = Lab(a.bin_dir, tmp)
    results = []
    try:
        for n, size in enumerate(sizes):
            r = one(lab, tmp, size, n)
            results.append(r)
            print(f"failback {size >> 20:6} MiB volume, {r['changed'] >> 20} MiB changed on the new "
                  f"primary: examined {r['examined'] / MIB:7.1f} MiB, sent {r['sent'] / MIB:7.1f} MiB "
                  f"= {100 * r['sent'] / size:5.2f} % of the volume, {r['sent'] / r['changed']:.2f}x the "
                  f"change; converged in {r['seconds']:.2f} s", flush=True)
    finally:
        lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
