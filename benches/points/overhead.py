#!/usr/bin/python3
"""What recovery points cost the replication stream, in one run, as ratios
(this machine is noisy; ratios travel, absolutes don't).

Two async replicas on the same two-site lab (emberctl lab up), whose data
dirs are on a loop-mounted XFS with reflink (points need it): `plain` has
no points, `points` takes a point every --every seconds (default 10 s) on
the secondary. Rounds alternate which volume goes first.

  throughput  sequential 1 MiB writes (fio, ioengine=nbd, QD8) of --size,
              timed until the secondary holds everything (lag 0) and has
              applied it to its image (batches acknowledged during a
              point's clone are applied after it).
              Ratio = points time / plain time (target <= 1.05x).
  latency     4 KiB QD1 random writes for --runtime seconds (fio): p50 and
              p99. Ratio = points / plain (target <= 1.05x).

The runs are long enough to span several points each (the script checks
the secondary took them and prints how many and how long each took, from
the agent's log).

usage: benches/points/overhead.py [--quick] [--bin-dir DIR] [--rounds N]
       [--size 2G] [--runtime 30] [--every 10]
Needs: root (loop mount), xfsprogs, emberd and emberctl (cargo build
--release --bins), libnbd-bin, fio.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def size_arg(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def run(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr}{r.stdout}")
    return r.stdout


class Xfs:
    """A sparse file made XFS (reflink=1) and loop-mounted."""

    def __init__(self, tmp, size, cowextsize=None):
        self.image = os.path.join(tmp, "xfs.img")
        self.path = os.path.join(tmp, "mnt")
        with open(self.image, "wb") as f:
            f.truncate(size)
        run("mkfs.xfs", "-q", "-m", "reflink=1", self.image)
        os.mkdir(self.path)
        run("mount", "-o", "loop", self.image, self.path)
        if cowextsize:
            # Inherited by every directory and file made below the root.
            run("xfs_io", "-c", f"cowextsize {cowextsize}", self.path)

    def close(self):
        run("umount", self.path, check=False)


class Lab:
    def __init__(self, bins, dir):
        self.ctl_bin = os.path.join(bins, "emberctl")
        self.dir = dir
        run(self.ctl_bin, "lab", "up", "--dir", dir, "--detach", "--size", "16M")
        with open(os.path.join(dir, "lab.json")) as f:
            self.lab = json.load(f)

    def ctl(self, site, *args):
        out = run(self.ctl_bin, "--api", self.lab["sites"][site]["api"], "--json", *args)
        return json.loads(out) if out.strip() else None

    def uri(self, vol):
        return f"nbd://{self.lab['sites']['site-a']['nbd']}/{vol}"

    def wait_in_sync(self, vol, timeout=3600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.ctl("site-a", "replica", "status", vol)
            if s["state"] == "in-sync" and s["lag_bytes"] == 0:
                return s
            time.sleep(0.02)
        raise RuntimeError(f"{vol} not in sync: {s}")

    def wait_applied(self, vol, at_ns, timeout=3600):
        """Until the secondary's image (not only its staging log) holds the
        primary's writes up to `at_ns`: batches acknowledged while a
        point's clone ran are applied after it, and the clock stops only
        when they are, so both volumes are timed to the same work."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.ctl("site-b", "replica", "status", vol)
            if s["last_consistent_at_unix_ns"] >= at_ns:
                return s
            time.sleep(0.01)
        raise RuntimeError(f"{vol}: the secondary did not apply up to {at_ns}: {s}")

    def log(self, site):
        with open(os.path.join(self.dir, f"{site}.log"), errors="replace") as f:
            return f.read()

    def down(self):
        run(self.ctl_bin, "lab", "down", "--dir", self.dir, check=False)


def fio_json(*args):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        run("fio", *args, "--output-format=json", f"--output={f.name}")
        return json.load(open(f.name))


def throughput(lab, vol, size):
    t0 = time.time()
    run("fio", "--name=s", "--ioengine=nbd", f"--uri={lab.uri(vol)}", "--rw=write",
        "--bs=1m", "--iodepth=8", f"--size={size}", "--refill_buffers")
    s = lab.wait_in_sync(vol)
    lab.wait_applied(vol, s["last_consistent_at_unix_ns"])
    return size / (time.time() - t0)


def latency(lab, vol, runtime):
    out = fio_json("--name=lat", "--ioengine=nbd", f"--uri={lab.uri(vol)}", "--rw=randwrite",
                   "--bs=4k", "--iodepth=1", "--size=256M", "--time_based",
                   f"--runtime={runtime}", "--lat_percentiles=1", "--percentile_list=50:99")
    pct = out["jobs"][0]["write"]["lat_ns"]["percentile"]
    return pct["50.000000"] / 1000, pct["99.000000"] / 1000


def point_stats(lab):
    """(points taken, their durations in ms, how long each held the
    stream in ms, each clone's time in ms, bytes the stream acknowledged
    and deferred during each clone) from site-b's log."""
    ms, held, clone, deferred = [], [], [], []
    for line in lab.log("site-b").splitlines():
        if "recovery point taken" not in line:
            continue
        # Text (`ms=12`) or JSON (`"ms":12`) logs.
        m = re.search(r'\bms"?[=:]\s*(\d+)', line)
        if m:
            ms.append(int(m.group(1)))
        h = re.search(r'\bstream_held_us"?[=:]\s*(\d+)', line)
        if h:
            held.append(int(h.group(1)) / 1000)
        c = re.search(r'\bclone_us"?[=:]\s*(\d+)', line)
        if c:
            clone.append(int(c.group(1)) / 1000)
        d = re.search(r'\bdeferred_bytes"?[=:]\s*(\d+)', line)
        if d:
            deferred.append(int(d.group(1)))
    return len(ms), ms, held, clone, deferred


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode (seconds, any build): tiny sizes, a point every second; "
                         "asserts points were taken and listed, prints the ratios (not a measurement)")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="2G", help="bytes written per throughput round")
    ap.add_argument("--runtime", type=int, default=30, help="seconds per latency round")
    ap.add_argument("--every", type=int, default=10, help="seconds between points")
    ap.add_argument("--dir", default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--cowextsize", default=None,
                    help="XFS copy-on-write extent size hint on the file system's root "
                         "(e.g. 16m), inherited by the lab's data dirs")
    ap.add_argument("--keep-log", default=None, metavar="FILE",
                    help="copy the secondary's log here before cleaning up")
    a = ap.parse_args()
    if a.quick:
        a.size, a.runtime, a.rounds, a.every = "64M", 2, 1, 1
    for tool in ["mkfs.xfs", "fio", "nbdinfo"]:
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")
    size = size_arg(a.size)
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="ember-points-bench-", dir=a.dir)
    fs = Xfs(tmp, max(8 << 30, 4 * size), a.cowextsize)
    lab = None
    try:
        lab = Lab(a.bin_dir, os.path.join(fs.path, "lab"))
        vols = {"plain": "plain", "points": "pts"}
        for mode, vol in vols.items():
            lab.ctl("site-a", "volume", "create", vol, "--size", str(size))
            extra = ["--points-every", f"{a.every}s"] if mode == "points" else []
            lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-b", "--mode", "async",
                    "--rpo", "30s", *extra)
            lab.wait_in_sync(vol)
        tput = {m: [] for m in vols}
        lat = {m: [] for m in vols}
        for r in range(a.rounds):
            order = list(vols) if r % 2 == 0 else list(reversed(list(vols)))
            for mode in order:
                tput[mode].append(throughput(lab, vols[mode], size))
            for mode in order:
                lat[mode].append(latency(lab, vols[mode], a.runtime))
        taken, ms, held, clone, deferred = point_stats(lab)
        listed = len(lab.ctl("site-b", "replica", "points", "pts"))
        t = {m: statistics.median(v) for m, v in tput.items()}
        p50 = {m: statistics.median(x[0] for x in v) for m, v in lat.items()}
        p99 = {m: statistics.median(x[1] for x in v) for m, v in lat.items()}
        res = {
            "every_s": a.every,
            "throughput_MBps": {m: round(v / 1e6, 1) for m, v in t.items()},
            "throughput_time_ratio": t["plain"] / t["points"],
            "p50_us": p50, "p99_us": p99,
            "p50_ratio": p50["points"] / p50["plain"],
            "p99_ratio": p99["points"] / p99["plain"],
            "points_taken": taken, "points_listed": listed,
            "point_ms_median": statistics.median(ms) if ms else None,
            "point_ms_max": max(ms) if ms else None,
            "stream_held_ms_median": statistics.median(held) if held else None,
            "stream_held_ms_max": max(held) if held else None,
            "clone_ms_median": statistics.median(clone) if clone else None,
            "clone_ms_max": max(clone) if clone else None,
            "deferred_MiB_max": round(max(deferred) / (1 << 20), 1) if deferred else None,
            "load_before": load_before, "load_after": os.getloadavg(),
        }
        print(f"points every {a.every} s ({taken} taken, clone+record median "
              f"{res['point_ms_median']} ms, max {res['point_ms_max']} ms; stream held median "
              f"{res['stream_held_ms_median']} ms, max {res['stream_held_ms_max']} ms; clone median "
              f"{res['clone_ms_median']} ms, max {res['clone_ms_max']} ms, the stream going on "
              f"meanwhile: up to {res['deferred_MiB_max']} MiB acknowledged and deferred):")
        print(f"throughput {size >> 20} MiB seq 1M QD8 to lag 0: plain {t['plain'] / 1e6:.0f} MB/s, "
              f"points {t['points'] / 1e6:.0f} MB/s; time ratio points/plain "
              f"{res['throughput_time_ratio']:.3f}x (target <= 1.05x)")
        print(f"4k QD1 randwrite: p50 plain {p50['plain']:.1f} us, points {p50['points']:.1f} us "
              f"({res['p50_ratio']:.3f}x); p99 plain {p99['plain']:.1f} us, points "
              f"{p99['points']:.1f} us ({res['p99_ratio']:.3f}x) (target <= 1.05x)")
        if taken == 0:
            raise RuntimeError("the secondary took no point: the comparison measured nothing")
        if listed == 0:
            raise RuntimeError(f"{taken} points taken but none listed by `replica points`")
        for m in vols:
            if not (t[m] > 0 and p50[m] > 0):
                raise RuntimeError(f"{m}: no throughput or latency measured: {t[m]} B/s, p50 {p50[m]} us")
        print(json.dumps(res, indent=1, default=str))
    finally:
        if lab:
            lab.down()
            if a.keep_log:
                shutil.copy(os.path.join(lab.dir, "site-b.log"), a.keep_log)
        fs.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
