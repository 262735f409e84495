"""Fixtures: a real two-site Ember lab (two emberd processes paired over
mutual TLS, started by `emberctl lab up --detach`) and drivers built with
the real cinder 29.0.0 package's configuration and objects. Nothing is
mocked: every driver call reaches an agent."""
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import uuid
import warnings

import pytest

warnings.filterwarnings("ignore")

from cinder import context as cinder_context  # noqa: E402
from cinder import objects  # noqa: E402
from cinder.tests.unit import fake_snapshot, fake_volume  # noqa: E402
from cinder.volume import configuration as conf  # noqa: E402
from cinder.volume import driver as base_driver  # noqa: E402
from oslo_config import cfg  # noqa: E402

from ember_cinder import driver as ember_driver  # noqa: E402

objects.register_all()
REPO = pathlib.Path(__file__).resolve().parents[2]


def bin_dir():
    d = pathlib.Path(os.environ.get("EMBER_BIN_DIR", REPO / "target" / "debug"))
    for tool in ("emberd", "emberctl"):
        if not (d / tool).exists():
            pytest.fail(f"{d / tool} missing: build the agent first (cargo build --bins)")
    return d


def unmount_under(prefix):
    """Lazily unmounts every mount below `prefix`: nbdfuse attachments a
    failed test left behind (unmounting ends their processes)."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for m in mounts:
        if m.startswith(str(prefix) + "/"):
            subprocess.run(["umount", "-l", m], capture_output=True)


def require(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed (scripts/test-all.sh installs it)")


def _lab(sites=2):
    d = tempfile.mkdtemp(prefix="ember-shim-")
    ctl = str(bin_dir() / "emberctl")
    subprocess.run([ctl, "lab", "up", "--dir", d, "--detach", "--size", "16M",
                    "--sites", str(sites)],
                   check=True, capture_output=True)
    sites = json.loads(pathlib.Path(d, "lab.json").read_text())["sites"]
    yield {"dir": d, "ctl": ctl, **sites}
    subprocess.run([ctl, "lab", "down", "--dir", d], capture_output=True)
    if not os.environ.get("EMBER_KEEP_TMP"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def lab():
    """Two paired sites: {'site-a': {'api', 'nbd', 'pid'}, 'site-b': {...}}."""
    yield from _lab()


@pytest.fixture(scope="session")
def lab3():
    """Three sites, every two paired: site-a, site-b (metro), site-c (far)."""
    yield from _lab(sites=3)


@pytest.fixture
def own_lab3():
    """A three-site lab of its own, for a test that fails a site over."""
    yield from _lab(sites=3)


@pytest.fixture
def own_lab():
    """A lab of its own, for a test that kills a site."""
    yield from _lab()


_groups = iter(range(10**6))


def make_driver(lab_sites, devices=None, endpoint=None, active_backend_id=None,
                **options):
    """A driver in its own config group, set up as cinder-volume would.
    `options` override driver options; the export mode defaults to `nbd`
    (no host attach) except where a test asks for another."""
    group = f"ember-{next(_groups)}"
    configuration = conf.Configuration(base_driver.volume_opts, config_group=group)
    configuration.append_config_values(ember_driver.ember_opts)
    if devices is None:
        devices = [{"backend_id": "site-b", "endpoint": lab_sites["site-b"]["api"]}]
    cfg.CONF.set_override("replication_device", devices, group=group)
    cfg.CONF.set_override("volume_backend_name", "ember-a", group=group)
    cfg.CONF.set_override("ember_agent_endpoint",
                          endpoint or lab_sites["site-a"]["api"], group=group)
    cfg.CONF.set_override("ember_rpc_timeout", 20.0, group=group)
    options.setdefault("ember_export_mode", "nbd")
    for name, value in options.items():
        cfg.CONF.set_override(name, value, group=group)
    d = ember_driver.EmberDriver(configuration=configuration, host="shim-test@ember",
                                 active_backend_id=active_backend_id)
    d.do_setup(cinder_context.get_admin_context())
    d.check_for_setup_error()
    return d


@pytest.fixture
def ctx():
    return cinder_context.get_admin_context()


def volume_type(ctx, **specs):
    return objects.VolumeType(context=ctx, id=str(uuid.uuid4()), name="t",
                              extra_specs=specs)


def volume(ctx, size=1, vtype=None, replication_status=None):
    vid = str(uuid.uuid4())
    v = fake_volume.fake_volume_obj(ctx, id=vid, size=size,
                                    volume_type_id=vtype.id if vtype else None,
                                    replication_status=replication_status)
    v.volume_type = vtype
    return v


def snapshot(ctx, vol):
    return fake_snapshot.fake_snapshot_obj(ctx, id=str(uuid.uuid4()), volume=vol,
                                           volume_id=vol.id, volume_size=vol.size)
