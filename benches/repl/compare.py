#!/usr/bin/python3
"""Replication benchmarks, each side by side with its peer in one run,
reported as ratios (this machine is noisy; ratios travel, absolutes don't).

  initial-sync  enable replication of a volume with 50 % allocated random
                data (emberd: blake3/hole-skipping initial sync over mutual
                TLS) vs nbdcopy between two qemu-nbd exports of the same
                image (no TLS). Ratio = nbdcopy time / ember time. Also
                user+sys CPU-seconds per GiB allocated of each agent
                (/proc/PID/stat) beside nbdcopy's and both qemu-nbd's, and
                the ratio of the totals.
  latency       4 KiB QD1 random writes (fio, ioengine=nbd): p50/p99 with
                replication off, async and sync, rounds interleaved, each
                run starting with nothing left to ship (the async volume's
                lag as its runs end is printed: shipping that fell behind
                shows there); the link RTT (median of pings) for the sync
                budget. Measured
                with the sites on CPUs of their own (the targets) and with
                everything on shared CPUs, in the same run.

Placement (--placement): `sites` (default) gives each site a CPU of its
own, as two hosts would have: CPU 0 runs site-a's agent and the clients
writing to it (fio; for the peer, the source qemu-nbd and nbdcopy), CPU 1
runs site-b's agent (the destination qemu-nbd). `shared` lets the kernel
place everything. On this 2-vCPU VM a wakeup that crosses vCPUs costs
~15 us, so with shared CPUs any background work (here: the secondary,
which in production runs on another host) moves the QD1 write path into a
slower mode: the measurement is then of the VM, not of replication.
  stream        sequential 1 MiB writes to an async volume: time until the
                secondary has everything, vs the loopback TCP ceiling
                (iperf3) and the disk write ceiling (fio to a file); CPU-
                seconds per GiB written of each agent, beside the peer's
                (the same fio writes into a qemu-nbd at site-a, then
                nbdcopy --flush to a qemu-nbd at site-b) and the ratio.
                Also the stream against its design limit (issue 16): the
                disk ceiling divided by the writes the secondary makes of
                each byte — 2 (staging log, then volume), or 1 where the
                data dir can reflink and batches are applied by clone
                (site-b's `status` says `snapshot_method: reflink`).
  resync        change 1 % of a full volume while replication is paused,
                resume, time to in-sync vs rsync --inplace --no-whole-file
                --ignore-times on the image files.

usage: benches/repl/compare.py [--quick] [--bin-dir DIR] [--only NAME,...]
       [--sync-size 4G] [--resync-size 8G] [--rounds N] [--perf-dir DIR]
Needs: emberd and emberctl (cargo build --release --bins), qemu-utils,
libnbd-bin, fio, rsync, iperf3.
"""
import argparse
import mmap
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MIB = 1 << 20


def size_arg(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def run(*cmd, check=True, capture=True):
    r = subprocess.run(cmd, capture_output=capture, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr}{r.stdout}")
    return r.stdout


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """user+sys CPU-seconds of process `pid` so far, all its threads
    (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces: split after its ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu_seconds():
    """user+sys CPU-seconds of every waited-for child so far."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """CPU-seconds each named process used between start() and stop()."""

    def __init__(self, pids):
        self.pids = pids

    def start(self):
        self.t0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self):
        return {name: cpu_seconds(pid) - self.t0[name] for name, pid in self.pids.items()}


def run_seconds(pid):
    """Seconds process `pid`'s live threads have run so far, to the
    nanosecond (/proc/PID/task/*/schedstat, field 1): for phases too short
    for the 10 ms ticks of `cpu_seconds`. Threads that ended are not
    counted (tokio keeps its blocking threads 10 s after their last job)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


class RunMeter(CpuMeter):
    """As CpuMeter, counted with `run_seconds`."""

    def start(self):
        self.t0 = {name: run_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self):
        return {name: run_seconds(pid) - self.t0[name] for name, pid in self.pids.items()}


class Profiler:
    """`perf record -g` of each agent during a measured phase, when
    --perf-dir is given (numbers taken with it on are not comparable with
    runs without it). Writes DIR/<phase>-<site>.data; read them with
    `perf report -i FILE --no-children --percent-limit 2`."""

    def __init__(self, lab, phase):
        self.procs = []
        if not PERF_DIR or not phase:
            return
        os.makedirs(PERF_DIR, exist_ok=True)
        for site in ("site-a", "site-b"):
            out = os.path.join(PERF_DIR, f"{phase}-{site}.data")
            self.procs.append(subprocess.Popen(
                ["perf", "record", "-q", "-g", "-o", out, "-p",
                 str(lab.lab["sites"][site]["pid"])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)  # perf attaches before the phase starts

    def stop(self):
        for p in self.procs:
            p.send_signal(2)  # SIGINT: perf writes its file and exits
        for p in self.procs:
            p.wait(timeout=60)


PERF_DIR = None


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Placement:
    """CPUs per site (see the module docstring): `sites` pins site-a to
    CPU 0 and site-b to CPU 1; `shared` pins nothing."""

    SITE_CPU = {"site-a": 0, "site-b": 1}

    def __init__(self, mode):
        if mode == "sites" and (os.cpu_count() or 1) < 2:
            print("placement: fewer than 2 CPUs, using shared", file=sys.stderr)
            mode = "shared"
        self.mode = mode

    def cpus(self, site):
        if self.mode == "sites":
            return {self.SITE_CPU[site]}
        return set(range(os.cpu_count() or 1))

    def cmd(self, site, *argv):
        """`argv` run on `site`'s CPUs."""
        if self.mode == "sites":
            return ("taskset", "-c", str(self.SITE_CPU[site]), *argv)
        return argv

    def pin(self, pid, site):
        """Moves every thread of process `pid` to `site`'s CPUs (threads
        it starts later inherit them)."""
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), self.cpus(site))
            except ProcessLookupError:
                pass


class Lab:
    def __init__(self, bins, tmp, placement=None):
        self.ctl_bin = os.path.join(bins, "emberctl")
        self.dir = os.path.join(tmp, "lab")
        run(self.ctl_bin, "lab", "up", "--dir", self.dir, "--detach", "--size", "16M")
        with open(os.path.join(self.dir, "lab.json")) as f:
            self.lab = json.load(f)
        self.place(placement or Placement("shared"))

    def place(self, placement):
        """Runs each site's agent on the CPUs `placement` gives it."""
        self.placement = placement
        for site in ("site-a", "site-b"):
            placement.pin(self.lab["sites"][site]["pid"], site)

    def api(self, site):
        return self.lab["sites"][site]["api"]

    def cpu_meter(self):
        """Measures both agents' CPU: `site-a`, `site-b`."""
        return CpuMeter({site: self.lab["sites"][site]["pid"] for site in ("site-a", "site-b")})

    def ctl(self, site, *args):
        out = run(self.ctl_bin, "--api", self.api(site), "--json", *args)
        return json.loads(out) if out.strip() else None

    def uri(self, site, vol):
        return f"nbd://{self.lab['sites'][site]['nbd']}/{vol}"

    def data_file(self, site, vol):
        return os.path.join(self.dir, site, "volumes", vol, "data.img")

    def status(self, vol):
        return self.ctl("site-a", "replica", "status", vol)

    def wait_in_sync(self, vol, timeout=3600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.status(vol)
            if s["state"] == "in-sync" and s["lag_bytes"] == 0:
                return s
            time.sleep(0.02)
        raise RuntimeError(f"{vol} not in sync: {s}")

    def down(self):
        run(self.ctl_bin, "lab", "down", "--dir", self.dir, check=False)


def make_half_random(path, size, seed=1):
    """A sparse image with a random half of its 1 MiB chunks random."""
    rng = random.Random(seed)
    chunks = size // MIB
    chosen = sorted(rng.sample(range(chunks), chunks // 2))
    with open(path, "wb") as f:
        f.truncate(size)
        for c in chosen:
            f.seek(c * MIB)
            f.write(os.urandom(MIB))
    return len(chosen) * MIB


def qemu_nbd(path, port, placement, site):
    p = subprocess.Popen(
        placement.cmd(site, "qemu-nbd", "-f", "raw", "--cache=writeback", "-p", str(port),
                      "-b", "127.0.0.1", "-t", path),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return p
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise RuntimeError("qemu-nbd did not listen")


def warm_memory(gib):
    """Touches and frees `gib` GiB of anonymous memory.

    This VM's virtio-balloon reports freed guest pages to the host, which
    takes them back; the next first touch of such a page costs a host fault
    (a 2 GiB buffered write runs at ~0.4-0.8 GB/s cold, ~5 GB/s warm).
    Whoever runs right after something freed memory would win by that alone,
    so every timed copy starts on the same footing: warm pages.
    """
    with mmap.mmap(-1, gib << 30) as m:
        for i in range(0, gib << 30, 4096):
            m[i] = 1


def ember_initial_sync(lab, src, size, r):
    """Fills a primary from `src`, times enable → in sync."""
    vol = f"isync{r}"
    lab.ctl("site-a", "volume", "create", vol, "--size", str(size))
    run("nbdcopy", "--destination-is-zero", src, lab.uri("site-a", vol))
    run("sync")
    warm_memory(max(2, 2 * size >> 30))
    prof = Profiler(lab, "initial-sync") if r == 0 else Profiler(lab, None)
    cpu = lab.cpu_meter().start()
    t0 = time.time()
    lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-b", "--mode", "async")
    s = lab.wait_in_sync(vol)
    took = time.time() - t0
    used = cpu.stop()
    prof.stop()
    lab.ctl("site-a", "replica", "disable", vol, "--delete-secondary")
    lab.ctl("site-a", "volume", "delete", vol)
    return took, s["resync_bytes_sent"], used


class QemuNbdPair:
    """A qemu-nbd export of `a` at site-a and of `b` at site-b, with a CPU
    meter on both; `copy()` runs nbdcopy --flush from one to the other (the
    copy ends durable, as ember's initial sync does). Stopped on exit."""

    def __init__(self, a, b, placement):
        self.placement = placement
        self.pa, self.pb = free_port(), free_port()
        self.qa = qemu_nbd(a, self.pa, placement, "site-a")
        self.qb = qemu_nbd(b, self.pb, placement, "site-b")

    def __enter__(self):
        self.servers = CpuMeter({"source qemu-nbd": self.qa.pid,
                                 "destination qemu-nbd": self.qb.pid}).start()
        return self

    def copy(self):
        """Returns nbdcopy's wall time and CPU-seconds."""
        copier = children_cpu_seconds()
        t0 = time.time()
        run(*self.placement.cmd("site-a", "nbdcopy", "--flush", f"nbd://127.0.0.1:{self.pa}",
                                f"nbd://127.0.0.1:{self.pb}"))
        return time.time() - t0, children_cpu_seconds() - copier

    def stop(self):
        """CPU-seconds of both servers so far."""
        return self.servers.stop()

    def __exit__(self, *exc):
        for q in (self.qa, self.qb):
            q.kill()
        for q in (self.qa, self.qb):
            q.wait()
        return False


def nbdcopy_initial_sync(tmp, src, size, placement):
    """Times nbdcopy between two qemu-nbd exports (source filled from `src`):
    the source export and nbdcopy at site-a, the destination at site-b."""
    a = os.path.join(tmp, "a.img")
    b = os.path.join(tmp, "b.img")
    run("cp", "--sparse=always", src, a)
    with open(b, "wb") as f:
        f.truncate(size)
    run("sync")
    warm_memory(max(2, 2 * size >> 30))
    with QemuNbdPair(a, b, placement) as pair:
        took, copier = pair.copy()
        used = pair.stop()
        used["nbdcopy"] = copier
    run("cmp", src, b)
    os.remove(a)
    os.remove(b)
    return took, used


def bench_initial_sync(lab, tmp, size, rounds):
    src = os.path.join(tmp, "src.img")
    allocated = make_half_random(src, size)
    results = {"ember": [], "nbdcopy": []}
    cpu = {"ember": [], "nbdcopy": []}
    sent = 0
    for r in range(rounds):
        # Alternate who goes first, so neither always inherits the other's
        # page-cache state.
        order = ["ember", "nbdcopy"] if r % 2 == 0 else ["nbdcopy", "ember"]
        for who in order:
            if who == "ember":
                took, sent, used = ember_initial_sync(lab, src, size, r)
            else:
                took, used = nbdcopy_initial_sync(tmp, src, size, lab.placement)
            results[who].append(took)
            cpu[who].append(used)
    e, n = statistics.median(results["ember"]), statistics.median(results["nbdcopy"])
    gib = allocated / (1 << 30)
    per_gib = {who: per_process_median(runs, gib) for who, runs in cpu.items()}
    ember_cpu, peer_cpu = sum(per_gib["ember"].values()), sum(per_gib["nbdcopy"].values())
    print(f"initial-sync {size >> 20} MiB ({allocated >> 20} MiB allocated random, "
          f"placement {lab.placement.mode}): "
          f"ember {e:.2f} s (sent {sent >> 20} MiB)  nbdcopy {n:.2f} s  "
          f"ratio nbdcopy/ember {n / e:.2f}x  (target >= 1.2x)  "
          f"rounds ember {[round(x, 2) for x in results['ember']]} "
          f"nbdcopy {[round(x, 2) for x in results['nbdcopy']]}")
    print(f"initial-sync CPU-seconds per GiB allocated: ember {ember_cpu:.2f} "
          f"({fmt_cpu(per_gib['ember'])})  peer {peer_cpu:.2f} ({fmt_cpu(per_gib['nbdcopy'])})  "
          f"ratio ember/peer {ember_cpu / peer_cpu:.2f}x  (target <= 1.5x)")
    return {"ember_s": e, "nbdcopy_s": n, "ratio": n / e,
            "cpu_s_per_gib": per_gib, "cpu_ratio": ember_cpu / peer_cpu}


def per_process_median(runs, gib):
    """Median CPU-seconds per GiB of each process over `runs` (dicts of
    process → CPU-seconds)."""
    return {name: statistics.median(r[name] for r in runs) / gib for name in runs[0]}


def fmt_cpu(per_gib):
    return ", ".join(f"{name} {v:.2f}" for name, v in per_gib.items())


def fio_json(placement, *args):
    """Runs fio at site-a with JSON output to a file (fio prints notes on
    stdout)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        run(*placement.cmd("site-a", "fio", *args, "--output-format=json",
                           f"--output={f.name}"))
        return json.load(open(f.name))


def fio_lat(uri, runtime, placement):
    # Total latency (submission + completion): with the async nbd engine,
    # fio's clat alone can start after libnbd has already sent the request
    # and then reads a few microseconds, which measures nothing.
    out = fio_json(placement, "--name=lat", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                   "--bs=4k", "--iodepth=1", "--size=256M", "--time_based",
                   f"--runtime={runtime}", "--lat_percentiles=1", "--percentile_list=50:99")
    job = out["jobs"][0]["write"]
    pct = job["lat_ns"]["percentile"]
    return pct["50.000000"] / 1000, pct["99.000000"] / 1000, job["iops"]


def bench_latency(lab, rounds, runtime):
    vols = {"off": "lat-off", "async": "lat-async", "sync": "lat-sync"}
    for mode, vol in vols.items():
        lab.ctl("site-a", "volume", "create", vol, "--size", "256M")
        if mode != "off":
            lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-b", "--mode", mode)
            lab.wait_in_sync(vol)
    placements = [lab.placement]
    if lab.placement.mode != "shared":
        placements.append(Placement("shared"))
    results = {}
    for placement in placements:
        lab.place(placement)
        results[placement.mode] = latency_rounds(lab, vols, rounds, runtime)
    lab.place(placements[0])
    return results


def latency_rounds(lab, vols, rounds, runtime):
    samples = {m: [] for m in vols}
    rtts = []
    lags = []  # the async volume's lag (seconds, bytes) as each of its runs ends
    fio_lat(lab.uri("site-a", vols["off"]), 1, lab.placement)  # warm-up, not counted
    for r in range(rounds):
        order = list(vols) if r % 2 == 0 else list(reversed(vols))
        for mode in order:
            # Each run starts from replicas with nothing left to ship: an
            # async backlog left by the run before would be charged to
            # this one (its secondary applying on the same disk and CPU).
            for m, v in vols.items():
                if m != "off":
                    lab.wait_in_sync(v)
            samples[mode].append(fio_lat(lab.uri("site-a", vols[mode]), runtime, lab.placement))
            if mode == "async":
                s = lab.status(vols[mode])
                lags.append((s["lag_seconds"], s["lag_bytes"]))
        rtts.append(lab.ctl("site-a", "peer", "list")[0]["rtt_us"])
    med = {m: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
           for m, v in samples.items()}
    rtt = statistics.median(rtts)
    where = lab.placement.mode
    for m in vols:
        print(f"latency [{where}] 4k QD1 {m:>5}: p50 {med[m][0]:7.1f} us  p99 {med[m][1]:7.1f} us")
    async_ratio = med["async"][0] / med["off"][0]
    sync_add = med["sync"][0] - med["off"][0]
    print(f"latency [{where}]: async/off p50 {async_ratio:.3f}x (target <= 1.05x); sync adds "
          f"{sync_add:.0f} us at p50 vs budget RTT {rtt} us + 100 us = {rtt + 100} us")
    print(f"latency [{where}]: async lag as its runs end: "
          + ", ".join(f"{sec:.3f} s / {b / MIB:.1f} MiB" for sec, b in lags))
    return {"median_us": med, "rtt_us": rtt, "async_ratio": async_ratio, "sync_add_us": sync_add,
            "async_lag_at_end": [{"lag_seconds": sec, "lag_bytes": b} for sec, b in lags]}


def bench_stream(lab, tmp, size):
    vol = "stream"
    lab.ctl("site-a", "volume", "create", vol, "--size", str(size))
    lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-b", "--mode", "async")
    lab.wait_in_sync(vol)
    prof = Profiler(lab, "stream")
    cpu = lab.cpu_meter().start()
    t0 = time.time()
    run(*lab.placement.cmd("site-a", "fio", "--name=s", "--ioengine=nbd",
                           f"--uri={lab.uri('site-a', vol)}", "--rw=write", "--bs=1m",
                           "--iodepth=8", f"--size={size}", "--refill_buffers"))
    lab.wait_in_sync(vol)
    stream = size / (time.time() - t0)
    stream_cpu = {site: v / (size / (1 << 30)) for site, v in cpu.stop().items()}
    prof.stop()
    port = free_port()
    server = subprocess.Popen(
        lab.placement.cmd("site-b", "iperf3", "-s", "-1", "-p", str(port), "-B", "127.0.0.1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        out = json.loads(run(*lab.placement.cmd("site-a", "iperf3", "-c", "127.0.0.1", "-p",
                                                str(port), "-t", "3", "-J")))
        net = out["end"]["sum_received"]["bits_per_second"] / 8
    finally:
        server.wait(timeout=10)
    target = os.path.join(tmp, "disk.img")
    out = fio_json(Placement("shared"), "--name=d", f"--filename={target}", "--rw=write", "--bs=1m",
                   "--iodepth=8", f"--size={size}", "--end_fsync=1")
    disk = out["jobs"][0]["write"]["bw_bytes"]
    os.remove(target)
    ceiling = min(net, disk)
    writes = design_writes(lab)
    design = disk / writes
    peer_cpu = stream_peer_cpu(tmp, size, lab.placement)
    ember_sum, peer_sum = sum(stream_cpu.values()), sum(peer_cpu.values())
    print(f"stream: {stream / MIB:.0f} MiB/s to the secondary; ceilings: loopback TCP "
          f"{net / MIB:.0f} MiB/s, disk {disk / MIB:.0f} MiB/s; ratio {stream / ceiling:.2f}x "
          f"of the lower ceiling")
    print(f"stream: design limit {design / MIB:.0f} MiB/s (disk / {writes}: "
          f"{'clone apply, one write' if writes == 1 else 'staging log then volume, two writes'}); "
          f"ratio {stream / design:.2f}x (target >= 0.9x)")
    print(f"stream CPU-seconds per GiB written: {fmt_cpu(stream_cpu)}, "
          f"both {ember_sum:.2f}  peer {peer_sum:.2f} ({fmt_cpu(peer_cpu)})  "
          f"ratio ember/peer {ember_sum / peer_sum:.2f}x")
    return {"stream_Bps": stream, "iperf3_Bps": net, "disk_Bps": disk, "ratio": stream / ceiling,
            "design_writes": writes, "design_limit_Bps": design, "design_ratio": stream / design,
            "cpu_s_per_gib": stream_cpu, "peer_cpu_s_per_gib": peer_cpu,
            "cpu_ratio": ember_sum / peer_sum}


def design_writes(lab):
    """Writes the secondary makes of each streamed byte: 1 where its data
    dir can reflink (committed batches are applied by cloning the staged
    blocks), else 2 (the staging log, then the volume)."""
    method = lab.ctl("site-b", "status").get("snapshot_method")
    return 1 if method == "reflink" else 2


def stream_peer_cpu(tmp, size, placement):
    """CPU-seconds per GiB of the stream's peer: the same fio writes into a
    qemu-nbd export at site-a (serving the writes, as site-a's agent does),
    then nbdcopy --flush of the written image to a qemu-nbd export at
    site-b (moving them, as replication does). Per process: both qemu-nbd
    (each over both phases) and nbdcopy; fio's own CPU is counted on
    neither side."""
    a = os.path.join(tmp, "stream-a.img")
    b = os.path.join(tmp, "stream-b.img")
    for path in (a, b):
        with open(path, "wb") as f:
            f.truncate(size)
    with QemuNbdPair(a, b, placement) as pair:
        run(*placement.cmd("site-a", "fio", "--name=s", "--ioengine=nbd",
                           f"--uri=nbd://127.0.0.1:{pair.pa}", "--rw=write", "--bs=1m",
                           "--iodepth=8", f"--size={size}", "--refill_buffers"))
        _, copier = pair.copy()
        used = pair.stop()
        used["nbdcopy"] = copier
    run("cmp", a, b)
    os.remove(a)
    os.remove(b)
    gib = size / (1 << 30)
    return {name: v / gib for name, v in used.items()}


def bench_resync(lab, tmp, size):
    vol = "resync"
    lab.ctl("site-a", "volume", "create", vol, "--size", str(size))
    run(*lab.placement.cmd("site-a", "fio", "--name=fill", "--ioengine=nbd",
                           f"--uri={lab.uri('site-a', vol)}", "--rw=write", "--bs=1m",
                           "--iodepth=8", f"--size={size}", "--refill_buffers"))
    lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-b", "--mode", "async")
    lab.wait_in_sync(vol)
    old = os.path.join(tmp, "old.img")
    run("cp", lab.data_file("site-b", vol), old)
    before = lab.status(vol)["resync_bytes_sent"]
    lab.ctl("site-a", "replica", "pause", vol)
    rng = random.Random(5)
    chunks = size // MIB
    changed = sorted(rng.sample(range(chunks), max(1, chunks // 100)))
    args = []
    for c in changed:
        args += ["-c", f"write -P {c % 250 + 1} {c * MIB} 1M"]
    run("qemu-io", "-f", "raw", *args, lab.uri("site-a", vol))
    run("sync")
    # CPU-seconds of both agents over the resync: steadier than its wall
    # time on a shared machine (the wall time includes the status polls).
    cpu = RunMeter(lab.cpu_meter().pids).start()
    t0 = time.time()
    lab.ctl("site-a", "replica", "resume", vol)
    s = lab.wait_in_sync(vol)
    ember = time.time() - t0
    used = cpu.stop()
    resent = s["resync_bytes_sent"] - before
    t0 = time.time()
    run("rsync", "--inplace", "--no-whole-file", "--ignore-times",
        lab.data_file("site-a", vol), old)
    rsync = time.time() - t0
    run("cmp", lab.data_file("site-a", vol), old)
    os.remove(old)
    print(f"resync after changing {len(changed)} MiB of {size >> 20} MiB: ember {ember:.2f} s "
          f"(resent {resent >> 20} MiB)  rsync {rsync:.2f} s  ratio rsync/ember "
          f"{rsync / ember:.1f}x  (target >= 30x)  CPU-s site-a {used['site-a']:.3f} "
          f"site-b {used['site-b']:.3f}")
    return {"ember_s": ember, "rsync_s": rsync, "resent": resent, "ratio": rsync / ember,
            "cpu_s": used}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script works")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--only", default="initial-sync,latency,stream,resync")
    ap.add_argument("--sync-size", default="4G")
    ap.add_argument("--stream-size", default="2G")
    ap.add_argument("--resync-size", default="8G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--dir", default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--placement", choices=["sites", "shared"], default="sites",
                    help="sites: a CPU per site (default); shared: the kernel places all")
    ap.add_argument("--keep-logs", default=None,
                    help="copy both agents' logs into this dir before the lab is removed "
                         "(with RUST_LOG=info,ember_repl=debug they time a resync's phases)")
    ap.add_argument("--perf-dir", default=None,
                    help="perf record both agents during the first initial sync and the "
                         "stream into this dir (slows them: not for comparing numbers)")
    a = ap.parse_args()
    global PERF_DIR
    PERF_DIR = a.perf_dir and os.path.abspath(a.perf_dir)
    if a.quick:
        a.sync_size, a.stream_size, a.resync_size = "128M", "64M", "128M"
        a.rounds, a.runtime = 1, 1
    for tool in ["qemu-nbd", "qemu-io", "nbdcopy", "fio", "rsync", "iperf3"]:
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")
    tmp = tempfile.mkdtemp(prefix="ember-repl-bench-", dir=a.dir)
    lab = Lab(a.bin_dir, tmp, Placement(a.placement))
    results = {"placement": lab.placement.mode}
    try:
        only = a.only.split(",")
        if "initial-sync" in only:
            results["initial-sync"] = bench_initial_sync(lab, tmp, size_arg(a.sync_size), 1 if a.quick else a.rounds)
        if "latency" in only:
            results["latency"] = bench_latency(lab, a.rounds, a.runtime)
        if "stream" in only:
            results["stream"] = bench_stream(lab, tmp, size_arg(a.stream_size))
        if "resync" in only:
            results["resync"] = bench_resync(lab, tmp, size_arg(a.resync_size))
    finally:
        lab.down()
        if a.keep_logs:
            os.makedirs(a.keep_logs, exist_ok=True)
            for site in ("site-a", "site-b"):
                log = os.path.join(lab.dir, f"{site}.log")
                if os.path.exists(log):
                    shutil.copy(log, a.keep_logs)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
