"""Builds the gRPC stubs from the agent's proto at install time.

The control API's source of truth is ../proto/ember/control/v1/control.proto
(the Rust agent is built from the same file). It is compiled with the pinned
grpcio-tools from pyproject.toml into ember_cinder/_proto, so the shim can
never drift from the agent it ships with.
"""
import os
import shutil
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join(HERE, "..", "proto", "ember", "control", "v1", "control.proto")


def generate(out_root):
    from grpc_tools import protoc  # build requirement, pinned

    with tempfile.TemporaryDirectory() as tmp:
        pkg = os.path.join(tmp, "ember_cinder", "_proto")
        os.makedirs(pkg)
        shutil.copy(PROTO, os.path.join(pkg, "control.proto"))
        out = os.path.join(out_root, "ember_cinder", "_proto")
        os.makedirs(out, exist_ok=True)
        rc = protoc.main([
            "protoc",
            f"-I{tmp}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            os.path.join(pkg, "control.proto"),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO}")
        init = os.path.join(out, "__init__.py")
        if not os.path.exists(init):
            with open(init, "w") as f:
                f.write('"""Generated from proto/ember/control/v1/control.proto."""\n')


# Every build step (egg_info lists the package before build_py runs) needs
# the generated package, so it is generated as soon as setuptools loads
# this file, inside the isolated build environment that has the pinned
# grpcio-tools.
generate(HERE)
setup()
