#!/usr/bin/python3
"""A/B of two emberd builds' snapshot path on one loop-mounted XFS: both
agents run side by side on the same file system, each with a filled volume,
and snapshots alternate A, B, B, A, … so both see the same load (this
machine is shared and noisy). Reports, per build, the median and best of
the wall time of `emberctl snapshot create` and of emberd's own time
(`elapsed_us` of its "snapshot created" log line), next to a bare
`cp --reflink=always` of the same data file timed in the same round.
Also what the load does not change much: per snapshot, the CPU time of
the `emberctl` process and of emberd (all threads, from /proc), and
emberd's context switches (every thread hand-off is one, and on a loaded
host each waits for a CPU).

usage: benches/snap/ab.py --a DIR --b DIR [--size 1G] [--rounds 30] [--dir DIR]
  DIR: a directory holding emberd and emberctl (e.g. target/release of two
  worktrees). Needs root (loop mount), xfsprogs, nbdkit, nbdcopy.
"""
import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import GIB, Agent, LoopFs, run, size_arg, timed  # noqa: E402


def proc_cost(pid):
    """(CPU seconds, context switches) of process `pid`, summed over its
    live threads (`schedstat`: ns on a CPU; `status`: switches)."""
    cpu, switches = 0.0, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                cpu += int(f.read().split()[0]) / 1e9
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return cpu, switches


def child_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def summary(name, rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return (f"{name}: median {statistics.median(vals):.2f} ms, best {min(vals):.2f} ms"
            f" (n={len(vals)})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root to loop-mount XFS")
    size = size_arg(a.size)
    tmp = tempfile.mkdtemp(prefix="ember-snap-ab-", dir=a.dir)
    xfs = LoopFs(tmp, "xfs", 2 * size + 2 * GIB, "mkfs.xfs", "-q", "-m", "reflink=1")
    agents = {}
    load0 = open("/proc/loadavg").read().split()[:3]
    rows = {"A": [], "B": [], "cp": []}
    cost = {"A": [0.0, 0, 0.0], "B": [0.0, 0, 0.0]}  # agent CPU s, switches, client CPU s
    try:
        for key, bins in (("A", a.a), ("B", a.b)):
            ag = Agent(bins, key.lower(), os.path.join(xfs.path, key.lower()), tmp)
            agents[key] = ag
            ag.fill("v", size)
        run("sync")
        for r in range(a.rounds):
            order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
            for key in order:
                ag = agents[key]
                cpu0, sw0 = proc_cost(ag.proc.pid)
                child0 = child_cpu()
                secs = timed(ag.ctl_bin, "--api", ag.api, "snapshot", "create", "v", f"s{r}")
                cpu1, sw1 = proc_cost(ag.proc.pid)
                c = cost[key]
                c[0] += cpu1 - cpu0
                c[1] += sw1 - sw0
                c[2] += child_cpu() - child0
                rows[key].append({"ms": secs * 1000, "agent_ms": ag.agent_ms("v", f"s{r}")})
            dst = os.path.join(xfs.path, f"cp{r}.img")
            rows["cp"].append({"ms": timed("cp", "--reflink=always",
                                           agents["A"].data_file("v"), dst) * 1000})
            os.remove(dst)
    finally:
        for ag in agents.values():
            ag.stop()
        xfs.close()
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"{a.rounds} rounds, {a.size} volume, load average {' '.join(load0)} -> {' '.join(load1)}")
    for key, bins in (("A", a.a), ("B", a.b)):
        print(f"{key} ({bins}):")
        print("  " + summary("end to end", rows[key], "ms"))
        print("  " + summary("agent", rows[key], "agent_ms"))
        c = cost[key]
        print(f"  per snapshot: emberd CPU {c[0] / a.rounds * 1000:.2f} ms,"
              f" emberd context switches {c[1] / a.rounds:.1f}, emberctl CPU {c[2] / a.rounds * 1000:.2f} ms")
    print("  " + summary("bare cp --reflink", rows["cp"], "ms"))
    cp_med = statistics.median(r["ms"] for r in rows["cp"])
    cp_best = min(r["ms"] for r in rows["cp"])
    for key in ("A", "B"):
        e = [r["ms"] for r in rows[key]]
        paired = statistics.median(x / c["ms"] for x, c in zip(e, rows["cp"]))
        print(f"{key} / cp: median {statistics.median(e) / cp_med:.2f}x, best {min(e) / cp_best:.2f}x,"
              f" median of same-round ratios {paired:.2f}x")


if __name__ == "__main__":
    main()
