"""The snapshot path the Cinder driver sees: one CreateSnapshot RPC over a
long-lived gRPC channel (the driver's `AgentClient`, made once per
backend), timed from the call to its answer. No process start, no
connect: what `create_snapshot` costs Cinder once the backend is up.

Run by benches/snap/compare.py with the shim venv's python (it needs
grpcio and `ember_cinder`): one request per stdin line `VOLUME SNAPSHOT`,
one stdout line per answer: milliseconds (float) or `error: ...`.

usage: driver_rpc.py ENDPOINT   (e.g. unix:/tmp/x/xfs.sock)
"""
import sys
import time

from ember_cinder.client import AgentClient, pb


def main():
    client = AgentClient(sys.argv[1])
    # Connect and warm the channel the way a running driver's is.
    client.raw("GetCapabilities", pb.GetCapabilitiesRequest())
    for line in sys.stdin:
        vol, snap = line.split()
        req = pb.CreateSnapshotRequest(volume=vol, name=snap)
        t0 = time.perf_counter()
        try:
            client.call("CreateSnapshot", req, f"snapshot {vol}@{snap}")
        except Exception as e:  # reported to compare.py, which fails the run
            print(f"error: {e}", flush=True)
            continue
        print(f"{(time.perf_counter() - t0) * 1000:.4f}", flush=True)
    client.close()


if __name__ == "__main__":
    main()
