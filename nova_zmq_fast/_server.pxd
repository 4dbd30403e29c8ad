# The serving side: one listening socket per process, its worker pool and
# receive loop.  Behaviour in _server.pyx; the token protocol in csrc/leader.h.
cimport cython
from libc.stdint cimport int64_t, uint64_t

from nova_zmq_fast._libzmq cimport zmq_msg_t
from nova_zmq_fast._zmq cimport Context
from nova_zmq_fast._envelope cimport Header
from nova_zmq_fast._dispatch cimport Consumer, RpcContext, Subscription
from nova_zmq_fast._curve cimport AllowList


cdef extern from "leader.h" nogil:
    ctypedef struct lf_token:
        uint64_t owner
        int waiting
        int closed
    int lf_init(lf_token *t, int64_t patience_ns)
    void lf_destroy(lf_token *t)
    uint64_t lf_follow(lf_token *t, int *stole)
    uint64_t lf_lead(lf_token *t)
    void lf_busy(lf_token *t, uint64_t gen)
    int lf_idle(lf_token *t, uint64_t gen)
    void lf_close_owner(lf_token *t, uint64_t gen)
    int lf_try_close(lf_token *t)
    void lf_lock(lf_token *t)
    void lf_unlock(lf_token *t)


cdef enum:                          # indexes into Server.counters
    RECEIVED, HANDLED, REPLIES, HANDLER_ERRORS,
    DROPPED_FRAMES, DROPPED_HEADER, DROPPED_VERSION, DROPPED_OVERSIZE,
    DROPPED_BODY, DROPPED_TOPIC, DROPPED_REVOKED, REPLIES_UNDELIVERABLE,
    ACKS, DUPLICATES, PINGS,
    REPLIES_DELAYED,                # waited for room in the control socket's queue
    REPLIES_HANDOFF_TIMEOUT,        # ... and found none in send_timeout: dropped
    STREAMS_TRUNCATED,              # multicalls that lost values: FAILURE instead of END
    REPLIES_TOO_LARGE,              # over rpc_zmq_max_message_size: FAILURE instead
    NCOUNTERS


cdef enum SeenAs:                   # what Seen.begin() found
    SEEN_NEW, SEEN_RUNNING, SEEN_HANDLED


cdef class Seen:
    cdef double window               # seconds a handled cast is remembered
    cdef dict running                # key -> None: not answered yet
    cdef object handled              # OrderedDict key -> when it may go, oldest first
    cdef readonly unsigned long long forgotten_early

    @staticmethod
    cdef Seen new(double window)
    cdef int begin(self, object key) except -1
    cdef done(self, object key)
    cdef forget(self, object key)


cdef class Worker:
    cdef object packer              # msgpack packers are not thread-safe


cdef class Server:
    cdef Context ctx
    cdef void *sock                 # ROUTER, bound: requests in, replies out
    cdef void *control              # inproc DEALER into sock; under the token mutex
    cdef bytes secret               # the control socket's routing id
    cdef lf_token lf
    cdef bint lf_ready
    cdef dict direct                # topic (UTF-8 bytes) -> Subscription
    cdef dict fanouts
    cdef tuple last                 # (is fanout, topic bytes, Subscription)
    cdef bytes host                 # rpc_zmq_host, UTF-8: the 'topic.host' rule
    cdef readonly str bound         # the endpoint libzmq reports
    cdef readonly str address       # the endpoint peers dial; also its routing id
    cdef Py_ssize_t max_message_size
    cdef readonly int max_threads
    cdef readonly int workers       # worker threads running
    cdef bint started
    cdef readonly bint stopping
    cdef object threads_lock
    cdef set spawn_tokens           # tokens of worker threads about to start
    cdef double quiet
    cdef double stop_by             # stop()'s deadline: draining ends by then
    cdef double last_wake           # when a blocking receive last returned a message
    cdef bint idle                  # the leader is blocked on an empty queue
    cdef unsigned long long counters[NCOUNTERS]
    cdef int epoch
    cdef object serialize_failure   # exception -> msgpack-able failure
    cdef object on_failure          # called once if the receive loop dies
    cdef double send_timeout        # the longest a reply waits for the leader to take it
    cdef bint green                 # ... in a green thread (eventlet), cooperatively
    cdef public object before_close # called by stop() just before the sockets close
    cdef AllowList allow            # with CURVE: the keys accepted, and those revoked
    cdef object log                 # a RateLimitedLog for what peers cause
    cdef dict about                 # what a PING is answered with
    cdef Seen seen                  # at-least-once casts received: never run twice
    cdef dict broken                # (caller, msg_id) of a stream that lost values ->
                                    # (how many, whether the leader lost one forwarding,
                                    # the error its end reports or None: StreamTruncated)
    cdef uint64_t loop_gen          # the token's generation an event loop leads with, or 0
    cdef unsigned long loop_thread  # ... and that loop's thread
    cdef Worker loop_worker

    cdef Subscription find(self, Header *h)
    cdef _spawn(self)
    cdef _grow(self)
    cdef _lead(self, Worker w, uint64_t gen)
    cdef _failed(self, uint64_t gen)
    cdef int _recv(self, zmq_msg_t *parts, Header *h, int timeout_ms) except -1
    cdef bint _revoked(self, zmq_msg_t *part) except -1
    cdef int _drop(self, int counter, str what) except -1
    cdef _discard_rest(self)
    cdef int _control(self, zmq_msg_t *parts, int n) except -1
    cdef bint _forward_broken(self, zmq_msg_t *parts) except -1
    cdef _forward_lost(self, zmq_msg_t *parts)
    cdef _drain(self, Worker w, uint64_t gen, zmq_msg_t *parts)
    cdef _handle(self, Worker w, uint64_t gen, zmq_msg_t *parts, Header *h)
    cdef _run(self, Worker w, uint64_t gen, zmq_msg_t *identity, Header *h,
              Consumer consumer, RpcContext ctxt, dict msg)
    cdef _pong(self, Worker w, uint64_t gen, zmq_msg_t *identity, Header *h,
               Subscription sub, dict msg)
    cdef _answer(self, Worker w, uint64_t gen, zmq_msg_t *identity, uint64_t msg_id,
                 bint multi, object result)
    cdef _reply(self, Worker w, uint64_t gen, zmq_msg_t *identity, int kind,
                uint64_t msg_id, object value)
    cdef _fail(self, Worker w, uint64_t gen, zmq_msg_t *identity, uint64_t msg_id, exc)
    cdef _send_reply(self, uint64_t gen, const char *identity, size_t identity_len,
                     int kind, uint64_t msg_id, bytes body)
    @cython.final                   # on every reply: called directly, inlined
    cdef inline int _try_send(self, uint64_t gen, const char *identity, size_t identity_len,
                              const char *header, size_t hlen, const char *data,
                              size_t size) noexcept nogil
    @cython.final
    cdef inline bint _send_now(self, const char *identity, size_t identity_len,
                               const char *header, size_t hlen, const char *data,
                               size_t size) noexcept nogil
    cdef bytes _too_large(self, const char *identity, size_t identity_len, int kind,
                          uint64_t msg_id, Py_ssize_t size)
    cdef _lost(self, const char *identity, size_t identity_len, int kind, uint64_t msg_id,
               bint forwarding)
    cdef _break(self, const char *identity, size_t identity_len, uint64_t msg_id,
                bint forwarding, why)
    cdef bytes _failure_body(self, error)
    cdef bint _leads(self, uint64_t gen) noexcept
    cdef object _stream_fate(self, const char *identity, size_t identity_len, int kind,
                             uint64_t msg_id, bint forwarding)
    cdef _ack(self, uint64_t gen, bytes identity, uint64_t msg_id)
    cdef _close_sockets(self, int linger_ms)


cdef class Replier:
    cdef Server server
    cdef bytes identity
    cdef uint64_t msg_id
    cdef readonly bint done
    cdef readonly bint multi        # a multicall: values may stream (chunk, then end)
    cdef readonly bint cast         # an at-least-once cast: its answer is the ACK
    cdef uint64_t gen               # with `thread`: the token of the thread that received
    cdef unsigned long thread       # the request, for replies sent straight from there

    cdef uint64_t _gen(self)

    cdef _check(self)
    cdef _acknowledge(self)
    cdef _abandon(self)
    cdef _send(self, int kind, bytes body)
