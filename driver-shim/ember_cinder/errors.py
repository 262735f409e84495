"""The one mapping from the agent's gRPC status codes to Cinder exceptions.

Every call the driver makes goes through `translate`, so an operator sees the
same exception for the same agent answer whichever driver method asked.
"""
import grpc
from cinder import exception


def translate(err, what):
    """Returns the Cinder exception for a failed agent call `what`."""
    code = err.code() if hasattr(err, "code") else None
    detail = err.details() if hasattr(err, "details") else str(err)
    message = f"Ember agent: {what}: {detail}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return exception.InvalidInput(reason=message)
    if code == grpc.StatusCode.NOT_FOUND:
        return exception.VolumeBackendAPIException(data=message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return exception.VolumeBackendAPIException(
            data=f"Ember agent unreachable: {what}: {detail}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return exception.VolumeBackendAPIException(
            data=f"Ember agent out of space: {what}: {detail}")
    return exception.VolumeBackendAPIException(data=message)
