"""The calling side: cast, fanout, notify, call and multicall.

Each calling thread owns one ROUTER socket (its *outbox*), connected to every
peer that thread has talked to.  A server announces its advertised address
as its ZeroMQ routing id, so a request goes out as [peer address, header,
body]; the server answers on the same connection, so the reply comes back to
the very thread that waits for it: no reply-dispatcher thread and no
hand-off, and the round trip has the same hops as a raw REQ/REP exchange.
Sockets live as long as their thread (or until cleanup()), never one per
message.

Delivery: outboxes set ZMQ_IMMEDIATE and ZMQ_ROUTER_MANDATORY, so a message
only ever enters the queue of an established connection.  A peer not yet
connected (or whose connection dropped) is waited for, GIL released, up to
rpc_zmq_connect_timeout; then the send fails loudly (PeerUnreachable), and a
cast or call to a topic moves on to another consumer.  When a peer's queue
is full a send blocks for up to rpc_cast_timeout, then raises Timeout.  No
message is dropped silently, and closing an outbox with a linger flushes
what it queued.
"""
import logging
import select
import threading
import time
import weakref

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec

from nova_zmq_fast._libzmq cimport *
from nova_zmq_fast._zmq cimport Context, check, fork_epoch, raise_zmq_error, set_int
from nova_zmq_fast._envelope cimport *

from nova_zmq_fast.exceptions import (
    InvalidMessage, MalformedEnvelope, MessageTooLarge, NoListeners,
    PeerUnreachable, RPCException, SerializationError, Timeout)

cdef object _get_ident = threading.get_ident
LOG = logging.getLogger("nova_zmq_fast.client")

cdef enum Delivery:                 # how request() treats its endpoints
    ONE_OF                          # a topic: one of them, the next if one is unreachable
    EACH                            # a fanout: every one that can be reached
    EXACTLY                         # named by the caller: each, or an error

# How long a consumer that could not be reached is skipped by this process
# (discovery notices a dead one within about a second anyway).
cdef double DOWN_FOR = 2.0


cdef inline double _monotonic() noexcept nogil:
    # The clock time.monotonic() reads, without a Python call.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline dict context_dict(object context):
    """The wire form of a request context: a dict, or an object's to_dict()."""
    if context is None:
        return {}
    if type(context) is dict:
        return <dict>context
    to_dict = getattr(context, "to_dict", None)
    if to_dict is None:
        if isinstance(context, dict):
            return dict(context)
        raise TypeError(f"context must be a dict or have to_dict(), "
                        f"not {type(context).__name__}")
    values = to_dict()
    if not isinstance(values, dict):
        raise TypeError("context.to_dict() must return a dict")
    return values


cdef inline object method_of(object msg):
    """Validate an RPC message, {'method': str, 'args': dict, ...}."""
    if not isinstance(msg, dict):
        raise InvalidMessage(f"message must be a dict, not {type(msg).__name__}")
    method = (<dict>msg).get("method")
    if not isinstance(method, str) or not method:
        raise InvalidMessage("message needs a non-empty 'method' string")
    args = (<dict>msg).get("args")
    if args is not None and not isinstance(args, dict):
        raise InvalidMessage("message 'args' must be a dict")
    return method


@cython.final
cdef class Outbox:
    """One thread's calling socket (see the module docstring)."""
    cdef Context ctx
    cdef void *sock
    cdef int epoch
    cdef set peers                  # addresses this outbox connects to
    cdef uint64_t last_id
    cdef object packer
    cdef long forgotten_seen        # discovery's forget counter, last seen
    cdef dict streams               # msg_id -> list: replies for open multicalls
    cdef int linger_ms              # for messages still queued when the thread ends
    cdef bint green                 # wait cooperatively (eventlet), never in libzmq
    cdef object __weakref__

    def __cinit__(self, Context ctx not None, int send_timeout_ms, int linger_ms,
                  bint green=False):
        self.ctx = ctx
        self.linger_ms = linger_ms
        self.green = green
        self.epoch = fork_epoch()
        self.sock = ctx.socket(ZMQ_ROUTER)
        self.peers = set()
        self.streams = {}
        self.packer = new_packer()
        self.last_id = 0
        self.forgotten_seen = 0
        try:
            set_int(self.sock, ZMQ_ROUTER_MANDATORY, 1)
            set_int(self.sock, ZMQ_IMMEDIATE, 1)
            set_int(self.sock, ZMQ_ROUTER_HANDOVER, 1)
            set_int(self.sock, ZMQ_SNDTIMEO, send_timeout_ms)
            set_int(self.sock, ZMQ_IPV6, 1)
            set_int(self.sock, ZMQ_LINGER, 0)
        except BaseException:
            self.close(0)
            raise

    cdef void close(self, int linger_ms) noexcept:
        if self.sock != NULL:
            if self.epoch == fork_epoch():
                self.ctx.close_socket(self.sock, linger_ms)
            self.sock = NULL

    def __dealloc__(self):
        # The owning thread ended: nothing else uses the socket any more.
        # What it queued still leaves, within the linger, in the background.
        self.close(self.linger_ms)

    cdef int connect(self, bytes address) except -1:
        if address not in self.peers:
            check(zmq_connect(self.sock, address))
            self.peers.add(address)
        return 0

    cdef forget_peers(self, object matchmaker):
        """Disconnect from peers discovery has declared dead, dropping
        whatever was queued for them."""
        self.forgotten_seen = matchmaker.forgotten_count
        dead = matchmaker.forgotten
        for address in [a for a in self.peers if a.decode() in dead]:
            zmq_disconnect(self.sock, address)
            self.peers.discard(address)

    cdef int send(self, bytes address, const char *header, size_t hlen,
                  bytes body, double timeout, double connect_timeout) except -1:
        """Send one request to the peer at `address` (also its routing id).

        If there is no established connection to it yet, connect and wait
        for one, up to `connect_timeout` (PeerUnreachable).  If its queue
        is full, block up to `timeout` (Timeout).  The GIL is released
        while waiting."""
        cdef int rc, err
        cdef int timeout_ms
        cdef double deadline = 0, connect_deadline = 0
        cdef long pause_ns = 20000
        cdef timespec pause
        cdef const char *r = PyBytes_AS_STRING(address)
        cdef size_t rlen = PyBytes_GET_SIZE(address)
        rc = zmq_send(self.sock, r, rlen, ZMQ_SNDMORE | ZMQ_DONTWAIT)
        while rc == -1:
            err = zmq_errno()
            if err == EHOSTUNREACH:
                # Not connected (yet, or any more): wait for the connection.
                self.connect(address)
                if connect_deadline == 0:
                    connect_deadline = _monotonic() + connect_timeout
                elif _monotonic() >= connect_deadline:
                    raise PeerUnreachable(f"no connection to {address.decode()} "
                                          f"within {connect_timeout:g}s")
                if self.green:
                    time.sleep(pause_ns * 1e-9)     # patched: yields to other greenlets
                else:
                    pause.tv_sec = 0
                    pause.tv_nsec = pause_ns
                    with nogil:
                        nanosleep(&pause, NULL)
                pause_ns = min(pause_ns * 2, 5000000)
                rc = zmq_send(self.sock, r, rlen, ZMQ_SNDMORE | ZMQ_DONTWAIT)
                continue
            if err == EINTR:
                PyErr_CheckSignals()
            elif err != EAGAIN:
                raise_zmq_error(err)
            # The peer's queue is full: wait for room, up to `timeout`.
            if deadline == 0:
                deadline = _monotonic() + timeout
            timeout_ms = <int>((deadline - _monotonic()) * 1000)
            if timeout_ms <= 0:
                raise Timeout("send queue to peer is full", None, None)
            if self.green:
                time.sleep(0.001)
                rc = zmq_send(self.sock, r, rlen, ZMQ_SNDMORE | ZMQ_DONTWAIT)
                continue
            set_int(self.sock, ZMQ_SNDTIMEO, timeout_ms)
            with nogil:
                rc = zmq_send(self.sock, r, rlen, ZMQ_SNDMORE)
        # The routing frame went through: the rest of the message cannot
        # block or fail on the high-water mark.
        check(zmq_send(self.sock, header, hlen, ZMQ_SNDMORE))
        check(zmq_send(self.sock, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), 0))
        return 0

    cdef tuple wait_reply(self, uint64_t msg_id, double deadline):
        """Wait for the next reply to `msg_id`: (kind, body bytes), or None
        at the deadline.  Replies for other open multicall streams are kept
        for them; stale ones (calls that already timed out) are dropped."""
        cdef zmq_msg_t part
        cdef Header h
        cdef int nparts, status
        cdef bytes body
        cdef list pending = self.streams.get(msg_id)
        if pending:
            return pending.pop(0)
        zmq_msg_init(&part)
        try:
            while True:
                if not self.next_frame(&part, deadline):
                    return None
                # [peer, header, body]
                nparts = 1
                status = HDR_SHORT
                body = None
                while zmq_msg_more(&part):
                    check(zmq_msg_recv(&part, self.sock, 0))
                    nparts += 1
                    if nparts == 2:
                        status = parse_header(<const char *>zmq_msg_data(&part),
                                              zmq_msg_size(&part), &h)
                    elif nparts == 3:
                        body = (<const char *>zmq_msg_data(&part))[:zmq_msg_size(&part)]
                if nparts != 3 or status != HDR_OK or not is_reply(h.kind):
                    continue
                if h.msg_id == msg_id:
                    return (h.kind, body)
                pending = self.streams.get(h.msg_id)
                if pending is not None:
                    pending.append((h.kind, body))
        finally:
            zmq_msg_close(&part)

    cdef bint next_frame(self, zmq_msg_t *part, double deadline) except -1:
        """Receive the first frame of the next message, waiting until
        `deadline`; False if none came.

        Natively this is one blocking zmq_msg_recv with ZMQ_RCVTIMEO and the
        GIL released: the same path as a REQ socket's, with no zmq_poll.
        Green (eventlet), it waits on the socket's ZMQ_FD with select(),
        which eventlet makes cooperative, so the hub never blocks."""
        cdef int rc, err, events
        cdef long timeout_ms
        cdef size_t size = sizeof(int)
        cdef int fd
        cdef double left
        while True:
            if self.green:
                if zmq_msg_recv(part, self.sock, ZMQ_DONTWAIT) != -1:
                    return True
                if zmq_errno() not in (EAGAIN, EINTR):
                    raise_zmq_error(zmq_errno())
                left = deadline - _monotonic()
                if left <= 0:
                    return False
                # ZMQ_FD is edge-triggered: look at ZMQ_EVENTS before sleeping.
                check(zmq_getsockopt(self.sock, ZMQ_EVENTS, &events, &size))
                if events & ZMQ_POLLIN:
                    continue
                size = sizeof(int)
                check(zmq_getsockopt(self.sock, ZMQ_FD, &fd, &size))
                select.select([fd], [], [], min(left, 0.05))
                continue
            timeout_ms = <long>((deadline - _monotonic()) * 1000.0 + 0.999)
            if timeout_ms <= 0:
                return False
            set_int(self.sock, ZMQ_RCVTIMEO, <int>min(timeout_ms, 2000000000))
            with nogil:
                rc = zmq_msg_recv(part, self.sock, 0)
            if rc != -1:
                return True
            err = zmq_errno()
            if err == EINTR:
                PyErr_CheckSignals()
            elif err != EAGAIN:
                raise_zmq_error(err)


@cython.final
cdef class ReplyStream:
    """The iterator multicall() returns: yields each value as the server
    produces it; ends at the server's explicit end-of-stream."""
    cdef Client client
    cdef Outbox outbox
    cdef uint64_t msg_id
    cdef double timeout
    cdef object topic, method
    cdef long thread
    cdef bint done

    def __cinit__(self):
        self.done = True                # until multicall() fills it in

    def __iter__(self):
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        if _get_ident() != self.thread:
            raise RuntimeError("a multicall stream must be read by the thread that made the call")
        while True:
            reply = self.outbox.wait_reply(self.msg_id, _monotonic() + self.timeout)
            if reply is None:
                self.finish()
                self.client.timeouts += 1
                raise Timeout(None, self.topic, self.method)
            if reply[0] != KIND_HEARTBEAT:         # a heartbeat restarts the wait
                break
        kind, body = reply
        if kind == KIND_CHUNK:
            return self.client.decode_value(body)
        self.finish()
        if kind == KIND_END:
            raise StopIteration
        if kind == KIND_FAILURE:
            raise self.client.decode_failure(body)
        return self.client.decode_value(body)           # KIND_RESULT: last value

    cdef finish(self):
        self.done = True
        if self.outbox is not None:
            self.outbox.streams.pop(self.msg_id, None)

    def close(self):
        """Stop listening; later replies for this stream are dropped."""
        if not self.done:
            self.finish()

    def __del__(self):
        self.close()


cdef class Client:
    """Everything a process needs to send: discovery, the per-thread outboxes
    and the counters.  One per process, made by nova_zmq_fast.rpc."""
    cdef Context ctx
    cdef object matchmaker
    cdef dict routes                # the matchmaker's route caches, read directly
    cdef dict fanout_routes
    cdef object tls
    cdef object outboxes
    cdef dict rr
    cdef int send_timeout_ms
    cdef int linger_ms
    cdef readonly double connect_timeout
    cdef dict down                  # address -> time until which it is skipped
    cdef readonly bint green
    cdef readonly double send_timeout
    cdef readonly double response_timeout
    cdef readonly Py_ssize_t max_message_size
    cdef object rebuild_exception
    cdef bint closed
    cdef public unsigned long long casts, calls, fanouts, notifies, timeouts
    cdef public unsigned long long no_listeners, notifications_dropped, fanout_unreachable

    def __cinit__(self, Context ctx not None, matchmaker, *, double send_timeout,
                  double response_timeout, Py_ssize_t max_message_size,
                  rebuild_exception, double linger=5.0, double connect_timeout=2.0,
                  bint green=False):
        self.ctx = ctx
        self.matchmaker = matchmaker
        self.routes = matchmaker.routes
        self.fanout_routes = matchmaker.fanout_routes
        self.tls = threading.local()
        self.outboxes = weakref.WeakSet()
        self.rr = {}
        self.send_timeout = send_timeout
        self.send_timeout_ms = max(1, <int>(send_timeout * 1000))
        self.response_timeout = response_timeout
        self.linger_ms = <int>(linger * 1000)
        self.connect_timeout = connect_timeout
        self.down = {}
        self.green = green
        self.max_message_size = max_message_size
        self.rebuild_exception = rebuild_exception

    cdef Outbox outbox(self):
        """This thread's outbox; it is closed when the thread ends."""
        cdef Outbox ob = getattr(self.tls, "outbox", None)
        if ob is None or ob.epoch != fork_epoch() or ob.sock == NULL:
            if self.closed:
                raise RPCException("this RPC client was cleaned up")
            ob = Outbox(self.ctx, self.send_timeout_ms, self.linger_ms, self.green)
            ob.forgotten_seen = self.matchmaker.forgotten_count
            self.tls.outbox = ob
            self.outboxes.add(ob)
        elif ob.forgotten_seen != self.matchmaker.forgotten_count:
            ob.forget_peers(self.matchmaker)
        return ob

    cdef bytes encode(self, Outbox ob, object context, object msg):
        cdef bytes body
        try:
            body = ob.packer.pack([context_dict(context), msg])
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"message cannot be encoded with msgpack: {exc}") from None
        if PyBytes_GET_SIZE(body) > self.max_message_size:
            raise MessageTooLarge(f"message is {PyBytes_GET_SIZE(body)} bytes; "
                                  f"rpc_zmq_max_message_size is {self.max_message_size}")
        return body

    cdef tuple route(self, object topic, bint fanout=False):
        entry = (self.fanout_routes if fanout else self.routes).get(topic)
        if entry is not None and <double>(<tuple>entry)[0] > _monotonic():
            return <tuple>(<tuple>entry)[1]
        if fanout:
            return self.matchmaker.lookup_fanout(topic)
        return self.matchmaker.lookup(topic)

    cdef tuple live(self, tuple endpoints):
        """`endpoints` without those that just failed to connect."""
        if not self.down:
            return endpoints
        now = _monotonic()
        for address, until in list(self.down.items()):
            if until <= now:
                del self.down[address]
        return tuple(ep for ep in endpoints if ep.address not in self.down)

    cdef object pick(self, tuple endpoints, object topic, object method):
        """One endpoint, round-robin over the live consumers."""
        endpoints = self.live(endpoints)
        cdef Py_ssize_t n = len(endpoints), i
        if n == 0:
            self.no_listeners += 1
            raise NoListeners(None, topic, method)
        if n == 1:
            return endpoints[0]
        i = self.rr.get(topic, 0)
        self.rr[topic] = i + 1
        return endpoints[i % n]

    cdef int request(self, int kind, int flags, int delivery, object endpoints,
                     object context, const char *t, Py_ssize_t tlen, object msg,
                     uint64_t msg_id, Outbox ob, object topic=None,
                     object method=None) except -1:
        """Encode once, then send.  Everything that can be wrong with the
        arguments has raised before the first byte leaves.  `delivery`
        says what to do with `endpoints` (see Delivery); an endpoint that
        cannot be reached is skipped by this process for DOWN_FOR seconds."""
        cdef char header[MAX_HEADER]
        cdef bytes body = self.encode(ob, context, msg)
        cdef size_t hlen = write_header(header, kind, flags, msg_id, t, tlen)
        if delivery == EXACTLY:
            for ep in endpoints:
                ob.send(ep.rid, header, hlen, body, self.send_timeout, self.connect_timeout)
            return 0
        if delivery == EACH:
            for ep in self.live(endpoints):
                try:
                    ob.send(ep.rid, header, hlen, body, self.send_timeout,
                            self.connect_timeout)
                except PeerUnreachable:
                    self.down[ep.address] = _monotonic() + DOWN_FOR
                    self.fanout_unreachable += 1
                    LOG.warning("fanout to %s skipped %s: not reachable", topic, ep.address)
            return 0
        while True:
            ep = self.pick(endpoints, topic, method)
            try:
                ob.send(ep.rid, header, hlen, body, self.send_timeout, self.connect_timeout)
                return 0
            except PeerUnreachable:
                self.down[ep.address] = _monotonic() + DOWN_FOR

    # -- public operations -------------------------------------------------

    def cast(self, context, topic, msg):
        """Send to one consumer of `topic` (round-robin); no reply."""
        cdef const char *t
        cdef Py_ssize_t tlen
        topic_utf8(topic, &t, &tlen)
        method = method_of(msg)
        cdef Outbox ob = self.outbox()
        self.request(KIND_CAST, 0, ONE_OF, self.route(topic), context, t, tlen, msg, 0, ob,
                     topic, method)
        self.casts += 1

    def cast_to(self, endpoints, context, topic, msg, bint fanout=False):
        """Send to the given endpoints, bypassing discovery."""
        cdef const char *t
        cdef Py_ssize_t tlen
        topic_utf8(topic, &t, &tlen)
        method_of(msg)
        cdef Outbox ob = self.outbox()
        self.request(KIND_FANOUT if fanout else KIND_CAST, 0, EXACTLY, tuple(endpoints),
                     context, t, tlen, msg, 0, ob)
        self.casts += 1

    def fanout_cast(self, context, topic, msg):
        """Send to every consumer registered with fanout=True on `topic`,
        once each.  With none registered, nothing is sent; one that cannot
        be reached is skipped (logged and counted), the others still get it."""
        cdef const char *t
        cdef Py_ssize_t tlen
        topic_utf8(topic, &t, &tlen)
        method_of(msg)
        cdef Outbox ob = self.outbox()
        endpoints = self.route(topic, True)
        self.request(KIND_FANOUT, 0, EACH, endpoints, context, t, tlen, msg, 0, ob, topic)
        self.fanouts += 1
        return len(endpoints)

    def notify(self, context, topic, msg):
        """Deliver a notification (any dict) to one consumer of `topic`.
        With no consumer it is dropped and counted: notifications are
        best-effort, as with the original driver."""
        cdef const char *t
        cdef Py_ssize_t tlen
        topic_utf8(topic, &t, &tlen)
        if not isinstance(msg, dict):
            raise InvalidMessage(f"notification must be a dict, not {type(msg).__name__}")
        cdef Outbox ob = self.outbox()
        try:
            self.request(KIND_NOTIFY, 0, ONE_OF, self.route(topic), context, t, tlen, msg, 0,
                         ob, topic, None)
        except NoListeners:
            self.no_listeners -= 1                  # counted as a dropped notification
            self.notifications_dropped += 1
            return False
        self.notifies += 1
        return True

    cdef uint64_t send_call(self, Outbox ob, object context, object topic, object msg,
                            int flags) except? 0:
        """Validate and send a CALL; returns its msg_id."""
        cdef const char *t
        cdef Py_ssize_t tlen
        topic_utf8(topic, &t, &tlen)
        method = method_of(msg)
        ob.last_id += 1
        self.request(KIND_CALL, flags, ONE_OF, self.route(topic), context, t, tlen, msg,
                     ob.last_id, ob, topic, method)
        self.calls += 1
        return ob.last_id

    def call(self, context, topic, msg, timeout=None, monitor_timeout=None):
        """Send to one consumer and wait for its result (or exception).

        With `monitor_timeout`, the call also fails when the server has
        sent neither the result nor a heartbeat for that long (oslo.messaging's
        call monitor); heartbeats let a long call run up to `timeout`."""
        cdef double wait = self.check_timeout(timeout)
        cdef double monitor = self.check_timeout(monitor_timeout) if monitor_timeout else 0
        cdef Outbox ob = self.outbox()
        cdef uint64_t msg_id = self.send_call(ob, context, topic, msg, 0)
        cdef double deadline = _monotonic() + wait
        cdef double alive_until
        while True:
            alive_until = deadline if monitor == 0 else min(deadline, _monotonic() + monitor)
            reply = ob.wait_reply(msg_id, alive_until)
            if reply is None:
                self.timeouts += 1
                if alive_until < deadline:
                    raise Timeout(f"no heartbeat for {monitor:g}s", topic, msg["method"])
                raise Timeout(None, topic, msg["method"])
            if reply[0] != KIND_HEARTBEAT:
                break
        kind, body = reply
        if kind == KIND_FAILURE:
            raise self.decode_failure(body)
        if kind == KIND_END:
            return None
        return self.decode_value(body)

    def multicall(self, context, topic, msg, timeout=None):
        """Like call, but returns an iterator over every value the remote
        method yields, each delivered as soon as it is produced.  `timeout`
        bounds the wait for each value."""
        cdef double wait = self.check_timeout(timeout)
        cdef Outbox ob = self.outbox()
        cdef uint64_t msg_id = self.send_call(ob, context, topic, msg, FLAG_MULTI)
        cdef ReplyStream stream = ReplyStream.__new__(ReplyStream)
        stream.msg_id = msg_id
        stream.client = self
        stream.outbox = ob
        stream.timeout = wait
        stream.topic = topic
        stream.method = msg["method"]
        stream.thread = _get_ident()
        stream.done = False
        ob.streams[stream.msg_id] = []
        return stream

    # -- helpers -----------------------------------------------------------

    cdef double check_timeout(self, timeout) except -1:
        if timeout is None:
            return self.response_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        return timeout

    cdef object decode_value(self, bytes body):
        try:
            return unpack(PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        except MalformedEnvelope as exc:
            raise RPCException(f"malformed reply: {exc}") from None

    cdef object decode_failure(self, bytes body):
        return self.rebuild_exception(self.decode_value(body))

    def stats(self):
        return {
            "casts": self.casts, "calls": self.calls, "fanouts": self.fanouts,
            "notifies": self.notifies, "timeouts": self.timeouts,
            "no_listeners": self.no_listeners,
            "notifications_dropped": self.notifications_dropped,
            "fanout_unreachable": self.fanout_unreachable,
            "outboxes": len(self.outboxes),
        }

    def close(self, double linger=0.0):
        """Close every thread's outbox.  Queued messages get `linger`
        seconds to leave.  Must not race with calls still in progress."""
        self.closed = True
        cdef Outbox ob
        cdef int linger_ms = <int>(linger * 1000)
        for ob in list(self.outboxes):
            ob.close(linger_ms)
        self.tls = threading.local()
