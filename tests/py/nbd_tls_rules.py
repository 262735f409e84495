#!/usr/bin/python3
"""Raw-socket check of the NBD FORCEDTLS MUST rules (doc/proto.md "TLS
support") against a running emberd: options before STARTTLS get
ERR_TLS_REQD, EXPORT_NAME before TLS closes, STARTTLS is ACKed and the TLS
handshake runs on the same socket, a second STARTTLS (sent over TLS) gets
ERR_INVALID, and the export is then served over TLS.

usage: nbd_tls_rules.py PORT EXPORT CERTDIR TLSVERSION(1.2|1.3)
Prints one "ok   ..." line per check; exits non-zero on the first failure.
"""
import os
import socket
import ssl
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
OPT_EXPORT_NAME, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 8, 10
REP_ACK, REP_INFO = 1, 3
ERR_INVALID, ERR_TLS_REQD = 2**31 + 3, 2**31 + 5
NAMES = {REP_ACK: "ACK", REP_INFO: "INFO", ERR_INVALID: "ERR_INVALID",
         ERR_TLS_REQD: "ERR_TLS_REQD", 2**31 + 2: "ERR_POLICY", 2**31 + 1: "ERR_UNSUP"}


def fail(msg):
    print(f"FAIL {msg}")
    sys.exit(1)


def ok(msg):
    print(f"ok   {msg}")


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def greet(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    magic, opt, flags = struct.unpack(">QQH", recv_exact(s, 18))
    if (magic, opt) != (NBDMAGIC, IHAVEOPT):
        fail("greeting magic")
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s


def send_opt(s, option, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def reply(s):
    magic, option, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
    if magic != REPLY_MAGIC:
        fail(f"reply magic {magic:#x}")
    return option, kind, recv_exact(s, length)


def go_payload(name):
    return struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)


def expect(s, option, want, what):
    got_opt, kind, data = reply(s)
    if got_opt != option or kind != want:
        fail(f"{what}: got option {got_opt} reply {NAMES.get(kind, hex(kind))} "
             f"{data!r}, want {NAMES[want]}")
    shown = data.decode(errors="replace") if kind & 2**31 else f"{len(data)} bytes"
    ok(f"{what}: {NAMES[want]} {shown!r}")
    return data


def main():
    port, export, certdir, version = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

    # 1. Every option before STARTTLS gets ERR_TLS_REQD (payloads skipped).
    s = greet(port)
    for option, data, what in [
        (OPT_GO, go_payload(export), "GO before TLS"),
        (OPT_INFO, go_payload(export), "INFO before TLS"),
        (OPT_LIST, b"", "LIST before TLS"),
        (OPT_STRUCTURED_REPLY, b"", "STRUCTURED_REPLY before TLS"),
        (OPT_SET_META_CONTEXT, b"\0" * 12, "SET_META_CONTEXT before TLS"),
        (0x7777, b"x" * 100, "unknown option before TLS"),
    ]:
        send_opt(s, option, data)
        expect(s, option, ERR_TLS_REQD, what)

    # 2. STARTTLS: ACK, then TLS on the same socket.
    send_opt(s, OPT_STARTTLS)
    expect(s, OPT_STARTTLS, REP_ACK, "STARTTLS")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certdir, "ca-cert.pem"))
    ctx.load_cert_chain(os.path.join(certdir, "client-cert.pem"),
                        os.path.join(certdir, "client-key.pem"))
    tls_version = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
    ctx.minimum_version = ctx.maximum_version = tls_version
    t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    if t.version() != f"TLSv{version}":
        fail(f"negotiated {t.version()}, want TLSv{version}")
    ok(f"TLS handshake on the same socket: {t.version()} {t.cipher()[0]}")

    # 3. A second STARTTLS, over TLS, is invalid; the session goes on.
    send_opt(t, OPT_STARTTLS)
    expect(t, OPT_STARTTLS, ERR_INVALID, "second STARTTLS over TLS")

    # 4. GO over TLS serves the export; transmission runs over TLS.
    send_opt(t, OPT_GO, go_payload(export))
    info = expect(t, OPT_GO, REP_INFO, "GO over TLS")
    size, tflags = struct.unpack(">QH", info[2:12])
    if tflags & (1 << 7):
        fail("structured-reply flag (SEND_DF) set without STRUCTURED_REPLY after TLS")
    expect(t, OPT_GO, REP_ACK, "GO over TLS done")
    t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 42, 0, 4096))  # READ 4K
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(t, 16))
    data = recv_exact(t, 4096)
    if (magic, err, cookie) != (0x67446698, 0, 42):
        fail(f"READ over TLS: {magic:#x} err {err} cookie {cookie}")
    ok(f"READ 4 KiB over TLS (export {size} bytes)")
    t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 43, 0, 0))  # DISC
    t.close()

    # 5. The old-style EXPORT_NAME works once TLS is up.
    s = greet(port)
    send_opt(s, OPT_STARTTLS)
    expect(s, OPT_STARTTLS, REP_ACK, "STARTTLS (second connection)")
    t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    send_opt(t, OPT_EXPORT_NAME, export.encode())
    size2, _ = struct.unpack(">QH", recv_exact(t, 10))  # NO_ZEROES: no padding
    if size2 != size:
        fail(f"EXPORT_NAME over TLS: size {size2}, want {size}")
    t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 44, 4096, 512))  # READ 512
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(t, 16))
    recv_exact(t, 512)
    if (magic, err, cookie) != (0x67446698, 0, 44):
        fail(f"READ after EXPORT_NAME over TLS: {magic:#x} err {err} cookie {cookie}")
    ok("EXPORT_NAME over TLS, then READ")
    t.close()

    # 5. EXPORT_NAME before TLS: the server can only hang up.
    s = greet(port)
    send_opt(s, OPT_EXPORT_NAME, export.encode())
    try:
        rest = s.recv(4096)
    except ConnectionResetError:
        rest = b""
    if rest:
        fail(f"EXPORT_NAME before TLS answered {rest!r}")
    ok("EXPORT_NAME before TLS: connection closed, nothing sent")
    s.close()
    print("all TLS rules hold")


if __name__ == "__main__":
    main()
