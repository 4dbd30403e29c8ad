"""openstack.common.rpc.dispatcher, as a Folsom-era service imports it:
`from <its rpc package> import dispatcher as rpc_dispatcher`.  The rules
live in nova_zmq_fast.dispatcher."""
from nova_zmq_fast.dispatcher import RpcDispatcher, version_is_compatible

__all__ = ["RpcDispatcher", "version_is_compatible"]
