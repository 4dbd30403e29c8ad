"""The RPC API: openstack.common.rpc's public functions, over ZeroMQ.

A Nova-era service switches transport by changing one import:

    from nova_zmq_fast import rpc

    rpc.init(rpc_zmq_host="compute-1")        # optional: defaults work
    conn = rpc.create_connection()
    conn.create_consumer("compute", ComputeManager())
    conn.consume_in_thread()

    rpc.call(ctxt, "compute", {"method": "ping", "args": {"x": 1}}, timeout=5)

Layers underneath: `_client` (sending, per-thread sockets), `_server`
(receive loop and dispatch), `matchmaker` (discovery), `dispatcher`
(version rules), `_envelope` (wire format), `_zmq` (libzmq context).
"""
import atexit
import errno
import logging
import os
import socket
import threading
import time

from nova_zmq_fast import matchmaker as _matchmaker
from nova_zmq_fast._client import Client
from nova_zmq_fast._envelope import check_topic
from nova_zmq_fast._server import RpcContext, Server
from nova_zmq_fast._zmq import Context
from nova_zmq_fast.dispatcher import RpcDispatcher, wrap
from nova_zmq_fast.exceptions import (  # noqa: F401  (re-exported API)
    InvalidMessage, MessageTooLarge, NoListeners, PeerUnreachable, RemoteError,
    RPCException, SerializationError, Timeout, UnsupportedRpcVersion,
    deserialize_remote_exception, serialize_remote_exception)
from nova_zmq_fast.matchmaker import Endpoint
from nova_zmq_fast.options import DEFAULT_RING_PORT, Options, tcp_endpoint

__all__ = [
    "init", "create_connection", "call", "multicall", "cast", "fanout_cast",
    "cast_to_server", "fanout_cast_to_server", "notify", "queue_get_for",
    "cleanup", "stats", "RpcDispatcher", "RpcContext", "Connection",
    "RPCException", "Timeout", "NoListeners", "PeerUnreachable", "RemoteError",
    "UnsupportedRpcVersion", "InvalidMessage", "SerializationError",
    "MessageTooLarge",
]

LOG = logging.getLogger("nova_zmq_fast.rpc")
_lock = threading.RLock()
_options = None
_runtime_ = None


class _Runtime:
    """Everything this process has open: libzmq context, discovery, the
    sending client and the serving connections."""

    def __init__(self, options):
        self.options = options
        self.context = Context()
        try:
            self.matchmaker = _matchmaker.create(options)
            # The transport's own errors (UnsupportedRpcVersion, ...) always
            # come back as themselves.
            allowed = tuple(options.allowed_rpc_exception_modules) + (
                "nova_zmq_fast.exceptions",)
            self.client = Client(
                self.context, self.matchmaker,
                send_timeout=options.rpc_cast_timeout,
                response_timeout=options.rpc_response_timeout,
                max_message_size=options.rpc_zmq_max_message_size,
                linger=options.rpc_zmq_linger,
                connect_timeout=options.rpc_zmq_connect_timeout,
                rebuild_exception=lambda failure: deserialize_remote_exception(failure, allowed))
        except BaseException:
            self.context.term()
            raise
        self.connections = set()

    def close(self):
        deadline = time.monotonic() + self.options.rpc_zmq_linger
        for conn in list(self.connections):
            conn._close(deadline)
        self.client.close(max(0.0, deadline - time.monotonic()))
        self.matchmaker.close()
        try:
            self.context.term()
        except RuntimeError as exc:         # a server that could not stop
            LOG.error("libzmq context left open: %s", exc)


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
    _runtime_ = _Runtime(_options or Options.from_conf())
    return _runtime_


def _after_fork_in_child():
    # The parent's sockets and threads do not exist here; start afresh on
    # first use (the parent's objects are left untouched, never closed).
    global _runtime_, _lock
    _runtime_ = None
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- configuration and lifecycle -----------------------------------------------

def init(conf=None, **options):
    """Configure this process from an oslo.config ConfigOpts, a dict or
    keyword options (see nova_zmq_fast.options.Options).  Calling it again
    first cleans up what the previous configuration opened."""
    global _options
    opts = Options.from_conf(conf, **options)
    with _lock:
        if _runtime_ is not None:
            cleanup()
        _options = opts
    return opts


def cleanup():
    """Close every connection (finishing queued work), flush queued
    messages, withdraw this process from discovery and release every
    socket, thread and descriptor.  Bounded by rpc_zmq_linger."""
    global _runtime_
    with _lock:
        rt, _runtime_ = _runtime_, None
    if rt is not None:
        rt.close()


atexit.register(cleanup)


def stats():
    """Counters of this process: what was sent and, per connection, what
    was received, handled and dropped."""
    rt = _runtime()
    return {"client": rt.client.stats(),
            "connections": [c.stats() for c in list(rt.connections)]}


# -- sending -----------------------------------------------------------------------

def call(context, topic, msg, timeout=None):
    """Invoke a method on one consumer of `topic` and return its result.
    Raises Timeout after `timeout` (rpc_response_timeout) seconds, at once
    NoListeners if no consumer is alive, or the remote exception."""
    return (_runtime_ or _runtime()).client.call(context, topic, msg, timeout)


def multicall(context, topic, msg, timeout=None):
    """Like call(), returning an iterator over every value the remote
    method yields, each as soon as it is produced."""
    return (_runtime_ or _runtime()).client.multicall(context, topic, msg, timeout)


def cast(context, topic, msg):
    """Invoke a method on one consumer of `topic`; no result."""
    (_runtime_ or _runtime()).client.cast(context, topic, msg)


def fanout_cast(context, topic, msg):
    """Invoke a method on every fanout consumer of `topic`, once each."""
    (_runtime_ or _runtime()).client.fanout_cast(context, topic, msg)


def _server_endpoint(server_params):
    if isinstance(server_params, str):
        server_params = {"address": server_params}
    if not isinstance(server_params, dict):
        raise TypeError("server_params must be a dict with 'host' and 'port', or 'address'")
    address = server_params.get("address")
    if address:
        if not isinstance(address, str) or "://" not in address:
            raise ValueError(f"server_params address {address!r} is not a ZeroMQ endpoint")
        return Endpoint(server_params.get("host") or address, address)
    host = server_params.get("host") or server_params.get("hostname")
    if not isinstance(host, str) or not host:
        raise ValueError("server_params needs 'host' (or 'hostname') or 'address'")
    port = server_params.get("port") or DEFAULT_RING_PORT
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"server_params port {port!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"server_params port {port} is out of range")
    return Endpoint(host, tcp_endpoint(host, port))


def cast_to_server(context, server_params, topic, msg):
    """cast() to the node named by server_params ({'host', 'port'} or
    {'address': 'tcp://...'}), bypassing discovery."""
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


def queue_get_for(context, topic, host):
    """The topic that reaches `topic` on `host` only."""
    return f"{topic}.{host}" if host else topic


# -- serving -----------------------------------------------------------------------

def create_connection(new=True):
    """A Connection for consuming.  new=False returns this process's shared
    one."""
    rt = _runtime()
    with _lock:
        if not new:
            for conn in rt.connections:
                if conn._shared:
                    return conn
        conn = Connection(rt, shared=not new)
        rt.connections.add(conn)
        return conn


BIND_ATTEMPTS = 5


def _free_port(bind_address):
    """A TCP port that is free on `bind_address` right now."""
    host = bind_address.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if host in ("*", "0.0.0.0", "::"):
        host = ""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Connection:
    """A set of consumers served by one listening socket and its workers."""

    def __init__(self, runtime, shared=False):
        self._rt = runtime
        self._shared = shared
        self._server = None
        self._address = None
        self._consumers = {}                # (topic, fanout) -> proxy
        self._consuming = False
        self._closing = False
        self._closed = threading.Event()    # set once fully closed
        self._lock = threading.Lock()

    def _ensure_server(self):
        if self._server is None:
            opts = self._rt.options
            for attempt in range(BIND_ATTEMPTS):
                # The advertised address is also the server's routing id, so
                # the port must be known before binding: pick a free one.
                port = opts.port or _free_port(opts.bind_address)
                address = tcp_endpoint(opts.advertised_host(), port)
                try:
                    self._server = Server(
                        self._rt.context, opts.bind_endpoint(port), opts.rpc_zmq_host,
                        address.encode(),
                        max_message_size=opts.rpc_zmq_max_message_size,
                        max_threads=opts.rpc_thread_pool_size,
                        serialize_failure=serialize_remote_exception)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or opts.port or \
                            attempt == BIND_ATTEMPTS - 1:
                        raise
                    continue                # somebody took the free port first
                self._address = address
                break
        return self._server

    def _check_open(self):
        if self._closing:
            raise RPCException("connection is closed")

    @property
    def address(self):
        """The endpoint peers use to reach this connection."""
        return self._address

    def create_consumer(self, topic, proxy, fanout=False):
        """Consume `topic` with `proxy` (an RpcDispatcher, an object whose
        methods are called as method(ctxt, **args), or a callable called as
        proxy(ctxt, msg)).  fanout=True receives fanout_cast()s instead."""
        check_topic(topic)
        if proxy is None:
            raise TypeError("proxy must not be None")
        fanout = bool(fanout)
        with self._lock:
            self._check_open()
            server = self._ensure_server()
            server.add_consumer(topic, fanout, proxy)
            self._consumers[(topic, fanout)] = proxy
            if self._consuming:
                self._register(topic, fanout)

    def _register(self, topic, fanout):
        self._rt.matchmaker.register(topic, self._rt.options.rpc_zmq_host,
                                     self._address, fanout)

    def consume_in_thread(self):
        """Start serving in worker threads and announce the consumers."""
        with self._lock:
            self._check_open()
            if self._consuming:
                return
            self._ensure_server().start()
            for topic, fanout in self._consumers:
                self._register(topic, fanout)
            self._consuming = True

    def wait(self):
        """Block until the connection is closed (by another thread)."""
        while not self._closed.wait(0.5):
            pass

    def close(self):
        """Stop consuming: withdraw from discovery, finish the queued work
        (bounded by rpc_zmq_linger), release the socket and threads."""
        self._close(time.monotonic() + self._rt.options.rpc_zmq_linger)

    def _close(self, deadline):
        with self._lock:
            first = not self._closing
            self._closing = True
            if first and self._consuming:
                for topic, fanout in self._consumers:
                    self._rt.matchmaker.unregister(topic, self._rt.options.rpc_zmq_host,
                                                   self._address, fanout)
        if not first:                       # another thread is closing it
            self._closed.wait(max(0.0, deadline - time.monotonic()))
            return
        try:
            if self._server is not None:
                self._server.stop(max(0.0, deadline - time.monotonic()))
        finally:
            self._rt.connections.discard(self)
            self._closed.set()

    def stats(self):
        counters = self._server.stats() if self._server is not None else {}
        return dict(counters, address=self._address,
                    topics=sorted(f"{t}{' (fanout)' if f else ''}" for t, f in self._consumers))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
