"""The runtime under both APIs: a libzmq context, discovery (a backend and
the route table it fills), the sending client, the process's one listening
server, and Connections (sets of consumers on that server).

`nova_zmq_fast.rpc` keeps one Runtime per process; every oslo.messaging
transport using the zmqfast driver has its own.  Both are the same core.
"""
import errno
import logging
import os
import socket
import threading
import time

from nova_zmq_fast._client import Client
from nova_zmq_fast._courier import Courier
from nova_zmq_fast._curve import Authenticator
from nova_zmq_fast._envelope import check_topic
from nova_zmq_fast._handoff import Deferred, GreenHandoff, ThreadHandoff
from nova_zmq_fast._green import unpatched
from nova_zmq_fast._routes import Endpoint, RouteTable
from nova_zmq_fast._server import PEERS_LOG, serve
from nova_zmq_fast._zmq import Context
from nova_zmq_fast.exceptions import (
    InvalidRPCConnectionReuse, RemoteFailure, deserialize_remote_exception,
    serialize_remote_exception)
from nova_zmq_fast.options import tcp_endpoint

LOG = logging.getLogger("nova_zmq_fast.runtime")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
_warned_plaintext = []

# A fixed port may still be held for a moment by a server this process just
# closed (libzmq releases listeners in its I/O thread): retry that long.
BIND_RETRY = 2.0

# Fixed ports this process listens on, and the runtime listening there.
_listening = {}


def _free_port(bind_address):
    """A TCP port that is free on `bind_address` right now."""
    host = bind_address.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if host in ("*", "0.0.0.0", "::"):
        host = ""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _after_fork_in_child():
    # The parent's runtimes, sockets and listeners do not exist here: a
    # transport created in the child opens its own (the parent's objects
    # are left untouched, never closed).
    _listening.clear()
    Runtime._shared = {}
    Runtime._shared_lock = threading.Lock()


class Runtime:
    """One set of open resources: a libzmq context, discovery, the sending
    client and the listening server with its connections.

    `rebuild_exception(failure)` turns a FAILURE reply into the exception
    to raise (default: the native format, see exceptions.py); `green`
    makes every wait cooperative for eventlet."""

    # Runtimes shared by oslo.messaging transports: (options key, green) ->
    # [runtime, transports using it].
    _shared = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, options, green=False):
        """The runtime of every transport of this process with these
        options, so that a process listens on one socket however many
        transports it opens (oslo.messaging services open an RPC and a
        notification transport).  Each call is matched by a close(); the
        last one closes it.  A FAILURE reply raises RemoteFailure, which
        each transport rebuilds in its own way."""
        key = (options.key(), bool(green))
        with cls._shared_lock:
            entry = cls._shared.get(key)
            if entry is None:
                runtime = cls(options, rebuild_exception=RemoteFailure, green=green)
                runtime._shared_key = key
                entry = cls._shared[key] = [runtime, 0]
            entry[1] += 1
            return entry[0]

    def __init__(self, options, rebuild_exception=None, green=False):
        self._shared_key = None
        self.options = options
        self.curve = options.curve_keys()          # (public, secret) or None
        self.context = Context()
        self.backend = None
        self.routes = None
        self.zap = None                             # the ZAP handler, while serving
        try:
            self.backend = options.backend(options)
            self.routes = RouteTable(self.backend)
            if rebuild_exception is None:
                # The transport's own errors (UnsupportedRpcVersion, ...)
                # always come back as themselves.
                allowed = tuple(options.allowed_rpc_exception_modules) + (
                    "nova_zmq_fast.exceptions",)
                rebuild_exception = lambda failure: deserialize_remote_exception(  # noqa: E731
                    failure, allowed)
            self.client = Client(
                self.context, self.routes,
                send_timeout=options.rpc_cast_timeout,
                response_timeout=options.rpc_response_timeout,
                max_message_size=options.rpc_zmq_max_message_size,
                linger=options.rpc_zmq_linger,
                connect_timeout=options.rpc_zmq_connect_timeout,
                backlog=options.rpc_zmq_topic_backlog,
                socket_buffer=options.rpc_zmq_socket_buffer,
                rebuild_exception=rebuild_exception, green=green, curve=self.curve)
            # The background sender: liveness probes, route refresh,
            # at-least-once casts, held notifications.  It starts with the
            # first route cached, or the first message it must carry.
            self.courier = Courier(self.client, self.routes, options)
            self.client.courier = self.courier
            self.routes.on_route = self.courier.start
        except BaseException:
            self._close_discovery()
            self.context.term()
            raise
        self.server = None
        self.handoff = None                 # under eventlet: where handlers run (_handoff)
        self.node = None                    # this process's Endpoint, once serving
        self.connections = set()
        self._announced = {}                # (topic, fanout) -> consuming Connections
        self.lock = unpatched("threading").RLock()

    # -- the process's one listening socket ------------------------------------

    def serve(self):
        """The server every Connection of this runtime shares; bound on
        first use."""
        with self.lock:
            if self.server is None:
                server = self._bind()
                try:
                    # Endpoint() refuses an address nobody could dial (a bad
                    # rpc_zmq_advertise_address): then nothing stays bound.
                    self.node = Endpoint(self.options.rpc_zmq_host, server.address,
                                         self.curve[0] if self.curve else None)
                except BaseException as exc:
                    server.stop(0)
                    self._stop_zap()
                    if isinstance(exc, ValueError):
                        raise ValueError(f"{exc}: check rpc_zmq_advertise_address and "
                                         f"rpc_zmq_host") from None
                    raise
                self.server = server
                if self.options.port:
                    _listening[self.options.port] = self
            return self.server

    def _bind(self):
        opts = self.options
        host = opts.advertised_host()
        allow = None
        if self.curve:
            # The context's ZAP handler: without it a CURVE server refuses
            # everyone (it has a ZAP domain), which is what we want if it
            # cannot start.
            allow = opts.allow_list()
            if not allow.keys:
                LOG.warning("CURVE server with %s: it refuses every client until a key "
                            "is added", f"an empty allow-list {opts.rpc_zmq_allowed_keys}"
                            if opts.rpc_zmq_allowed_keys else "no allow-list "
                            "(rpc_zmq_allowed_keys)")
            self.zap = Authenticator(self.context, allow, PEERS_LOG)
            self.zap.start()
        elif opts.bind_address.strip("[]") not in LOOPBACK and not _warned_plaintext:
            _warned_plaintext.append(True)
            LOG.warning("listening on %s without CURVE: anyone who can reach it can call "
                        "any method and read every message; set rpc_zmq_secret_key_file",
                        opts.bind_address)
        try:
            return self._bind_server(opts, host, allow)
        except BaseException:
            self._stop_zap()
            raise

    def _bind_server(self, opts, host, allow):
        deadline = time.monotonic() + BIND_RETRY
        while True:
            # The advertised address is also the server's routing id, which
            # libzmq fixes at bind time: so the port is chosen first.
            port = opts.port or _free_port(opts.bind_address)
            try:
                return serve(
                    self.context, opts.bind_endpoint(port), opts.rpc_zmq_host,
                    tcp_endpoint(host, port), max_message_size=opts.rpc_zmq_max_message_size,
                    max_threads=opts.rpc_thread_pool_size,
                    backlog=opts.rpc_zmq_topic_backlog,
                    socket_buffer=opts.rpc_zmq_socket_buffer,
                    serialize_failure=serialize_remote_exception,
                    on_failure=self._server_failed,
                    curve_secret=self.curve[1] if self.curve else None, allow=allow,
                    send_timeout=opts.rpc_cast_timeout, green=self.client.green,
                    ack_timeout=opts.rpc_zmq_ack_timeout)
            except OSError as exc:
                # EADDRINUSE: another process took the free port first, or a
                # fixed port is still held by a server just closed.
                if exc.errno != errno.EADDRINUSE:
                    raise
                if port in _listening:
                    raise OSError(exc.errno, f"cannot listen on {opts.bind_endpoint(port)}: this "
                                  f"process already listens there for another transport (the "
                                  f"native API's, or one with other options); transports with "
                                  f"the same options share the socket") from None
                if time.monotonic() >= deadline:
                    raise OSError(exc.errno, f"cannot listen on {opts.bind_endpoint(port)}: "
                                  f"the port is in use by another process") from None
                time.sleep(0.02)

    def add_consumer(self, conn, topic, fanout, proxy, deferred, start):
        """A consumer on the shared server (bound now if need be); `start`
        starts serving.  Under the lock, so release() cannot stop the
        server in between."""
        with self.lock:
            server = self.serve()
            consumer = server.add_consumer(topic, fanout, proxy, deferred, conn)
            if isinstance(proxy, Deferred):
                proxy.runner.errors = server.handler_error
            if start:
                server.start()
            return consumer

    def plain_handoff(self):
        """Where the methods of a consumer of plain code run when the
        receive loop cannot run them itself (made on first use): under
        eventlet, green threads on the calling thread's hub
        (GreenHandoff); when an event loop leads the server (aio), a pool
        of threads (ThreadHandoff), never the loop.  Else None."""
        with self.lock:
            if self.handoff is None:
                if self.client.green:
                    self.handoff = GreenHandoff(self.options.rpc_thread_pool_size)
                elif self.server is not None and self.server.loop_led:
                    self.handoff = ThreadHandoff(self.options.rpc_thread_pool_size)
            return self.handoff

    def direct_base(self, topic):
        """'topic' for 'topic.<this host>' (rpc_zmq_host), else None."""
        suffix = "." + self.options.rpc_zmq_host
        if topic.endswith(suffix) and len(topic) > len(suffix):
            return topic[:-len(suffix)]
        return None

    def announce(self, conn, topic, fanout):
        """`conn` consumes (topic, fanout): register it on the first."""
        with self.lock:
            holders = self._announced.setdefault((topic, fanout), set())
            holders.add(conn)
            if len(holders) == 1:
                self.backend.register(self.node, topic, fanout)

    def withdraw(self, conn, topic, fanout):
        """`conn` stops consuming (topic, fanout): unregister after the last."""
        with self.lock:
            holders = self._announced.get((topic, fanout))
            if holders is None or conn not in holders:
                return
            holders.discard(conn)
            if not holders:
                del self._announced[(topic, fanout)]
                try:
                    self.backend.unregister(self.node, topic, fanout)
                except Exception as exc:            # noqa: BLE001
                    # Discovery is unreachable: closing goes on (draining,
                    # stopping the server); the entry ages out by its TTL.
                    LOG.warning("could not withdraw %s from discovery: %s", topic, exc)

    def release(self, deadline):
        """Stop the server once no Connection consumes anything: the
        process goes back to no listening socket and no worker threads."""
        with self.lock:
            server = self.server
            if server is None or server.consumers:
                return
            if any(conn._keeps_server for conn in list(self.connections)):
                return                      # its handlers may still reply (stop_consuming)
            self.server = None
            if _listening.get(self.options.port) is self:
                del _listening[self.options.port]
        server.stop(max(0.0, deadline - time.monotonic()))
        if self.node is not None:
            # It handled everything it received, so everything this process
            # sent itself: not "maybe lost" at cleanup, and no PING to wait
            # for from a socket that is gone.
            self.client.confirm_sent(self.node.address)
        self._stop_zap()

    def _stop_zap(self):
        zap, self.zap = self.zap, None
        if zap is not None:
            zap.stop()

    def _server_failed(self):
        # The receive loop died: withdraw from discovery at once, so that
        # nobody keeps sending to a process that no longer answers.
        with self.lock:
            announced, self._announced = list(self._announced), {}
        for topic, fanout in announced:
            try:
                self.backend.unregister(self.node, topic, fanout)
            except Exception:
                LOG.exception("could not withdraw %s", topic)

    # -- connections -------------------------------------------------------------

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
        """Release everything; returns what was sent and never confirmed:
        {address: messages} from the outboxes (see Client.close), and
        {topic: casts} that the courier carried at least once and no server
        acknowledged.  Takes at most three times rpc_zmq_linger: first what
        this process sent is confirmed (while its own server still answers,
        for what it sent itself), then at-least-once casts, then what it
        received is finished.  A shared() runtime closes with its last
        user; until then close() returns {}."""
        if self._shared_key is not None:
            with self._shared_lock:
                entry = self._shared[self._shared_key]
                entry[1] -= 1
                if entry[1]:
                    return {}
                del self._shared[self._shared_key]
        linger = self.options.rpc_zmq_linger
        try:
            lost = self.client.close(linger)
            for topic, n in self.courier.close(linger).items():
                lost[topic] = lost.get(topic, 0) + n
            deadline = time.monotonic() + linger
            for conn in list(self.connections):
                conn._close(deadline)
            self.release(deadline)
            if self.handoff is not None:
                self.handoff.close()
        finally:
            # Whatever failed above, nothing is left open.
            self._close_discovery()
            # Calls other threads still wait on end now (TransportClosed).
            self.client.interrupt(1.0)
            try:
                self.context.term()
            except RuntimeError as exc:     # a server that could not stop
                LOG.error("libzmq context left open: %s", exc)
        return lost

    def _close_discovery(self):
        if self.routes is not None:
            self.routes.close()
        if self.backend is not None:
            self.backend.close()


class Connection:
    """A set of consumers on the runtime's listening socket."""

    def __init__(self, runtime, shared=False):
        self._rt = runtime
        self._shared = shared
        self._consumers = []                # _dispatch.Consumer
        self._created_for = {}              # Consumer -> the topic create_consumer() named
        self._runners = set()               # each `runner` given to create_consumer()
        self._consuming = False
        self._closing = False
        self._keeps_server = False          # stop_consuming(): the server stays until close()
        self._closed = threading.Event()    # set once fully closed
        self._lock = threading.Lock()

    def _check_open(self):
        if self._closing:
            raise InvalidRPCConnectionReuse()

    @property
    def address(self):
        """The endpoint peers use to reach this process."""
        server = self._rt.server
        return server.address if server is not None and self._consumers else None

    def create_consumer(self, topic, proxy, fanout=False, deferred=False, runner=None):
        """Consume `topic` with `proxy` (an RpcDispatcher, an object whose
        methods are called as method(ctxt, **args), or a callable called as
        proxy(ctxt, msg)).  fanout=True receives fanout_cast()s instead.
        deferred=True: proxy(ctxt, msg, replier) answers calls later through
        the replier (used by the oslo.messaging driver).  Under eventlet
        the proxy's methods run in green threads (_handoff); `runner`
        (something with wrap(topic, proxy), such as aio's) runs them
        elsewhere."""
        check_topic(topic)
        if proxy is None:
            raise TypeError("proxy must not be None")
        fanout = bool(fanout)
        # As in the 2012 driver, which consumed on the base topic name: a
        # direct consumer of 'topic.<this host>' also serves 'topic'.
        # (oslo.messaging's servers, deferred, consume what their targets name.)
        topics = [topic]
        base = self._rt.direct_base(topic)
        if base and not fanout and not deferred:
            topics.append(base)
        handoff = None if deferred else (runner or self._rt.plain_handoff())
        with self._lock:
            self._check_open()
            if runner is not None:
                self._runners.add(runner)
            for name in topics:
                target = proxy if handoff is None else handoff.wrap(topic, proxy)
                consumer = self._rt.add_consumer(self, name, fanout, target,
                                                 deferred or handoff is not None,
                                                 start=self._consuming)
                self._consumers.append(consumer)
                self._created_for[consumer] = topic
                if self._consuming:
                    self._rt.announce(self, name, fanout)

    def consume_in_thread(self):
        """Start serving and announce the consumers.  Worker threads serve,
        or under eventlet the hub itself if it is the first to serve."""
        with self._lock:
            self._check_open()
            if self._consuming:
                return
            if self._consumers:
                server = self._rt.serve()
                if self._rt.client.green and self._rt.handoff is not None:
                    self._rt.handoff.lead(server)       # the hub serves, if first
                server.start()                          # else worker threads
            for consumer in self._consumers:
                self._rt.announce(self, consumer.topic, consumer.fanout)
            self._consuming = True

    def wait(self):
        """Block until the connection is closed (by another thread, or a
        signal handler: this thread holds no lock while it waits, so a
        handler that calls close() on it cannot wait for itself)."""
        while not self._closed.is_set():
            time.sleep(0.05)

    def close(self):
        """Stop consuming: withdraw from discovery, finish the queued work
        (bounded by rpc_zmq_linger), release what is no longer used.
        Returns False if some of that work was still running or queued at
        the bound (the server's stats() count what it then refused or
        dropped), True otherwise."""
        return self._close(time.monotonic() + self._rt.options.rpc_zmq_linger)

    def _close(self, deadline):
        with self._lock:
            first = not self._closing
            self._closing = True
            consumers, self._consumers = self._consumers, []
        if not first:                       # another thread is closing it
            return self._closed.wait(max(0.0, deadline - time.monotonic()))
        try:
            return self._stop(consumers, deadline)
        finally:
            self._rt.connections.discard(self)
            self._rt.release(deadline)
            self._closed.set()

    def _stop(self, consumers, deadline):
        """Withdraw and drain `consumers`; True if their work finished."""
        finished = True
        if not consumers:
            return finished
        with self._lock:
            kept = {(c.topic, c.fanout) for c in self._consumers}
        for consumer in consumers:
            # Nova consumes 'compute' and 'compute.<host>' (which also serves
            # 'compute'): removing the second must not withdraw the first.
            if (consumer.topic, consumer.fanout) not in kept:
                self._rt.withdraw(self, consumer.topic, consumer.fanout)
        server = self._rt.server
        if server is not None:
            finished = server.drain(consumers, max(0.0, deadline - time.monotonic()))
        # Handed-off work: the runtime's handoff holds every connection's
        # (what is queued is not tied to one; a short, bounded wait either
        # way), a runner of this connection's own (an event loop) its own.
        for handoff in (self._rt.handoff, *self._runners):
            if handoff is not None:
                finished = handoff.wait_idle(max(0.0, deadline - time.monotonic())) and finished
        return finished

    def remove_consumer(self, topic, fanout=False):
        """Stop consuming `topic`: withdraw it from discovery first."""
        fanout = bool(fanout)
        with self._lock:
            gone = [c for c in self._consumers
                    if self._created_for.get(c) == topic and c.fanout == fanout]
            self._consumers = [c for c in self._consumers if c not in gone]
        self._stop(gone, time.monotonic() + self._rt.options.rpc_zmq_linger)

    def stop_consuming(self):
        """Stop consuming every topic, as remove_consumer() does one: each
        is withdrawn from discovery first, then drained.  Afterwards a call
        that still arrives (sent on a route cached before) is refused, and
        its caller tries another server; a cast or notification is dropped
        and counted in the server's stats().  The listening socket stays up
        until close(), so that handlers still running (a deferred
        consumer's) can send their replies."""
        with self._lock:
            consumers, self._consumers = self._consumers, []
            if consumers:
                self._keeps_server = True
        self._stop(consumers, time.monotonic() + self._rt.options.rpc_zmq_linger)

    def stats(self):
        server = self._rt.server
        counters = server.stats() if server is not None else {}
        zap = self._rt.zap
        if zap is not None:
            counters.update(curve_accepted=zap.accepted, curve_refused=zap.refused)
        return dict(counters, address=self.address,
                    topics=sorted(f"{c.topic}{' (fanout)' if c.fanout else ''}"
                                  for c in self._consumers))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
