"""The driver must be safe in a process that forks while RPCs are in flight:
cinder-volume forks for every command it runs. grpcio 1.80-1.85 aborts such
children when its fork support is on (grpc/grpc#43055); `ember_cinder`
turns it off before grpc is imported. Each case runs `fork_storm.py` in a
fresh interpreter against a live agent: 400 children (`subprocess.run` and
`processutils.execute`, plain threads and eventlet-patched like
cinder-volume) while three threads call the agent. Without the setting in
`ember_cinder/__init__.py` about 2 % of the children die with SIGABRT or the
run hangs (checked by running with GRPC_ENABLE_FORK_SUPPORT=true)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.parametrize("mode", ["threads", "eventlet"])
def test_children_forked_under_live_rpcs_all_exit_normally(lab, mode):
    env = dict(os.environ)
    env.pop("GRPC_ENABLE_FORK_SUPPORT", None)  # the driver's own default
    argv = [sys.executable, str(HERE / "fork_storm.py"), lab["site-a"]["api"], "400"]
    if mode == "eventlet":
        argv.append("--eventlet")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"fork storm hung (a forked child stuck before exec?): {e.stderr!r:.2000}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["abnormal"] == [], (
        f"{len(report['abnormal'])} of 400 children died: {report['abnormal']}; "
        f"stderr: {out.stderr[-2000:]}")
    assert report["rpc_errors"] == []
    # The RPCs really were in flight across the forks.
    assert report["rpcs"] >= 100, report
