#!/usr/bin/python3
"""Diagnosis of async QD1 write latency (issue 16): where the tail comes from.

Three 256 MiB volumes at site-a: `off`, `async` (replicated to site-b), and
`paused` (async with `replica pause`: every write tracked and journaled, nothing
shipped). 4 KiB QD1 random writes with fio's nbd engine, `sites` placement
(compare.py's Placement), rounds interleaved. Per run: p50/p99, each agent's
CPU per write, context switches per write, and site-a's busiest threads.

  --shm        site-b's data dir on a tmpfs (is the tail the secondary's disk?)
  --order M,.. the modes of every round, e.g. off,async,async,async

usage: sudo /usr/bin/python3 benches/repl/latency_modes.py [--bin-dir DIR]
       [--rounds N] [--runtime S] [--shm] [--order ...]
Findings: benches/RESULTS.md, "Async QD1 p99: where the tail is not" and
"The bimodal async runs".
"""
import argparse, os, subprocess, sys, tempfile, statistics
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C


def threads(pid):
    """{tid: (comm, cpu ticks)} of every thread of pid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = open(f"/proc/{pid}/task/{tid}/stat").read()
            comm = st[st.index("(") + 1:st.rindex(")")]
            f = st[st.rindex(")") + 2:].split()
            out[tid] = (comm, int(f[11]) + int(f[12]))
        except FileNotFoundError:
            pass
    return out


def ctxsw(pid):
    """(voluntary, involuntary) context switches of every thread of pid."""
    v = n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            for line in open(f"/proc/{pid}/task/{tid}/status"):
                if line.startswith("voluntary_ctxt_switches"):
                    v += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    n += int(line.split()[1])
        except FileNotFoundError:
            pass
    return v, n

ap = argparse.ArgumentParser()
ap.add_argument("--bin-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "release"))
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--runtime", type=int, default=5)
ap.add_argument("--shm", action="store_true")
ap.add_argument("--order", default=None, help="comma list of modes for every round")
a = ap.parse_args()
tmp = tempfile.mkdtemp(prefix="latexp-")
if a.shm:
    os.makedirs(f"{tmp}/lab/site-b")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", f"{tmp}/lab/site-b"], check=True)
lab = C.Lab(a.bin_dir, tmp, C.Placement("sites"))
try:
    vols = {"off": "x-off", "async": "x-async", "paused": "x-paused"}
    for m, v in vols.items():
        lab.ctl("site-a", "volume", "create", v, "--size", "256M")
        if m != "off":
            lab.ctl("site-a", "replica", "enable", v, "--peer", "site-b", "--mode", "async")
            lab.wait_in_sync(v)
    lab.ctl("site-a", "replica", "pause", vols["paused"])
    C.fio_lat(lab.uri("site-a", vols["off"]), 1, lab.placement)
    s = {m: [] for m in vols}
    for r in range(a.rounds):
        order = a.order.split(",") if a.order else (list(vols) if r % 2 == 0 else list(reversed(vols)))
        for m in order:
            meter = lab.cpu_meter().start()
            pa, pb = lab.lab["sites"]["site-a"]["pid"], lab.lab["sites"]["site-b"]["pid"]
            ca0, cb0 = ctxsw(pa), ctxsw(pb)
            th0 = threads(pa)
            p50, p99, iops = C.fio_lat(lab.uri("site-a", vols[m]), a.runtime, lab.placement)
            used = meter.stop()
            ca1, cb1 = ctxsw(pa), ctxsw(pb)
            th1 = threads(pa)
            busy = sorted(((th1[t][1] - th0.get(t, ("", 0))[1], th1[t][0]) for t in th1), reverse=True)[:4]
            print(f"  {m}: p50 {p50:.1f} p99 {p99:.1f}  site-a threads (ticks): {busy}", flush=True)
            n = iops * a.runtime
            s[m].append((p50, p99, used["site-a"] / n * 1e6, used["site-b"] / n * 1e6,
                         (ca1[0] - ca0[0]) / n, (ca1[1] - ca0[1]) / n, (cb1[0] - cb0[0]) / n))
    for m in vols:
        if not s[m]:
            continue
        print(f"{m:>7}: p50 {[round(x[0],1) for x in s[m]]} p99 {[round(x[1],1) for x in s[m]]} "
              f"med p50 {statistics.median(x[0] for x in s[m]):.1f} p99 {statistics.median(x[1] for x in s[m]):.1f} "
              f"cpu/write us a {[round(x[2],1) for x in s[m]]} b {[round(x[3],1) for x in s[m]]} "
              f"csw/write a vol {[round(x[4],2) for x in s[m]]} a invol {[round(x[5],2) for x in s[m]]} b vol {[round(x[6],2) for x in s[m]]}")
finally:
    lab.down()
    if a.shm:
        subprocess.run(["umount", f"{tmp}/lab/site-b"])
    subprocess.run(["rm", "-rf", tmp])
