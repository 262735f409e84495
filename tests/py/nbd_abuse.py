#!/usr/bin/python3
"""Protocol abuse against a running emberd with python3-libnbd in
strict-mode-off: every bad request must get its precise errno, and the same
connection must keep working afterwards. Run by tests/tests/protocol_abuse.rs.

usage: nbd_abuse.py RW_URI RO_URI
"""
import errno
import socket
import struct
import sys
from urllib.parse import urlparse

import nbd

failures = []


def errname(e):
    # libnbd's Python binding reports errno as a name or a number by version.
    return e.errno if isinstance(e.errno, str) else errno.errorcode.get(e.errno, str(e.errno))


def expect(what, want, fn):
    try:
        fn()
    except nbd.Error as e:
        got = errname(e)
        if got != want:
            failures.append(f"{what}: expected {want}, got {got} ({e.string})")
        else:
            print(f"ok   {what}: {got}")
        return
    failures.append(f"{what}: expected {want}, but the request succeeded")


def closed_by_server(sock):
    """True when the server hung up (EOF or reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def connect(uri):
    h = nbd.NBD()
    h.set_strict_mode(0)  # let us send what a well-behaved client never would
    h.connect_uri(uri)
    return h


rw_uri, ro_uri = sys.argv[1], sys.argv[2]
h = connect(rw_uri)
size = h.get_size()

expect("read past the end", "EINVAL", lambda: h.pread(4096, size - 512))
expect("write past the end", "ENOSPC", lambda: h.pwrite(b"x" * 4096, size - 512))
expect("write at offset overflow", "ENOSPC", lambda: h.pwrite(b"x" * 512, 2**64 - 256))
expect("trim past the end", "ENOSPC", lambda: h.trim(8192, size - 4096))
expect("zero past the end", "ENOSPC", lambda: h.zero(8192, size - 4096))
expect("zero-length read", "EINVAL", lambda: h.pread(0, 0))
expect("read with unknown flag", "EINVAL", lambda: h.pread(512, 0, flags=1 << 9))
expect("write with unknown flag", "EINVAL", lambda: h.pwrite(b"y" * 512, 0, flags=1 << 12))
expect("oversize read (33 MiB > 32 MiB max)", "EINVAL", lambda: h.pread(33 * 2**20, 0))
expect("oversize write (33 MiB), payload drained", "EINVAL", lambda: h.pwrite(b"z" * (33 * 2**20), 0))

# Unaligned requests are served byte-exactly (we are a byte-granular store).
h.pwrite(b"unaligned!", 1001)
if h.pread(10, 1001) != b"unaligned!":
    failures.append("unaligned write/read round trip mismatch")
else:
    print("ok   unaligned write/read round trip")

# The connection still works after all of that.
h.pwrite(b"\xab" * 4096, 4096)
if h.pread(4096, 4096) != b"\xab" * 4096:
    failures.append("connection broken after bad requests")
else:
    print("ok   connection survives bad requests")
h.shutdown()

ro = connect(ro_uri)
if not ro.is_read_only():
    failures.append("snapshot export does not advertise read-only")
expect("write to read-only export", "EPERM", lambda: ro.pwrite(b"x" * 512, 0))
expect("trim on read-only export", "EPERM", lambda: ro.trim(4096, 0))
ro.shutdown()

# Unknown export: GO must fail with an error (ERR_UNKNOWN), not a hang.
bad = nbd.NBD()
try:
    bad.connect_uri(rw_uri.rsplit("/", 1)[0] + "/no-such-volume")
    failures.append("connect to unknown export succeeded")
except nbd.Error as e:
    print(f"ok   unknown export refused: {e.string}")

# Garbage on a raw socket: the server hangs up, and keeps serving others.
u = urlparse(rw_uri)
s = socket.create_connection((u.hostname, u.port))
greeting = s.recv(18)
if greeting[:8] != b"NBDMAGIC":
    failures.append(f"bad greeting {greeting!r}")
s.sendall(struct.pack(">I", 0xFFFFFFFF))  # unknown client flags
if not closed_by_server(s):
    failures.append("server kept a connection with unknown client flags")
else:
    print("ok   unknown client flags: disconnected")
s.close()

s = socket.create_connection((u.hostname, u.port))
s.recv(18)
s.sendall(struct.pack(">I", 3) + b"NOTAMAGIC" * 3)
if not closed_by_server(s):
    failures.append("server kept a connection with garbage option magic")
else:
    print("ok   garbage option magic: disconnected")
s.close()

# Unknown option: ERR_UNSUP, payload drained, negotiation continues.
s = socket.create_connection((u.hostname, u.port))
s.recv(18)
s.sendall(struct.pack(">I", 3))
s.sendall(struct.pack(">QII", 0x49484156454F5054, 99, 5) + b"hello")
reply = s.recv(20)
magic, opt, rtype, rlen = struct.unpack(">QIII", reply)
s.recv(rlen)
if rtype != (1 << 31) + 1 or opt != 99:
    failures.append(f"unknown option got reply type {rtype:#x}")
else:
    print("ok   unknown option: ERR_UNSUP")
s.sendall(struct.pack(">QII", 0x49484156454F5054, 11, 0))  # EXTENDED_HEADERS
magic, opt, rtype, rlen = struct.unpack(">QIII", s.recv(20))
s.recv(rlen)
if rtype != (1 << 31) + 1:
    failures.append(f"EXTENDED_HEADERS got reply type {rtype:#x}, QEMU needs ERR_UNSUP")
else:
    print("ok   EXTENDED_HEADERS: ERR_UNSUP")
s.close()

# A client vanishing mid-write: header plus half the payload, then gone.
s = socket.create_connection((u.hostname, u.port))
s.recv(18)
s.sendall(struct.pack(">I", 3))
name = urlparse(rw_uri).path.lstrip("/").encode()
s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)  # EXPORT_NAME
s.recv(10)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 65536) + b"\x00" * 1000)
s.close()

h = connect(rw_uri)
if h.pread(4096, 4096) != b"\xab" * 4096:
    failures.append("data changed by the half-written request")
else:
    print("ok   vanished mid-write: nothing applied, server still serving")
h.shutdown()

for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)
