"""The runtime under both APIs: a libzmq context, discovery, the sending
client, and Connections (a listening server with its consumers).

`nova_zmq_fast.rpc` keeps one Runtime per process; every oslo.messaging
transport using the zmqfast driver has its own.  Both are the same core.
"""
import errno
import logging
import socket
import threading
import time

from nova_zmq_fast import matchmaker as _matchmaker
from nova_zmq_fast._client import Client
from nova_zmq_fast._envelope import check_topic
from nova_zmq_fast._server import Server
from nova_zmq_fast._zmq import Context
from nova_zmq_fast.exceptions import (
    RPCException, deserialize_remote_exception, serialize_remote_exception)
from nova_zmq_fast.options import tcp_endpoint

LOG = logging.getLogger("nova_zmq_fast.runtime")


class Runtime:
    """One set of open resources: a libzmq context, discovery, the sending
    client and the serving connections.  The RPC API keeps one per process;
    each oslo.messaging transport has its own.

    `rebuild_exception(failure)` turns a FAILURE reply into the exception
    to raise (default: the native format, see exceptions.py); `green`
    makes every wait cooperative for eventlet."""

    def __init__(self, options, rebuild_exception=None, green=False):
        self.options = options
        self.context = Context()
        try:
            self.matchmaker = _matchmaker.create(options)
            if rebuild_exception is None:
                # The transport's own errors (UnsupportedRpcVersion, ...)
                # always come back as themselves.
                allowed = tuple(options.allowed_rpc_exception_modules) + (
                    "nova_zmq_fast.exceptions",)
                rebuild_exception = lambda failure: deserialize_remote_exception(  # noqa: E731
                    failure, allowed)
            self.client = Client(
                self.context, self.matchmaker,
                send_timeout=options.rpc_cast_timeout,
                response_timeout=options.rpc_response_timeout,
                max_message_size=options.rpc_zmq_max_message_size,
                linger=options.rpc_zmq_linger,
                connect_timeout=options.rpc_zmq_connect_timeout,
                rebuild_exception=rebuild_exception, green=green)
        except BaseException:
            self.context.term()
            raise
        self.connections = set()
        self.lock = threading.RLock()

    def connection(self, shared=False):
        """A new Connection (or, with shared=True, this runtime's shared one)."""
        with self.lock:
            if shared:
                for conn in self.connections:
                    if conn._shared:
                        return conn
            conn = Connection(self, shared=shared)
            self.connections.add(conn)
            return conn

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

    def create_consumer(self, topic, proxy, fanout=False, deferred=False):
        """Consume `topic` with `proxy` (an RpcDispatcher, an object whose
        methods are called as method(ctxt, **args), or a callable called as
        proxy(ctxt, msg)).  fanout=True receives fanout_cast()s instead.
        deferred=True: proxy(ctxt, msg, replier) answers calls later through
        the replier (used by the oslo.messaging driver)."""
        check_topic(topic)
        if proxy is None:
            raise TypeError("proxy must not be None")
        fanout = bool(fanout)
        with self._lock:
            self._check_open()
            server = self._ensure_server()
            server.add_consumer(topic, fanout, proxy, deferred)
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

    def remove_consumer(self, topic, fanout=False):
        """Stop consuming `topic`: withdraw it from discovery first."""
        fanout = bool(fanout)
        with self._lock:
            if self._consumers.pop((topic, fanout), None) is None:
                return
            if self._consuming:
                self._rt.matchmaker.unregister(topic, self._rt.options.rpc_zmq_host,
                                               self._address, fanout)
            self._server.remove_consumer(topic, fanout)

    def stats(self):
        counters = self._server.stats() if self._server is not None else {}
        return dict(counters, address=self._address,
                    topics=sorted(f"{t}{' (fanout)' if f else ''}" for t, f in self._consumers))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
