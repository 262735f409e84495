"""Cinder volume driver for Ember agents (emberd).

Fork safety: cinder-volume forks a child for every command it runs
(processutils, rootwrap, privsep) while this driver's gRPC channels may have
calls in flight in other threads. grpcio 1.80-1.85, with its fork support on,
restarts its poller in the forked child, which then aborts before `exec`
(SIGABRT, "ev_epoll1_linux.cc ... epoll_wait error: Bad file descriptor";
grpc/grpc#43055, open). Those children only ever `exec`, so they need none
of gRPC's fork handling: turn it off before grpc is first imported. We chose
this over pinning an older grpcio (1.78 has other fixes we rely on and the
protobuf runtime pin follows grpcio-tools) and over moving the channels to a
helper process (a second process to supervise inside cinder-volume). An
operator's explicit setting wins. `tests/test_fork_safety.py` forks
hundreds of children under live RPCs and fails without this line.
"""
import os
import sys

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
if "grpc" in sys.modules and os.environ["GRPC_ENABLE_FORK_SUPPORT"] == "false":
    # Imported before us: the setting may come too late for this process.
    import logging
    logging.getLogger(__name__).warning(
        "grpc was imported before ember_cinder; set GRPC_ENABLE_FORK_SUPPORT=false "
        "in cinder-volume's environment so forked commands cannot abort")
