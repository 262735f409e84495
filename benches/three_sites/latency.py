#!/usr/bin/python3
"""Issue 14's fan-out benchmark: 4 KiB QD1 write latency (fio,
ioengine=nbd, randwrite) of a volume with one sync target against a
volume with one sync + one async target, on the same primary, in the same
run, rounds interleaved (each round alternates which volume goes first),
each run starting once every target of both volumes has nothing left to
ship (a backlog of the run before would otherwise be charged to it).

  one   site-a -> site-b sync
  two   site-a -> site-b sync + site-a -> site-c async

Reported: p50/p99 of each (median over rounds), the ratio two/one (target:
<= 1.05x at p50, sites placement), the CPU-seconds each agent used per
round of each volume, and the peers' RTT.

Placement `sites` (as benches/repl/compare.py, whose helpers this reuses):
CPU 0 runs site-a's agent and fio, CPU 1 runs site-b's and site-c's agents
(the secondaries, which in production run on hosts of their own; this VM
has two CPUs, so the two secondaries share one). Each agent starts on one
CPU, so it sizes its runtime for the one CPU its site has.

Three agents come from `emberctl lab up --sites 3 --detach` (every pair of
sites paired over mutual TLS); its demo volume is left alone.

usage: benches/three_sites/latency.py [--quick] [--rounds N] [--runtime S]
       [--bin-dir DIR] [--placement sites|shared] [--site-c-cpu 0|1]
       [--async-target normal|paused|idle-cpu|own-host] [--dir DIR]
--async-target (a diagnosis of where the second target's cost is):
`paused` pauses site-c's target of `two` over the rounds (`replica pause`:
each write still goes through the fan-out and the async link's hook, but
nothing is shipped or applied), `idle-cpu` runs site-c's agent under
SCHED_IDLE (it then takes CPU 1 only when site-b leaves it idle, as on a
host of its own, while site-a still ships everything to it), `own-host`
does that and also puts site-c's data dir on tmpfs (no fsync of site-c's
reaches the disk site-a and site-b write to): what is left of the cost is
site-a's own work for its second target, and the loopback's receive
processing, which runs on the sender's CPU. All resume normally before the
replicas are compared.

Besides the ratio of the medians, `ratio_p50_paired` is the median of each
round's two/one ratio (the two volumes of a round run back to back, so
drift between rounds cancels out of it).

--quick (a CI smoke; works with debug binaries): one short round, then
asserts that both volumes have all their targets in sync, that fio wrote
(bytes shipped, all replicas byte-identical) and prints the ratio; the
latency target is not judged. A full run exits 1 when the target is
missed. Needs: emberd and emberctl, fio, taskset.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.dont_write_bytecode = True  # no __pycache__ in benches/repl
sys.path.insert(0, os.path.join(ROOT, "benches", "repl"))
# compare.py runs nothing at import (main() is guarded); these are its
# measuring helpers, so both benchmarks measure latency the same way.
from compare import CpuMeter, Placement, fio_lat, run  # noqa: E402

MIB = 1 << 20
# fio_lat writes over the first 256 MiB of the volume.
VOLUME_SIZE = "256M"
# Volume -> its targets (peer, mode), in the order they are enabled.
VOLUMES = {
    "one": [("site-b", "sync")],
    "two": [("site-b", "sync"), ("site-c", "async")],
}
SITES = ("site-a", "site-b", "site-c")
P50_TARGET = 1.05


class Placement3(Placement):
    """compare.py's placement with a third site: the secondaries site-b
    and site-c share CPU 1."""

    SITE_CPU = {"site-a": 0, "site-b": 1, "site-c": 1}


class Lab3:
    """A detached three-site lab (`emberctl lab up --sites 3`)."""

    def __init__(self, bins, tmp, placement, site_c_dir=None):
        self.ctl_bin = os.path.join(bins, "emberctl")
        for b in (self.ctl_bin, os.path.join(bins, "emberd")):
            if not os.access(b, os.X_OK):
                raise RuntimeError(f"{b} missing: cargo build --bins (--release for numbers)")
        self.dir = os.path.join(tmp, "lab")
        self.placement = placement
        self.up = False
        # `lab up` starts emberd from the directory emberctl lives in. In
        # `sites` placement every site has one CPU, and an agent sizes its
        # runtime from the CPUs it may use when it starts: start the agents
        # on one CPU (as an operator starts emberd with the affinity it
        # keeps, docs/operations.md), then move each to its site's CPU.
        # Started on both CPUs and pinned afterwards, each agent ran two
        # runtime workers on one CPU (session 12: sync p50 125 -> 102 us).
        start = ("taskset", "-c", str(placement.SITE_CPU["site-a"])) \
            if placement.mode == "sites" else ()
        if site_c_dir is not None:
            # `lab up` keeps each site's data in DIR/SITE: site-c's is elsewhere.
            os.makedirs(self.dir)
            os.symlink(site_c_dir, os.path.join(self.dir, "site-c"))
        run(*start, self.ctl_bin, "lab", "up", "--sites", "3", "--dir", self.dir, "--detach",
            "--size", "16M")
        self.up = True
        with open(os.path.join(self.dir, "lab.json")) as f:
            self.lab = json.load(f)
        missing = [s for s in SITES if s not in self.lab["sites"]]
        if missing:
            raise RuntimeError(f"lab.json has no {missing}: {self.lab['sites']}")
        for site in SITES:
            placement.pin(self.pid(site), site)

    def pid(self, site):
        return self.lab["sites"][site]["pid"]

    def cpu_meter(self):
        return CpuMeter({site: self.pid(site) for site in SITES})

    def ctl(self, site, *args):
        out = run(self.ctl_bin, "--api", self.lab["sites"][site]["api"], "--json", *args)
        return json.loads(out) if out.strip() else None

    def uri(self, vol):
        return f"nbd://{self.lab['sites']['site-a']['nbd']}/{vol}"

    def data_file(self, site, vol):
        return os.path.join(self.dir, site, "volumes", vol, "data.img")

    def status(self, vol):
        return self.ctl("site-a", "replica", "status", vol)

    def wait_in_sync(self, vol, timeout=120, paused=()):
        """Waits until every one of `vol`'s expected targets is in sync with
        nothing left to ship (a peer in `paused` only has to be paused);
        returns the status."""
        want = {peer: mode for peer, mode in VOLUMES[vol]}
        deadline = time.time() + timeout
        s = None
        while time.time() < deadline:
            s = self.status(vol)
            got = {t["peer"]: t for t in s.get("targets", [])}
            if (set(got) == set(want)
                    and all(got[p]["mode"] == m for p, m in want.items())
                    and all(t["state"] == "paused" if p in paused
                            else t["state"] == "in-sync" and t["lag_bytes"] == 0
                            for p, t in got.items())):
                return s
            time.sleep(0.05)
        raise RuntimeError(f"{vol}: targets {want} not all in sync within {timeout} s: {s}")

    def down(self):
        if self.up:
            run(self.ctl_bin, "lab", "down", "--dir", self.dir, check=False)


def df_root():
    st = os.statvfs("/")
    return st.f_bavail * st.f_frsize


def setup(lab):
    for vol, targets in VOLUMES.items():
        lab.ctl("site-a", "volume", "create", vol, "--size", VOLUME_SIZE)
        for peer, mode in targets:
            lab.ctl("site-a", "replica", "enable", vol, "--peer", peer, "--mode", mode)
        lab.wait_in_sync(vol)


def rtts(lab):
    return {p["site"]: p["rtt_us"] for p in lab.ctl("site-a", "peer", "list")}


def set_idle_policy(pid):
    """Every thread of `pid` to SCHED_IDLE (threads it starts later
    inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:
            pass


def measure(lab, rounds, runtime, paused=()):
    """Interleaved rounds; returns per volume a list of
    (p50_us, p99_us, iops, {site: cpu_s}), the RTT samples and each
    volume's bytes shipped before the rounds."""
    samples = {vol: [] for vol in VOLUMES}
    rtt = []
    for vol in VOLUMES:
        fio_lat(lab.uri(vol), 1, lab.placement)  # warm-up, not counted
    # After the warm-up: the check counts only what the measured rounds wrote.
    shipped_before = {vol: lab.status(vol)["bytes_shipped"] for vol in VOLUMES}
    for r in range(rounds):
        order = list(VOLUMES) if r % 2 == 0 else list(reversed(VOLUMES))
        for vol in order:
            # Each run starts with nothing left to ship anywhere: a backlog
            # from the run before would be charged to this one.
            for v in VOLUMES:
                lab.wait_in_sync(v, paused=paused)
            cpu = lab.cpu_meter().start()
            p50, p99, iops = fio_lat(lab.uri(vol), runtime, lab.placement)
            used = cpu.stop()
            samples[vol].append((p50, p99, iops, used))
            print(f"round {r + 1} {vol}: p50 {p50:7.1f} us  p99 {p99:7.1f} us  "
                  f"{iops:7.0f} IOPS  CPU-s " + ", ".join(f"{s} {v:.2f}" for s, v in used.items()),
                  flush=True)
        rtt.append(rtts(lab))
    return samples, rtt, shipped_before


def summarize(samples, rtt):
    med = {}
    for vol, runs in samples.items():
        med[vol] = {
            "p50_us": statistics.median(x[0] for x in runs),
            "p99_us": statistics.median(x[1] for x in runs),
            "iops": statistics.median(x[2] for x in runs),
            "cpu_s_per_round": {s: statistics.median(x[3][s] for x in runs) for s in SITES},
            "rounds_p50_us": [round(x[0], 1) for x in runs],
        }
    # Each round ran both volumes back to back: the median of those pairs.
    paired = statistics.median(t[0] / o[0] for o, t in zip(samples["one"], samples["two"]))
    rtt_med = {site: statistics.median(r[site] for r in rtt if site in r)
               for site in ("site-b", "site-c") if any(site in r for r in rtt)}
    return med, rtt_med, paired


def check_replicas(lab, shipped_before):
    """After the writes: every target of both volumes in sync, bytes were
    shipped during the run, and every replica equals the primary."""
    for vol, targets in VOLUMES.items():
        s = lab.wait_in_sync(vol)
        shipped = s["bytes_shipped"] - shipped_before[vol]
        if shipped <= 0:
            raise RuntimeError(f"{vol}: nothing shipped during the run (fio wrote nothing?): {s}")
        primary = lab.data_file("site-a", vol)
        for peer, _ in targets:
            replica = lab.data_file(peer, vol)
            if not os.path.exists(replica):
                raise RuntimeError(f"{vol}: no replica image at {replica}")
            run("cmp", primary, replica)
        states = ", ".join(f"{t['peer']} {t['mode']} {t['state']}" for t in s["targets"])
        print(f"check {vol}: targets [{states}], {shipped / MIB:.1f} MiB shipped during the "
              f"rounds, replicas identical to site-a", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds: the CI smoke")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=10, help="seconds of fio per volume per round")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--placement", choices=["sites", "shared"], default="sites",
                    help="sites: site-a + fio on CPU 0, site-b + site-c on CPU 1 (default)")
    ap.add_argument("--site-c-cpu", type=int, choices=[0, 1], default=1,
                    help="diagnosis: the CPU of site-c's agent under --placement sites "
                         "(0: beside site-a and fio instead of beside the sync secondary)")
    ap.add_argument("--async-target", choices=["normal", "paused", "idle-cpu", "own-host"],
                    default="normal",
                    help="diagnosis: pause site-c's target of `two` during the rounds, or run "
                         "site-c's agent under SCHED_IDLE (as if on a CPU of its own), "
                         "own-host: that and site-c's data on tmpfs (as if on a disk of its own)")
    ap.add_argument("--dir", default=None, help="parent of the temp work dir")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.runtime = 1, 2
    for tool in ["fio", "taskset", "cmp"]:
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")
    print(f"free on /: {df_root() / (1 << 30):.1f} GiB; load {os.getloadavg()}", flush=True)
    placement = Placement3(a.placement)
    placement.SITE_CPU = {**Placement3.SITE_CPU, "site-c": a.site_c_cpu}
    tmp = tempfile.mkdtemp(prefix="ember-three-sites-lat-", dir=a.dir)
    lab = None
    site_c_dir = tempfile.mkdtemp(prefix="ember-site-c-", dir="/dev/shm") \
        if a.async_target == "own-host" else None
    try:
        lab = Lab3(os.path.abspath(a.bin_dir), tmp, placement, site_c_dir)
        setup(lab)
        if a.async_target == "paused":
            lab.ctl("site-a", "replica", "pause", "two", "--peer", "site-c")
        elif a.async_target in ("idle-cpu", "own-host"):
            set_idle_policy(lab.pid("site-c"))
        paused = ("site-c",) if a.async_target == "paused" else ()
        samples, rtt, shipped_before = measure(lab, a.rounds, a.runtime, paused)
        if a.async_target == "paused":
            lab.ctl("site-a", "replica", "resume", "two", "--peer", "site-c")
        check_replicas(lab, shipped_before)
        med, rtt_med, paired = summarize(samples, rtt)
    finally:
        if lab is not None:
            lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
        if site_c_dir is not None:
            shutil.rmtree(site_c_dir, ignore_errors=True)
    where = placement.mode
    if placement.mode == "sites" and a.site_c_cpu != 1:
        where += f", site-c on CPU {a.site_c_cpu}"
    if a.async_target != "normal":
        where += f", site-c target {a.async_target}"
    for vol in VOLUMES:
        m = med[vol]
        cpu = ", ".join(f"{s} {v:.2f}" for s, v in m["cpu_s_per_round"].items())
        targets = " + ".join(f"{p} {mo}" for p, mo in VOLUMES[vol])
        print(f"latency [{where}] 4k QD1 {vol} ({targets}): "
              f"p50 {m['p50_us']:7.1f} us  p99 {m['p99_us']:7.1f} us  {m['iops']:.0f} IOPS  "
              f"CPU-s per {a.runtime} s round: {cpu}")
    ratio50 = med["two"]["p50_us"] / med["one"]["p50_us"]
    ratio99 = med["two"]["p99_us"] / med["one"]["p99_us"]
    met = ratio50 <= P50_TARGET
    diagnosis = a.quick or a.async_target != "normal"
    verdict = "not judged (--quick or a diagnosis)" if diagnosis else ("met" if met else "MISSED")
    print(f"latency [{where}]: two/one p50 {ratio50:.3f}x (target <= {P50_TARGET}x: {verdict}), "
          f"p99 {ratio99:.3f}x; median of the rounds' two/one p50 {paired:.3f}x; RTT median " + ", ".join(f"{s} {v} us" for s, v in rtt_med.items()))
    print(f"load after: {os.getloadavg()}")
    print(json.dumps({"placement": placement.mode, "site_c_cpu": a.site_c_cpu,
                      "async_target": a.async_target,
                      "rounds": a.rounds, "runtime_s": a.runtime, "volumes": med,
                      "rtt_us": rtt_med, "ratio_p50": ratio50, "ratio_p99": ratio99,
                      "ratio_p50_paired": paired,
                      "target_met": met}, indent=1))
    if not diagnosis and not met:
        print("FAIL: issue-14 latency target missed (two/one p50 > 1.05x)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
