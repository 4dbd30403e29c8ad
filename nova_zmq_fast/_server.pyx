"""The serving side: the receive loop and topic dispatch.

A Server owns one bound ROUTER socket.  Requests arrive as
[caller identity, header, body]; replies leave on the same socket with the
same identity, straight back to the waiting thread's outbox.

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
that id and forwards the reply.

Bad input never stops the loop: a message with the wrong frame count, a bad
header, an unknown version, an oversized body, undecodable msgpack or a
topic this node does not serve is dropped and counted in `stats()`.  If its
header was readable and it was a CALL, the caller also gets a failure reply
at once instead of waiting for its timeout.
"""
import logging
import os
import time

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject_Call
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcmp

from nova_zmq_fast._libzmq cimport *
from nova_zmq_fast._zmq cimport Context, check, fork_epoch, raise_zmq_error, set_int
from nova_zmq_fast._envelope cimport *

from nova_zmq_fast._green import unpatched
from nova_zmq_fast.dispatcher import unwrap
from nova_zmq_fast.exceptions import (
    InvalidMessage, MalformedEnvelope, MessageTooLarge, SerializationError)

LOG = logging.getLogger("nova_zmq_fast.server")

cdef extern from "leader.h" nogil:
    ctypedef struct lf_token:
        uint64_t owner
        int waiting
        int closed
    int lf_init(lf_token *t, int64_t patience_ns)
    void lf_destroy(lf_token *t)
    uint64_t lf_follow(lf_token *t, int *stole)
    void lf_busy(lf_token *t, uint64_t gen)
    int lf_idle(lf_token *t, uint64_t gen)
    void lf_close_owner(lf_token *t, uint64_t gen)
    int lf_try_close(lf_token *t)
    void lf_lock(lf_token *t)
    void lf_unlock(lf_token *t)

cdef extern from "Python.h":
    bint PyGen_Check(object o)

cdef object _monotonic = time.monotonic
cdef object _unwrap = unwrap

cdef enum:
    SECRET_LEN = 16
    MAX_PARTS = 5                   # a forwarded reply: secret, FWD, identity, header, body

cdef enum Received:                 # what _recv() found
    GOT_NOTHING = 0                 # timed out (only when a timeout was given)
    GOT_REQUEST = 1                 # a valid request in parts[0..2]
    GOT_DROPPED = 2                 # a bad message, dropped and counted
    GOT_CONTROL = 3                 # a forwarded reply, already sent on
    GOT_STOP = 4


@cython.final
@cython.freelist(32)
cdef class RpcContext:
    """The request context a server method receives: attribute access to
    the caller's context values, and to_dict() for passing it on."""
    cdef dict _values

    def __cinit__(self):
        self._values = {}

    def __init__(self, values=None, **kwargs):
        self._values = dict(values or (), **kwargs)

    @staticmethod
    cdef RpcContext wrap(dict values):
        cdef RpcContext ctx = RpcContext.__new__(RpcContext)
        ctx._values = values
        return ctx

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self._values[name] = value

    def __delattr__(self, name):
        try:
            del self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self):
        return dict(self._values)

    def __reduce__(self):
        return (RpcContext, (self._values,))

    def __eq__(self, other):
        if isinstance(other, RpcContext):
            return self._values == (<RpcContext>other)._values
        return NotImplemented

    def __repr__(self):
        return f"RpcContext({self._values!r})"


cdef enum ProxyKind:
    PROXY_DISPATCHER                # has dispatch(): version/namespace rules
    PROXY_CALLABLE                  # called as proxy(ctxt, msg) with raw messages
    PROXY_METHODS                   # its public method msg['method'] is called
    PROXY_DEFERRED                  # called as proxy(ctxt, msg, replier); replies later


@cython.final
cdef class Replier:
    """Answers one call later, from any thread (the oslo.messaging driver
    hands requests to its executor and replies from there).  The reply goes
    through the server's control socket to whichever worker leads."""
    cdef Server server
    cdef bytes identity
    cdef uint64_t msg_id
    cdef readonly bint done

    def result(self, value):
        """The final value."""
        self._send(KIND_RESULT, _packb(value))

    def failure(self, payload):
        """The call failed; `payload` is the serialized exception."""
        self._send(KIND_FAILURE, _packb(payload))

    def heartbeat(self):
        """The call is still running (restarts the caller's call monitor)."""
        if not self.done:
            self.server._send_reply(0, PyBytes_AS_STRING(self.identity),
                                    PyBytes_GET_SIZE(self.identity), KIND_HEARTBEAT,
                                    self.msg_id, b"")

    cdef _send(self, int kind, bytes body):
        if self.done:
            return
        self.done = True
        self.server._send_reply(0, PyBytes_AS_STRING(self.identity),
                                PyBytes_GET_SIZE(self.identity), kind, self.msg_id, body)


cdef bytes _packb(value):
    try:
        return new_packer().pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"reply cannot be encoded with msgpack: {exc}") from None


@cython.final
cdef class Consumer:
    """What a Server does with messages for one topic: call into `proxy`
    (see nova_zmq_fast.dispatcher for the three kinds of proxy)."""
    cdef readonly str topic
    cdef readonly bint fanout
    cdef readonly object proxy
    cdef object dispatch
    cdef int mode

    def __cinit__(self, str topic, bint fanout, proxy, bint deferred=False):
        self.topic = topic
        self.fanout = fanout
        self.proxy = proxy
        self.dispatch = getattr(proxy, "dispatch", None)
        if deferred:
            self.mode = PROXY_DEFERRED
        elif callable(self.dispatch):
            self.mode = PROXY_DISPATCHER
        elif callable(proxy):
            self.mode = PROXY_CALLABLE
        else:
            self.mode = PROXY_METHODS

    def handle(self, dict context not None, dict message not None):
        """Run one cast the way the receive loop does; for tests and
        micro-benchmarks."""
        return self.invoke(RpcContext.wrap(context), message, KIND_CAST)

    cdef object invoke(self, RpcContext ctxt, dict msg, int kind):
        if kind == KIND_NOTIFY:
            msg = _unwrap(msg)
        if self.mode == PROXY_CALLABLE:
            return self.proxy(ctxt, msg)
        if self.mode == PROXY_DEFERRED:
            return self.proxy(ctxt, msg, None)
        method = msg.get("method")
        if type(method) is not str or not method:
            raise InvalidMessage("message has no 'method'")
        args = msg.get("args")
        if args is None:
            args = {}
        elif type(args) is not dict:
            raise InvalidMessage("message 'args' is not a dict")
        if self.mode == PROXY_DISPATCHER:
            return self.dispatch(ctxt, msg.get("version"), method, msg.get("namespace"),
                                 **args)
        target = None
        if (<str>method)[0] != "_":
            target = getattr(self.proxy, method, None)
        if target is None or not callable(target):
            raise AttributeError(f"No such RPC function '{method}'")
        return PyObject_Call(target, (ctxt,), args)


cdef enum:                          # indexes into Server.counters
    RECEIVED, HANDLED, REPLIES, HANDLER_ERRORS,
    DROPPED_FRAMES, DROPPED_HEADER, DROPPED_VERSION, DROPPED_OVERSIZE,
    DROPPED_BODY, DROPPED_TOPIC, REPLIES_UNDELIVERABLE,
    NCOUNTERS

_COUNTER_NAMES = (
    "received", "handled", "replies", "handler_errors",
    "dropped_frame_count", "dropped_bad_header", "dropped_version",
    "dropped_oversize", "dropped_bad_body", "dropped_unknown_topic",
    "replies_undeliverable",
)


@cython.final
cdef class Worker:
    """Per-thread state: packers are not thread-safe."""
    cdef object packer

    def __cinit__(self):
        self.packer = new_packer()


cdef class Server:
    cdef Context ctx
    cdef void *sock                 # ROUTER, bound: requests in, replies out
    cdef void *control              # inproc DEALER into sock; under the token mutex
    cdef bytes secret               # the control socket's routing id
    cdef lf_token lf
    cdef bint lf_ready
    cdef dict direct                # topic (UTF-8 bytes) -> Consumer
    cdef dict fanouts
    cdef tuple last                 # (kind is fanout, topic bytes, Consumer)
    cdef bytes host_suffix          # b"." + host: 'topic.host' is ours
    cdef readonly str bound         # the endpoint libzmq reports
    cdef Py_ssize_t max_message_size
    cdef readonly int max_threads
    cdef readonly int workers        # worker threads running
    cdef bint started
    cdef object threads_lock
    cdef bint stopping
    cdef double quiet
    cdef unsigned long long counters[NCOUNTERS]
    cdef int epoch
    cdef object handle_failure      # exception -> msgpack-able failure

    def __cinit__(self):
        self.sock = self.control = NULL
        self.lf_ready = False

    def __init__(self, Context ctx not None, str bind not None, str host not None,
                 bytes identity=None, *,
                 Py_ssize_t max_message_size, int max_threads=64, double patience=0.005,
                 double quiet=0.05, serialize_failure=None):
        cdef int64_t limit
        cdef zmq_msg_t probe
        self.ctx = ctx
        self.epoch = fork_epoch()
        self.direct = {}
        self.fanouts = {}
        self.host_suffix = ("." + host).encode("utf-8")
        self.max_message_size = max_message_size
        self.max_threads = max(1, max_threads)
        self.threads_lock = unpatched("_thread").allocate_lock()
        self.quiet = quiet
        self.handle_failure = serialize_failure
        if lf_init(&self.lf, <int64_t>(patience * 1e9)) != 0:
            raise MemoryError("cannot initialise the worker token")
        self.lf_ready = True
        self.secret = os.urandom(16)
        internal = f"inproc://nzf-control-{id(self):x}".encode()
        try:
            self.sock = ctx.socket(ZMQ_ROUTER)
            set_int(self.sock, ZMQ_ROUTER_MANDATORY, 1)
            set_int(self.sock, ZMQ_LINGER, 0)
            set_int(self.sock, ZMQ_RCVHWM, 100000)
            set_int(self.sock, ZMQ_SNDHWM, 100000)
            if ":" in bind.partition("://")[2].rpartition(":")[0]:
                set_int(self.sock, ZMQ_IPV6, 1)
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
            if identity:
                # Callers address this server by its advertised address:
                # that is the routing id it announces to every peer.
                check(zmq_setsockopt(self.sock, ZMQ_ROUTING_ID,
                                     PyBytes_AS_STRING(identity), PyBytes_GET_SIZE(identity)))
            check(zmq_bind(self.sock, bind.encode()))
            self.bound = self._last_endpoint()
        except BaseException:
            self._close_sockets(0)
            raise

    cdef str _last_endpoint(self):
        cdef char buf[256]
        cdef size_t size = sizeof(buf)
        check(zmq_getsockopt(self.sock, ZMQ_LAST_ENDPOINT, buf, &size))
        return buf[:size - 1].decode()

    # -- consumers ---------------------------------------------------------

    def add_consumer(self, str topic, bint fanout, proxy, bint deferred=False):
        """Serve `topic` with `proxy`.  deferred=True: the proxy is called
        as proxy(ctxt, msg, replier) and answers calls through the Replier
        whenever it likes (replier is None for casts)."""
        table = self.fanouts if fanout else self.direct
        table[topic.encode("utf-8")] = Consumer(topic, fanout, proxy, deferred)
        self.last = None

    def remove_consumer(self, str topic, bint fanout):
        table = self.fanouts if fanout else self.direct
        table.pop(topic.encode("utf-8"), None)
        self.last = None

    cdef Consumer find(self, Header *h):
        """The consumer for a request: the exact topic, or for 'topic.host'
        where host is ours, the consumer of 'topic'.  The last answer is
        kept, so a stream of messages to one topic costs a memcmp."""
        cdef bint fanout = h.kind == KIND_FANOUT
        cdef tuple last = self.last
        cdef bytes topic
        if last is not None:
            topic = <bytes>last[1]
            if (<bint>last[0] == fanout and PyBytes_GET_SIZE(topic) == <Py_ssize_t>h.topic_len
                    and memcmp(PyBytes_AS_STRING(topic), h.topic, h.topic_len) == 0):
                return <Consumer>last[2]
        topic = PyBytes_FromStringAndSize(h.topic, h.topic_len)
        consumer = (self.fanouts if fanout else self.direct).get(topic)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(self.host_suffix)
        if consumer is None and not fanout and <Py_ssize_t>h.topic_len > n and memcmp(
                h.topic + h.topic_len - n, PyBytes_AS_STRING(self.host_suffix), n) == 0:
            consumer = self.direct.get(topic[:h.topic_len - n])
        if consumer is not None:
            self.last = (fanout, topic, consumer)
        return consumer

    # -- workers -----------------------------------------------------------

    def start(self):
        """Start serving: one leader plus a standby; more on demand."""
        with self.threads_lock:
            if self.started or self.stopping:
                return
            self.started = True
            for _ in range(min(2, self.max_threads)):
                self._spawn()

    cdef _spawn(self):
        self.workers += 1
        try:
            unpatched("_thread").start_new_thread(self._work, ())
        except BaseException:
            self.workers -= 1
            raise

    cdef _grow(self):
        """Called by a worker that took over from a busy leader: keep a
        standby available while the pool may still grow."""
        if self.lf.waiting > 0 or self.stopping:
            return
        with self.threads_lock:
            if self.workers < self.max_threads and not self.stopping:
                self._spawn()

    def _work(self):
        cdef uint64_t gen
        cdef int stole
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
                    LOG.exception("receive loop failed; closing server %s", self.bound)
                    self.stopping = True
                    lf_close_owner(&self.lf, gen)
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
        rc = zmq_msg_recv(&parts[0], self.sock, ZMQ_DONTWAIT)
        if rc == -1:
            err = zmq_errno()
            if err != EAGAIN and err != EINTR:
                raise_zmq_error(err)
            set_int(self.sock, ZMQ_RCVTIMEO, timeout_ms)
            with nogil:
                rc = zmq_msg_recv(&parts[0], self.sock, 0)
            if rc == -1:
                err = zmq_errno()
                if err == EAGAIN or err == EINTR:
                    return GOT_NOTHING
                raise_zmq_error(err)
        while zmq_msg_more(&parts[n - 1]) and n < MAX_PARTS:
            check(zmq_msg_recv(&parts[n], self.sock, 0))
            n += 1
        if zmq_msg_more(&parts[n - 1]):
            self._discard_rest()
            n = MAX_PARTS + 1
        if (zmq_msg_size(&parts[0]) == SECRET_LEN and memcmp(
                zmq_msg_data(&parts[0]), PyBytes_AS_STRING(self.secret), SECRET_LEN) == 0):
            return self._control(parts, n)
        self.counters[RECEIVED] += 1
        if n != 3:
            self.counters[DROPPED_FRAMES] += 1
            return GOT_DROPPED
        status = parse_header(<const char *>zmq_msg_data(&parts[1]),
                              zmq_msg_size(&parts[1]), h)
        if status == HDR_VERSION:
            self.counters[DROPPED_VERSION] += 1
            return GOT_DROPPED
        if status != HDR_OK or not is_request(h.kind):
            self.counters[DROPPED_HEADER] += 1
            return GOT_DROPPED
        return GOT_REQUEST

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
        if n == 5:
            if (zmq_msg_send(&parts[2], self.sock, ZMQ_SNDMORE | ZMQ_DONTWAIT) == -1):
                self.counters[REPLIES_UNDELIVERABLE] += 1
            else:
                zmq_msg_send(&parts[3], self.sock, ZMQ_SNDMORE)
                zmq_msg_send(&parts[4], self.sock, 0)
                self.counters[REPLIES] += 1
            return GOT_CONTROL
        return GOT_STOP

    cdef _drain(self, Worker w, uint64_t gen, zmq_msg_t *parts):
        """Stop requested: serve what is already queued or still arriving
        until the socket has been quiet for `quiet` seconds, then close the
        token so that no worker touches the sockets again."""
        cdef Header h
        cdef int got
        cdef int quiet_ms = max(1, <int>(self.quiet * 1000))
        try:
            while True:
                got = self._recv(parts, &h, quiet_ms)
                if got == GOT_NOTHING:
                    break
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
        cdef Consumer consumer
        cdef size_t size = zmq_msg_size(&parts[2])
        if self.max_message_size > 0 and size > <size_t>self.max_message_size:
            self.counters[DROPPED_OVERSIZE] += 1
            if kind == KIND_CALL:
                self._fail(w, gen, &parts[0], msg_id, MessageTooLarge(
                    f"request of {size} bytes exceeds the server's limit of "
                    f"{self.max_message_size}"))
            return
        consumer = self.find(h)
        if consumer is None:
            self.counters[DROPPED_TOPIC] += 1
            if kind == KIND_CALL:
                topic = PyBytes_FromStringAndSize(h.topic, h.topic_len)
                self._fail(w, gen, &parts[0], msg_id, LookupError(
                    f"topic {topic.decode('utf-8', 'replace')!r} is not served here"))
            return
        try:
            body = unpack(<const char *>zmq_msg_data(&parts[2]), size)
            if (type(body) is not list or len(<list>body) != 2
                    or type((<list>body)[0]) is not dict
                    or type((<list>body)[1]) is not dict):
                raise MalformedEnvelope("body is not [context, message]")
        except MalformedEnvelope as exc:
            self.counters[DROPPED_BODY] += 1
            if kind == KIND_CALL:
                self._fail(w, gen, &parts[0], msg_id, exc)
            return
        ctxt = RpcContext.wrap(<dict>(<list>body)[0])
        msg = <dict>(<list>body)[1]
        cdef Replier replier
        try:
            if consumer.mode == PROXY_DEFERRED and kind == KIND_CALL:
                replier = Replier.__new__(Replier)
                replier.server = self
                replier.identity = (<const char *>zmq_msg_data(&parts[0]))[
                    :zmq_msg_size(&parts[0])]
                replier.msg_id = msg_id
                consumer.proxy(ctxt, msg, replier)
                self.counters[HANDLED] += 1
                return
            result = consumer.invoke(ctxt, msg, kind)
            if kind == KIND_CALL:
                self._answer(w, gen, &parts[0], msg_id, h.flags & FLAG_MULTI, result)
            elif PyGen_Check(result):
                for _ in result:
                    pass
        except Exception as exc:
            if kind == KIND_CALL:
                self._fail(w, gen, &parts[0], msg_id, exc)
            else:
                self.counters[HANDLER_ERRORS] += 1
                LOG.exception("error handling %s on topic %s", msg.get("method", "<notification>"),
                              consumer.topic)
        self.counters[HANDLED] += 1

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
            body = w.packer.pack(self.handle_failure(exc))
        except Exception:
            body = w.packer.pack(["builtins", "RuntimeError",
                                  "the remote exception could not be encoded", [], ""])
        self._send_reply(gen, <const char *>zmq_msg_data(identity), zmq_msg_size(identity),
                         KIND_FAILURE, msg_id, body)

    cdef _send_reply(self, uint64_t gen, const char *identity, size_t identity_len,
                     int kind, uint64_t msg_id, bytes body):
        """Send [identity, header, body] back to the caller: directly while
        this worker holds the token `gen`, else (gen 0: not a worker) via the
        control socket for the leader to forward.  Either way under the token
        mutex, so the token cannot move in between."""
        cdef char header[MAX_HEADER]
        cdef size_t hlen = write_header(header, kind, 0, msg_id, NULL, 0)
        cdef int ok = 0
        cdef const char *data = PyBytes_AS_STRING(body)
        cdef size_t size = PyBytes_GET_SIZE(body)
        with nogil:
            lf_lock(&self.lf)
            if not self.lf.closed:
                if gen != 0 and self.lf.owner == gen:
                    if zmq_send(self.sock, identity, identity_len,
                                ZMQ_SNDMORE | ZMQ_DONTWAIT) != -1:
                        zmq_send(self.sock, header, hlen, ZMQ_SNDMORE)
                        zmq_send(self.sock, data, size, 0)
                        ok = 1
                elif zmq_send(self.control, b"FWD", 3, ZMQ_SNDMORE | ZMQ_DONTWAIT) != -1:
                    zmq_send(self.control, identity, identity_len, ZMQ_SNDMORE)
                    zmq_send(self.control, header, hlen, ZMQ_SNDMORE)
                    zmq_send(self.control, data, size, 0)
                    ok = 2
            lf_unlock(&self.lf)
        if ok == 1:
            self.counters[REPLIES] += 1
        elif ok == 0:
            self.counters[REPLIES_UNDELIVERABLE] += 1

    # -- lifecycle ---------------------------------------------------------

    def stats(self):
        return {name: self.counters[i] for i, name in enumerate(_COUNTER_NAMES)}

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
        self.stopping = True
        with nogil:
            lf_lock(&self.lf)
            if not self.lf.closed:
                zmq_send(self.control, b"STOP", 4, ZMQ_DONTWAIT)
            lf_unlock(&self.lf)
        # The leader drains and closes the token; if nobody leads (never
        # started, or every worker is inside a handler) close it ourselves.
        with self.threads_lock:
            started = self.started
        while not self.lf.closed:
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
        linger = max(0, <int>((deadline - _monotonic()) * 1000))
        self._close_sockets(linger)
        if self.workers:
            LOG.warning("server %s: %d handler(s) still running after %.1fs",
                        self.bound, self.workers, timeout)
        return self.workers == 0

    cdef _close_sockets(self, int linger_ms):
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
