"""An iSCSI initiator for tests: libiscsi (through cython-iscsi) reading
and writing a LUN with plain SCSI commands, from the connection info
Cinder hands to Nova. It stands in for os-brick's kernel initiator
(open-iscsi), which needs the iscsi_tcp kernel module this machine lacks;
the target side it talks to is real."""
import struct

import iscsi

READ_16, WRITE_16, SYNCHRONIZE_CACHE_10 = 0x88, 0x8A, 0x35
SECTOR = 512
GOOD = 0


class ScsiError(Exception):
    pass


class Lun:
    """One logged-in session to the LUN `connection` (Cinder's iSCSI
    connection info: target_portal, target_iqn, target_lun and CHAP)."""

    def __init__(self, connection, initiator="iqn.2026-11.org.ember:e2e"):
        auth = ""
        if connection.get("auth_method") == "CHAP":
            auth = f"{connection['auth_username']}%{connection['auth_password']}@"
        url = (f"iscsi://{auth}{connection['target_portal']}/"
               f"{connection['target_iqn']}/{connection['target_lun']}")
        self._ctx = iscsi.Context(initiator)
        parsed = iscsi.URL(self._ctx, url)
        self._ctx.set_targetname(parsed.target)
        self._ctx.set_session_type(iscsi.iscsi_session_type.ISCSI_SESSION_NORMAL)
        self._ctx.set_header_digest(iscsi.iscsi_header_digest.ISCSI_HEADER_DIGEST_NONE_CRC32C)
        self._ctx.connect(parsed.portal, parsed.lun)
        self._lun = parsed.lun

    def _run(self, cdb, data_out=None, read_len=0):
        direction = (iscsi.scsi_xfer_dir.SCSI_XFER_WRITE if data_out
                     else iscsi.scsi_xfer_dir.SCSI_XFER_READ if read_len
                     else iscsi.scsi_xfer_dir.SCSI_XFER_NONE)
        data_in = bytearray(read_len)
        task = iscsi.Task(bytes(cdb), direction, len(data_out or b"") or read_len)
        self._ctx.command(self._lun, task, bytearray(data_out or b""), data_in)
        if task.status != GOOD:
            raise ScsiError(f"SCSI status {task.status} for opcode 0x{cdb[0]:02x}")
        return bytes(data_in)

    def read(self, offset, length):
        cdb = bytearray(16)
        cdb[0] = READ_16
        struct.pack_into(">QI", cdb, 2, offset // SECTOR, length // SECTOR)
        return self._run(cdb, read_len=length)

    def write(self, offset, data):
        cdb = bytearray(16)
        cdb[0] = WRITE_16
        struct.pack_into(">QI", cdb, 2, offset // SECTOR, len(data) // SECTOR)
        self._run(cdb, data_out=data)

    def flush(self):
        cdb = bytearray(10)
        cdb[0] = SYNCHRONIZE_CACHE_10
        self._run(cdb)

    def close(self):
        self._ctx.disconnect()
