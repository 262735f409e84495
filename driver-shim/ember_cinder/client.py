"""A small client for one agent's control API (unix socket or mutual TLS).

Calls have a deadline (`timeout`). Only calls the API defines as idempotent
(creates, deletes, resizes to a size, status reads, planned promotion) are
retried, and only when the agent was unreachable (UNAVAILABLE), so a retry
can never apply an operation twice with different effect.
"""
import time

import grpc

from ember_cinder import errors
from ember_cinder._proto import control_pb2 as pb
from ember_cinder._proto import control_pb2_grpc as pb_grpc

__all__ = ["AgentClient", "pb"]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


class AgentClient:
    """Talks to one emberd control endpoint: `unix:/path` or `host:port`
    (mutual TLS when `tls_ca` is set)."""

    def __init__(self, endpoint, tls_ca=None, tls_cert=None, tls_key=None,
                 timeout=30.0, retries=3):
        if not endpoint:
            raise ValueError("empty agent endpoint")
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        if endpoint.startswith("unix:"):
            # grpc-python would send the socket path as :authority, which
            # is not a valid authority (the agent's HTTP/2 stack resets it).
            channel = grpc.insecure_channel(
                endpoint, options=[("grpc.default_authority", "localhost")])
        else:
            target = endpoint.split("://", 1)[-1]
            if ":" not in target:
                raise ValueError(f"agent endpoint {endpoint!r} has no port")
            if tls_ca:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=_read(tls_ca),
                    private_key=_read(tls_key) if tls_key else None,
                    certificate_chain=_read(tls_cert) if tls_cert else None)
                channel = grpc.secure_channel(target, creds)
            else:
                channel = grpc.insecure_channel(target)
        self._channel = channel
        self._stub = pb_grpc.EmberControlStub(channel)

    def call(self, method, request, what, idempotent=True, timeout=None):
        """Calls `method` (an EmberControl RPC name) and returns its answer;
        raises the Cinder exception `errors.translate` picks."""
        rpc = getattr(self._stub, method)
        attempts = 1 + (self.retries if idempotent else 0)
        delay = 0.2
        for attempt in range(attempts):
            try:
                return rpc(request, timeout=timeout or self.timeout)
            except grpc.RpcError as err:
                retry = (err.code() == grpc.StatusCode.UNAVAILABLE
                         and attempt + 1 < attempts)
                if not retry:
                    raise errors.translate(err, what) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def raw(self, method, request, timeout=None):
        """Calls without translation or retries (status probes)."""
        return getattr(self._stub, method)(request, timeout=timeout or self.timeout)

    def close(self):
        self._channel.close()
