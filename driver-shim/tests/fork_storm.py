"""Forks children while gRPC calls to a live agent are in flight, the way
cinder-volume does: `processutils.execute` / `subprocess` for every command
it runs, in a process whose driver talks to the agent from other threads.

Run as its own interpreter (`python fork_storm.py ENDPOINT CHILDREN
[--eventlet]`) so that what is imported first, and whether eventlet has
patched the process, is exactly what cinder-volume does; the driver must be
imported the way cinder-volume imports it, before any RPC. Prints one JSON
line: how many children exited abnormally (a negative return code is a
signal: grpcio 1.80-1.85 aborts with SIGABRT, -6) and how many RPCs ran.
"""
import json
import sys

EVENTLET = "--eventlet" in sys.argv
if EVENTLET:
    # cinder/cmd/volume.py monkey-patches before anything else.
    import eventlet
    eventlet.monkey_patch()

import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from oslo_concurrency import processutils  # noqa: E402

from ember_cinder.client import AgentClient, pb  # noqa: E402

endpoint, children = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
rpcs = [0]
errors = []


def rpc_loop():
    # A channel of its own per thread: several RPCs in flight at once.
    client = AgentClient(endpoint, timeout=10.0)
    try:
        while not stop.is_set():
            client.raw("ListVolumes", pb.ListVolumesRequest())
            client.raw("GetCapabilities", pb.GetCapabilitiesRequest())
            rpcs[0] += 2
            # Patched, this yields to the other green threads (a blocking
            # gRPC call does not); unpatched, it is a no-op.
            time.sleep(0)
    except Exception as e:  # reported, not raised: the main thread decides
        errors.append(repr(e))
    finally:
        client.close()


# Patched, these are green threads on the main OS thread: how cinder-volume
# runs the driver's calls (ember_cinder does not push them to eventlet's
# tpool). They interleave with the forks while the main green thread waits
# for each child, and gRPC's own core threads are live across every fork.
# An earlier version ran the loops in tpool's OS threads: grpcio then mixed
# green locks across OS threads ("cannot switch to a different thread") and
# the run hung now and then, in a set-up the driver never uses.
workers = [threading.Thread(target=rpc_loop) for _ in range(3)]
for w in workers:
    w.start()

abnormal = []
for i in range(children):
    if i % 2 == 0:
        rc = subprocess.run(["true"], close_fds=True).returncode
    else:
        try:
            processutils.execute("true")
            rc = 0
        except processutils.ProcessExecutionError as e:
            rc = e.exit_code
    if rc != 0:
        abnormal.append(rc)
stop.set()
for w in workers:
    w.join(30)
print(json.dumps({"children": children, "abnormal": abnormal, "rpcs": rpcs[0],
                  "rpc_errors": errors}))
