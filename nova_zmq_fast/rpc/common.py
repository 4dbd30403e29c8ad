"""openstack.common.rpc.common, as a Folsom-era service imports it: the
exceptions a caller catches, the remote-exception codec, and the
Connection type.  Each is defined once, in nova_zmq_fast.exceptions or
nova_zmq_fast.runtime."""
from nova_zmq_fast.exceptions import (
    RemoteError, RPCException, Timeout, UnsupportedRpcVersion,
    deserialize_remote_exception, serialize_remote_exception)
from nova_zmq_fast.runtime import Connection

__all__ = ["Connection", "RPCException", "RemoteError", "Timeout", "UnsupportedRpcVersion",
           "deserialize_remote_exception", "serialize_remote_exception"]
