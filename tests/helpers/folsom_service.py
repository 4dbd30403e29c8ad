"""A service written as Folsom's Nova wrote one, unchanged but for the
import of its rpc package: eventlet monkey-patched, a manager behind
rpc.dispatcher.RpcDispatcher, the Service.start() consumers ('compute',
'compute.<host>', and the fanout), a client API built on rpc.proxy.RpcProxy,
and errors from rpc.common.  It also serves 'compute_folsom' through a
dispatcher with Folsom's own signature, dispatch(ctxt, version, method,
**kwargs) (no namespace).

    python -m tests.helpers.folsom_service --host HOST --options JSON

Prints "READY <address>"; exits cleanly on SIGTERM or when stdin closes.
"""
import eventlet
eventlet.monkey_patch()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import eventlet.queue  # noqa: E402

from nova_zmq_fast import rpc  # noqa: E402
from nova_zmq_fast.rpc import common as rpc_common  # noqa: E402
from nova_zmq_fast.rpc import dispatcher as rpc_dispatcher  # noqa: E402
from nova_zmq_fast.rpc import proxy as rpc_proxy  # noqa: E402
from tests.helpers import errors  # noqa: E402


class ComputeAPI(rpc_proxy.RpcProxy):
    """compute_rpcapi.ComputeAPI's shape."""
    BASE_RPC_API_VERSION = "2.0"

    def __init__(self):
        super().__init__(topic="compute", default_version=self.BASE_RPC_API_VERSION)

    def ping(self, ctxt, host, x):
        return self.call(ctxt, self.make_msg("ping", x=x),
                         topic=rpc.queue_get_for(ctxt, self.topic, host))


class ComputeManager:
    RPC_API_VERSION = "2.1"

    def __init__(self, host):
        self.host = host
        self.fanouts = []
        self.queue = eventlet.queue.Queue()

    def create_rpc_dispatcher(self):
        return rpc_dispatcher.RpcDispatcher([self])

    def ping(self, context, x):
        return x

    def whoami(self, context):
        return self.host

    def whois(self, context):
        return context.user_id

    def relay(self, context, x):
        # A nested call from a green thread, back into this very process.
        return ComputeAPI().ping(context, self.host, x)

    def hand_over(self, context, x):
        # A green thread spawned by the handler, and an eventlet queue.
        eventlet.spawn_n(self.queue.put, x)
        return self.queue.get(timeout=5)

    def refresh(self, context, n):
        self.fanouts.append(n)

    def fanouts_seen(self, context):
        return self.fanouts

    def refuse(self, context):
        raise rpc_common.RPCException("refused by policy")

    def admin_view(self, context):
        # What a Nova manager does with the context it is handed.
        admin = context.elevated(read_deleted="yes")
        copied = context.deepcopy()
        return {"is_admin": admin.is_admin, "roles": admin.roles,
                "read_deleted": admin.read_deleted, "unchanged": "is_admin" not in context.values,
                "copy": copied.to_dict() == context.to_dict()}

    def lookup(self, context, instance_id):
        raise errors.InstanceNotFound(instance_id=instance_id)

    def legacy_refusal(self, context, what):
        raise errors.LegacyRefusal(what=what)

    @rpc_common.client_exceptions(KeyError)
    def expected_miss(self, context, key):
        return {}[key]

    def created_at(self, context):
        return datetime.datetime(2012, 9, 27, 1, 2, 3, 4)

    def sorted_ids(self, context, ids):
        return sorted(ids)

    def relay_failure(self, context):
        # A remote ValueError re-raised here travels on as a ValueError.
        return ComputeAPI().call(context, ComputeAPI().make_msg("fail_value"),
                                 topic=rpc.queue_get_for(context, "compute", self.host))

    def fail_value(self, context):
        raise ValueError("bad value two hops away")


class FolsomDispatcher:
    """openstack/common/rpc/dispatcher.py as Folsom shipped its interface:
    no namespaces."""

    def __init__(self, callbacks):
        self.callbacks = callbacks

    def dispatch(self, ctxt, version, method, **kwargs):
        for proxyobj in self.callbacks:
            if version is not None and version.split(".")[0] != \
                    proxyobj.RPC_API_VERSION.split(".")[0]:
                continue
            return getattr(proxyobj, method)(ctxt, **kwargs)
        raise rpc_common.UnsupportedRpcVersion(version=version)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--options", default="{}")
    args = parser.parse_args()
    rpc.init(rpc_zmq_host=args.host, **json.loads(args.options))
    manager = ComputeManager(args.host)
    # nova/service.py Service.start(), Folsom.
    conn = rpc.create_connection(new=True)
    dispatcher = manager.create_rpc_dispatcher()
    conn.create_consumer("compute", dispatcher, fanout=False)
    conn.create_consumer(f"compute.{args.host}", dispatcher, fanout=False)
    conn.create_consumer("compute", dispatcher, fanout=True)
    conn.create_consumer("compute_folsom", FolsomDispatcher([manager]), fanout=False)
    conn.consume_in_thread()

    done = []
    signal.signal(signal.SIGTERM, lambda *_: done.append(True))
    # stdin is not green: read it on a real thread (the test holds it).
    eventlet.patcher.original("threading").Thread(
        target=lambda: (sys.stdin.read(), done.append(True)), daemon=True).start()
    print("READY", conn.address, flush=True)
    while not done:
        eventlet.sleep(0.2)
    conn.close()
    rpc.cleanup()


if __name__ == "__main__":
    main()
