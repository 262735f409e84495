#!/usr/bin/env python3
"""Write-order workload for replication tests.

Writes sequence-stamped 4 KiB blocks at random block offsets, one at a time
(each acknowledged before the next is issued, so the history is a total
order), and appends "SEQ OFFSET ACK_UNIX_NS" to HISTORY after every
acknowledgement (the wall clock when the acknowledgement arrived).
Stops after COUNT writes or when the server goes away.

Block layout: seq (u64 LE), offset (u64 LE), then seq repeated 510 times.

With span=N, each write is either one block or N consecutive blocks
(N-aligned; at random), every block stamped with the write's seq and its
own offset; the history line then ends with the write's length in blocks.
Large aligned writes are what a reflink secondary applies by clone.

usage: stamped_writer.py URI HISTORY BLOCKS COUNT SEED [fua] [span=N]
"""
import random
import struct
import sys
import time

import nbd


def main():
    uri, history = sys.argv[1], sys.argv[2]
    blocks, count, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    opts = sys.argv[6:]
    fua = "fua" in opts
    span = next((int(o[5:]) for o in opts if o.startswith("span=")), 1)
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(seed)
    flags = nbd.CMD_FLAG_FUA if fua else 0
    with open(history, "w", buffering=1) as out:
        for seq in range(1, count + 1):
            n = span if span > 1 and rng.random() < 0.5 else 1
            off = rng.randrange(blocks // n) * n * 4096
            s = struct.pack("<Q", seq)
            buf = b"".join(s + struct.pack("<Q", off + i * 4096) + s * 510 for i in range(n))
            try:
                h.pwrite(buf, off, flags=flags)
            except Exception as e:  # the server died or the link was cut
                print(f"stopped at seq {seq}: {e}", file=sys.stderr)
                return
            out.write(f"{seq} {off} {time.time_ns()} {n}\n")
    print(f"wrote {count} blocks", file=sys.stderr)


if __name__ == "__main__":
    main()
