"""The driver against a real agent whose NBD listener requires TLS
([nbd_tls], issue 15): the `nbd` export mode hands out nbds:// URIs and
says so in the connection info, the agent reports it in GetCapabilities,
a libnbd client with the issued certificates reads the volume through
that URI, and the plaintext host-attach modes refuse with the reason."""
import pathlib
import subprocess
import time

import pytest
from cinder import exception

from conftest import bin_dir, make_driver, require, volume, volume_type
from ember_cinder import attach
from ember_cinder._proto import control_pb2 as pb


@pytest.fixture
def tls_agent(tmp_path):
    ctl, emberd = str(bin_dir() / "emberctl"), str(bin_dir() / "emberd")
    pki, client = tmp_path / "pki", tmp_path / "client"
    for args in (["init", "--dir", str(pki)],
                 ["issue", "--dir", str(pki), "agent"],
                 ["issue", "--dir", str(pki), "compute-1", "--client-dir", str(client)]):
        subprocess.run([ctl, "pki", *args], check=True, capture_output=True)
    cfg = tmp_path / "emberd.toml"
    cfg.write_text(f'[nbd_tls]\ncert = "{pki}/agent.crt"\nkey = "{pki}/agent.key"\n'
                   f'ca = "{pki}/ca.crt"\nallow = ["compute-*"]\n')
    sock = tmp_path / "api.sock"
    port = 20000 + (hash(str(tmp_path)) % 10000)
    log = open(tmp_path / "emberd.log", "w")
    proc = subprocess.Popen([emberd, "--config", str(cfg), "--data-dir", str(tmp_path / "data"),
                             "--api", f"unix:{sock}", "--nbd", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 30
    while subprocess.run([ctl, "--api", f"unix:{sock}", "status"],
                         capture_output=True).returncode != 0:
        assert proc.poll() is None, pathlib.Path(tmp_path / "emberd.log").read_text()
        assert time.time() < deadline, "emberd did not start"
        time.sleep(0.1)
    yield {"sites": {"site-a": {"api": f"unix:{sock}"}}, "client": client, "port": port}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_nbd_export_mode_hands_out_nbds_uris_when_the_agent_requires_tls(tls_agent, ctx):
    require("nbdinfo")
    drv = make_driver(tls_agent["sites"], devices=[])
    caps = drv._agent.raw("GetCapabilities", pb.GetCapabilitiesRequest())
    assert caps.nbd_tls is True

    vol = volume(ctx, size=1, vtype=volume_type(ctx))
    drv.create_volume(vol)
    info = drv.initialize_connection(vol, {})
    uri = info["data"]["nbd_uri"]
    assert info["driver_volume_type"] == "nbd"
    assert uri.startswith(f"nbds://127.0.0.1:{tls_agent['port']}/"), uri
    assert info["data"]["tls"] is True

    # A real TLS client with the issued certificate reaches the volume.
    out = subprocess.run(["nbdinfo", f"{uri}?tls-certificates={tls_agent['client']}"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "with TLS" in out.stdout and "export-size: 1073741824" in out.stdout, out.stdout
    # The same URI without certificates is refused by the agent.
    out = subprocess.run(["nbdinfo", uri.replace("nbds://", "nbd://")],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "Operation not supported" in out.stderr, out.stderr
    drv.delete_volume(vol)


def test_host_attach_modes_refuse_a_tls_only_agent_with_the_reason(tls_agent, ctx, tmp_path):
    drv = make_driver(tls_agent["sites"], devices=[], ember_export_mode="local",
                      ember_host_attach="nbdfuse", ember_attach_dir=str(tmp_path / "attach"))
    vol = volume(ctx, size=1, vtype=volume_type(ctx))
    drv.create_volume(vol)
    with pytest.raises((attach.AttachError, exception.VolumeBackendAPIException)) as e:
        drv.create_export(ctx, vol, {})
    assert "NBD over TLS only" in str(e.value)
    drv.delete_volume(vol)
