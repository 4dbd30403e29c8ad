"""openstack.common.rpc.proxy: the calling side of a versioned RPC API, as
Folsom-era client classes (compute_rpcapi.ComputeAPI and the like)
subclass it.  Each message is stamped with the API version, and sent to
the API's topic unless the caller names another."""
from nova_zmq_fast import rpc


class RpcProxy:
    """A base class for a service's RPC client API.

        class ComputeAPI(RpcProxy):
            BASE_RPC_API_VERSION = "2.0"

            def __init__(self):
                super().__init__(topic="compute", default_version="2.0")

            def ping(self, ctxt, host, x):
                return self.call(ctxt, self.make_msg("ping", x=x),
                                 topic=rpc.queue_get_for(ctxt, "compute", host))
    """

    def __init__(self, topic, default_version):
        self.topic = topic
        self.default_version = default_version

    @staticmethod
    def make_msg(method, **kwargs):
        return {"method": method, "args": kwargs}

    def _prepare(self, msg, version, topic):
        msg["version"] = version or self.default_version
        return topic or self.topic

    def call(self, context, msg, topic=None, version=None, timeout=None):
        """rpc.call, with the version set: the method's return value."""
        return rpc.call(context, self._prepare(msg, version, topic), msg, timeout)

    def multicall(self, context, msg, topic=None, version=None, timeout=None):
        """rpc.multicall, with the version set: an iterator of values."""
        return rpc.multicall(context, self._prepare(msg, version, topic), msg, timeout)

    def cast(self, context, msg, topic=None, version=None):
        rpc.cast(context, self._prepare(msg, version, topic), msg)

    def fanout_cast(self, context, msg, topic=None, version=None):
        rpc.fanout_cast(context, self._prepare(msg, version, topic), msg)

    def cast_to_server(self, context, server_params, msg, topic=None, version=None):
        rpc.cast_to_server(context, server_params, self._prepare(msg, version, topic), msg)

    def fanout_cast_to_server(self, context, server_params, msg, topic=None, version=None):
        rpc.fanout_cast_to_server(context, server_params, self._prepare(msg, version, topic),
                                  msg)
