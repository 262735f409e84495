#!/usr/bin/python3
"""Where one async stream's time goes (a probe beside compare.py's `stream`,
which gives only the rate): the same fio writes (1 MiB, QD8) into an async
volume, then

  - how fast the primary took the writes and when the secondary had them;
  - bytes the disk wrote (/proc/diskstats) and each agent wrote
    (/proc/PID/io), i.e. how many times the stream hit the disk;
  - each agent's CPU-seconds;
  - journal overflows (site-a's log) and the lag sampled every 0.25 s;
  - at the end, whether the replica equals the primary byte for byte
    (exit status 1 when not).

--primary-on-tmpfs puts site-a's data dir on /dev/shm: a primary whose
disk is not the secondary's (this VM has one disk), so the secondary's
disk carries only the stream. With it the primary outruns the secondary,
the journal overflows and the catch-up scan's cost shows.

--random-for S writes random 1 MiB blocks over the volume for S seconds
instead of one sequential pass (an overload that does not end by itself:
whether the secondary still reaches consistent points, from the lag
samples with `lag_seconds` beside them, and how long it takes once the
writer stops).

--rpo R --rpo-policy P are passed to `replica enable` (e.g. 10s and
throttle: the writer is slowed to the link instead of the lag growing).

usage: benches/repl/stream_probe.py [--bin-dir DIR] [--size 2G]
       [--primary-on-tmpfs] [--random-for S] [--rpo R] [--rpo-policy P]
Needs what compare.py needs; root for /proc/PID/io of the agents.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402

MIB = 1 << 20


def disk_written(dev):
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] == dev:
                return int(fields[9]) * 512
    raise SystemExit(f"no disk {dev} in /proc/diskstats")


def agent_written(pid):
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["write_bytes"])


def root_disk():
    """The block device under / (e.g. vda), for its write counter."""
    src = subprocess.run(["findmnt", "-no", "SOURCE", "/"], capture_output=True,
                         text=True, check=True).stdout.strip()
    name = os.path.basename(src)
    parent = subprocess.run(["lsblk", "-no", "PKNAME", src], capture_output=True,
                            text=True).stdout.strip()
    return parent or name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(C.ROOT, "target", "release"))
    ap.add_argument("--size", default="2G")
    ap.add_argument("--primary-on-tmpfs", action="store_true")
    ap.add_argument("--random-for", type=int, default=0, metavar="S")
    ap.add_argument("--rpo", default=None)
    ap.add_argument("--rpo-policy", default=None, choices=["alert", "throttle", "escalate"])
    a = ap.parse_args()
    size = C.size_arg(a.size)
    dev = root_disk()
    tmp = tempfile.mkdtemp(prefix="ember-stream-probe-")
    shm = None
    if a.primary_on_tmpfs:
        os.makedirs(os.path.join(tmp, "lab"))
        shm = tempfile.mkdtemp(prefix="ember-stream-probe-a-", dir="/dev/shm")
        os.symlink(shm, os.path.join(tmp, "lab", "site-a"))
    lab = C.Lab(a.bin_dir, tmp, C.Placement("sites"))
    done = threading.Event()
    try:
        vol = "stream"
        lab.ctl("site-a", "volume", "create", vol, "--size", str(size))
        policy = (["--rpo", a.rpo] if a.rpo else []) + \
            (["--rpo-policy", a.rpo_policy] if a.rpo_policy else [])
        lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-b", "--mode", "async", *policy)
        lab.wait_in_sync(vol)
        pids = {s: lab.lab["sites"][s]["pid"] for s in ("site-a", "site-b")}
        d0, w0 = disk_written(dev), {s: agent_written(p) for s, p in pids.items()}
        cpu = lab.cpu_meter().start()
        lags = []

        def sample():
            while not done.is_set():
                s = lab.status(vol)
                lags.append((s["lag_bytes"], s["lag_seconds"]))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        t0 = time.time()
        sampler.start()
        pattern = ["--rw=randwrite", "--time_based", f"--runtime={a.random_for}"] \
            if a.random_for else ["--rw=write"]
        fio = C.fio_json(lab.placement, "--name=s", "--ioengine=nbd",
                         f"--uri={lab.uri('site-a', vol)}", *pattern, "--bs=1m", "--iodepth=8",
                         f"--size={size}", "--refill_buffers")
        written = fio["jobs"][0]["write"]["io_bytes"]
        t1 = time.time()
        lab.wait_in_sync(vol)
        t2 = time.time()
        done.set()
        sampler.join()
        used = cpu.stop()
        d1, w1 = disk_written(dev), {s: agent_written(p) for s, p in pids.items()}
        with open(os.path.join(lab.dir, "site-a.log")) as f:
            overflows = sum("journal overflow" in line for line in f)
        print(f"primary took {written / MIB:.0f} MiB in {t1 - t0:.2f} s "
              f"({written / MIB / (t1 - t0):.0f} MiB/s); secondary in sync after {t2 - t0:.2f} s "
              f"({written / MIB / (t2 - t0):.0f} MiB/s), {t2 - t1:.2f} s after the writer stopped")
        print(f"disk {dev} wrote {(d1 - d0) / MIB:.0f} MiB; agents wrote "
              + ", ".join(f"{s} {(w1[s] - w0[s]) / MIB:.0f} MiB" for s in pids))
        print("CPU-seconds: " + ", ".join(f"{s} {v:.2f}" for s, v in used.items()))
        print(f"journal overflows: {overflows}")
        print("lag MiB every 0.25 s: " + " ".join(str(round(b / MIB)) for b, _ in lags))
        print("lag_seconds every 0.25 s: " + " ".join(f"{x:.1f}" for _, x in lags))
        # In sync with the writer stopped: the replica must equal the primary.
        same = subprocess.run(["cmp", "-s", lab.data_file("site-a", vol),
                               lab.data_file("site-b", vol)]).returncode == 0
        print("replica identical to the primary" if same else "REPLICA DIFFERS FROM THE PRIMARY")
        if not same:
            sys.exit(1)
    finally:
        done.set()
        lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
        if shm:
            shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    main()
