"""The RPC API: openstack.common.rpc's public functions, over ZeroMQ.

A Nova-era service switches transport by changing one import:

    from nova_zmq_fast import rpc

    rpc.init(rpc_zmq_host="compute-1")        # optional: defaults work
    conn = rpc.create_connection()
    conn.create_consumer("compute", ComputeManager())
    conn.consume_in_thread()

    rpc.call(ctxt, "compute", {"method": "ping", "args": {"x": 1}}, timeout=5)

Layers underneath: `runtime` (the context, discovery, client, server and
connections this module keeps one of), `_client` (sending, per-thread
sockets), `_server` (the receive loop), `_dispatch` (consumers),
`_routes` (the route table) filled by `matchmaker` (discovery backends),
`dispatcher` (version rules), `_envelope` (wire format), `_zmq` (libzmq).
"""
import atexit
import os
import threading

from nova_zmq_fast._dispatch import RpcContext, wrap
from nova_zmq_fast._handoff import monkey_patched
from nova_zmq_fast._routes import Endpoint
from nova_zmq_fast.dispatcher import RpcDispatcher
from nova_zmq_fast.exceptions import (  # noqa: F401  (re-exported API)
    DiscoveryUnavailable, InvalidMessage, KeyRevoked, MessageTooLarge, NoListeners,
    PeerUnreachable, RemoteError, RPCException, SerializationError, StreamTruncated, Timeout,
    TransportClosed, UnsupportedRpcVersion, deserialize_remote_exception,
    serialize_remote_exception)
from nova_zmq_fast.options import Options, tcp_endpoint
from nova_zmq_fast.runtime import Connection, Runtime

__all__ = [
    "init", "register_opts", "set_defaults", "create_connection", "call", "multicall", "cast", "fanout_cast",
    "cast_to_server", "fanout_cast_to_server", "notify", "ping", "queue_get_for",
    "cleanup", "stats", "RpcDispatcher", "RpcContext", "Connection",
    "RPCException", "Timeout", "NoListeners", "PeerUnreachable", "RemoteError",
    "UnsupportedRpcVersion", "InvalidMessage", "SerializationError",
    "MessageTooLarge", "StreamTruncated", "TransportClosed", "DiscoveryUnavailable",
    "KeyRevoked",
]

DEFAULT_PORT = 9501                     # the original driver's rpc_zmq_port
_lock = threading.RLock()
_options = None
_runtime_ = None
# What earlier runtimes, since cleaned up, discarded: stats() goes on
# counting it, so that a loss reported at cleanup() can be read afterwards.
_discarded_before = {"discarded": 0, "at_least_once_lost": 0, "notifications_held_dropped": 0}


def _runtime():
    rt = _runtime_
    if rt is None:
        with _lock:
            rt = _runtime_
            if rt is None:
                rt = _start()
    return rt


def _start():
    global _runtime_
    # A monkey-patched process waits cooperatively and runs handlers in
    # green threads (as the 2012 driver did).
    _runtime_ = Runtime(_options or Options.from_conf(_global_conf()), green=monkey_patched())
    return _runtime_


def _global_conf():
    """Without init(): oslo.config's global CONF, which the original API
    read (what the service's config files set), with the options
    registered; None (the defaults) without oslo.config."""
    try:
        from oslo_config import cfg
    except ImportError:
        return None
    register_opts(cfg.CONF)
    return cfg.CONF


def _after_fork_in_child():
    # The parent's sockets and threads do not exist here; start afresh on
    # first use (the parent's objects are left untouched, never closed).
    global _runtime_, _lock
    _runtime_ = None
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- configuration and lifecycle -----------------------------------------------

def register_opts(conf):
    """Register every option on an oslo.config ConfigOpts in [DEFAULT],
    under the original driver's names, as openstack.common.rpc did (done
    for the global CONF at first use without init()).  An option already
    registered is left as it is; rpc_response_timeout is oslo.messaging's
    own where that is installed, so both register it alike."""
    from oslo_config import cfg

    from nova_zmq_fast.options import oslo_opts
    opts = oslo_opts()
    try:
        from oslo_messaging.opts import list_opts
    except ImportError:
        pass
    else:
        theirs = {o.name: o for group, group_opts in list_opts() if group in (None, "DEFAULT")
                  for o in group_opts}
        opts = [theirs.get(o.name, o) if o.name == "rpc_response_timeout" else o for o in opts]
    for opt in opts:
        try:
            conf.register_opt(opt)
        except cfg.DuplicateOptError:
            pass                        # the service's own, of the same name


def set_defaults(control_exchange=None):
    """openstack.common.rpc's: sets the AMQP exchange, which a broker-less
    transport has no use for (topics are the whole address).  Accepted, so
    services that call it need no change."""


def init(conf=None, **options):
    """Configure this process from an oslo.config ConfigOpts (its
    [DEFAULT] options, registered by register_opts()), a dict or keyword
    options (see nova_zmq_fast.options.Options).  Without init(), the
    first use reads oslo.config's global CONF, as the original API did.
    Calling it again first cleans up what the previous configuration
    opened."""
    global _options
    if hasattr(conf, "register_opt"):       # an oslo.config ConfigOpts
        register_opts(conf)
    opts = Options.from_conf(conf, **options)
    with _lock:
        if _runtime_ is not None:
            cleanup()
        _options = opts
    return opts


def cleanup():
    """Make sure what this process sent has arrived, close every
    connection (finishing queued work), withdraw this process from
    discovery and release every socket, thread and descriptor.

    Returns {address: messages sent there that its peer never confirmed
    within rpc_zmq_linger, so may be lost, and topic: at-least-once casts
    never acknowledged and held notifications never delivered}: empty
    when nothing was lost.  They are also named in a warning.  Takes at most three times
    rpc_zmq_linger (see Runtime.close)."""
    global _runtime_
    with _lock:
        rt, _runtime_ = _runtime_, None
    if rt is None:
        return {}
    try:
        return rt.close()
    finally:
        counted = dict(rt.client.stats(), **rt.courier.stats())
        for name in _discarded_before:
            _discarded_before[name] += counted[name]


atexit.register(cleanup)


def stats():
    """Counters of this process: what was sent and, per connection, what
    was received, handled and dropped.  They start again after cleanup(),
    except "discarded", "at_least_once_lost" and
    "notifications_held_dropped": what was lost since the process started."""
    rt = _runtime()
    client = dict(rt.client.stats(), **rt.courier.stats())
    for name, n in _discarded_before.items():
        client[name] += n
    return {"client": client, "connections": [c.stats() for c in list(rt.connections)]}


# -- sending -----------------------------------------------------------------------

def call(context, topic, msg, timeout=None):
    """Invoke a method on one consumer of `topic` and return its result.
    Raises Timeout after `timeout` seconds (None or 0, as in the original
    API: rpc_response_timeout), at once NoListeners if no consumer is
    alive, or the remote exception."""
    return (_runtime_ or _runtime()).client.call(context, topic, msg, _default_zero(timeout))


def _default_zero(timeout):
    # The original API read a timeout of 0 as "rpc_response_timeout".
    return None if type(timeout) in (int, float) and timeout == 0 else timeout


def multicall(context, topic, msg, timeout=None):
    """Like call(), returning an iterator over every value the remote
    method yields, each as soon as it is produced."""
    return (_runtime_ or _runtime()).client.multicall(context, topic, msg, _default_zero(timeout))


def cast(context, topic, msg, at_least_once=None):
    """Invoke a method on one consumer of `topic`; no result.  With
    at_least_once (default: rpc_zmq_at_least_once) the cast is kept until a
    consumer has handled it (see the README's Delivery)."""
    rt = _runtime_ or _runtime()
    rt.client.cast(context, topic, msg,
                   rt.options.rpc_zmq_at_least_once if at_least_once is None else at_least_once)


def fanout_cast(context, topic, msg):
    """Invoke a method on every fanout consumer of `topic`, once each.
    Returns how many it reached; those it could not are counted in
    stats()["client"]["fanout_unreachable"] and named in a warning."""
    return (_runtime_ or _runtime()).client.fanout_cast(context, topic, msg)


def _server_endpoint(server_params):
    if isinstance(server_params, str):
        server_params = {"address": server_params}
    if not isinstance(server_params, dict):
        raise TypeError("server_params must be a dict with 'host' and 'port', or 'address'")
    key = server_params.get("key")              # its CURVE public key (Z85), with CURVE
    if key is not None:
        if not isinstance(key, str) or len(key) != 40:
            raise ValueError("server_params key must be a Z85 CURVE public key")
        key = key.encode()
    address = server_params.get("address")
    if address:
        if not isinstance(address, str) or "://" not in address:
            raise ValueError(f"server_params address {address!r} is not a ZeroMQ endpoint")
        return Endpoint(server_params.get("host") or address, address, key)
    host = server_params.get("host") or server_params.get("hostname")
    if not isinstance(host, str) or not host:
        raise ValueError("server_params needs 'host' (or 'hostname') or 'address'")
    port = server_params.get("port") or _runtime().options.rpc_zmq_port or DEFAULT_PORT
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"server_params port {port!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"server_params port {port} is out of range")
    return Endpoint(host, tcp_endpoint(host, port), key)


def cast_to_server(context, server_params, topic, msg):
    """cast() to the node named by server_params ({'host', 'port'} or
    {'address': 'tcp://...'}, and with CURVE its 'key'), bypassing
    discovery."""
    _runtime().client.cast_to((_server_endpoint(server_params),), context, topic, msg)


def fanout_cast_to_server(context, server_params, topic, msg):
    """fanout_cast() to the node named by server_params."""
    _runtime().client.cast_to((_server_endpoint(server_params),), context, topic, msg,
                              fanout=True)


def notify(context, topic, msg, envelope=False):
    """Send a notification (a dict) to one consumer of `topic`.  With no
    consumer alive it is dropped and counted.  envelope=True wraps it as
    {'oslo.version': '2.0', 'oslo.message': <json>}; consumers unwrap it."""
    if envelope:
        if not isinstance(msg, dict):
            raise InvalidMessage(f"notification must be a dict, not {type(msg).__name__}")
        msg = wrap(msg)
    return _runtime().client.notify(context, topic, msg)


def ping(topic, timeout=None, version=None, namespace=None):
    """A round trip to each live consumer of `topic` ('topic.host': that
    host's), answered by its receive loop, not the service's code.  One
    dict per consumer: its host, address, pid, transport and envelope
    versions and "rtt" (seconds); or, where its ping failed, host, address
    and "error" (NoListeners: the topic is not served there; with
    `version`, UnsupportedRpcVersion: no consumer accepts it; Timeout,
    PeerUnreachable).  NoListeners if discovery knows no consumer."""
    rt = _runtime()
    endpoints = rt.routes.route(topic)
    if not endpoints:
        raise NoListeners(None, topic, "ping")
    answers = []
    for endpoint in endpoints:
        try:
            answers.append(rt.client.ping(endpoint, topic, timeout, version, namespace))
        except RPCException as exc:
            answers.append({"host": endpoint.host, "address": endpoint.address, "error": exc})
    return answers


def queue_get_for(context, topic, host):
    """The topic that reaches `topic` on `host` only."""
    return f"{topic}.{host}" if host else topic


# -- serving -----------------------------------------------------------------------

def create_connection(new=True):
    """A Connection for consuming.  new=False returns this process's shared
    one."""
    return _runtime().connection(shared=not new)
