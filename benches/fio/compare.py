#!/usr/bin/python3
"""fio (ioengine=nbd) against emberd and qemu-nbd in one run, alternating
servers each round, reporting medians and ratios.

Servers, each serving a 1 GiB file pre-filled with the same random data on
the same file system:
  emberd            tracking on (the product)
  emberd-notrack    tracking off (to measure tracking overhead)
  qemu-nbd-native   --cache=none --aio=native   (the issue's reference)
  qemu-nbd-uring    --cache=none --aio=io_uring
  qemu-nbd-wb       --cache=writeback --aio=threads (same caching as emberd)

usage: benches/fio/compare.py [--rounds N] [--runtime S] [--dir DIR]
Needs: cargo build --release --bins; qemu-utils, fio, libnbd-bin.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REL = os.path.join(ROOT, "target", "release")
SIZE = 1 << 30

JOBS = {
    "randwrite-4k-qd1": ["--rw=randwrite", "--bs=4k", "--iodepth=1"],
    "randwrite-4k-qd32": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "write-1m-qd8": ["--rw=write", "--bs=1m", "--iodepth=8"],
    "read-1m-qd8": ["--rw=read", "--bs=1m", "--iodepth=8"],
}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not listen")


class Server:
    def __init__(self, name, workdir, template):
        self.name, self.port = name, free_port()
        self.uri = None
        d = os.path.join(workdir, name)
        os.makedirs(d)
        if name.startswith("emberd"):
            api = f"unix:{d}/api.sock"
            args = [os.path.join(REL, "emberd"), "--data-dir", f"{d}/data", "--api", api,
                    "--nbd", f"127.0.0.1:{self.port}", "--log-format", "json"]
            if name == "emberd-notrack":
                args.append("--no-tracking")
            self.proc = subprocess.Popen(args, stderr=open(f"{d}/log", "w"))
            wait_port(self.port, self.proc)
            out = subprocess.run([os.path.join(REL, "emberctl"), "--api", api, "volume", "create", "bench",
                                  "--size", str(SIZE), "--json"], check=True, capture_output=True, text=True)
            self.uri = json.loads(out.stdout)["nbd_uri"]
        else:
            img = f"{d}/disk.raw"
            open(img, "wb").truncate(SIZE)
            cache, aio = {"qemu-nbd-native": ("none", "native"), "qemu-nbd-uring": ("none", "io_uring"),
                          "qemu-nbd-wb": ("writeback", "threads")}[name]
            self.proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "8", f"--cache={cache}",
                                          f"--aio={aio}", "-b", "127.0.0.1", "-p", str(self.port), "-x", "bench", img],
                                         stderr=subprocess.DEVNULL)
            wait_port(self.port, self.proc)
            self.uri = f"nbd://127.0.0.1:{self.port}/bench"
        subprocess.run(["nbdcopy", template, self.uri], check=True)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def fio(uri, job, runtime):
    args = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--size={SIZE}", "--time_based",
            f"--runtime={runtime}", "--ramp_time=1", "--output-format=json"] + JOBS[job]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["read"] if "read" in job else j["write"]
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--servers", default="emberd,emberd-notrack,qemu-nbd-native,qemu-nbd-uring,qemu-nbd-wb",
                    help="comma-separated subset of the servers above")
    a = ap.parse_args()
    for tool in ("fio", "qemu-nbd", "nbdcopy"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required")
    work = tempfile.mkdtemp(prefix="ember-bench-", dir=a.dir)
    template = os.path.join(work, "template.raw")
    with open(template, "wb") as f:
        for _ in range(SIZE // (16 << 20)):
            f.write(os.urandom(16 << 20))
    names = a.servers.split(",")
    servers = [Server(n, work, template) for n in names]
    results = {n: {j: [] for j in JOBS} for n in names}
    try:
        for r in range(a.rounds):
            for job in JOBS:
                order = servers if r % 2 == 0 else list(reversed(servers))
                for s in order:
                    results[s.name][job].append(fio(s.uri, job, a.runtime))
                    print(f"round {r} {job:18} {s.name:16} {results[s.name][job][-1]}", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)

    def med(name, job):
        key = "iops" if "4k" in job else "mbps"
        return statistics.median(x[key] for x in results[name][job])

    print(f"\nmedians of {a.rounds} rounds, {a.runtime}s each, servers alternated\n")
    print("| job | unit | " + " | ".join(names) + " | emberd ÷ best qemu cache=none | emberd ÷ qemu writeback | tracking overhead |")
    print("|---|---|" + "---|" * (len(names) + 3))
    for job in JOBS:
        unit = "IOPS" if "4k" in job else "MB/s"
        m = {n: med(n, job) for n in names}
        cells = " | ".join(f"{m[n]:.0f}" for n in names)
        qemu_none = [m[n] for n in ("qemu-nbd-native", "qemu-nbd-uring") if n in m]
        r1 = f"{m['emberd'] / max(qemu_none):.2f}×" if qemu_none and "emberd" in m else "–"
        r2 = f"{m['emberd'] / m['qemu-nbd-wb']:.2f}×" if "qemu-nbd-wb" in m and "emberd" in m else "–"
        ov = f"{(m['emberd-notrack'] - m['emberd']) / m['emberd-notrack'] * 100:+.1f} %" if "emberd-notrack" in m and "emberd" in m else "–"
        print(f"| {job} | {unit} | {cells} | {r1} | {r2} | {ov} |")
    if "emberd" in names and "emberd-notrack" in names:
        print("\ntracking overhead per round (paired: same round, adjacent runs):")
        for job in JOBS:
            key = "iops" if "4k" in job else "mbps"
            pairs = [(t[key], n[key]) for t, n in zip(results["emberd"][job], results["emberd-notrack"][job])]
            per = [(n - t) / n * 100 for t, n in pairs]
            print(f"  {job:18} median {statistics.median(per):+.1f} %  rounds: " + ", ".join(f"{p:+.1f}" for p in per))


if __name__ == "__main__":
    main()
