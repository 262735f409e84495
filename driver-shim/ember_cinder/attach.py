"""Attaching an agent's NBD export on the storage host, so that Cinder's
own target helpers (tgtadm, lioadm, nvmet) can export it to compute hosts:
the LVM driver's pattern, with the agent's export in place of the LV.

Two helpers make the export a local path:

- ``nbd-client``: the kernel NBD client, ``/dev/nbdN``. A block device,
  so every target helper and ``local`` attach can use it. Needs the
  ``nbd`` kernel module (``modprobe nbd nbds_max=128``).
- ``nbdfuse``: libnbd's FUSE client, a regular file under
  ``ember_attach_dir``. No kernel module, but a file is a backing store
  only for tgtadm, and FUSE costs throughput.

Every attachment is recorded in ``ember_attach_dir/NAME.json`` so that
`ensure_export` (after a reboot or a restart of cinder-volume) finds it,
sees whether it is still alive and attaches again if not. Commands run as
root through Cinder's root helper; ``etc/cinder/rootwrap.d/ember.filters``
lists exactly these commands.
"""
import json
import os
import signal
import subprocess
import time
import urllib.parse

from cinder import exception
from cinder import utils
from oslo_concurrency import lockutils
from oslo_log import log as logging

LOG = logging.getLogger(__name__)
HELPERS = ("nbd-client", "nbdfuse")
BLOCK_SIZE = "4096"
READY_TIMEOUT = 15.0


class AttachError(exception.VolumeBackendAPIException):
    message = "Cannot attach %(volume)s on this host: %(reason)s"


def split_nbd_uri(uri):
    """(host, port, export) of an ``nbd://host:port/export`` URI."""
    u = urllib.parse.urlsplit(uri)
    if u.scheme != "nbd" or not u.hostname or not u.path.strip("/"):
        raise ValueError(f"not an nbd://HOST:PORT/EXPORT URI: {uri!r}")
    return u.hostname, str(u.port or 10809), u.path.lstrip("/")


class HostAttacher:
    """Attaches and detaches agent exports on this host with one helper."""

    def __init__(self, helper, state_dir, execute=utils.execute, sys_block="/sys/block"):
        if helper not in HELPERS:
            raise ValueError(f"ember_host_attach must be one of {HELPERS}, not {helper!r}")
        self.helper = helper
        self.state_dir = state_dir
        self._execute = execute
        self._sys_block = sys_block
        self._children = {}  # nbdfuse processes this process started (to reap)

    # ---- records ----------------------------------------------------------

    def _record_path(self, name):
        return os.path.join(self.state_dir, f"{name}.json")

    def _read(self, name):
        try:
            with open(self._record_path(name)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def _write(self, name, record):
        os.makedirs(self.state_dir, exist_ok=True)
        tmp = self._record_path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._record_path(name))

    def _forget(self, name):
        try:
            os.unlink(self._record_path(name))
        except FileNotFoundError:
            pass

    def _alive(self, record):
        if record["helper"] == "nbd-client":
            dev = os.path.basename(record["path"])
            return os.path.exists(os.path.join(self._sys_block, dev, "pid"))
        return (_running(record.get("pid"))
                and _mounted(os.path.dirname(record["path"])))

    # ---- public -----------------------------------------------------------

    def path(self, name):
        """The live local path of `name`'s attachment, or None."""
        record = self._read(name)
        if record and self._alive(record):
            return record["path"]
        return None

    def attach(self, name, nbd_uri, size_bytes):
        """Attaches `name`'s export (idempotent); returns the local path."""
        with lockutils.lock("ember-host-attach", external=True,
                            lock_path=self.state_dir):
            record = self._read(name)
            if record and self._alive(record):
                if record["uri"] == nbd_uri:
                    return record["path"]
                # The volume is served elsewhere now (failover/failback).
                self._detach_record(name, record)
            elif record:
                LOG.info("Ember: attachment of %s at %s is gone; attaching again",
                         name, record["path"])
                self._detach_record(name, record)
            if self.helper == "nbd-client":
                record = self._attach_kernel(name, nbd_uri)
            else:
                record = self._attach_fuse(name, nbd_uri)
            self._write(name, record)
            self._check_size(name, record["path"], size_bytes)
            LOG.info("Ember: %s attached at %s (%s)", name, record["path"], self.helper)
            return record["path"]

    def detach(self, name):
        """Detaches `name`; a volume that is not attached is a success."""
        with lockutils.lock("ember-host-attach", external=True,
                            lock_path=self.state_dir):
            record = self._read(name)
            if record:
                self._detach_record(name, record)

    # ---- commands (each matches a filter in ember.filters) ----------------

    @staticmethod
    def kernel_attach_argv(nbd_uri, device):
        host, port, export = split_nbd_uri(nbd_uri)
        return ["nbd-client", "-N", export, "-b", BLOCK_SIZE, host, port, device]

    @staticmethod
    def kernel_detach_argv(device):
        return ["nbd-client", "-d", device]

    def fuse_attach_argv(self, name, nbd_uri):
        split_nbd_uri(nbd_uri)  # refuse anything but nbd:// early
        return ["nbdfuse", "-P", os.path.join(self.state_dir, f"{name}.pid"),
                os.path.join(self.state_dir, name, "disk"), nbd_uri]

    def fuse_detach_argv(self, name):
        return ["umount", os.path.join(self.state_dir, name)]

    # ---- kernel NBD -------------------------------------------------------

    def _free_nbd_device(self, name):
        try:
            devices = sorted((d for d in os.listdir(self._sys_block)
                              if d.startswith("nbd") and d[3:].isdigit()),
                             key=lambda d: int(d[3:]))
        except FileNotFoundError:
            devices = []
        if not devices:
            raise AttachError(
                volume=name,
                reason="there is no /dev/nbd* device: load the kernel module "
                       "(modprobe nbd nbds_max=128, and list it in "
                       "/etc/modules-load.d) or set ember_host_attach = nbdfuse")
        for dev in devices:
            if not os.path.exists(os.path.join(self._sys_block, dev, "pid")):
                return f"/dev/{dev}"
        raise AttachError(volume=name,
                          reason=f"all {len(devices)} /dev/nbd* devices are in use: "
                                 "raise nbds_max")

    def _attach_kernel(self, name, nbd_uri):
        argv = self.kernel_attach_argv(nbd_uri, "/dev/nbd0")  # validates the URI
        device = self._free_nbd_device(name)
        argv[-1] = device
        self._execute(*argv, run_as_root=True)
        if not os.path.exists(os.path.join(self._sys_block, device[5:], "pid")):
            raise AttachError(volume=name, reason=f"nbd-client left {device} unconnected")
        return {"helper": "nbd-client", "path": device, "uri": nbd_uri}

    # ---- FUSE -------------------------------------------------------------

    def _attach_fuse(self, name, nbd_uri):
        argv = self.fuse_attach_argv(name, nbd_uri)
        pidfile, disk = argv[2], argv[3]
        os.makedirs(os.path.dirname(disk), exist_ok=True)
        try:
            os.unlink(pidfile)
        except FileNotFoundError:
            pass
        # nbdfuse serves in the foreground for as long as it is mounted:
        # start it in its own session (it outlives a cinder-volume restart)
        # and wait for its pid file, its "ready" signal.
        if os.geteuid() != 0:
            argv = utils.get_root_helper().split() + argv
        log = open(os.path.join(self.state_dir, f"{name}.log"), "ab")
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=log, start_new_session=True)
        except OSError as e:
            raise AttachError(volume=name, reason=f"cannot run nbdfuse: {e}")
        finally:
            log.close()
        self._children[name] = child
        deadline = time.monotonic() + READY_TIMEOUT
        while not os.path.exists(pidfile):
            if child.poll() is not None:
                raise AttachError(volume=name,
                                  reason=f"nbdfuse exited with {child.returncode}: "
                                         f"{self._log_tail(name)}")
            if time.monotonic() > deadline:
                child.kill()
                raise AttachError(volume=name,
                                  reason=f"nbdfuse not ready in {READY_TIMEOUT:.0f}s")
            time.sleep(0.05)
        return {"helper": "nbdfuse", "path": disk, "uri": nbd_uri, "pid": child.pid}

    def _log_tail(self, name):
        try:
            with open(os.path.join(self.state_dir, f"{name}.log"), errors="replace") as f:
                return f.read()[-500:].strip()
        except OSError:
            return ""

    # ---- both -------------------------------------------------------------

    def _check_size(self, name, path, size_bytes):
        """Refuses an attachment of the wrong size (a wrong export, or a
        volume resized elsewhere)."""
        if path.startswith("/dev/nbd"):
            sectors = os.path.join(self._sys_block, os.path.basename(path), "size")
            with open(sectors) as f:
                actual = int(f.read()) * 512
        else:
            try:
                actual = os.stat(path).st_size
            except PermissionError:
                # A FUSE file mounted by root is root's alone (no
                # allow_other, on purpose); tgtd runs as root.
                LOG.debug("Ember: cannot stat %s as uid %d; size unchecked",
                          path, os.geteuid())
                return
        if actual != size_bytes:
            raise AttachError(volume=name,
                              reason=f"{path} has {actual} bytes, the volume {size_bytes}")

    def _detach_record(self, name, record):
        if record["helper"] == "nbd-client":
            if self._alive(record):
                self._execute(*self.kernel_detach_argv(record["path"]), run_as_root=True)
        else:
            mount = os.path.dirname(record["path"])
            if _mounted(mount):
                self._execute(*self.fuse_detach_argv(name), run_as_root=True)
            self._reap(name, record.get("pid"))
            try:
                os.rmdir(mount)
            except OSError:
                pass
        self._forget(name)
        LOG.info("Ember: %s detached from %s", name, record["path"])

    def _reap(self, name, pid):
        """Waits for nbdfuse to leave after its unmount, so no stale process
        keeps the agent's connection open."""
        child = self._children.pop(name, None)
        if child is not None:
            try:
                child.wait(timeout=READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return
        deadline = time.monotonic() + READY_TIMEOUT
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as e:
                LOG.warning("Ember: nbdfuse %d of %s did not exit: %s", pid, name, e)


def _running(pid):
    """Whether process `pid` runs (a zombie, e.g. our own killed nbdfuse
    child, does not)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _mounted(path):
    """Whether `path` is a mount point, from the mount table (a FUSE mount
    of another user cannot even be stat()ed)."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split()[4].replace("\\040", " ") == path:
                return True
    return False
