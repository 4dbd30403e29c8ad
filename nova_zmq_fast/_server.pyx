"""The serving side: the receive loop of the process's one listening socket.

A Server owns one bound ROUTER socket, shared by every Connection of its
Runtime: a process is one address in discovery, and announces that address
as its routing id.  Requests arrive as
[caller identity, header, body]; the topic names a Subscription (every
local consumer of it, see _dispatch.pyx); replies leave on the same socket
with the same identity, straight back to the waiting thread's outbox.

Workers follow a lazy leader/follower scheme (csrc/leader.h): the worker
holding the token receives a message and runs the handler itself, in its own
thread, then goes back to the socket.  A fast request therefore costs no
thread hand-off, and a burst is drained with the GIL held and no system call
per message.  If a handler runs longer than `patience`, a standby worker
takes the token and keeps serving, so a slow method never blocks the
others; the pool grows up to rpc_thread_pool_size workers.

When the queue is empty the leader waits in one blocking zmq_msg_recv on
that one socket, GIL released, exactly as a REP server would (no zmq_poll,
no second socket to check).  Anything else that must reach the leader (a
stop request, or a reply from a worker that lost the token or from a
deferred consumer answering later) is sent *into* the ROUTER by an inproc
DEALER whose routing id is a random secret; the leader recognises it by
that id and forwards the reply.  The leader never waits to send: a caller
that is gone, or whose queue is full, loses the reply (counted).  Other
threads do wait, for room in the control socket's queue, up to
rpc_cast_timeout: a leader stuck in a handler holds their replies back
instead of losing them.

A multicall streams its values as CHUNKs, then END.  Once a CHUNK is lost
(the caller reads more slowly than the server yields, and its queue of
ZMQ_SNDHWM replies is full), the stream is *broken*: its later CHUNKs are
dropped too, so that the caller never sees a gap, and its end (END, or a
last value sent as RESULT) goes as a FAILURE (StreamTruncated).  A value
over rpc_zmq_max_message_size is never sent: it breaks its stream the same
way, and the end's FAILURE is MessageTooLarge.  "Later"
in the stream's order, not the clock's: replies handed to the control
socket wait there for the leader, so what is queued ahead of a loss still
goes, what is queued behind one does not, and the end is settled only
where it leaves for the caller, behind them all.  A caller
therefore gets every value up to the first lost one and then that
failure, or, when the FAILURE finds its queue still full, a Timeout: never
a stream that ends normally without all its values.  (Holding the
generator back instead cannot work: after `patience` its values go
through the leader, which must not wait for one caller.)

Bad input never stops the loop: a message with the wrong frame count, a bad
header, an unknown version, an oversized body, undecodable msgpack or a
topic this node does not serve is dropped and counted in `stats()`.  If its
header was readable and it was a CALL, the caller also gets an answer at
once instead of waiting for its timeout: FAILURE, or REFUSED for a topic
not served here (the call did not run, so the caller may try another
server).  Whatever a handler raises, BaseException included, becomes a
FAILURE (or, for a cast, a logged error) and the loop serves on.
"""
import collections
import itertools
import logging
import os
import time

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.pythread cimport PyThread_get_thread_ident
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcmp, memcpy

from nova_zmq_fast._libzmq cimport *
from nova_zmq_fast._zmq cimport (
    PAUSE_MIN_NS, Context, check, fork_epoch, ms_until, now as _now, pause, raise_zmq_error,
    set_int)
from nova_zmq_fast._envelope cimport *
from nova_zmq_fast._dispatch cimport PROXY_DEFERRED, Consumer, RpcContext, Subscription
from nova_zmq_fast._routes cimport host_base_len

from nova_zmq_fast import __version__
from nova_zmq_fast._curve import ZAP_DOMAIN
from nova_zmq_fast._green import unpatched
from nova_zmq_fast.logs import RateLimitedLog
from nova_zmq_fast.exceptions import (
    ClientException, KeyRevoked, MalformedEnvelope, MessageTooLarge, SerializationError,
    StreamTruncated, UnsupportedRpcVersion, expected)

LOG = logging.getLogger("nova_zmq_fast.server")
PEERS_LOG = RateLimitedLog(LOG)


def log_handler_error(topic, method, exc):
    """Log the error of a handler that no caller is told of (a cast's, a
    notification's).  Peers can cause these by the thousand: at a bounded
    rate per topic, with the traceback of the first of each interval.
    An exception the method declared expected (client_exceptions) is not
    an error of the service."""
    if isinstance(exc, ClientException):
        LOG.debug("expected exception handling %s on topic %s: %r", method, topic, expected(exc))
        return
    PEERS_LOG.error(("handler", topic), "error handling %s on topic %s", method, topic,
                    exc_info=(type(exc), exc, exc.__traceback__))


cdef extern from "Python.h":
    bint PyGen_Check(object o)

cdef object _monotonic = time.monotonic
cdef object _control_names = itertools.count()


cdef enum:
    SECRET_LEN = 16
    MAX_PARTS = 5                   # a forwarded reply: secret, FWD, identity, header, body

cdef enum Received:                 # what _recv() found
    GOT_NOTHING = 0                 # timed out (only when a timeout was given)
    GOT_REQUEST = 1                 # a valid request in parts[0..2]
    GOT_DROPPED = 2                 # a bad message, dropped and counted
    GOT_CONTROL = 3                 # a forwarded reply, already sent on
    GOT_STOP = 4

cdef enum Sent:                     # what one attempt to send a reply did (_try_send)
    REPLY_SENT = 0                  # onto the caller's connection
    REPLY_HANDED = 1                # into the control socket, for the leader to forward
    REPLY_DROPPED = 2               # the caller is gone or full, or the server closed
    CONTROL_FULL = 3                # the control socket's queue is full: try again

_COUNTER_NAMES = (
    "received", "handled", "replies", "handler_errors",
    "dropped_frame_count", "dropped_bad_header", "dropped_version",
    "dropped_oversize", "dropped_bad_body", "dropped_unknown_topic",
    "dropped_revoked", "replies_undeliverable", "acks", "duplicates", "pings",
    "replies_delayed", "replies_handoff_timeout", "streams_truncated",
    "replies_too_large",
)
# Handled at-least-once casts remembered at most (see Seen): about 190
# bytes each, 75 MB.
SEEN_MAX = 400000
# Broken streams remembered until their end (a deferred consumer may never
# end one): the oldest are forgotten past this.
BROKEN_MAX = 1024


@cython.final
@cython.no_gc_clear                 # __dealloc__ reads its fields
cdef class Replier:
    """Answers one call later, from any thread (the oslo.messaging driver
    hands requests to its executor and replies from there).  The reply goes
    through the server's control socket to whichever worker leads, or
    straight out from the thread that received the request while that
    thread still leads (an event loop that leads the server, or a worker
    whose consumer answered at once).

    Released unanswered (its work dropped: an executor shut down, a
    listener stopped with requests queued), it abandons its request."""

    def __init__(self, *args, **kwargs):
        raise TypeError("Replier is not supposed to be instantiated from Python")

    def __dealloc__(self):
        if not self.done and self.cast and self.server is not None:
            self._abandon()

    def abandon(self):
        """This request will not be answered: an at-least-once cast is
        forgotten, so that its sender's resend runs it (a call is left to
        its caller's timeout)."""
        self._check()
        self._abandon()

    def result(self, value):
        """The final value (of an at-least-once cast: its handler is done,
        and the ACK goes)."""
        if self.cast:
            self._acknowledge()
            return
        self._send(KIND_RESULT, _packb(value))

    def failure(self, payload):
        """The call failed; `payload` is the serialized exception.  (An
        at-least-once cast whose handler raised counts as handled: ACK.)"""
        if self.cast:
            self._acknowledge()
            return
        self._send(KIND_FAILURE, _packb(payload))

    def chunk(self, value):
        """One value of a multicall's stream, sent at once (see `multi`)."""
        self._check()
        if not self.multi:
            raise RuntimeError("only a multicall's replier streams values")
        if not self.done:
            self.server._send_reply(self._gen(), PyBytes_AS_STRING(self.identity),
                                    PyBytes_GET_SIZE(self.identity), KIND_CHUNK,
                                    self.msg_id, _packb(value))

    def end(self):
        """The end of a multicall's stream."""
        if self.cast:
            self._acknowledge()
            return
        self._send(KIND_END, b"")

    def heartbeat(self):
        """The call is still running (restarts the caller's call monitor).
        Nothing for an at-least-once cast: its sender waits for the ACK."""
        self._check()
        if not self.done and not self.cast:
            self.server._send_reply(self._gen(), PyBytes_AS_STRING(self.identity),
                                    PyBytes_GET_SIZE(self.identity), KIND_HEARTBEAT,
                                    self.msg_id, b"")

    cdef _check(self):
        if self.server is None or self.identity is None:
            raise RuntimeError("this Replier is not bound to a call")

    cdef _acknowledge(self):
        self._check()
        if not self.done:
            self.done = True
            self.server._ack(self._gen(), self.identity, self.msg_id)

    cdef _abandon(self):
        if not self.done:
            self.done = True
            if self.cast and self.server.seen is not None:
                self.server.seen.forget(_seen_key(self.msg_id))

    cdef _send(self, int kind, bytes body):
        self._check()
        if self.done:
            return
        self.done = True
        self.server._send_reply(self._gen(), PyBytes_AS_STRING(self.identity),
                                PyBytes_GET_SIZE(self.identity), kind, self.msg_id, body)

    cdef uint64_t _gen(self):
        """On the thread that received the request: the token it held then
        (the reply goes straight out if it still leads); elsewhere 0,
        through the control socket."""
        if self.gen != 0 and PyThread_get_thread_ident() == self.thread:
            return self.gen
        return 0


cdef bytes _packb(value):
    try:
        return new_packer().pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"reply cannot be encoded with msgpack: {exc}") from None


@cython.final
cdef class Worker:
    """Per-thread state."""

    def __cinit__(self):
        self.packer = new_packer()


def serve(Context ctx not None, str bind not None, str host not None, str address not None,
          *, Py_ssize_t max_message_size, int max_threads=64, int backlog=1000,
          int socket_buffer=0,
          double patience=0.005, double quiet=0.05, serialize_failure,
          on_failure=None, bytes curve_secret=None,
          AllowList allow=None, double send_timeout=30.0, bint green=False,
          double ack_timeout=30.0):
    """Bind a Server to `bind`; peers reach it at `address`, which is
    also the routing id it announces (outboxes address it by that).  With
    `curve_secret` (Z85) it speaks only CURVE and requires the context's
    ZAP handler to accept each client (`allow` is its allow-list).  A
    reply from a thread that does not lead waits up to `send_timeout`
    (rpc_cast_timeout) for the leader to take it; in a green thread when
    `green` (eventlet), cooperatively.  `ack_timeout` is
    rpc_zmq_ack_timeout, which sizes the window of at-least-once casts
    (Seen).  It serves once start() is called."""
    cdef Server server = Server.__new__(Server)
    server._setup(ctx, bind, host, address, max_message_size, max_threads, backlog,
                  socket_buffer, patience, quiet, serialize_failure, on_failure, curve_secret,
                  allow)
    server.send_timeout = max(0.0, send_timeout)
    server.green = green
    server.seen.window = 2 * max(0.0, ack_timeout)
    return server


cdef inline object _seen_key(uint64_t msg_id):
    """An at-least-once cast's key in Seen: its id alone.  A courier's ids
    start at a random 32-bit prefix, so they do not collide between senders
    (nor between restarts of one); the sender's routing id cannot be part
    of the key: what was still queued on a connection replaced by a
    reconnect arrives under a temporary one (ZMQ_ROUTER_HANDOVER)."""
    return msg_id


@cython.final
cdef class Seen:
    """The at-least-once casts a server received, by id, so
    that one sent again (its ACK lost, or late) never runs twice.

    A cast is *running* from its arrival until its handler is done (its
    ACK goes), or until its Replier is released unanswered: its work was
    dropped, so the resend must run.  Running casts are never forgotten.
    A handled cast is remembered for `window` seconds, twice
    rpc_zmq_ack_timeout: its sender sends it again rpc_zmq_ack_timeout
    after the last send it has no ACK for.  At most SEEN_MAX are kept:
    beyond SEEN_MAX / window casts a second (6,666 at the default 30 s)
    the oldest go sooner, counted in `forgotten_early`.  Called from any
    thread (a Replier answers from wherever its handler ran), always under
    the GIL, which no call here lets go."""

    def __init__(self, *args, **kwargs):
        raise TypeError("Seen is not supposed to be instantiated from Python")

    @staticmethod
    cdef Seen new(double window):
        cdef Seen seen = Seen.__new__(Seen)
        seen.window = window
        seen.running = {}
        seen.handled = collections.OrderedDict()
        return seen

    cdef int begin(self, object key) except -1:
        """A cast arrived: SEEN_NEW (now running), SEEN_RUNNING or
        SEEN_HANDLED."""
        if key in self.running:
            return SEEN_RUNNING
        if key in self.handled:
            return SEEN_HANDLED
        self.running[key] = None
        return SEEN_NEW

    cdef done(self, object key):
        """Its handler is done: remembered as handled for `window`."""
        cdef double now = _now()
        self.running.pop(key, None)
        self.handled[key] = now + self.window
        self.handled.move_to_end(key)
        while self.handled:
            oldest = next(iter(self.handled))
            if len(self.handled) > SEEN_MAX:
                self.forgotten_early += <double>self.handled[oldest] > now
            elif <double>self.handled[oldest] > now:
                break
            del self.handled[oldest]

    cdef forget(self, object key):
        """Never to be answered (see Replier.abandon): a resend runs."""
        self.running.pop(key, None)


cdef class Server:

    def __cinit__(self):
        self.sock = self.control = NULL
        self.stop_by = float("inf")
        self.lf_ready = False
        self.loop_gen = 0
        self.direct = {}
        self.fanouts = {}
        self.spawn_tokens = set()
        self.seen = Seen.new(60.0)          # serve() sizes it

    def __init__(self, *args, **kwargs):
        raise TypeError("Server is not supposed to be instantiated from Python; "
                        "use nova_zmq_fast._server.serve()")

    def _setup(self, Context ctx not None, str bind, str host, str address, Py_ssize_t max_message_size,
               int max_threads, int backlog, int socket_buffer, double patience, double quiet,
               serialize_failure, on_failure, bytes curve_secret, AllowList allow):
        cdef int64_t limit
        cdef zmq_msg_t probe
        if self.ctx is not None:
            raise RuntimeError("server is already set up")
        self.ctx = ctx
        self.epoch = fork_epoch()
        self.host = host.encode("utf-8")
        self.address = address
        self.max_message_size = max_message_size
        self.max_threads = max(1, max_threads)
        self.threads_lock = unpatched("_thread").allocate_lock()
        self.quiet = quiet
        self.serialize_failure = serialize_failure
        self.on_failure = on_failure
        self.allow = allow
        self.log = PEERS_LOG
        self.broken = {}
        self.about = {"host": host, "address": address, "pid": os.getpid(),
                      "transport": __version__, "envelope": VERSION}
        if lf_init(&self.lf, <int64_t>(patience * 1e9)) != 0:
            raise MemoryError("cannot initialise the worker token")
        self.lf_ready = True
        self.secret = os.urandom(SECRET_LEN)
        # Unique per server for the life of the process: libzmq releases an
        # inproc name asynchronously, so a name derived from id(self) could
        # still be taken by a server just closed at the same address.
        internal = (f"inproc://nzf-control-{os.getpid()}-{next(_control_names)}-"
                    f"{self.secret[:4].hex()}").encode()
        try:
            self.sock = ctx.socket(ZMQ_ROUTER)
            set_int(self.sock, ZMQ_ROUTER_MANDATORY, 1)
            set_int(self.sock, ZMQ_LINGER, 0)
            # A second connection presenting a routing id already connected
            # takes it over.  Without this, libzmq parks such a connection
            # unread while its data piles up in memory for good.  Callers'
            # ids are random (outboxes), so nobody takes over someone else's.
            set_int(self.sock, ZMQ_ROUTER_HANDOVER, 1)
            # Per connection: what a peer may queue here before its sends
            # wait (and all the memory it can make us hold); replies may
            # pile up more, for callers reading a long multicall stream.
            set_int(self.sock, ZMQ_RCVHWM, max(1, backlog))
            if socket_buffer > 0:
                set_int(self.sock, ZMQ_RCVBUF, socket_buffer)
            set_int(self.sock, ZMQ_SNDHWM, 100000)
            # Dual stack: '*' then listens on IPv6 too (libzmq falls back to
            # IPv4 where the host has no IPv6).
            set_int(self.sock, ZMQ_IPV6, 1)
            if curve_secret is not None:
                if PyBytes_GET_SIZE(curve_secret) != 40:
                    raise ValueError("a CURVE key is 40 characters of Z85")
                set_int(self.sock, ZMQ_CURVE_SERVER, 1)
                # Z85 with its terminating NUL: 41 bytes.
                check(zmq_setsockopt(self.sock, ZMQ_CURVE_SECRETKEY,
                                     PyBytes_AS_STRING(curve_secret), 41))
                # Every handshake asks the context's ZAP handler (_curve);
                # with no handler running, libzmq refuses it: never "any
                # key will do", even while the handler stops or restarts.
                check(zmq_setsockopt(self.sock, ZMQ_ZAP_DOMAIN, PyBytes_AS_STRING(ZAP_DOMAIN),
                                     PyBytes_GET_SIZE(ZAP_DOMAIN)))
                set_int(self.sock, ZMQ_ZAP_ENFORCE_DOMAIN, 1)
            if max_message_size > 0:
                # Safety net only: the loop itself drops and counts messages
                # over the limit; libzmq refuses frames beyond twice it (and
                # drops that sender's connection) so memory stays bounded.
                limit = <int64_t>max_message_size * 2 + 65536
                check(zmq_setsockopt(self.sock, ZMQ_MAXMSGSIZE, &limit, sizeof(int64_t)))
            # The control peer attaches first, so its id is taken before any
            # network peer could present the same one.
            check(zmq_bind(self.sock, internal))
            self.control = ctx.socket(ZMQ_DEALER)
            set_int(self.control, ZMQ_LINGER, 0)
            check(zmq_setsockopt(self.control, ZMQ_ROUTING_ID,
                                 PyBytes_AS_STRING(self.secret), SECRET_LEN))
            check(zmq_connect(self.control, internal))
            zmq_msg_init(&probe)
            zmq_msg_recv(&probe, self.sock, ZMQ_DONTWAIT)   # attach it now
            zmq_msg_close(&probe)
            # Callers address this server by its advertised address: that
            # is the routing id it announces to every peer.
            identity = address.encode()
            check(zmq_setsockopt(self.sock, ZMQ_ROUTING_ID, PyBytes_AS_STRING(identity),
                                 PyBytes_GET_SIZE(identity)))
            check(zmq_bind(self.sock, bind.encode()))
            self.bound = self._last_endpoint()
        except BaseException:
            self._close_sockets(0)
            raise

    def _last_endpoint(self):
        cdef char buf[256]
        cdef size_t size = sizeof(buf)
        check(zmq_getsockopt(self.sock, ZMQ_LAST_ENDPOINT, buf, &size))
        return buf[:size - 1].decode()

    # -- consumers ---------------------------------------------------------

    def add_consumer(self, str topic not None, bint fanout, proxy, bint deferred, owner):
        """Serve `topic` with `proxy` too (see _dispatch.pyx); returns the
        Consumer, which drain() takes back."""
        cdef Consumer consumer = Consumer.new(topic, fanout, proxy, deferred, owner)
        cdef dict table = self.fanouts if fanout else self.direct
        key = topic.encode("utf-8")
        cdef Subscription sub = table.get(key)
        table[key] = Subscription.new((sub.consumers if sub is not None else ()) + (consumer,))
        self.last = None
        return consumer

    def drain(self, consumers, double timeout):
        """Stop serving `consumers` (withdrawn from discovery by the caller):
        go on dispatching to them until none has been used for `quiet`
        seconds, remove them, and wait for their running handlers.  Bounded
        by `timeout`; True if everything finished in time."""
        cdef Consumer c
        cdef double started = _now()
        cdef double deadline = _monotonic() + max(0.0, timeout)
        cdef double last
        for c in consumers:
            if c is None:
                raise TypeError("drain() takes Consumers")
        for c in consumers:
            c.closing = True
            c.last_used = started
        while self.workers > 0 and _monotonic() < deadline:
            if not any(c.active for c in consumers):
                # An idle loop that has received nothing since we began
                # holds nothing for these consumers: done at once.
                if self.idle and self.last_wake < started:
                    break
                last = max([c.last_used for c in consumers] or [0.0])
                if _now() - last >= self.quiet:
                    break
            time.sleep(0.002)
        self._remove(consumers)
        while any(c.active for c in consumers) and _monotonic() < deadline:
            time.sleep(0.002)
        return not any(c.active for c in consumers)

    def _remove(self, consumers):
        cdef Subscription sub
        cdef dict table
        gone = set(consumers)
        for table in (self.direct, self.fanouts):
            for key, sub in list(table.items()):
                kept = tuple(c for c in sub.consumers if c not in gone)
                if len(kept) == len(sub.consumers):
                    continue
                if kept:
                    table[key] = Subscription.new(kept)
                else:
                    del table[key]
        self.last = None

    @property
    def consumers(self):
        """Every (topic, fanout) served."""
        return sorted([(k.decode(), False) for k in self.direct] +
                      [(k.decode(), True) for k in self.fanouts])

    cdef Subscription find(self, Header *h):
        """The subscription for a request: the exact topic, or for
        'topic.host' where host is ours (the rule lives in _routes), the
        subscription of 'topic'.  The last answer is kept, so a stream of
        messages to one topic costs a memcmp."""
        cdef bint fanout = h.kind == KIND_FANOUT
        cdef tuple last = self.last
        cdef bytes topic
        cdef Py_ssize_t base
        if last is not None:
            topic = <bytes>last[1]
            if (<bint>last[0] == fanout and PyBytes_GET_SIZE(topic) == <Py_ssize_t>h.topic_len
                    and memcmp(PyBytes_AS_STRING(topic), h.topic, h.topic_len) == 0):
                return <Subscription>last[2]
        topic = PyBytes_FromStringAndSize(h.topic, h.topic_len)
        sub = (self.fanouts if fanout else self.direct).get(topic)
        if sub is None and not fanout:
            base = host_base_len(h.topic, h.topic_len, PyBytes_AS_STRING(self.host),
                                 PyBytes_GET_SIZE(self.host))
            if base > 0:
                sub = self.direct.get(topic[:base])
        if sub is not None:
            self.last = (fanout, topic, sub)
        return sub

    # -- workers -----------------------------------------------------------

    def start(self):
        """Start serving: one leader plus a standby; more on demand."""
        with self.threads_lock:
            if self.started or self.stopping or self.sock == NULL:
                return
            self.started = True
            for _ in range(min(2, self.max_threads)):
                self._spawn()

    def lead_here(self):
        """Serve from the calling thread instead of worker threads: an event
        loop that watches `fd` and calls serve_ready() whenever it is
        readable (nova_zmq_fast.aio), so a request costs no thread hand-off.
        Only before start(), and only if every consumer so far is deferred
        (its code runs elsewhere, never blocking the loop).  True if this
        thread now leads."""
        cdef Subscription sub
        cdef Consumer c
        cdef uint64_t gen
        with self.threads_lock:
            if self.started or self.stopping or self.sock == NULL or not self.lf_ready:
                return False
            for sub in list(self.direct.values()) + list(self.fanouts.values()):
                for c in sub.consumers:
                    if c.mode != PROXY_DEFERRED:
                        return False
            with nogil:
                gen = lf_lead(&self.lf)
            if gen == 0:
                return False
            self.started = True
            self.loop_worker = Worker()
            self.loop_thread = PyThread_get_thread_ident()
            self.loop_gen = gen
            return True

    @property
    def loop_led(self):
        """An event loop leads this server (lead_here())."""
        return self.loop_gen != 0

    @property
    def fd(self):
        """The socket's ZMQ_FD: readable (edge-triggered) when something
        may have arrived; serve_ready() then takes everything queued."""
        cdef int fd = -1
        cdef size_t size = sizeof(fd)
        if self.sock == NULL:
            raise RuntimeError("the server is closed")
        check(zmq_getsockopt(self.sock, ZMQ_FD, &fd, &size))
        return fd

    def serve_ready(self):
        """The leading event loop's turn: serve every message queued now,
        without blocking.  False once the server stopped (stop watching
        `fd`).  After the loop's thread replies outside a turn, a new turn
        is due: a send can consume the fd's edge."""
        cdef zmq_msg_t parts[MAX_PARTS]
        cdef Header h
        cdef int got
        cdef uint64_t gen = self.loop_gen
        cdef Worker w = self.loop_worker
        if gen == 0 or PyThread_get_thread_ident() != self.loop_thread:
            raise RuntimeError("serve_ready() is for the thread that called lead_here()")
        if not lf_idle(&self.lf, gen):
            return False
        self.last_wake = _now()
        for i in range(MAX_PARTS):
            zmq_msg_init(&parts[i])
        try:
            while True:
                if self.stopping:
                    self._drain(w, gen, parts)
                    return False
                got = self._recv(parts, &h, 0)
                if got == GOT_REQUEST:
                    lf_busy(&self.lf, gen)
                    self._handle(w, gen, parts, &h)
                    if not lf_idle(&self.lf, gen):
                        return False
                elif got == GOT_STOP:
                    self._drain(w, gen, parts)
                    return False
                elif got == GOT_NOTHING:
                    lf_busy(&self.lf, gen)      # not touching the sockets until the next turn
                    return True
        except BaseException:
            self._failed(gen)
            return False
        finally:
            for i in range(MAX_PARTS):
                zmq_msg_close(&parts[i])

    cdef _failed(self, uint64_t gen):
        LOG.exception("receive loop failed; closing server %s", self.bound)
        self.stopping = True
        lf_close_owner(&self.lf, gen)
        if self.on_failure is not None:
            try:
                self.on_failure()
            except Exception:
                LOG.exception("withdrawing server %s failed", self.bound)

    cdef _spawn(self):
        token = object()
        self.spawn_tokens.add(token)
        self.workers += 1
        try:
            unpatched("_thread").start_new_thread(self._work, (token,))
        except BaseException:
            self.workers -= 1
            self.spawn_tokens.discard(token)
            raise

    cdef _grow(self):
        """Called by a worker that took over from a busy leader: keep a
        standby available while the pool may still grow."""
        if self.lf.waiting > 0 or self.stopping:
            return
        with self.threads_lock:
            if self.workers < self.max_threads and not self.stopping:
                self._spawn()

    def _work(self, token):
        """A worker thread's body; only threads the server spawned run it."""
        cdef uint64_t gen
        cdef int stole
        if token not in self.spawn_tokens:
            raise RuntimeError("Server._work is the body of the server's own worker threads")
        self.spawn_tokens.discard(token)
        cdef Worker w = Worker()
        try:
            while True:
                with nogil:
                    gen = lf_follow(&self.lf, &stole)
                if gen == 0:
                    return
                if stole:
                    self._grow()
                try:
                    self._lead(w, gen)
                except BaseException:
                    self._failed(gen)
                    return
        finally:
            self.workers -= 1

    cdef _lead(self, Worker w, uint64_t gen):
        """Serve while holding the token `gen`; return when it moves on."""
        cdef zmq_msg_t parts[MAX_PARTS]
        cdef Header h
        cdef int got
        for i in range(MAX_PARTS):
            zmq_msg_init(&parts[i])
        try:
            while True:
                if self.stopping:           # without waiting for STOP, which may be lost
                    self._drain(w, gen, parts)
                    return
                got = self._recv(parts, &h, -1)
                if got == GOT_REQUEST:
                    lf_busy(&self.lf, gen)
                    self._handle(w, gen, parts, &h)
                    if not lf_idle(&self.lf, gen):
                        return                      # replaced while busy
                elif got == GOT_STOP:
                    self._drain(w, gen, parts)
                    return
        finally:
            for i in range(MAX_PARTS):
                zmq_msg_close(&parts[i])

    cdef int _recv(self, zmq_msg_t *parts, Header *h, int timeout_ms) except -1:
        """Receive one message.  While messages are queued this takes them
        with the GIL held and no system call; only an empty queue releases
        the GIL and blocks, up to `timeout_ms` (-1: forever).  The rest of a
        multipart message is already there."""
        cdef int n = 1, rc, err, status
        cdef bint woke = False
        rc = zmq_msg_recv(&parts[0], self.sock, ZMQ_DONTWAIT)
        if rc == -1:
            err = zmq_errno()
            if err != EAGAIN and err != EINTR:
                raise_zmq_error(err)
            if timeout_ms == 0:
                return GOT_NOTHING
            set_int(self.sock, ZMQ_RCVTIMEO, timeout_ms)
            self.idle = True
            with nogil:
                rc = zmq_msg_recv(&parts[0], self.sock, 0)
            self.idle = False
            if rc == -1:
                err = zmq_errno()
                if err == EAGAIN or err == EINTR:
                    return GOT_NOTHING
                raise_zmq_error(err)
            woke = True
        while zmq_msg_more(&parts[n - 1]) and n < MAX_PARTS:
            check(zmq_msg_recv(&parts[n], self.sock, 0))
            n += 1
        if zmq_msg_more(&parts[n - 1]):
            self._discard_rest()
            n = MAX_PARTS + 1
        if (zmq_msg_size(&parts[0]) == SECRET_LEN and memcmp(
                zmq_msg_data(&parts[0]), PyBytes_AS_STRING(self.secret), SECRET_LEN) == 0):
            return self._control(parts, n)
        if woke:
            self.last_wake = _now()         # once per wake-up by a peer, not per message
        self.counters[RECEIVED] += 1
        if n != 3:
            return self._drop(DROPPED_FRAMES, "a message that is not 3 frames")
        status = parse_header(<const char *>zmq_msg_data(&parts[1]),
                              zmq_msg_size(&parts[1]), h)
        if status == HDR_VERSION:
            return self._drop(DROPPED_VERSION, "a message of an unknown envelope version")
        if status != HDR_OK or not is_request(h.kind):
            return self._drop(DROPPED_HEADER, "a message with a bad header")
        return GOT_REQUEST

    cdef int _drop(self, int counter, str what) except -1:
        """Count a message dropped for what a peer sent, and say so in the
        log at a bounded rate."""
        self.counters[counter] += 1
        self.log.warning(("dropped", counter), "dropped %s (see stats())", what)
        return GOT_DROPPED

    cdef bint _revoked(self, zmq_msg_t *part) except -1:
        """Did this message come over a connection whose key has since been
        taken out of the allow-list?  (ZAP names each connection by its key.)"""
        cdef const char *user = zmq_msg_gets(part, b"User-Id")
        if user == NULL:
            return False
        return <bytes>user in self.allow.revoked_keys

    cdef _discard_rest(self):
        cdef zmq_msg_t extra
        zmq_msg_init(&extra)
        try:
            while True:
                check(zmq_msg_recv(&extra, self.sock, 0))
                if not zmq_msg_more(&extra):
                    break
        finally:
            zmq_msg_close(&extra)

    cdef int _control(self, zmq_msg_t *parts, int n) except -1:
        """A message from our own control socket: [secret, b"STOP"] or
        [secret, b"FWD", identity, header, body] to send on to a caller."""
        if n != 5:
            return GOT_STOP
        if self.broken and self._forward_broken(parts):
            return GOT_CONTROL
        if zmq_msg_send(&parts[2], self.sock, ZMQ_SNDMORE | ZMQ_DONTWAIT) == -1:
            self._forward_lost(parts)
            return GOT_CONTROL
        zmq_msg_send(&parts[3], self.sock, ZMQ_SNDMORE)
        zmq_msg_send(&parts[4], self.sock, 0)
        self.counters[REPLIES] += 1
        return GOT_CONTROL

    cdef bint _forward_broken(self, zmq_msg_t *parts) except -1:
        """_control's reply while some stream is broken: True if it went
        as _stream_fate says (dropped, or a FAILURE in its place)."""
        cdef Header h
        cdef char header[MAX_HEADER]
        cdef const char *identity = <const char *>zmq_msg_data(&parts[2])
        cdef size_t identity_len = zmq_msg_size(&parts[2])
        # (The header is one of ours: it parses.)
        parse_header(<const char *>zmq_msg_data(&parts[3]), zmq_msg_size(&parts[3]), &h)
        fate = self._stream_fate(identity, identity_len, h.kind, h.msg_id, True)
        if fate is None:
            return False
        if fate:
            if self._send_now(identity, identity_len, header,
                              write_header(header, KIND_FAILURE, 0, h.msg_id, NULL, 0),
                              PyBytes_AS_STRING(fate), PyBytes_GET_SIZE(fate)):
                self.counters[REPLIES] += 1
            else:
                self._lost(identity, identity_len, KIND_FAILURE, h.msg_id, True)
        return True

    cdef _forward_lost(self, zmq_msg_t *parts):
        cdef Header h
        parse_header(<const char *>zmq_msg_data(&parts[3]), zmq_msg_size(&parts[3]), &h)
        self._lost(<const char *>zmq_msg_data(&parts[2]), zmq_msg_size(&parts[2]), h.kind,
                   h.msg_id, True)

    cdef _drain(self, Worker w, uint64_t gen, zmq_msg_t *parts):
        """Stop requested: serve what is already queued or still arriving
        until the socket has been quiet for `quiet` seconds, then close the
        token so that no worker touches the sockets again.  A socket that
        has been quiet that long already stops at once."""
        cdef Header h
        cdef int got
        cdef double quiet_until = min(self.last_wake + self.quiet, self.stop_by)
        try:
            while True:
                got = self._recv(parts, &h, ms_until(quiet_until))
                if got == GOT_NOTHING:
                    break
                if got == GOT_STOP or got == GOT_CONTROL:
                    continue                # ours (stop() repeats STOP): not a peer's
                # A peer that keeps sending (a stale route, a hostile one)
                # cannot keep the server from stopping in time.
                quiet_until = min(_now() + self.quiet, self.stop_by)
                if got == GOT_REQUEST:
                    lf_busy(&self.lf, gen)
                    self._handle(w, gen, parts, &h)
                    if not lf_idle(&self.lf, gen):
                        return
        finally:
            lf_close_owner(&self.lf, gen)

    # -- dispatch ----------------------------------------------------------

    cdef _handle(self, Worker w, uint64_t gen, zmq_msg_t *parts, Header *h):
        cdef int kind = h.kind
        cdef uint64_t msg_id = h.msg_id
        cdef Subscription sub
        cdef Consumer consumer
        cdef int seen
        cdef size_t size = zmq_msg_size(&parts[2])
        # A cast at least once: answered (REFUSED, FAILURE, ACK) like a call.
        cdef bint answered = kind == KIND_CALL or kind == KIND_PING or (
            kind == KIND_CAST and h.flags & FLAG_ACK)
        if self.allow is not None and self.allow.revoked and self._revoked(&parts[1]):
            # Nothing runs.  A call learns why rather than timing out; a
            # PING stays unanswered, so that the sender's probes pass this
            # server over (for the others, which may still accept its key),
            # and an at-least-once cast unacknowledged, so that it goes
            # to another.
            self._drop(DROPPED_REVOKED, "a message over a connection whose key was revoked")
            if kind == KIND_CALL:
                self._fail(w, gen, &parts[0], msg_id, KeyRevoked(
                    f"{self.address} took this process's CURVE key out of its allow-list"))
            return
        if self.max_message_size > 0 and size > <size_t>self.max_message_size:
            self._drop(DROPPED_OVERSIZE, "a message over rpc_zmq_max_message_size")
            if answered:
                self._fail(w, gen, &parts[0], msg_id, MessageTooLarge(
                    f"request of {size} bytes exceeds the server's limit of "
                    f"{self.max_message_size}"))
            return
        sub = self.find(h)
        if sub is None:
            if kind == KIND_PING:       # to a PING, REFUSED is an answer, not a drop
                self.counters[PINGS] += 1
            else:
                self._drop(DROPPED_TOPIC, "a message for a topic not served here")
            if answered:
                topic = PyBytes_FromStringAndSize(h.topic, h.topic_len)
                self._send_reply(gen, <const char *>zmq_msg_data(&parts[0]),
                                 zmq_msg_size(&parts[0]), KIND_REFUSED, msg_id, w.packer.pack(
                                     f"topic {topic.decode('utf-8', 'replace')!r} is not "
                                     f"served at {self.address}"))
            return
        try:
            body = _decode_request(<const char *>zmq_msg_data(&parts[2]), size,
                                   self.max_message_size)
        except MalformedEnvelope as exc:
            self._drop(DROPPED_BODY, "a message whose body is not msgpack [context, message]")
            if answered:
                self._fail(w, gen, &parts[0], msg_id, exc)
            return
        if kind == KIND_CAST and h.flags & FLAG_ACK:
            # Keyed by its id alone (see _seen_key).
            seen = self.seen.begin(_seen_key(msg_id))
            if seen != SEEN_NEW:
                # Sent again (its ACK was lost, or late): never run twice.
                self.counters[DUPLICATES] += 1
                if seen == SEEN_HANDLED:
                    self._send_reply(gen, <const char *>zmq_msg_data(&parts[0]),
                                     zmq_msg_size(&parts[0]), KIND_ACK, msg_id, b"")
                return                  # still running: its ACK comes when it ends
        if kind == KIND_PING:
            self.counters[PINGS] += 1
            self._pong(w, gen, &parts[0], h, sub, <dict>(<list>body)[1])
            return
        if kind != KIND_FANOUT:
            self._run(w, gen, &parts[0], h, sub.pick(),
                      RpcContext.wrap(<dict>(<list>body)[0]), <dict>(<list>body)[1])
            return
        for consumer in sub.consumers:
            if body is None:                        # each fanout consumer gets its own copy
                body = _decode_request(<const char *>zmq_msg_data(&parts[2]), size,
                                   self.max_message_size)
            self._run(w, gen, &parts[0], h, consumer,
                      RpcContext.wrap(<dict>(<list>body)[0]), <dict>(<list>body)[1])
            body = None

    cdef _run(self, Worker w, uint64_t gen, zmq_msg_t *identity, Header *h,
              Consumer consumer, RpcContext ctxt, dict msg):
        cdef int kind = h.kind
        cdef bint acked = kind == KIND_CAST and h.flags & FLAG_ACK
        cdef Replier replier = None
        cdef bint handed_off = False
        consumer.begin()
        # Counted as it is dispatched, so a caller that got its reply never
        # sees the count without its own request.
        self.counters[HANDLED] += 1
        try:
            if consumer.mode == PROXY_DEFERRED and (kind == KIND_CALL or acked):
                # Answered later, from where the handler runs; an
                # at-least-once cast's ACK too, once its handler is done.
                replier = Replier.__new__(Replier)
                replier.server = self
                replier.identity = (<const char *>zmq_msg_data(identity))[
                    :zmq_msg_size(identity)]
                replier.msg_id = h.msg_id
                replier.multi = h.flags & FLAG_MULTI
                replier.cast = acked
                replier.gen = gen
                replier.thread = PyThread_get_thread_ident()
                consumer.proxy(ctxt, msg, replier)
                handed_off = True
            else:
                result = consumer.invoke(ctxt, msg, kind)
                if kind == KIND_CALL:
                    self._answer(w, gen, identity, h.msg_id, h.flags & FLAG_MULTI, result)
                elif PyGen_Check(result):
                    for _ in result:
                        pass
        except BaseException as exc:
            # BaseException too: a handler raising SystemExit or
            # KeyboardInterrupt must not stop the loop that serves everyone.
            if replier is not None and acked:
                # The hand-off failed and its handler never runs: no ACK,
                # and forgotten, so that the sender's resend runs it.
                acked = False
                replier._abandon()
            if kind == KIND_CALL:
                self._fail(w, gen, identity, h.msg_id, exc)
            else:
                # (An at-least-once cast whose handler raised counts as
                # handled: its ACK follows.)
                self.handler_error(consumer.topic, msg.get("method", "<notification>"), exc)
        finally:
            consumer.end()
        if acked and not handed_off:
            self._ack(gen, (<const char *>zmq_msg_data(identity))[:zmq_msg_size(identity)],
                      h.msg_id)

    cdef _pong(self, Worker w, uint64_t gen, zmq_msg_t *identity, Header *h,
               Subscription sub, dict msg):
        """Answer a PING here, without the service's code: who we are, or
        that no consumer of the topic accepts the version it names."""
        cdef Consumer consumer
        version = msg.get("version")
        if version is not None:
            namespace = msg.get("namespace")
            ok = False
            try:
                for consumer in sub.consumers:
                    if consumer.accepts(version, namespace):
                        ok = True
                        break
            except BaseException as exc:       # the service's code: never stops the loop
                self._fail(w, gen, identity, h.msg_id, exc)
                return
            if not ok:
                self._fail(w, gen, identity, h.msg_id, UnsupportedRpcVersion(version=version))
                return
        self._reply(w, gen, identity, KIND_RESULT, h.msg_id, self.about)

    cdef _answer(self, Worker w, uint64_t gen, zmq_msg_t *identity, uint64_t msg_id,
                 bint multi, object result):
        if not PyGen_Check(result):
            self._reply(w, gen, identity, KIND_RESULT, msg_id, result)
            return
        if multi:
            for value in result:
                self._reply(w, gen, identity, KIND_CHUNK, msg_id, value)
            self._send_reply(gen, <const char *>zmq_msg_data(identity),
                             zmq_msg_size(identity), KIND_END, msg_id, b"")
            return
        last = None
        for last in result:
            pass
        self._reply(w, gen, identity, KIND_RESULT, msg_id, last)

    cdef _reply(self, Worker w, uint64_t gen, zmq_msg_t *identity, int kind,
                uint64_t msg_id, object value):
        try:
            body = w.packer.pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"result cannot be encoded with msgpack: {exc}") from None
        self._send_reply(gen, <const char *>zmq_msg_data(identity), zmq_msg_size(identity),
                         kind, msg_id, body)

    cdef _fail(self, Worker w, uint64_t gen, zmq_msg_t *identity, uint64_t msg_id, exc):
        try:
            body = w.packer.pack(self.serialize_failure(exc))
        except Exception:
            body = w.packer.pack(["builtins", "RuntimeError",
                                  "the remote exception could not be encoded", [], ""])
        self._send_reply(gen, <const char *>zmq_msg_data(identity), zmq_msg_size(identity),
                         KIND_FAILURE, msg_id, body)

    cdef _ack(self, uint64_t gen, bytes identity, uint64_t msg_id):
        """An at-least-once cast's handler is done: remember it as handled
        (a resend is answered, not run) and tell its sender."""
        self.seen.done(_seen_key(msg_id))
        self.counters[ACKS] += 1
        self._send_reply(gen, PyBytes_AS_STRING(identity), PyBytes_GET_SIZE(identity),
                         KIND_ACK, msg_id, b"")

    cdef _send_reply(self, uint64_t gen, const char *identity, size_t identity_len,
                     int kind, uint64_t msg_id, bytes body):
        """Send [identity, header, body] back to the caller: straight out
        while this thread leads with the token `gen`, else through the
        control socket for the leader to forward.  The leader never waits;
        any other thread (a worker replaced while its handler ran, or
        wherever a deferred consumer answers) waits for room in the control
        socket's queue, which the leader empties as it forwards, up to
        `send_timeout` (green threads cooperatively), then drops the reply.
        Every reply dropped is counted in replies_undeliverable."""
        cdef char header[MAX_HEADER]
        cdef size_t hlen
        cdef const char *data
        cdef size_t size
        cdef int status
        cdef long pause_ns = PAUSE_MIN_NS
        cdef double deadline = 0
        if not self.lf_ready:
            return
        # A broken stream's CHUNKs are dropped here at once (any loss came
        # before them); its last reply only if it goes straight out, else
        # the leader settles it as it forwards it.
        if self.broken and (kind == KIND_CHUNK or self._leads(gen)):
            fate = self._stream_fate(identity, identity_len, kind, msg_id, False)
            if fate is not None:
                if not fate:
                    return
                kind, body = KIND_FAILURE, fate
        if 0 < self.max_message_size < PyBytes_GET_SIZE(body):
            body = self._too_large(identity, identity_len, kind, msg_id, PyBytes_GET_SIZE(body))
            if body is None:
                return                      # a stream's value: its end says why
            kind = KIND_FAILURE
        hlen = write_header(header, kind, 0, msg_id, NULL, 0)
        data = PyBytes_AS_STRING(body)
        size = PyBytes_GET_SIZE(body)
        while True:
            with nogil:
                status = self._try_send(gen, identity, identity_len, header, hlen, data, size)
            if status != CONTROL_FULL:
                break
            if deadline == 0:
                self.counters[REPLIES_DELAYED] += 1
                deadline = _now() + self.send_timeout
            elif _now() >= deadline:
                self.counters[REPLIES_HANDOFF_TIMEOUT] += 1
                status = REPLY_DROPPED
                break
            pause_ns = pause(pause_ns, self.green and gen == 0)
        if status == REPLY_SENT:
            self.counters[REPLIES] += 1
        elif status == REPLY_DROPPED:
            self._lost(identity, identity_len, kind, msg_id, False)

    cdef bytes _too_large(self, const char *identity, size_t identity_len, int kind,
                          uint64_t msg_id, Py_ssize_t size):
        """A reply over rpc_zmq_max_message_size, which no caller would
        accept, is not sent.  Returns the FAILURE body to send in its place,
        so that the caller learns why rather than timing out; or None for a
        stream's value (CHUNK): the stream breaks there, as when a value is
        lost, and its end is this FAILURE (_stream_fate)."""
        self.counters[REPLIES_TOO_LARGE] += 1
        error = MessageTooLarge(f"the reply is {size} bytes; the server's "
                                f"rpc_zmq_max_message_size is {self.max_message_size}")
        if kind == KIND_CHUNK:
            self._break(identity, identity_len, msg_id, False, error)
            return None
        return self._failure_body(error)

    cdef _lost(self, const char *identity, size_t identity_len, int kind, uint64_t msg_id,
               bint forwarding):
        """A reply was dropped: counted; a lost CHUNK breaks its stream.
        `forwarding`: by the leader, taking it from the control socket,
        where later CHUNKs of the stream may already wait behind it."""
        self.counters[REPLIES_UNDELIVERABLE] += 1
        if kind == KIND_CHUNK:
            self._break(identity, identity_len, msg_id, forwarding, None)

    cdef _break(self, const char *identity, size_t identity_len, uint64_t msg_id,
                bint forwarding, why):
        """One more value of a stream not sent: the stream is broken (see
        the module docstring).  `forwarding`: lost by the leader, with later
        values maybe queued behind it; `why`: the error its end reports
        (the first given), else StreamTruncated."""
        key = (identity[:identity_len], msg_id)
        lost, behind, was = self.broken.get(key, (0, False, None))
        self.broken[key] = (lost + 1, behind or forwarding, was or why)
        if len(self.broken) > BROKEN_MAX:
            del self.broken[next(iter(self.broken))]

    cdef bytes _failure_body(self, error):
        """A FAILURE reply's body for `error`, however it serializes."""
        try:
            return _packb(self.serialize_failure(error))
        except Exception:
            return _packb(["builtins", "RuntimeError", str(error), [], ""])

    cdef bint _leads(self, uint64_t gen) noexcept:
        """This thread leads with the token `gen`: what it sends goes
        straight out, behind everything it sent before."""
        cdef bint leads = False
        if gen != 0:
            with nogil:
                lf_lock(&self.lf)
                leads = self.lf.owner == gen
                lf_unlock(&self.lf)
        return leads

    cdef object _stream_fate(self, const char *identity, size_t identity_len, int kind,
                             uint64_t msg_id, bint forwarding):
        """What becomes of a reply about to leave while some stream is
        broken (see the module docstring): None, send it as it is; b"",
        drop it (counted); else the FAILURE body to send in its place (of
        the broken stream's END, or a last value sent as RESULT).

        `forwarding`: the leader takes it from the control socket.  A
        CHUNK queued there is later than a loss the leader met forwarding
        that stream, but earlier than one its sender met handing it over
        (no room within send_timeout), so it still goes.  The stream's
        last reply ends its entry, so it is settled only where it leaves,
        behind every CHUNK queued ahead of it: those must still find the
        stream broken."""
        key = (identity[:identity_len], msg_id)
        found = self.broken.get(key)
        if found is None or kind == KIND_HEARTBEAT:
            return None
        lost, behind, why = found
        if kind == KIND_CHUNK:
            if forwarding and not behind:
                return None
            self.broken[key] = (lost + 1, behind, why)
            self.counters[REPLIES_UNDELIVERABLE] += 1
            return b""
        del self.broken[key]                # the stream's last reply
        if kind == KIND_FAILURE:
            return None                     # a failure already
        self.counters[STREAMS_TRUNCATED] += 1       # END, or a last value (RESULT)
        # Why it broke: a value over the size limit, or values lost.
        return self._failure_body(why if why is not None else StreamTruncated(lost=lost))

    @cython.final
    cdef inline int _try_send(self, uint64_t gen, const char *identity, size_t identity_len,
                              const char *header, size_t hlen, const char *data,
                              size_t size) noexcept nogil:
        """One attempt at _send_reply's send, never waiting, under the token
        mutex so that the token cannot move in between."""
        cdef int status = REPLY_DROPPED
        lf_lock(&self.lf)
        if not self.lf.closed and self.sock != NULL:
            if gen != 0 and self.lf.owner == gen:
                if self._send_now(identity, identity_len, header, hlen, data, size):
                    status = REPLY_SENT
            elif zmq_send(self.control, b"FWD", 3, ZMQ_SNDMORE | ZMQ_DONTWAIT) != -1:
                zmq_send(self.control, identity, identity_len, ZMQ_SNDMORE)
                zmq_send(self.control, header, hlen, ZMQ_SNDMORE)
                zmq_send(self.control, data, size, 0)
                status = REPLY_HANDED
            elif zmq_errno() == EAGAIN:
                status = CONTROL_FULL
        lf_unlock(&self.lf)
        return status

    @cython.final
    cdef inline bint _send_now(self, const char *identity, size_t identity_len,
                               const char *header, size_t hlen, const char *data,
                               size_t size) noexcept nogil:
        """Send a reply on the socket, never waiting (only the leader may):
        False if the caller is gone or its queue is full."""
        if zmq_send(self.sock, identity, identity_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) == -1:
            return False
        # The routing frame went through: the rest cannot block or fail.
        zmq_send(self.sock, header, hlen, ZMQ_SNDMORE)
        zmq_send(self.sock, data, size, 0)
        return True

    # -- lifecycle ---------------------------------------------------------

    def stats(self):
        counters = {name: self.counters[i] for i, name in enumerate(_COUNTER_NAMES)}
        counters["dedup_forgotten_early"] = self.seen.forgotten_early
        return counters

    def handler_error(self, topic, method, exc):
        """A handler of `topic` raised and no caller is told: counted in
        stats() and logged at a bounded rate.  From any thread (the
        receive loop, or wherever a deferred consumer runs handlers)."""
        self.counters[HANDLER_ERRORS] += 1
        log_handler_error(topic, method, exc)

    @property
    def running(self):
        return self.workers > 0

    def stop(self, double timeout):
        """Finish queued work, then close.  Waits at most `timeout` seconds;
        returns False if some handler was still running then (its thread is
        left to finish on its own; its reply is dropped)."""
        cdef double deadline = _monotonic() + max(0.0, timeout)
        cdef int closed = 0
        if self.sock == NULL:
            return True
        if self.epoch != fork_epoch():
            self.sock = self.control = NULL
            return True
        self.stop_by = deadline
        self.stopping = True
        # The leader drains and closes the token; if nobody leads (never
        # started, or every worker is inside a handler) close it ourselves.
        # A leader sees `stopping` before each message; STOP only wakes
        # one blocked on an empty queue (so there is room for it).  It goes
        # again every 50 ms: a draining leader whose handler outlasted
        # `patience` has lost the token, and the STOP with it, to a follower
        # now waiting for messages.
        with self.threads_lock:
            started = self.started
        next_stop = 0.0
        while not self.lf.closed:
            if _monotonic() >= next_stop:
                next_stop = _monotonic() + 0.05
                with nogil:
                    lf_lock(&self.lf)
                    if not self.lf.closed:
                        zmq_send(self.control, b"STOP", 4, ZMQ_DONTWAIT)
                    lf_unlock(&self.lf)
            if not started or _monotonic() >= deadline:
                if lf_try_close(&self.lf):
                    break
            if _monotonic() >= deadline + 1.0:
                break                               # a leader that ignores STOP
            time.sleep(0.002)
        closed = self.lf.closed
        while self.workers > 0 and _monotonic() < deadline:
            time.sleep(0.002)
        if not closed:
            LOG.error("server %s did not stop; leaving its sockets open", self.bound)
            return False
        hook, self.before_close = self.before_close, None
        if hook is not None:
            try:
                hook(self)      # an event loop that leads: off the socket's fd now
            except Exception:
                LOG.exception("server %s: before_close failed", self.bound)
        linger = ms_until(deadline)
        self._close_sockets(linger)
        if self.workers:
            LOG.warning("server %s: %d handler(s) still running after %.1fs",
                        self.bound, self.workers, timeout)
        return self.workers == 0

    cdef _close_sockets(self, int linger_ms):
        if self.ctx is not None:
            self.ctx.close_socket(self.control, 0)
            self.ctx.close_socket(self.sock, linger_ms)
        self.sock = self.control = NULL

    @property
    def closed(self):
        return self.sock == NULL

    def __dealloc__(self):
        if self.sock != NULL and self.epoch == fork_epoch():
            if lf_try_close(&self.lf):
                self._close_sockets(0)
        if self.lf_ready and self.workers == 0:
            lf_destroy(&self.lf)


cdef object _decode_request(const char *data, size_t size, Py_ssize_t limit):
    """The body of a request: msgpack [context, message], two maps, within
    what decoding a body of at most `limit` bytes may cost (_envelope)."""
    body = unpack(data, size, limit)
    if (type(body) is not list or len(<list>body) != 2
            or type((<list>body)[0]) is not dict
            or type((<list>body)[1]) is not dict):
        raise MalformedEnvelope("body is not [context, message]")
    return body
