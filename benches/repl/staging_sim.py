"""The secondary's two-write stream without Ember: what the data dir's file
system gives a staging log that is truncated after every batch (what
`StagingLog::reset` does) against one rewritten in place.

Per batch: BATCH bytes appended to the log, `fdatasync`, the same bytes
written to the volume file (page cache), then the log truncated to 0
(`truncate`) or simply rewritten from offset 0 by the next batch
(`inplace`). Prints the stream rate (bytes of volume per second) and the
bytes written per second. Issue 16: the stream on ext4 against its
design limit.

    /usr/bin/python3 benches/repl/staging_sim.py DIR truncate|inplace
"""
import os, sys, time
if len(sys.argv) != 3 or sys.argv[2] not in ("truncate", "inplace"):
    sys.exit("usage: staging_sim.py DIR truncate|inplace")
d, mode = sys.argv[1], sys.argv[2]
MiB = 1 << 20
BATCH, TOTAL = 112 * MiB, 2048 * MiB
buf = os.urandom(MiB)
log = os.open(os.path.join(d, "log"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
vol = os.open(os.path.join(d, "vol"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(vol, TOTAL)
t0 = time.time(); off = 0
while off < TOTAL:
    for i in range(BATCH // MiB):
        os.pwrite(log, buf, i * MiB)
    os.fdatasync(log)
    for i in range(BATCH // MiB):
        os.pwrite(vol, buf, off + i * MiB)
    if mode == "truncate":
        os.ftruncate(log, 0)
    off += BATCH
os.fdatasync(vol)
dt = time.time() - t0
print(f"{mode}: {TOTAL / MiB / dt:.0f} MiB/s of stream ({2 * TOTAL / MiB / dt:.0f} MiB/s written)")
os.unlink(os.path.join(d, "log")); os.unlink(os.path.join(d, "vol"))
