#!/usr/bin/python3
"""Snapshot time and space, each method side by side with its peers on the
same data in one run, reported as ratios (this machine is noisy; ratios
travel, absolutes don't).

For each allocated size (default 1G, 4G, 16G):
  ember-xfs     `emberctl snapshot create` on an emberd whose data dir is on
                a loop-mounted XFS made by this script (`mkfs.xfs -m
                reflink=1`): snapshot_method reflink.
  cp-reflink    `cp --reflink=always` of that volume's data file on the same
                XFS: the file system's own floor (no fsync, no metadata).
  cp-reflink+fsync  the same plus `sync FILE` (fsync of the copy): what a
                crash-safe clone costs at least; emberd also fsyncs its
                metadata and two directories.
  qcow2         `qemu-img snapshot -c` (internal snapshot) on a qcow2 holding
                the same data, on the same XFS: how Cinder's NFS-style
                drivers snapshot.
  ember-ext4    `emberctl snapshot create` on an emberd whose data dir is on
                a loop-mounted ext4 made by this script: snapshot_method copy.
  driver-rpc    the same snapshot as the Cinder driver takes it: one
                CreateSnapshot RPC over the driver's long-lived gRPC channel
                (`ember_cinder.client.AgentClient`, benches/snap/driver_rpc.py
                run with --driver-python, the shim venv's python): no process
                start, no connect. Not a CLI number: reported beside it.

Volumes are filled sequentially through NBD from nbdkit's pattern plugin
(non-zero everywhere), then `sync`ed, so every method starts from data on
disk (a clone otherwise pays for writing back dirty pages). Times are wall
clock of the client command (process start included for every method);
`agent_ms` is emberd's own time for the snapshot, from its log, and
`cli_floor_ms` the time of `emberctl status` (the CLI's fixed cost: process
start, runtime, connect, one RPC) measured next to it, with the bare
process-start floors `emberctl --version` and `cp --version`. Each round
runs ember and the `cp` peers back to back, alternating which goes first,
so both see the same load; the report adds a best-of-N ratio. Space is
the drop in the file system's free bytes (statvfs, after `sync`).

usage: benches/snap/compare.py [--quick] [--bin-dir DIR] [--sizes 1G,4G,16G]
       [--rounds N] [--dir DIR] [--skip ext4,qcow2,cp,driver]
       [--driver-python PY]  (default target/shim-venv/bin/python)
Needs: root (loop mount), emberd and emberctl (scripts/build-release.sh:
emberctl static-pie, as installed; the report's `emberctl_link` says which
one ran, and a dynamically linked one pays ~0.3 ms more per call), xfsprogs,
qemu-utils, libnbd-bin (nbdcopy), nbdkit.
"""
import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MIB = 1 << 20
GIB = 1 << 30


def size_arg(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def fmt_size(n):
    for unit, div in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def run(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr}{r.stdout}")
    return r.stdout


def timed(*cmd):
    """Seconds the command took (wall clock, process start included)."""
    t0 = time.perf_counter()
    run(*cmd)
    return time.perf_counter() - t0


def free_bytes(path):
    run("sync")
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LoopFs:
    """A sparse file in the work dir, made into a file system and
    loop-mounted with discard (so space freed inside returns to the host
    between sizes). Both XFS and ext4 sit on the same kind of loop device,
    so neither pays a layer the other doesn't, and free-space readings see
    only this benchmark."""

    def __init__(self, tmp, name, size, *mkfs):
        self.image = os.path.join(tmp, f"{name}.img")
        self.path = os.path.join(tmp, name)
        with open(self.image, "wb") as f:
            f.truncate(size)
        run(*mkfs, self.image)
        os.makedirs(self.path)
        run("mount", "-o", "loop,discard", self.image, self.path)

    def close(self):
        run("umount", self.path, check=False)


class Agent:
    """emberd on `data_dir` (log next to it), driven with emberctl."""

    def __init__(self, bins, name, data_dir, log_dir):
        self.ctl_bin = os.path.join(bins, "emberctl")
        self.data_dir = data_dir
        os.makedirs(data_dir, exist_ok=True)
        # Socket and log on the work dir, not the file system under test.
        self.api = f"unix:{os.path.join(log_dir, name + '.sock')}"
        self.nbd_port = free_port()
        self.log_path = os.path.join(log_dir, name + ".log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [os.path.join(bins, "emberd"), "--data-dir", data_dir, "--api", self.api,
             "--nbd", f"127.0.0.1:{self.nbd_port}", "--log-format", "text"],
            env={**os.environ, "RUST_LOG": "info"},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"emberd exited: {open(self.log_path).read()}")
            if subprocess.run([self.ctl_bin, "--api", self.api, "status"],
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("emberd did not come up")

    def ctl(self, *args):
        out = run(self.ctl_bin, "--api", self.api, "--json", *args)
        return json.loads(out) if out.strip() else None

    def uri(self, export):
        return f"nbd://127.0.0.1:{self.nbd_port}/{export}"

    def data_file(self, vol, snap=None):
        d = os.path.join(self.data_dir, "volumes", vol)
        if snap:
            d = os.path.join(d, "snapshots", snap)
        return os.path.join(d, "data.img")

    def agent_ms(self, vol, snap):
        """emberd's own time for snapshot `snap` of `vol`, from its log."""
        pat = re.compile(rf"volume_id={re.escape(vol)} snapshot={re.escape(snap)} .*elapsed_us=(\d+)")
        with open(self.log_path) as f:
            for line in f:
                m = pat.search(line)
                if m and "snapshot created" in line:
                    return int(m.group(1)) / 1000
        return None

    def fill(self, vol, size):
        self.ctl("volume", "create", vol, "--size", str(size))
        run("nbdcopy", "--", "[", "nbdkit", "pattern", f"size={size}", "]", self.uri(vol))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class DriverRpc:
    """benches/snap/driver_rpc.py in the shim venv: a long-lived gRPC
    channel to `agent`, as the Cinder driver holds one."""

    def __init__(self, python, agent):
        helper = os.path.join(ROOT, "benches", "snap", "driver_rpc.py")
        # The venv's installed ember_cinder: it holds the generated stubs
        # (`_proto`), which the source tree does not.
        self.proc = subprocess.Popen([python, helper, agent.api], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def snapshot_ms(self, vol, snap):
        self.proc.stdin.write(f"{vol} {snap}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        if not line or line.startswith("error"):
            raise RuntimeError(f"driver CreateSnapshot {vol}@{snap}: {line or 'helper exited'}")
        return float(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def process_floor(agent):
    """Process-start floors measured next to each round: `emberctl
    --version` (no runtime, no connection) and `cp --version`."""
    return {"ctl_version_ms": timed(agent.ctl_bin, "--version") * 1000,
            "cp_version_ms": timed("cp", "--version") * 1000}


def interleaved_rounds(agent, fs_path, vol, src, rounds, with_cp, delete_between, driver=None):
    """Times `rounds` snapshots of `vol` and, when `with_cp`, the `cp
    --reflink` peers of the same round right next to them, alternating
    which goes first: on a shared 2-vCPU machine the load changes from
    second to second, and a ratio is only fair when both sides saw the
    same load. With `driver`, the driver's RPC (a snapshot `d<r>`) runs
    in the same round too. Returns {method: {"rounds": [...]}}."""
    ember, cp, cp_sync, drv = [], [], [], []

    def one_ember(r):
        snap = f"s{r}"
        # The CLI's fixed cost (process start, runtime, connect, one RPC),
        # measured next to each snapshot.
        cli = timed(agent.ctl_bin, "--api", agent.api, "status")
        before = free_bytes(fs_path)
        secs = timed(agent.ctl_bin, "--api", agent.api, "snapshot", "create", vol, snap)
        used = before - free_bytes(fs_path)
        ember.append({"secs": secs, "space": used, "agent_ms": agent.agent_ms(vol, snap),
                      "cli_floor_ms": cli * 1000, **process_floor(agent)})
        if delete_between:
            agent.ctl("snapshot", "delete", vol, snap)

    def one_cp(r, fsync, into):
        dst = os.path.join(fs_path, f"cp-{'s' if fsync else 'b'}{r}.img")
        before = free_bytes(fs_path)
        if fsync:
            # One shell so both steps share one process start, as emberctl does.
            secs = timed("sh", "-c", f'cp --reflink=always "{src}" "{dst}" && sync "{dst}"')
        else:
            secs = timed("cp", "--reflink=always", src, dst)
        into.append({"secs": secs, "space": before - free_bytes(fs_path)})

    def one_driver(r):
        before = free_bytes(fs_path)
        ms = driver.snapshot_ms(vol, f"d{r}")
        drv.append({"secs": ms / 1000, "space": before - free_bytes(fs_path),
                    "agent_ms": agent.agent_ms(vol, f"d{r}")})
        if delete_between:
            agent.ctl("snapshot", "delete", vol, f"d{r}")

    for r in range(rounds):
        steps = [lambda: one_ember(r)]
        if with_cp:
            steps += [lambda: one_cp(r, False, cp), lambda: one_cp(r, True, cp_sync)]
        if driver is not None:
            steps.append(lambda: one_driver(r))
        if r % 2:
            steps.reverse()
        for step in steps:
            step()
    if with_cp:
        for r in range(rounds):
            for kind in "bs":
                os.remove(os.path.join(fs_path, f"cp-{kind}{r}.img"))
    out = {"ember": {"method": agent.ctl("status")["snapshot_method"], "rounds": ember}}
    if with_cp:
        out["cp-reflink"] = {"rounds": cp}
        out["cp-reflink+fsync"] = {"rounds": cp_sync}
    if driver is not None:
        out["driver-rpc"] = {"rounds": drv}
    return out


def qcow2_rounds(src, fs_path, rounds):
    img = os.path.join(fs_path, "img.qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, img)
    out = []
    for r in range(rounds):
        before = free_bytes(fs_path)
        secs = timed("qemu-img", "snapshot", "-c", f"s{r}", img)
        out.append({"secs": secs, "space": before - free_bytes(fs_path)})
    os.remove(img)
    return {"rounds": out}


def median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def elf_link(path):
    """`static` when the program at `path` has no program interpreter (no
    dynamic loader runs at exec), else `dynamic` — the test command's check."""
    headers = run("readelf", "-l", path)
    return "dynamic" if "INTERP" in headers else "static"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script works")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--sizes", default="1G,4G,16G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--skip", default="", help="comma list of: ext4, qcow2, cp, driver")
    ap.add_argument("--driver-python", default=os.path.join(ROOT, "target", "shim-venv", "bin", "python"),
                    help="python with grpcio and ember_cinder (the shim venv) for driver-rpc")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.rounds = "32M,64M,128M", 1
    sizes = [size_arg(s) for s in a.sizes.split(",")]
    skip = set(filter(None, a.skip.split(",")))
    for tool in ["mkfs.xfs", "qemu-img", "nbdcopy", "nbdkit", "readelf"]:
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")
    if os.geteuid() != 0:
        sys.exit("needs root to loop-mount XFS")
    if "driver" not in skip and not os.access(a.driver_python, os.X_OK):
        sys.exit(f"no {a.driver_python} for driver-rpc: pass --driver-python (the shim venv's"
                 " python, made by scripts/test-all.sh) or --skip driver")
    tmp = tempfile.mkdtemp(prefix="ember-snap-bench-", dir=a.dir)
    # Room for the largest volume and its qcow2 twin (or copy), and slack.
    fs_size = max(2 * max(sizes) + 2 * GIB, 2 * GIB)
    mounts = []
    xfs = LoopFs(tmp, "xfs", fs_size, "mkfs.xfs", "-q", "-m", "reflink=1")
    mounts.append(xfs)
    if "ext4" not in skip:
        ext4 = LoopFs(tmp, "ext4", fs_size, "mkfs.ext4", "-q", "-F")
        mounts.append(ext4)
    agents = []
    driver = None
    results = {"sizes": {}, "loadavg_start": open("/proc/loadavg").read().split()[:3],
               "emberctl_link": elf_link(os.path.join(a.bin_dir, "emberctl"))}
    if results["emberctl_link"] != "static":
        print("note: this emberctl is dynamically linked; scripts/build-release.sh builds the"
              " static-pie one that is installed", file=sys.stderr)
    try:
        ax = Agent(a.bin_dir, "xfs", os.path.join(xfs.path, "data"), tmp)
        agents.append(ax)
        driver = None if "driver" in skip else DriverRpc(a.driver_python, ax)
        ae = None
        if "ext4" not in skip:
            ae = Agent(a.bin_dir, "ext4", os.path.join(ext4.path, "data"), tmp)
            agents.append(ae)
        for size in sizes:
            label = fmt_size(size)
            print(f"{label}: filling", file=sys.stderr)
            row = {}
            vol = f"v{size >> 20}m"
            ax.fill(vol, size)
            run("sync")
            src = ax.data_file(vol)
            got = interleaved_rounds(ax, xfs.path, vol, src, a.rounds, "cp" not in skip, False, driver)
            row["ember-xfs"] = got.pop("ember")
            row.update(got)
            if "qcow2" not in skip:
                row["qcow2"] = qcow2_rounds(src, xfs.path, a.rounds)
            ax.ctl("volume", "delete", vol)
            if ae is not None:
                ae.fill(vol, size)
                run("sync")
                row["ember-ext4"] = interleaved_rounds(
                    ae, ext4.path, vol, None, a.rounds, False, True)["ember"]
                ae.ctl("volume", "delete", vol)
            results["sizes"][label] = row
    finally:
        if driver is not None:
            driver.close()
        for ag in agents:
            ag.stop()
        for m in mounts:
            m.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    report(results, sizes, a.rounds)
    print(json.dumps(results, indent=1, default=str))


def report(results, sizes, rounds):
    methods = ["ember-xfs", "driver-rpc", "cp-reflink", "cp-reflink+fsync", "qcow2", "ember-ext4"]
    print(f"medians of {rounds} round(s); time in ms (agent-side ms for ember in brackets), space used")
    print()
    print("| allocated | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    labels = [fmt_size(s) for s in sizes]
    for label in labels:
        row = results["sizes"][label]
        cells = []
        for m in methods:
            if m not in row:
                cells.append("–")
                continue
            secs = median(row[m]["rounds"], "secs")
            space = median(row[m]["rounds"], "space")
            agent = median(row[m]["rounds"], "agent_ms")
            t = f"{secs * 1000:.1f} ms" + (f" [{agent:.1f}]" if agent is not None else "")
            cells.append(f"{t}, {fmt_size(max(space, 0))}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()

    def t(label, m):
        row = results["sizes"][label]
        return median(row[m]["rounds"], "secs") if m in row else None

    ratios = {}
    first, last = labels[0], labels[-1]
    ratios["ember-xfs time, largest / smallest (target <= 2)"] = t(last, "ember-xfs") / t(first, "ember-xfs")
    for label in labels:
        ex = t(label, "ember-xfs")
        dr = t(label, "driver-rpc")
        cpt = t(label, "cp-reflink")
        if dr is not None and cpt is not None:
            ratios[f"{label}: driver-rpc (long-lived channel, no process) / cp --reflink"] = dr / cpt
        for peer, name in (("cp-reflink", "ember-xfs / cp --reflink (target <= 2)"),
                           ("cp-reflink+fsync", "ember-xfs / cp --reflink + fsync (like for like)"),
                           ("qcow2", "qcow2 snapshot / ember-xfs (target > 1)"),
                           ("ember-ext4", "ember-ext4 (copy) / ember-xfs")):
            p = t(label, peer)
            if p is None:
                continue
            ratios[f"{label}: {name}"] = ex / p if peer.startswith("cp") else p / ex
    for label in labels:
        row = results["sizes"][label]
        er = row["ember-xfs"]["rounds"]
        cli = median(er, "cli_floor_ms")
        agent = median(er, "agent_ms")
        cp = t(label, "cp-reflink")
        print(f"  {label}: `emberctl status` {cli:.1f} ms, `emberctl --version`"
              f" {median(er, 'ctl_version_ms'):.1f} ms, `cp --version` {median(er, 'cp_version_ms'):.1f} ms;"
              f" emberd's own snapshot time {agent:.1f} ms"
              + (f" = {agent / (cp * 1000):.2f}x cp --reflink" if cp else ""))
        if cp:
            ratios[f"{label}: emberd's own time / cp --reflink"] = agent / (cp * 1000)
            # Best of N: the least loaded round of each, which a busy
            # machine disturbs least.
            best = min(r["secs"] for r in er) / min(r["secs"] for r in row["cp-reflink"]["rounds"])
            ratios[f"{label}: ember-xfs / cp --reflink, best of {rounds} each"] = best
            # Each round's ember and cp ran back to back under one load:
            # the median of those paired ratios.
            paired = [e["secs"] / c["secs"] for e, c in zip(er, row["cp-reflink"]["rounds"])]
            ratios[f"{label}: ember-xfs / cp --reflink, median of same-round ratios"] = \
                statistics.median(paired)
            if "driver-rpc" in row:
                dr = row["driver-rpc"]["rounds"]
                cpr = row["cp-reflink"]["rounds"]
                ratios[f"{label}: driver-rpc / cp --reflink, best of {rounds} each"] = \
                    min(r["secs"] for r in dr) / min(r["secs"] for r in cpr)
                ratios[f"{label}: driver-rpc / cp --reflink, median of same-round ratios"] = \
                    statistics.median(d["secs"] / c["secs"] for d, c in zip(dr, cpr))
    print(f"  emberctl linked {results['emberctl_link']}")
    print(f"  load average at start {' '.join(results['loadavg_start'])},"
          f" at end {' '.join(results['loadavg_end'])}")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    results["ratios"] = ratios


if __name__ == "__main__":
    main()
