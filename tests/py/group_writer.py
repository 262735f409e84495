#!/usr/bin/env python3
"""Write-order workload across several volumes (consistency groups).

Writes sequence-stamped 4 KiB blocks round-robin over the volumes, one at a
time: write N goes to volume (N-1) % len(URIS) at a random block, and is
acknowledged before write N+1 is issued, so the history is one total order
across all volumes and every write depends on the one before it. Appends
"SEQ VOLUME_INDEX OFFSET ACK_UNIX_NS" to HISTORY after every
acknowledgement. Stops after COUNT writes or when a server refuses or goes
away.

Block layout (as stamped_writer.py): seq (u64 LE), offset (u64 LE), then
seq repeated 510 times.

usage: group_writer.py HISTORY BLOCKS COUNT SEED URI...
"""
import random
import struct
import sys
import time

import nbd


def main():
    history = sys.argv[1]
    blocks, count, seed = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    uris = sys.argv[5:]
    handles = []
    for uri in uris:
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    rng = random.Random(seed)
    with open(history, "w", buffering=1) as out:
        for seq in range(1, count + 1):
            vol = (seq - 1) % len(handles)
            off = rng.randrange(blocks) * 4096
            s = struct.pack("<Q", seq)
            buf = s + struct.pack("<Q", off) + s * 510
            try:
                handles[vol].pwrite(buf, off)
            except Exception as e:  # the server died or refused the write
                print(f"stopped at seq {seq}: {e}", file=sys.stderr)
                return
            out.write(f"{seq} {vol} {off} {time.time_ns()}\n")
    print(f"wrote {count} blocks", file=sys.stderr)


if __name__ == "__main__":
    main()
