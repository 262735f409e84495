"""A real Cinder on this machine for end-to-end tests: RabbitMQ (Debian's
package, started by hand on private loopback ports), then cinder-manage db
sync, cinder-scheduler, cinder-volume with the Ember driver and cinder-api
with auth_strategy = noauth, all from the real cinder 29.0.0 package.
The storage host's iSCSI target is Debian's tgtd (userspace), driven by
Cinder's own tgtadm target helper; the driver attaches the agent's exports
with nbdfuse (this machine has no nbd kernel module).

The database is SQLite. Three processes writing one SQLite file deadlock
on deferred transactions ("database is locked"), so each service starts
through RUNNER, which makes every SQLite transaction BEGIN IMMEDIATE with a
busy timeout: writers queue instead of failing. That is a setting of
the database connection, not a stand-in for any Cinder code.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from conftest import unmount_under

CMDS = {
    "api": "cinder.cmd.api",
    "scheduler": "cinder.cmd.scheduler",
    "volume": "cinder.cmd.volume",
}

RUNNER = r"""
import importlib, sqlite3, sqlite3.dbapi2, sys
service, conf = sys.argv[1], sys.argv[2]
mod = importlib.import_module(service)  # monkey-patches eventlet first


class _ImmediateCursor(sqlite3.Cursor):
    # oslo.db begins every SQLite transaction with a plain BEGIN: make it
    # take the write lock at once, so concurrent writers wait their turn
    # (busy timeout) instead of deadlocking on a lock upgrade.
    def execute(self, sql, *args):
        if sql.strip().upper() == "BEGIN":
            sql = "BEGIN IMMEDIATE"
        return super().execute(sql, *args)


class _ImmediateConnection(sqlite3.Connection):
    def cursor(self, factory=_ImmediateCursor):
        return super().cursor(factory)


_connect = sqlite3.dbapi2.connect


def connect(*args, **kwargs):
    kwargs.setdefault("factory", _ImmediateConnection)
    kwargs.setdefault("timeout", 60)
    return _connect(*args, **kwargs)


sqlite3.dbapi2.connect = sqlite3.connect = connect
sys.argv = [service.rsplit(".", 1)[-1], "--config-file", conf]
sys.exit(mod.main())
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


class Cinder:
    """Starts everything in `start`, stops it all in `stop`."""

    def __init__(self, lab, devices=None):
        """`devices`: the backend's replication_device entries as dicts
        (default: site-b of the lab, in the volume type's mode)."""
        self.lab = lab
        self.devices = devices or [{"backend_id": "site-b", "endpoint": lab["site-b"]["api"]}]
        self.dir = tempfile.mkdtemp(prefix="ember-cinder-")
        self.procs = {}
        self.amqp = free_port()
        self.api_port = free_port()
        self.conf = os.path.join(self.dir, "cinder.conf")
        self.host = "e2e"
        self.backend = f"{self.host}@ember-a"
        self.tgt_port = free_port()
        self.volumes_dir = os.path.join(self.dir, "volumes")
        self.attach_dir = os.path.join(self.dir, "attach")
        # tgt-admin reads /etc/tgt/targets.conf, which includes
        # conf.d/*.conf; Cinder writes one file per target into volumes_dir
        # (devstack's set-up, with a name of our own).
        self.tgt_include = f"/etc/tgt/conf.d/ember-e2e-{self.tgt_port}.conf"

    def log(self, name):
        path = os.path.join(self.dir, f"{name}.log")
        try:
            with open(path, errors="replace") as f:
                return f.read()[-6000:]
        except OSError:
            return ""

    def _spawn(self, name, argv, env=None):
        out = open(os.path.join(self.dir, f"{name}.log"), "a")
        self.procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)

    def start_rabbitmq(self):
        broker = shutil.which("rabbitmq-server", path="/usr/lib/rabbitmq/bin")
        if broker is None:
            raise RuntimeError("rabbitmq-server is not installed (scripts/test-all.sh installs it)")
        base = os.path.join(self.dir, "rabbitmq")
        os.makedirs(base)
        with open(os.path.join(base, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        env = dict(os.environ,
                   HOME=base,
                   RABBITMQ_NODENAME=f"ember{self.amqp}@localhost",
                   RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                   RABBITMQ_NODE_PORT=str(self.amqp),
                   RABBITMQ_DIST_PORT=str(free_port()),
                   RABBITMQ_MNESIA_BASE=os.path.join(base, "mnesia"),
                   RABBITMQ_LOG_BASE=os.path.join(base, "log"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(base, "enabled_plugins"),
                   RABBITMQ_PID_FILE=os.path.join(base, "pid"),
                   RABBITMQ_CONFIG_FILE=os.path.join(base, "rabbitmq"),
                   ERL_EPMD_ADDRESS="127.0.0.1")
        self._spawn("rabbitmq", [broker], env)
        wait_port(self.amqp, 60, "RabbitMQ")

    def start_tgtd(self):
        for tool in ("tgtd", "tgtadm", "tgt-admin"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (scripts/test-all.sh installs tgt)")
        show = ["tgtadm", "--lld", "iscsi", "--op", "show", "--mode", "target"]
        if subprocess.run(show, capture_output=True).returncode == 0:
            raise RuntimeError("a tgtd already runs here (control port 0): stop it first")
        os.makedirs(self.volumes_dir, exist_ok=True)
        with open(self.tgt_include, "w") as f:
            f.write(f"include {self.volumes_dir}/*\n")
        self._spawn("tgtd", ["tgtd", "-f", "--iscsi", f"portal=127.0.0.1:{self.tgt_port}"])
        deadline = time.time() + 20
        while subprocess.run(show, capture_output=True).returncode != 0:
            if time.time() > deadline or self.procs["tgtd"].poll() is not None:
                raise RuntimeError(f"tgtd did not start: {self.log('tgtd')}")
            time.sleep(0.1)

    def restart(self, name):
        """Stops one service (SIGTERM, then SIGKILL) and starts it again,
        as a reboot of that service would."""
        p = self.procs[name]
        try:
            os.killpg(p.pid, self._stop_signal(name))
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except ProcessLookupError:
            pass
        if name == "tgtd":
            self.start_tgtd()
        else:
            self._spawn(name, [sys.executable, "-c", RUNNER, CMDS[name], self.conf])

    def write_conf(self):
        etc = os.path.join(sys.prefix, "etc", "cinder")
        a = self.lab["site-a"]
        # replication_device is a multi-valued option: one line per device.
        devices = "\n".join(
            "replication_device = " + ",".join(f"{k}:{v}" for k, v in d.items())
            for d in self.devices)
        with open(self.conf, "w") as f:
            f.write(f"""[DEFAULT]
transport_url = rabbit://guest:guest@127.0.0.1:{self.amqp}/
auth_strategy = noauth
enabled_backends = ember-a
host = {self.host}
state_path = {self.dir}/state
api_paste_config = {etc}/api-paste.ini
rootwrap_config = {etc}/rootwrap.conf
resource_query_filters_file = {etc}/resource_filters.json
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {self.api_port}
osapi_volume_workers = 1
rpc_response_timeout = 30
report_interval = 2
periodic_interval = 5
scheduler_driver_init_wait_time = 2
debug = false

[database]
connection = sqlite:///{self.dir}/cinder.sqlite

[oslo_concurrency]
lock_path = {self.dir}/locks

[cinder_sys_admin]
# Cinder's tgtadm helper runs tgt-admin through privsep. These tests run
# as root, so the privsep daemon starts without sudo/rootwrap.
helper_command = {os.path.dirname(sys.executable)}/privsep-helper --config-file {self.conf}

[ember-a]
volume_driver = ember_cinder.driver.EmberDriver
volume_backend_name = ember
ember_agent_endpoint = {a['api']}
{devices}
ember_export_mode = target
ember_host_attach = nbdfuse
ember_attach_dir = {self.attach_dir}
target_helper = tgtadm
target_protocol = iscsi
target_ip_address = 127.0.0.1
target_port = {self.tgt_port}
volumes_dir = {self.volumes_dir}
""")

    def start(self):
        self.start_rabbitmq()
        self.start_tgtd()
        self.write_conf()
        os.makedirs(os.path.join(self.dir, "state"), exist_ok=True)
        manage = os.path.join(os.path.dirname(sys.executable), "cinder-manage")
        sync = subprocess.run([manage, "--config-file", self.conf, "db", "sync"],
                              capture_output=True, text=True)
        if sync.returncode != 0:
            raise RuntimeError(f"cinder-manage db sync failed: {sync.stderr[-3000:]}")
        for name in ("scheduler", "volume", "api"):
            self._spawn(name, [sys.executable, "-c", RUNNER, CMDS[name], self.conf])
        wait_port(self.api_port, 90, "cinder-api")
        deadline = time.time() + 120
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"cinder-{name} exited: {self.log(name)}")
            out = self.cli("get-pools", check=False)
            if out.returncode == 0 and self.backend in out.stdout:
                return
            time.sleep(1)
        raise RuntimeError(f"the scheduler never saw {self.backend}: {self.log('volume')}")

    def cli(self, *args, check=True, version="3.71"):
        env = dict(os.environ, OS_AUTH_TYPE="noauth")
        argv = [os.path.join(os.path.dirname(sys.executable), "cinder"),
                "--user-id", "admin", "--project-id", "admin",
                "--endpoint", f"http://127.0.0.1:{self.api_port}/v3",
                "--os-volume-api-version", version, *args]
        out = subprocess.run(argv, capture_output=True, text=True, env=env)
        if check and out.returncode != 0:
            raise AssertionError(f"cinder {' '.join(args)} failed: {out.stderr}{out.stdout}")
        return out

    def api_up(self):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/", timeout=2)
            return True
        except Exception:
            return False

    @staticmethod
    def _stop_signal(name):
        # tgtd ignores SIGTERM while it has targets.
        return signal.SIGKILL if name == "tgtd" else signal.SIGTERM

    def stop(self):
        for name, p in reversed(list(self.procs.items())):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, self._stop_signal(name))
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        # nbdfuse attachments run in sessions of their own.
        unmount_under(self.attach_dir)
        try:
            os.unlink(self.tgt_include)
        except FileNotFoundError:
            pass
        if not os.environ.get("EMBER_KEEP_TMP"):
            shutil.rmtree(self.dir, ignore_errors=True)


def start_or_report(c):
    """Starts Cinder `c`; on failure prints every service's log, stops
    what did start and raises."""
    try:
        c.start()
    except Exception:
        for name in ("rabbitmq", "scheduler", "volume", "api"):
            print(f"===== cinder {name} log\n{c.log(name)}")
        c.stop()
        raise
    return c


def running_cinder(lab, devices=None):
    """A module fixture's body: a started Cinder for `lab`, stopped after."""
    c = start_or_report(Cinder(lab, devices))
    yield c
    c.stop()


# What the end-to-end tests ask of a running Cinder and lab.

def show(cinder, name):
    out = cinder.cli("show", name)
    return {row[0]: row[1] for row in table_rows(out.stdout)}


def table_rows(table):
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("Property", ""):
            yield cells


def wait_for(what, check, timeout=90):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def volume_status(cinder, name, wanted):
    return wait_for(f"{name} {wanted}", lambda: (
        lambda s: s if s["status"] in (wanted, "error") else None)(show(cinder, name)))


def service(cinder):
    out = cinder.cli("service-list", "--withreplication", "--binary", "cinder-volume")
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 9 and cells[1] == cinder.backend:
            return {"status": cells[3], "replication_status": cells[7],
                    "active_backend_id": cells[8]}
    raise AssertionError(f"no service {cinder.backend}: {out.stdout}")


def qemu_io(uri, cmd, read_only=False):
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else []) + ["-c", cmd, uri]
    return subprocess.run(args, capture_output=True, text=True)


def holds(uri, pattern, offset, length="1M"):
    out = qemu_io(uri, f"read -P {pattern} {offset} {length}", read_only=True)
    return out.returncode == 0 and "verification failed" not in out.stdout


def replica_state(lab, site, volume):
    out = subprocess.run([lab["ctl"], "--api", lab[site]["api"], "replica", "status",
                          volume, "--json"], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}
