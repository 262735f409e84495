"""The driver against an agent whose control API authorises by client
certificate ([api_tls] client_ca, admins, readers; issue 15): the driver
needs the admin role. With an admin certificate it manages volumes; with a
reader certificate it can still report stats, and every change is refused
with the agent's PERMISSION_DENIED reason as a Cinder exception, nothing
changed."""
import pathlib
import random
import socket
import subprocess
import time

import pytest
from cinder import exception

from conftest import bin_dir, make_driver, volume, volume_type
from ember_cinder._proto import control_pb2 as pb
from ember_cinder.manage import agent_volume_name


def _free_port():
    """A free port below the kernel's ephemeral range (32768 up), so no
    outgoing connection can take it before emberd binds it."""
    for _ in range(1000):
        port = random.randrange(10000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 32000")


@pytest.fixture
def roles_agent(tmp_path):
    ctl, emberd = str(bin_dir() / "emberctl"), str(bin_dir() / "emberd")
    pki = tmp_path / "pki"
    subprocess.run([ctl, "pki", "init", "--dir", str(pki)], check=True, capture_output=True)
    for name in ("agent", "cinder", "monitor-1"):
        subprocess.run([ctl, "pki", "issue", "--dir", str(pki), name],
                       check=True, capture_output=True)
    cfg = tmp_path / "emberd.toml"
    cfg.write_text(f'[api_tls]\ncert = "{pki}/agent.crt"\nkey = "{pki}/agent.key"\n'
                   f'client_ca = "{pki}/ca.crt"\nadmins = ["cinder"]\nreaders = ["monitor-*"]\n')
    log_path = tmp_path / "emberd.log"
    port = _free_port()
    listen = f"http://127.0.0.1:{port}"
    endpoint = f"https://127.0.0.1:{port}"
    client = [ctl, "--api", endpoint, "--tls-ca", f"{pki}/ca.crt",
              "--tls-cert", f"{pki}/cinder.crt", "--tls-key", f"{pki}/cinder.key"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([emberd, "--config", str(cfg), "--data-dir", str(tmp_path / "data"),
                                 "--api", listen, "--nbd", f"127.0.0.1:{_free_port()}"],
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.time() + 30
            while subprocess.run([*client, "status"], capture_output=True).returncode != 0:
                assert proc.poll() is None, pathlib.Path(log_path).read_text()
                assert time.time() < deadline, "emberd did not start"
                time.sleep(0.1)
            yield {"endpoint": endpoint, "pki": pki}
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _driver(agent, who):
    pki = agent["pki"]
    return make_driver({"site-a": {"api": agent["endpoint"]}}, devices=[],
                       ember_tls_ca=str(pki / "ca.crt"),
                       ember_tls_cert=str(pki / f"{who}.crt"),
                       ember_tls_key=str(pki / f"{who}.key"))


def test_the_driver_needs_the_admin_role_and_a_reader_changes_nothing(roles_agent, ctx):
    admin = _driver(roles_agent, "cinder")
    vol = volume(ctx, size=1, vtype=volume_type(ctx))
    admin.create_volume(vol)

    reader = _driver(roles_agent, "monitor-1")
    stats = reader.get_volume_stats(refresh=True)
    assert stats["volume_backend_name"] == "ember-a", stats
    assert stats["total_capacity_gb"] > 0, stats

    with pytest.raises(exception.VolumeBackendAPIException) as refused:
        reader.delete_volume(vol)
    assert "PERMISSION_DENIED" in str(refused.value) or "admin role" in str(refused.value), \
        refused.value
    assert "monitor-1" in str(refused.value), refused.value
    with pytest.raises(exception.VolumeBackendAPIException):
        reader.create_volume(volume(ctx, size=1, vtype=volume_type(ctx)))

    # The reader's refusals changed nothing: the admin still sees exactly
    # the one volume and deletes it.
    def names():
        return [v.name for v in admin._agent.raw("ListVolumes", pb.ListVolumesRequest()).volumes]
    assert names() == [agent_volume_name(vol)]
    admin.delete_volume(vol)
    assert names() == []
