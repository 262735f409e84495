#!/usr/bin/env python3
"""RPO adherence benchmark (issue 5).

For each RPO policy (alert, throttle, escalate) and each ratio of offered
write rate to link capacity (0.5, 1, 2, 3), a volume replicating async with
a 2 s RPO target takes fio writes at ratio x LINK for RUNTIME seconds while
`replica status` is sampled every 100 ms. Reports lag p50 / p99 / max
against the target, breaches, and the writer's achieved throughput (the
cost of throttle, as a fraction of the link). Writes a JSON file and an SVG
chart (benches/rpo/adherence.svg) drawn by this script.

The link: a rate-limited TCP proxy (this file) between site-a and site-b's
peer listener, since netem is not available here and tc shaping needs
namespaces; both sites run on this machine (`emberctl lab`).

usage: adherence.py [--bin-dir target/release] [--link 4M] [--runtime 10]
                    [--target 2] [--quick]
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benches", "repl"))
from compare import Lab  # noqa: E402  (the lab driver both benchmarks share)
MIB = 1 << 20
POLICIES = ["alert", "throttle", "escalate"]
RATIOS = [0.5, 1, 2, 3]


class RateProxy:
    """Forwards TCP to `target`, each direction paced to `rate` bytes/s."""

    def __init__(self, target, rate):
        self.target, self.rate = target, rate
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            c, _ = self.sock.accept()
            host, port = self.target.rsplit(":", 1)
            s = socket.create_connection((host, int(port)))
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        start, sent = time.monotonic(), 0
        try:
            while True:
                data = a.recv(16384)
                if not data:
                    break
                sent += len(data)
                # Stay on the rate's schedule (a token bucket without burst).
                ahead = sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
                else:
                    start, sent = time.monotonic(), len(data)
                b.sendall(data)
        except OSError:
            pass
        for x in (a, b):
            try:
                x.close()
            except OSError:
                pass


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def one(lab, policy, ratio, link, target, runtime, n):
    vol = f"rpo{n}"
    lab.ctl("site-a", "volume", "create", vol, "--size", "1G")
    lab.ctl("site-a", "replica", "enable", vol, "--peer", "site-b", "--mode", "async",
            "--rpo", f"{target}s", "--rpo-policy", policy)
    deadline = time.time() + 120
    while time.time() < deadline:
        s = lab.ctl("site-a", "replica", "status", vol)
        if s["state"] == "in-sync" and s["lag_bytes"] == 0:
            break
        time.sleep(0.1)
    report = os.path.join(os.path.dirname(lab.dir), f"fio-{n}.json")
    fio = subprocess.Popen(
        ["fio", "--name=offered", "--ioengine=nbd", f"--uri={lab.uri('site-a', vol)}", "--rw=randwrite",
         "--bs=64k", "--iodepth=8", "--size=1G", "--time_based", f"--runtime={runtime}",
         f"--rate={int(ratio * link)}", "--output-format=json", f"--output={report}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lags, breached = [], 0
    while fio.poll() is None:
        s = lab.ctl("site-a", "replica", "status", vol)
        lags.append(s["lag_seconds"])
        breached += bool(s["rpo_breached"])
        time.sleep(0.1)
    with open(report) as f:
        text = f.read()
    bw = json.loads(text[text.index("{"):])["jobs"][0]["write"]["bw_bytes"]
    lab.ctl("site-a", "replica", "disable", vol, "--delete-secondary")
    lab.ctl("site-a", "volume", "delete", vol)
    return {
        "policy": policy, "ratio": ratio, "lag_p50": pct(lags, 50), "lag_p99": pct(lags, 99),
        "lag_max": max(lags), "breached_share": breached / len(lags),
        "writer_bytes_per_sec": bw, "writer_vs_link": bw / link, "samples": len(lags),
    }


def svg(results, target, path):
    """Grouped bars: max and p99 lag per ratio, one colour per policy."""
    w, h, left, bottom, top = 760, 380, 60, 50, 30
    colours = {"alert": "#d9534f", "throttle": "#5cb85c", "escalate": "#337ab7"}
    ymax = max(max(r["lag_max"] for r in results), target) * 1.15
    plot_h = h - bottom - top
    y = lambda v: top + plot_h - v / ymax * plot_h
    group_w = (w - left - 20) / len(RATIOS)
    bar_w = group_w / (len(POLICIES) + 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">'
           f'Replication lag vs RPO target ({target} s) by offered write rate / link capacity</text>']
    for i in range(6):
        v = ymax * i / 5
        out.append(f'<line x1="{left}" x2="{w - 20}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}s</text>')
    for gi, ratio in enumerate(RATIOS):
        gx = left + gi * group_w
        out.append(f'<text x="{gx + group_w / 2:.1f}" y="{h - bottom + 18}" '
                   f'text-anchor="middle">{ratio}x</text>')
        for pi, policy in enumerate(POLICIES):
            r = next((r for r in results if r["policy"] == policy and r["ratio"] == ratio), None)
            if r is None:
                continue
            x = gx + (pi + 0.5) * bar_w
            out.append(f'<rect x="{x:.1f}" y="{y(r["lag_max"]):.1f}" width="{bar_w * 0.9:.1f}" '
                       f'height="{y(0) - y(r["lag_max"]):.1f}" fill="{colours[policy]}" '
                       f'fill-opacity="0.35"><title>{policy} {ratio}x max {r["lag_max"]:.2f}s'
                       f'</title></rect>')
            out.append(f'<rect x="{x:.1f}" y="{y(r["lag_p99"]):.1f}" width="{bar_w * 0.9:.1f}" '
                       f'height="{y(0) - y(r["lag_p99"]):.1f}" fill="{colours[policy]}">'
                       f'<title>{policy} {ratio}x p99 {r["lag_p99"]:.2f}s</title></rect>')
    out.append(f'<line x1="{left}" x2="{w - 20}" y1="{y(target):.1f}" y2="{y(target):.1f}" '
               f'stroke="black" stroke-dasharray="6 4"/>')
    out.append(f'<text x="{w - 22}" y="{y(target) - 4:.1f}" text-anchor="end">RPO target</text>')
    for pi, policy in enumerate(POLICIES):
        lx = left + 10 + pi * 120
        out.append(f'<rect x="{lx}" y="{h - 22}" width="12" height="12" fill="{colours[policy]}"/>')
        out.append(f'<text x="{lx + 16}" y="{h - 12}">{policy}</text>')
    out.append(f'<text x="{left + 380}" y="{h - 12}">solid: p99, pale: max</text>')
    out.append('</svg>')
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--link", default="4M", help="link capacity (bytes/s, K/M suffix)")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--target", type=int, default=2, help="RPO target, seconds")
    ap.add_argument("--quick", action="store_true", help="one policy, one ratio, 2 s: checks the script")
    ap.add_argument("--out", default=os.path.join(ROOT, "benches", "rpo"))
    a = ap.parse_args()
    link = int(a.link[:-1]) * {"K": 1024, "M": MIB}[a.link[-1]] if a.link[-1] in "KM" else int(a.link)
    for tool in ["fio"]:
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")
    policies, ratios = (["throttle"], [3]) if a.quick else (POLICIES, RATIOS)
    runtime = 2 if a.quick else a.runtime
    tmp = tempfile.mkdtemp(prefix="ember-rpo-bench-")
    lab = Lab(a.bin_dir, tmp)
    results = []
    try:
        # Re-pair site-a with site-b through the rate-limited proxy.
        b_peer = lab.lab["sites"]["site-b"]["peer"]
        proxy = RateProxy(b_peer, link)
        lab.ctl("site-a", "replica", "disable", lab.lab["volume"]["name"], "--delete-secondary")
        lab.ctl("site-a", "peer", "remove", "site-b")
        lab.ctl("site-a", "peer", "add", "site-b", "--address", proxy.addr, "--measure", "256K")
        n = 0
        for policy in policies:
            for ratio in ratios:
                n += 1
                r = one(lab, policy, ratio, link, a.target, runtime, n)
                results.append(r)
                print(f"{policy:>8} {ratio:>3}x  lag p50 {r['lag_p50']:5.2f}s  p99 {r['lag_p99']:5.2f}s  "
                      f"max {r['lag_max']:5.2f}s  (target {a.target}s)  breached "
                      f"{100 * r['breached_share']:4.0f}% of samples  writer "
                      f"{r['writer_bytes_per_sec'] / MIB:5.2f} MiB/s = {r['writer_vs_link']:.2f}x link",
                      flush=True)
    finally:
        lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
    if not a.quick:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "adherence.json"), "w") as f:
            json.dump({"link_bytes_per_sec": link, "target_seconds": a.target,
                       "runtime_seconds": runtime, "results": results}, f, indent=1)
        svg(results, a.target, os.path.join(a.out, "adherence.svg"))
    print(json.dumps({"results": len(results)}))


if __name__ == "__main__":
    main()
