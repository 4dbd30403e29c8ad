# The calling side: per-thread outboxes and the process's Client.
# Behaviour in _client.pyx.
from libc.stdint cimport uint64_t

from nova_zmq_fast._libzmq cimport zmq_msg_t
from nova_zmq_fast._zmq cimport Context
from nova_zmq_fast._envelope cimport Header
from nova_zmq_fast._routes cimport Endpoint, RouteTable


cdef enum SendStatus:               # what one attempt to hand a message to a peer did
    SENT                            # it is in the peer's queue
    UNCONNECTED                     # no established connection (yet): try another
    FULL                            # the peer's queue is full
    NEVER                           # must not be dialled (CURVE keys): skip, don't wait


cdef class Peer:
    cdef double dialled             # when the outbox first dialled it
    cdef bytes key                  # the CURVE key it was dialled with, or None
    cdef unsigned long long total   # messages handed over to it
    cdef unsigned long long confirmed   # of which it confirmed arrival (a reply, a PING)
    cdef unsigned long long seen    # `total` when the outbox last tidied


cdef class Outbox:
    cdef Context ctx
    cdef void *sock
    cdef int epoch
    cdef dict peers                 # routing id (= address) -> Peer
    cdef uint64_t last_id
    cdef object packer
    cdef unsigned long dead_seen    # the route table's dead_count, last seen
    cdef unsigned long routes_seen  # the route table's generation, last seen
    cdef Peer last_peer             # who the last message went to
    cdef dict streams               # msg_id -> list: replies for those waiting, open multicalls
    cdef dict waiters               # green: msg_id -> the Event its green thread waits on
    cdef object listener            # green: the hub's watch on the socket, while any waits
    cdef int linger_ms              # for messages still queued when the thread ends
    cdef int backlog                # ZMQ_SNDHWM: messages queued per peer
    cdef bint green                 # wait cooperatively (eventlet), never in libzmq
    cdef bytes curve_secret         # this process's CURVE key pair (Z85), or None
    cdef bytes curve_public
    cdef void *monitor              # with CURVE: PAIR receiving handshake failures
    cdef dict reasons               # address -> why it cannot be reached
    cdef dict marks                 # event loop's calls: msg_id -> (Peer, its total then)
    cdef int users                  # operations holding it now (Client.enter/hold)
    cdef bint retiring              # closed by its owner when the last one ends
    cdef object __weakref__

    cdef void close(self, int linger_ms) noexcept
    cdef bint claim(self) noexcept
    cdef _watch_handshakes(self)
    cdef bint dial(self, Endpoint ep) except -1
    cdef bint dialling(self, bytes rid)
    cdef str why(self, str address)
    cdef dict flush(self, double deadline)
    cdef tidy(self, RouteTable routes)
    cdef dict forget_peers(self, RouteTable routes)
    cdef str refusal(self, Endpoint ep)
    cdef dict unconfirmed(self)
    cdef Peer hang_up(self, bytes rid)
    cdef Peer vouched(self, Endpoint ep)
    cdef int try_send(self, Endpoint ep, const char *header, size_t hlen,
                      bytes body) except -1
    cdef int send_blocking(self, Endpoint ep, const char *header, size_t hlen,
                           bytes body, double deadline) except -1
    cdef int send_waiting(self, bytes rid, const char *header, size_t hlen, bytes body,
                          double deadline) except -1
    cdef object read_reply(self, zmq_msg_t *part, Header *h)
    cdef int take(self, zmq_msg_t *part) except -1
    cdef tuple wait_reply(self, uint64_t msg_id, double deadline)
    cdef int read_until(self, list pending, double deadline) except -1
    cdef int await_green(self, uint64_t msg_id, list pending, double deadline) except -1
    cdef int drain(self) except -1
    cdef void poke(self) noexcept
    cdef void wake_all(self) noexcept
    cdef int settle(self) except -1
    cdef bint next_frame(self, zmq_msg_t *part, double deadline) except -1


cdef class Client:
    cdef Context ctx
    cdef readonly RouteTable routes
    cdef object tls
    cdef object outboxes            # every live outbox (weak)
    cdef list spare                 # outboxes of ended threads, for the next ones
    cdef object spare_lock
    cdef dict rr                    # topic -> round-robin position
    cdef int linger_ms
    cdef int backlog
    cdef int socket_buffer          # ZMQ_SNDBUF, bytes (0: the OS's)
    cdef readonly double connect_timeout
    cdef tuple curve                # (public, secret) Z85, or None
    cdef public object courier      # the runtime's Courier (at-least-once, held notifications)
    cdef readonly bint green
    cdef readonly double send_timeout
    cdef readonly double response_timeout
    cdef readonly Py_ssize_t max_message_size
    cdef object rebuild_exception
    cdef bint closed
    cdef public unsigned long long casts, calls, fanouts, notifies, timeouts, refused
    cdef public unsigned long long no_listeners, notifications_dropped, fanout_unreachable
    cdef public unsigned long long discarded
    cdef public unsigned long long outboxes_made    # sockets opened for callers, ever
    cdef dict lost                  # address -> messages it never confirmed, that died with it

    cdef Outbox enter(self)
    cdef hold(self, Outbox ob)
    cdef void leave(self, Outbox ob) noexcept
    cdef void retire(self, Outbox ob, int linger_ms) noexcept
    cdef list holding(self, list outboxes)
    cdef Outbox lease(self)
    cdef object request_now(self, Outbox ob, int kind, context, topic, msg, bint multi,
                            set refused)
    cdef tuple fanout_now(self, Outbox ob, context, topic, msg, endpoints)
    cdef bytes encode(self, Outbox ob, object context, object msg)
    cdef tuple fanout_targets(self, object topic, object method)
    cdef Endpoint send_one(self, Outbox ob, tuple endpoints, const char *header, size_t hlen,
                           bytes body, double deadline, object topic, object method,
                           set refused=*)
    cdef list send_each(self, Outbox ob, tuple endpoints, const char *header, size_t hlen,
                        bytes body, double deadline, list full)
    cdef list wait_connected(self, Outbox ob, list pending, const char *header, size_t hlen,
                             bytes body, double deadline, list reached, list full, bint one,
                             object topic, set refused)
    cdef Py_ssize_t turn(self, object topic, Py_ssize_t n)
    cdef str unreachable(self, Outbox ob, list endpoints)
    cdef int none_live(self, Outbox ob, tuple endpoints, object topic,
                       object method) except -1
    cdef account(self, dict lost, str how)
    cdef uint64_t send_call(self, Outbox ob, object context, object topic, object msg,
                            int flags, double deadline, set refused) except? 0
    cdef double check_timeout(self, timeout) except -1
    cdef object decode_value(self, bytes body)
    cdef object decode_failure(self, bytes body)
