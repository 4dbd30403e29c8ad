"""openstack.common.rpc.common, as a Folsom-era service imports it: the
exceptions a caller catches, the remote-exception codec, the Connection
type and CommonRpcContext.  Each is defined once, in
nova_zmq_fast.exceptions or nova_zmq_fast.runtime, except the context
base class, which is only ever a name services import from here."""
import copy

from nova_zmq_fast.exceptions import (
    InvalidRPCConnectionReuse, RemoteError, RPCException, Timeout, UnsupportedRpcVersion,
    deserialize_remote_exception, serialize_remote_exception)
from nova_zmq_fast.runtime import Connection

__all__ = ["CommonRpcContext", "Connection", "InvalidRPCConnectionReuse", "RPCException",
           "RemoteError", "Timeout", "UnsupportedRpcVersion", "deserialize_remote_exception",
           "serialize_remote_exception"]


class CommonRpcContext:
    """A request context of keyword values, as services of the time
    subclassed it: attributes read the values, to_dict() is what goes on
    the wire (any object with to_dict() may be passed as a context)."""

    def __init__(self, **kwargs):
        self.values = kwargs

    def __getattr__(self, key):
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def to_dict(self):
        return copy.deepcopy(self.values)

    @classmethod
    def from_dict(cls, values):
        return cls(**values)

    def deepcopy(self):
        return self.from_dict(self.to_dict())
