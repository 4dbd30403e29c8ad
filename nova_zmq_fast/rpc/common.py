"""openstack.common.rpc.common, as a Folsom-era service imports it: the
exceptions a caller catches, the remote-exception codec, expected
exceptions (client_exceptions), the message envelope, the Connection type
and CommonRpcContext.  Each is defined once, in nova_zmq_fast.exceptions,
nova_zmq_fast.dispatcher, nova_zmq_fast._dispatch or nova_zmq_fast.runtime,
except the context base class, which is only ever a name services import
from here."""
import copy

from nova_zmq_fast._dispatch import context_store, elevated_values, unwrap, wrap
from nova_zmq_fast.dispatcher import version_is_compatible
from nova_zmq_fast.exceptions import (
    ClientException, InvalidRPCConnectionReuse, RemoteError, RPCException, Timeout,
    UnsupportedRpcEnvelopeVersion, UnsupportedRpcVersion, catch_client_exception,
    client_exceptions, deserialize_remote_exception, serialize_remote_exception)
from nova_zmq_fast.runtime import Connection

__all__ = ["ClientException", "CommonRpcContext", "Connection", "InvalidRPCConnectionReuse",
           "RPCException", "RemoteError", "Timeout", "UnsupportedRpcEnvelopeVersion",
           "UnsupportedRpcVersion", "catch_client_exception", "client_exceptions",
           "context_store", "deserialize_msg", "deserialize_remote_exception",
           "serialize_msg", "serialize_remote_exception", "version_is_compatible"]


def serialize_msg(raw_msg, force_envelope=False):
    """The message as sent: wrapped in the 'oslo.version' 2.0 envelope
    only when asked (as openstack.common.rpc did by default)."""
    return wrap(raw_msg) if force_envelope else raw_msg


def deserialize_msg(msg):
    """A received message, unwrapped if it came in an envelope;
    UnsupportedRpcEnvelopeVersion for an envelope version not known."""
    return unwrap(msg) if isinstance(msg, dict) else msg


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

    def update_store(self):
        context_store().context = self

    def elevated(self, read_deleted=None, overwrite=False):
        """A copy with the admin flag and role set."""
        return self.from_dict(elevated_values(self.values, read_deleted))
