"""The version rules: which callback object serves a message.

`RpcDispatcher` follows openstack.common.rpc's rules: a message names a
method, an API version ('1.0' when missing) and optionally a namespace; the
first callback object of that namespace whose RPC_API_VERSION has the same
major version and a minor version at least as high, and that has the method,
is called as method(ctxt, **args).  The receive loop reaches it through a
Consumer (`_dispatch.pyx`, which lists every kind of proxy).
"""
from nova_zmq_fast.exceptions import UnsupportedRpcVersion


def version_is_compatible(implemented, requested):
    """True if an endpoint implementing `implemented` can serve `requested`:
    same major version, requested minor <= implemented minor."""
    try:
        imp_major, imp_minor = (int(p) for p in str(implemented).split(".")[:2])
        req = str(requested).split(".")
        req_major, req_minor = int(req[0]), int(req[1]) if len(req) > 1 else 0
    except (ValueError, IndexError):
        return False
    return req_major == imp_major and req_minor <= imp_minor


def _public_method(obj, name):
    if not isinstance(name, str) or not name or name.startswith("_"):
        return None
    method = getattr(obj, name, None)
    return method if callable(method) else None


class RpcDispatcher:
    """Dispatch a message to one of several versioned callback objects."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def accepts(self, version, namespace=None):
        """True if some callback would serve `version` in `namespace`
        (what a PING with a version asks)."""
        version = version or "1.0"
        return any(getattr(proxy, "RPC_API_NAMESPACE", None) == namespace and
                   version_is_compatible(getattr(proxy, "RPC_API_VERSION", "1.0"), version)
                   for proxy in self.callbacks)

    def dispatch(self, ctxt, version, method, namespace=None, **kwargs):
        """Call `method` on the first callback that serves `version` in
        `namespace` (None: the default; Folsom callers leave it out)."""
        version = version or "1.0"
        had_compatible = False
        for proxy in self.callbacks:
            if getattr(proxy, "RPC_API_NAMESPACE", None) != namespace:
                continue
            compatible = version_is_compatible(
                getattr(proxy, "RPC_API_VERSION", "1.0"), version)
            had_compatible = had_compatible or compatible
            target = _public_method(proxy, method)
            if compatible and target is not None:
                return target(ctxt, **kwargs)
        if had_compatible:
            raise AttributeError(f"No such RPC function '{method}'")
        raise UnsupportedRpcVersion(version=version)
