#!/usr/bin/env python3
"""Write-order workload for replication tests.

Writes sequence-stamped 4 KiB blocks at random block offsets, one at a time
(each acknowledged before the next is issued, so the history is a total
order), and appends "SEQ OFFSET ACK_UNIX_NS" to HISTORY after every
acknowledgement (the wall clock when the acknowledgement arrived).
Stops after COUNT writes or when the server goes away.

Block layout: seq (u64 LE), offset (u64 LE), then seq repeated 510 times.

usage: stamped_writer.py URI HISTORY BLOCKS COUNT SEED [fua]
"""
import random
import struct
import sys
import time

import nbd


def main():
    uri, history = sys.argv[1], sys.argv[2]
    blocks, count, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    fua = len(sys.argv) > 6 and sys.argv[6] == "fua"
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(seed)
    flags = nbd.CMD_FLAG_FUA if fua else 0
    with open(history, "w", buffering=1) as out:
        for seq in range(1, count + 1):
            off = rng.randrange(blocks) * 4096
            s = struct.pack("<Q", seq)
            buf = s + struct.pack("<Q", off) + s * 510
            try:
                h.pwrite(buf, off, flags=flags)
            except Exception as e:  # the server died or the link was cut
                print(f"stopped at seq {seq}: {e}", file=sys.stderr)
                return
            out.write(f"{seq} {off} {time.time_ns()}\n")
    print(f"wrote {count} blocks", file=sys.stderr)


if __name__ == "__main__":
    main()
