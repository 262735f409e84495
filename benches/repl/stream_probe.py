#!/usr/bin/python3
"""Where one async stream's time goes (a probe beside compare.py's `stream`,
which gives only the rate): the same fio writes (1 MiB, QD8) into an async
volume, then

  - how fast the primary took the writes and when the secondary had them;
  - bytes the disk wrote (/proc/diskstats) and each agent wrote
    (/proc/PID/io), i.e. how many times the stream hit the disk;
  - each agent's CPU-seconds;
  - journal overflows (site-a's log) and the lag sampled every 0.25 s.

--primary-on-tmpfs puts site-a's data dir on /dev/shm: a primary whose
disk is not the secondary's (this VM has one disk), so the secondary's
disk carries only the stream. With it the primary outruns the secondary,
the journal overflows and the catch-up scan's cost shows.

usage: benches/repl/stream_probe.py [--bin-dir DIR] [--size 2G]
       [--primary-on-tmpfs]
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
    try:
        vol = "stream"
        lab.ctl("site-a", "volume", "create", vol, "--size", str(size))
        lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-b", "--mode", "async")
        lab.wait_in_sync(vol)
        pids = {s: lab.lab["sites"][s]["pid"] for s in ("site-a", "site-b")}
        d0, w0 = disk_written(dev), {s: agent_written(p) for s, p in pids.items()}
        cpu = lab.cpu_meter().start()
        lags, done = [], threading.Event()

        def sample():
            while not done.is_set():
                lags.append(lab.status(vol)["lag_bytes"])
                time.sleep(0.25)

        sampler = threading.Thread(target=sample)
        t0 = time.time()
        sampler.start()
        C.run(*lab.placement.cmd("site-a", "fio", "--name=s", "--ioengine=nbd",
                                 f"--uri={lab.uri('site-a', vol)}", "--rw=write", "--bs=1m",
                                 "--iodepth=8", f"--size={size}", "--refill_buffers"))
        t1 = time.time()
        lab.wait_in_sync(vol)
        t2 = time.time()
        done.set()
        sampler.join()
        used = cpu.stop()
        d1, w1 = disk_written(dev), {s: agent_written(p) for s, p in pids.items()}
        with open(os.path.join(lab.dir, "site-a.log")) as f:
            overflows = sum("journal overflow" in line for line in f)
        print(f"primary took the writes in {t1 - t0:.2f} s ({size / MIB / (t1 - t0):.0f} MiB/s); "
              f"secondary in sync after {t2 - t0:.2f} s ({size / MIB / (t2 - t0):.0f} MiB/s)")
        print(f"disk {dev} wrote {(d1 - d0) / MIB:.0f} MiB; agents wrote "
              + ", ".join(f"{s} {(w1[s] - w0[s]) / MIB:.0f} MiB" for s in pids))
        print("CPU-seconds: " + ", ".join(f"{s} {v:.2f}" for s, v in used.items()))
        print(f"journal overflows: {overflows}")
        print("lag MiB every 0.25 s: " + " ".join(str(round(x / MIB)) for x in lags))
    finally:
        lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
        if shm:
            shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    main()
