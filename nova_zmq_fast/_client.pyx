"""The calling side: cast, fanout, notify, call and multicall.

Each calling thread owns one ROUTER socket (its *outbox*), connected to every
peer that thread has talked to; under eventlet the green threads of an OS
thread share its outbox, waiting for their replies side by side.  A server announces its advertised address
as its ZeroMQ routing id, so a request goes out as [peer address, header,
body]; the server answers on the same connection, so the reply comes back to the very thread
that waits for it: no reply-dispatcher thread and no hand-off, and the
round trip has the same hops as a raw REQ/REP exchange.  Sockets are never
one per message: when a thread ends, its outbox goes to a pool of spares,
connections and all, and the next new thread takes it.  So a service that
runs each request in a new thread does not pay a socket and a connection
per request, nor one per green thread (hundreds of green threads calling at
once use one socket and one connection per server), and what an ended
thread sent is still confirmed, or counted, at cleanup().

Where a message goes: the route table (_routes.pyx) gives the consumers of
the topic; round-robin picks where to start, and the message goes to the
first consumer, from there, that has an established connection with room in
its queue.  Outboxes set ZMQ_IMMEDIATE and ZMQ_ROUTER_MANDATORY, so a
message only ever enters the queue of an established connection, and
ZMTP heartbeats drop a connection whose peer stopped answering (frozen,
partitioned): such a peer is skipped at once while another is up.  Only
when no consumer is connected does a send wait for a connection, up to
rpc_zmq_connect_timeout; when every connected one is full it waits for room
(backpressure), up to rpc_cast_timeout.  Every wait is also bounded by the
call's own deadline.  No message is dropped silently, and closing an outbox
with a linger flushes what it queued.
"""
import itertools
import logging
import os
import select
import struct
import sys
import weakref

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from nova_zmq_fast._libzmq cimport *
from nova_zmq_fast._zmq cimport (
    PAUSE_MIN_NS, Context, check, fork_epoch, ms_until, pause, raise_zmq_error, set_int)
from nova_zmq_fast._envelope cimport *
from nova_zmq_fast._routes cimport Endpoint, RouteTable

from nova_zmq_fast import _green
from nova_zmq_fast._green import unpatched
from nova_zmq_fast.logs import RateLimitedLog
from nova_zmq_fast.exceptions import (
    InvalidMessage, MalformedEnvelope, MessageTooLarge, NoListeners,
    PeerUnreachable, RPCException, SerializationError, Timeout, TransportClosed)

# OS threads: the green threads of one share its outbox.
cdef object _get_ident = unpatched("threading").get_ident
_finalizing = sys.is_finalizing
cdef object _monitor_names = itertools.count()
LOG = logging.getLogger("nova_zmq_fast.client")
THROTTLED = RateLimitedLog(LOG)

# How long a consumer that could not be connected to is skipped by this
# process (a new connection attempt goes on in the background).
cdef double DOWN_FOR = 2.0
# A consumer being dialled for the first time gets this long to connect when
# round-robin picks it, so a new client spreads its first calls too; a peer
# that was connected before, or never answers, is passed over at once.
cdef double FIRST_DIAL_GRACE = 0.1
cdef double GREEN_SLICE = 1.0       # longest a waiting green thread sleeps between looks
# The longest wait a timeout can ask for (a year): float('inf') means this.
cdef double MAX_WAIT = 365 * 86400.0


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


FLUSH_TOPIC = "nova_zmq_fast.flush"

# Envelope kinds, for the event-loop API (try_request, Outbox.replies).
KINDS = {"cast": KIND_CAST, "call": KIND_CALL, "notify": KIND_NOTIFY,
         "result": KIND_RESULT, "chunk": KIND_CHUNK, "end": KIND_END,
         "failure": KIND_FAILURE, "heartbeat": KIND_HEARTBEAT, "refused": KIND_REFUSED}


@cython.final
@cython.freelist(64)
cdef class Peer:
    """What an outbox knows of one server it dialled."""


@cython.final
cdef class Outbox:
    """One thread's calling socket (see the module docstring)."""

    def __cinit__(self, Context ctx not None, int linger_ms, int backlog, bint green,
                  tuple curve=None, int64_t max_message_size=0, int socket_buffer=0):
        cdef int64_t limit
        self.ctx = ctx
        self.monitor = NULL
        self.reasons = {}
        self.marks = {}
        self.linger_ms = linger_ms
        self.backlog = backlog
        self.green = green
        self.epoch = fork_epoch()
        self.sock = ctx.socket(ZMQ_ROUTER)
        self.peers = {}
        self.streams = {}
        self.waiters = {}
        self.packer = new_packer()
        self.last_id = 0
        self.dead_seen = 0
        try:
            set_int(self.sock, ZMQ_ROUTER_MANDATORY, 1)
            set_int(self.sock, ZMQ_IMMEDIATE, 1)
            set_int(self.sock, ZMQ_ROUTER_HANDOVER, 1)
            set_int(self.sock, ZMQ_IPV6, 1)
            # A random routing id: the one libzmq would give (0x00 and a
            # counter starting at a fixed value) is predictable, and servers
            # let a connection with a known id take it over (handover).
            identity = os.urandom(16)
            check(zmq_setsockopt(self.sock, ZMQ_ROUTING_ID, PyBytes_AS_STRING(identity), 16))
            set_int(self.sock, ZMQ_LINGER, 0)
            set_int(self.sock, ZMQ_SNDHWM, max(1, backlog))
            if socket_buffer > 0:
                set_int(self.sock, ZMQ_SNDBUF, socket_buffer)
            set_int(self.sock, ZMQ_RCVHWM, 100000)     # a long multicall stream
            if max_message_size > 0:
                # As on the server: replies are bodies too, and libzmq drops
                # a peer that sends a frame beyond this.
                limit = max_message_size * 2 + 65536
                check(zmq_setsockopt(self.sock, ZMQ_MAXMSGSIZE, &limit, sizeof(int64_t)))
            if curve is not None:
                self.curve_public, self.curve_secret = curve
                if self.curve_public is None or self.curve_secret is None or \
                        PyBytes_GET_SIZE(self.curve_public) != 40 or \
                        PyBytes_GET_SIZE(self.curve_secret) != 40:
                    raise ValueError("CURVE keys are 40 characters of Z85")
                # Z85 keys with their terminating NUL: 41 bytes.
                check(zmq_setsockopt(self.sock, ZMQ_CURVE_PUBLICKEY,
                                     PyBytes_AS_STRING(self.curve_public), 41))
                check(zmq_setsockopt(self.sock, ZMQ_CURVE_SECRETKEY,
                                     PyBytes_AS_STRING(self.curve_secret), 41))
                self._watch_handshakes()
        except BaseException:
            self.close(0)
            raise

    cdef _watch_handshakes(self):
        # Handshake failures (a refused key, a server that is not who
        # discovery says) arrive as monitor events; why() reads them.
        name = f"inproc://nzf-monitor-{os.getpid()}-{next(_monitor_names)}".encode()
        check(zmq_socket_monitor(self.sock, name, ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                                 ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                                 ZMQ_EVENT_HANDSHAKE_FAILED_AUTH))
        self.monitor = self.ctx.socket(ZMQ_PAIR)
        set_int(self.monitor, ZMQ_LINGER, 0)
        check(zmq_connect(self.monitor, name))

    cdef void close(self, int linger_ms) noexcept:
        if self.monitor != NULL:
            if self.epoch == fork_epoch():
                if self.sock != NULL:
                    zmq_socket_monitor(self.sock, NULL, 0)
                self.ctx.close_socket(self.monitor, 0)
            self.monitor = NULL
        if self.sock != NULL:
            if self.epoch == fork_epoch():
                self.ctx.close_socket(self.sock, linger_ms)
            self.sock = NULL

    def __dealloc__(self):
        # The owning thread ended: nothing else uses the socket any more.
        # What it queued still leaves, within the linger, in the background.
        self.close(self.linger_ms)

    cdef bint claim(self) noexcept:
        """Take this outbox if it is open and no operation holds it: the
        one check-and-take of every holder but an operation's own
        (Client.enter/hold add to `users`).  Under the GIL with no Python
        call in between, so two threads never both take it."""
        if self.users or self.sock == NULL:
            return False
        self.users = 1
        return True

    cdef str refusal(self, Endpoint ep):
        """Why `ep` must never be dialled, as discovery describes it now, or
        None: with CURVE only with a well-formed key discovery gave for it,
        without CURVE never to a server that requires it."""
        cdef bytes key = ep.key
        cdef unsigned char decoded[32]
        if self.curve_secret is not None and key is None:
            return "discovery published no CURVE key for it; it is never dialled in clear"
        if self.curve_secret is None and key is not None:
            return "it requires CURVE, and this process has no key (rpc_zmq_secret_key_file)"
        if key is not None and (PyBytes_GET_SIZE(key) != 40 or
                                zmq_z85_decode(decoded, PyBytes_AS_STRING(key)) == NULL):
            return "discovery published a malformed CURVE key for it"
        return None

    cdef bint dial(self, Endpoint ep) except -1:
        """Connect to `ep` (once); False if it must not be (refusal())."""
        cdef bytes rid = ep.rid
        cdef bytes key = ep.key
        if rid in self.peers:
            return True
        why = self.refusal(ep)
        if why is not None:
            self.reasons[ep.address] = why
            return False
        if key is not None:
            # For this connection only: options are copied at connect time.
            check(zmq_setsockopt(self.sock, ZMQ_CURVE_SERVERKEY, PyBytes_AS_STRING(key), 41))
        # (ZMQ_CONNECT_ROUTING_ID cannot name the connection: with
        # ZMQ_IMMEDIATE libzmq ignores it, so servers announce their address
        # as their routing id instead.)
        check(zmq_connect(self.sock, rid))
        cdef Peer peer = Peer.__new__(Peer)
        peer.dialled = _monotonic()
        peer.key = key
        self.peers[rid] = peer
        return True

    cdef str why(self, str address):
        """What is known of why `address` cannot be reached ("" if nothing).
        Reads the handshake failures the monitor reported."""
        cdef zmq_msg_t part
        cdef int event
        cdef unsigned int value
        cdef bytes data
        if self.monitor != NULL:
            zmq_msg_init(&part)
            try:
                # Events are [u16 event, u32 value], [endpoint].
                while zmq_msg_recv(&part, self.monitor, ZMQ_DONTWAIT) != -1:
                    data = (<const char *>zmq_msg_data(&part))[:zmq_msg_size(&part)]
                    if zmq_msg_recv(&part, self.monitor, ZMQ_DONTWAIT) == -1:
                        break
                    where = (<const char *>zmq_msg_data(&part))[:zmq_msg_size(&part)].decode(
                        "utf-8", "replace")
                    if len(data) != 6:
                        continue
                    event, value = struct.unpack("<HI", data)
                    # libzmq ends a session whose handshake failed and never
                    # dials that address again: forget it, so that the next
                    # send dials afresh (the key may be allowed by then).
                    # Not dialled any more: the event is stale (it was hung
                    # up on since), and says nothing of the address now.
                    if self.hang_up(where.encode()) is None:
                        continue
                    if event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
                        self.reasons[where] = (f"it refused this process's CURVE key "
                                               f"(ZAP status {value}: not in its allow-list)")
                    else:
                        # (Only CURVE outboxes are watched.)  An impostor
                        # cannot decrypt our HELLO: no detail reaches us.
                        detail = (f" (protocol error {value:#x})"
                                  if event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL else "")
                        self.reasons[where] = (f"the CURVE handshake failed{detail}: is it "
                                               f"the server discovery names, with the key "
                                               f"published for it?")
            finally:
                zmq_msg_close(&part)
        return self.reasons.get(address, "")

    cdef bint dialling(self, bytes rid):
        """Dialled for the first time, moments ago."""
        cdef Peer peer = self.peers.get(rid)
        return peer is not None and _monotonic() - peer.dialled < FIRST_DIAL_GRACE

    cdef dict forget_peers(self, RouteTable routes):
        """Disconnect from peers discovery declared gone, dropping whatever
        was queued for them.  Returns {address: messages sent there that it
        never confirmed}: lost with it, as far as anyone can tell."""
        cdef Peer peer
        lost = {}
        self.dead_seen = routes.dead_count
        for address in routes.forgotten():
            peer = self.hang_up(address.encode())
            if peer is not None:
                if peer.total != peer.confirmed:
                    lost[address] = peer.total - peer.confirmed
        return lost

    cdef dict flush(self, double deadline):
        """Confirm that what this outbox handed to each peer has arrived:
        a PING to each peer with unconfirmed messages (a connection
        delivers in order, so its answer, whatever it says, means that
        everything sent before it arrived), answers awaited until
        `deadline`.  Returns {address: messages not confirmed} for the
        peers that did not answer in time or are no longer connected."""
        cdef char header[MAX_HEADER]
        cdef bytes topic = FLUSH_TOPIC.encode()
        cdef bytes body = self.packer.pack([{}, {}])
        cdef Peer peer
        cdef size_t hlen
        cdef uint64_t msg_id
        asked = {}                          # msg_id -> (rid, peer, its total then)
        lost = {}
        for rid, peer in list(self.peers.items()):
            if peer.total == peer.confirmed:
                continue
            self.last_id += 1
            msg_id = self.last_id
            hlen = write_header(header, KIND_PING, 0, msg_id,
                                PyBytes_AS_STRING(topic), PyBytes_GET_SIZE(topic))
            self.streams[msg_id] = []           # expected before it is sent
            # Behind a full queue the PING waits its turn, up to the deadline.
            if self.send_waiting(rid, header, hlen, body, deadline) != SENT:
                # Disconnected (libzmq dropped its queue), or still full at
                # the deadline: nothing confirms it in time.
                self.streams.pop(msg_id, None)
                lost[rid.decode()] = peer.total - peer.confirmed
                peer.confirmed = peer.total
                continue
            asked[msg_id] = (rid, peer, peer.total)
        try:
            for msg_id, (rid, peer, total) in asked.items():
                if self.wait_reply(msg_id, deadline) is None:
                    lost[rid.decode()] = total - peer.confirmed
                peer.confirmed = total
        finally:
            for msg_id in asked:
                self.streams.pop(msg_id, None)
        return lost

    cdef tidy(self, RouteTable routes):
        """Hang up on peers no route holds any more, that were not used since
        the last tidy and have confirmed everything: libzmq would otherwise
        keep redialling a closed server for the life of the thread.  Runs
        when the route table has changed."""
        cdef Peer peer
        self.routes_seen = routes.generation
        known = routes.addresses()
        for rid, peer in list(self.peers.items()):
            used = peer.total != peer.seen
            peer.seen = peer.total
            if used or peer.confirmed != peer.total or rid.decode() in known:
                continue
            self.hang_up(rid)

    cdef dict unconfirmed(self):
        """{address: messages handed to it that it has not confirmed}."""
        cdef Peer peer
        found = {}
        for rid, peer in self.peers.items():
            if peer.total != peer.confirmed:
                found[rid.decode()] = peer.total - peer.confirmed
        return found

    cdef Peer hang_up(self, bytes rid):
        """Disconnect from `rid`, dropping what is queued to it; the next
        send dials afresh.  Returns the Peer it was, or None."""
        cdef Peer peer = self.peers.pop(rid, None)
        if peer is not None:
            zmq_disconnect(self.sock, rid)
            self.settle()
        return peer

    cdef Peer vouched(self, Endpoint ep):
        """The peer `ep` names, if connected with the key discovery gives
        for it now.  When discovery has since published another key, the
        server this connection authenticated is no longer vouched for: it
        is hung up on, and the next send dials with the new key."""
        cdef Peer peer = self.peers.get(ep.rid)
        if peer is None or peer.key is ep.key or peer.key == ep.key:
            return peer
        self.hang_up(ep.rid)
        if peer.total != peer.confirmed:
            LOG.warning("%s has a new CURVE key in discovery: %d message(s) queued to the "
                        "server with the old key may be lost", ep.address,
                        peer.total - peer.confirmed)
        return None

    cdef int try_send(self, Endpoint ep, const char *header, size_t hlen,
                      bytes body) except -1:
        """Hand the message to `ep` if that can be done without waiting.
        A peer not connected yet is dialled for next time."""
        cdef bytes rid = ep.rid
        cdef int rc, err
        cdef Peer peer = self.vouched(ep)
        while True:
            rc = zmq_send(self.sock, PyBytes_AS_STRING(rid), PyBytes_GET_SIZE(rid),
                          ZMQ_SNDMORE | ZMQ_DONTWAIT)
            if rc != -1:
                break
            err = zmq_errno()
            if err == EHOSTUNREACH:
                rc = UNCONNECTED if self.dial(ep) else NEVER
                self.settle()
                return rc
            if err == EAGAIN:
                self.settle()
                return FULL
            if err == EINTR:
                PyErr_CheckSignals()
                continue
            raise_zmq_error(err)
        # The routing frame went through: the rest of the message cannot
        # block or fail on the high-water mark.
        check(zmq_send(self.sock, header, hlen, ZMQ_SNDMORE))
        check(zmq_send(self.sock, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), 0))
        if peer is not None:
            peer.total += 1                 # unconfirmed until a reply or flush() hears back
        self.last_peer = peer
        self.settle()
        return SENT

    cdef int send_blocking(self, Endpoint ep, const char *header, size_t hlen,
                           bytes body, double deadline) except -1:
        """Wait for room in `ep`'s full queue, up to `deadline`, and send:
        SENT, FULL at the deadline, or UNCONNECTED if the connection was
        lost.  The caller says what that means for its message."""
        cdef Peer peer = self.vouched(ep)
        cdef int status = self.send_waiting(ep.rid, header, hlen, body, deadline)
        if status == SENT:
            if peer is not None:
                peer.total += 1
            self.last_peer = peer
        return status

    cdef int send_waiting(self, bytes rid, const char *header, size_t hlen, bytes body,
                          double deadline) except -1:
        """Send to the connected peer `rid`, waiting for room in its queue
        up to `deadline`, GIL released (a green thread polls instead):
        SENT, FULL at the deadline, or UNCONNECTED when the connection is
        gone (libzmq dropped its queue).  ZMTP heartbeats drop a connection
        whose peer stopped reading for good, which ends the wait too."""
        cdef const char *r = PyBytes_AS_STRING(rid)
        cdef size_t rlen = PyBytes_GET_SIZE(rid)
        cdef int rc, err, timeout_ms
        cdef long pause_ns = PAUSE_MIN_NS
        while True:
            timeout_ms = ms_until(deadline)
            if timeout_ms == 0:
                return FULL
            if self.green:
                rc = zmq_send(self.sock, r, rlen, ZMQ_SNDMORE | ZMQ_DONTWAIT)
            else:
                set_int(self.sock, ZMQ_SNDTIMEO, timeout_ms)
                with nogil:
                    rc = zmq_send(self.sock, r, rlen, ZMQ_SNDMORE)
            if rc != -1:
                break
            err = zmq_errno()
            if err == EHOSTUNREACH:
                self.settle()
                return UNCONNECTED
            if err == EINTR:
                PyErr_CheckSignals()
            elif err != EAGAIN:
                raise_zmq_error(err)
            elif self.green:
                self.settle()
                pause_ns = pause(pause_ns, True)
        # The routing frame went through: the rest of the message cannot
        # block or fail on the high-water mark.
        check(zmq_send(self.sock, header, hlen, ZMQ_SNDMORE))
        check(zmq_send(self.sock, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), 0))
        self.settle()
        return SENT

    cdef object read_reply(self, zmq_msg_t *part, Header *h):
        """The rest of a message whose first frame (the peer) is in `part`:
        [peer, header, body].  Its body, with the header in `h`, if it is a
        well-formed reply; else None (dropped)."""
        cdef int nparts = 1
        cdef int status = HDR_SHORT
        body = None
        while zmq_msg_more(part):
            check(zmq_msg_recv(part, self.sock, 0))
            nparts += 1
            if nparts == 2:
                status = parse_header(<const char *>zmq_msg_data(part), zmq_msg_size(part), h)
            elif nparts == 3:
                body = (<const char *>zmq_msg_data(part))[:zmq_msg_size(part)]
        if nparts != 3 or status != HDR_OK or not is_reply(h.kind):
            return None
        return body

    cdef int take(self, zmq_msg_t *part) except -1:
        """The rest of a reply whose first frame is in `part`, kept for
        whoever waits for its msg_id (waking its green thread); dropped if
        nobody does (a call that timed out) or malformed."""
        cdef Header h
        body = self.read_reply(part, &h)
        if body is None:
            return 0
        cdef list pending = self.streams.get(h.msg_id)
        if pending is not None:
            pending.append((h.kind, body))
            if self.waiters:
                woken = self.waiters.pop(h.msg_id, None)
                if woken is not None:
                    woken.send()
        return 0

    cdef tuple wait_reply(self, uint64_t msg_id, double deadline):
        """Wait for the next reply to `msg_id`: (kind, body bytes), or None
        at the deadline.  `msg_id` is expected (its list in `streams`)
        from before its request was sent until its caller is done with it:
        replies read meanwhile for other calls and open multicall streams
        are kept for them; stale ones (calls that already timed out) are
        dropped."""
        cdef list pending = self.streams.get(msg_id)
        if pending is None:
            raise RPCException(f"no call {msg_id} is expected on this outbox")
        if not pending:
            if self.green:
                self.await_green(msg_id, pending, deadline)
            else:
                self.read_until(pending, deadline)
        return pending.pop(0) if pending else None

    cdef int read_until(self, list pending, double deadline) except -1:
        """Read replies, blocking in libzmq, until one is in `pending` or
        the deadline passes."""
        cdef zmq_msg_t part
        zmq_msg_init(&part)
        try:
            while not pending:
                if not self.next_frame(&part, deadline):
                    return 0
                self.take(&part)
        finally:
            zmq_msg_close(&part)
        return 0

    cdef int await_green(self, uint64_t msg_id, list pending, double deadline) except -1:
        """Wait cooperatively until a reply is in `pending` or the deadline
        passes.  Every green thread of an OS thread shares its outbox, and
        any number of them may wait at once: none reads the socket while
        parked.  The hub watches the socket's ZMQ_FD and reads what arrives
        (drain()), waking the green threads whose replies came."""
        cdef double left
        cdef int fd
        cdef size_t size = sizeof(int)
        while True:
            self.drain()                    # what is already there: no edge announces it
            if pending:
                return 0
            left = deadline - _monotonic()
            if left <= 0:
                return 0
            if msg_id in self.waiters:
                raise RuntimeError("another green thread already waits for this reply")
            woken = _green.event()
            self.waiters[msg_id] = woken
            try:
                if self.listener is None:
                    check(zmq_getsockopt(self.sock, ZMQ_FD, &fd, &size))
                    self.listener = _green.watch(fd, self.on_readable)
                # In slices: should a wake-up ever be missed, the wait
                # still ends at the next one, not at the deadline.
                woken.wait(min(left, GREEN_SLICE))
            finally:
                if self.waiters.get(msg_id) is woken:
                    del self.waiters[msg_id]
                if not self.waiters and self.listener is not None:
                    _green.unwatch(self.listener)
                    self.listener = None

    def on_readable(self):
        """The hub saw ZMQ_FD readable: read what came."""
        self.poke()

    cdef void poke(self) noexcept:
        """drain(), never raising (drain() wakes every waiter on an error):
        for the hub, and for an operation ending while green threads wait
        (Client.leave), whose last libzmq call on the socket may have taken
        in replies, or the one signal that the context was terminated, and
        with them the edge the hub waits for."""
        try:
            self.drain()
        except BaseException:
            pass

    cdef void wake_all(self) noexcept:
        """Wake every waiting green thread, to meet in drain() what ended
        the wait (the context terminated at cleanup, the socket closed)."""
        woken, self.waiters = list(self.waiters.values()), {}
        try:
            if self.listener is not None:
                _green.unwatch(self.listener)
            for event in woken:
                event.send()
        except BaseException:
            pass
        self.listener = None

    cdef int drain(self) except -1:
        """Read every reply already queued, without waiting (take()).  Also
        clears ZMQ_FD's edge, so the hub sees the next arrival.  On an
        error, every waiting green thread is woken before it is raised."""
        cdef zmq_msg_t part
        cdef int err
        if self.sock == NULL:
            self.wake_all()
            raise TransportClosed("the transport was cleaned up while this call waited")
        zmq_msg_init(&part)
        try:
            while True:
                if zmq_msg_recv(&part, self.sock, ZMQ_DONTWAIT) != -1:
                    self.take(&part)
                    continue
                err = zmq_errno()
                if err == EAGAIN:
                    break
                if err == EINTR:
                    PyErr_CheckSignals()
                    continue
                raise_zmq_error(err)
        except BaseException:
            self.wake_all()
            raise
        finally:
            zmq_msg_close(&part)
        return 0

    cdef inline int settle(self) except -1:
        """After a call into libzmq on the socket: it may have taken in
        replies, and with them the edge that would have told the hub.
        While green threads wait, read them now."""
        if self.waiters:
            self.drain()
        return 0

    cdef bint next_frame(self, zmq_msg_t *part, double deadline) except -1:
        """Receive the first frame of the next message, waiting until
        `deadline`; False if none came: one blocking zmq_msg_recv with
        ZMQ_RCVTIMEO and the GIL released, the same path as a REQ socket's,
        with no zmq_poll.  (Green threads never block here: await_green.)"""
        cdef int rc, err, timeout_ms
        while True:
            timeout_ms = ms_until(deadline)
            if timeout_ms == 0:
                return False
            set_int(self.sock, ZMQ_RCVTIMEO, timeout_ms)
            with nogil:
                rc = zmq_msg_recv(part, self.sock, 0)
            if rc != -1:
                return True
            err = zmq_errno()
            if err == EINTR:
                PyErr_CheckSignals()
            elif err != EAGAIN:
                raise_zmq_error(err)


    # -- for an event loop (nova_zmq_fast.aio): never waits ----------------

    @property
    def fd(self):
        """The socket's ZMQ_FD: readable (edge-triggered) when libzmq has
        something for it; check again with replies() after every wake-up
        and every send."""
        cdef int fd
        cdef size_t size = sizeof(int)
        if self.sock == NULL:
            raise RPCException("this outbox is closed")
        check(zmq_getsockopt(self.sock, ZMQ_FD, &fd, &size))
        return fd

    def replies(self):
        """Every reply already queued, without waiting: a list of
        (msg_id, kind, body bytes).  Ends with the queue empty, so the next
        arrival makes `fd` readable again."""
        cdef zmq_msg_t part
        cdef Header h
        cdef bytes body
        cdef Peer peer
        out = []
        if self.epoch != fork_epoch() or not self.claim():
            return out                      # closed, or being flushed by close()
        zmq_msg_init(&part)
        try:
            while True:
                if zmq_msg_recv(&part, self.sock, ZMQ_DONTWAIT) == -1:
                    if zmq_errno() in (EAGAIN, EINTR):
                        return out
                    raise_zmq_error(zmq_errno())
                body = self.read_reply(&part, &h)
                if body is not None:
                    out.append((h.msg_id, h.kind, body))
                    mark = self.marks.pop(h.msg_id, None) if h.kind != KIND_CHUNK else None
                    if mark is not None:
                        # Any answer means everything sent before the call arrived.
                        peer = <Peer>mark[0]
                        if <unsigned long long>mark[1] > peer.confirmed:
                            peer.confirmed = mark[1]
        finally:
            zmq_msg_close(&part)
            self.users = 0

    def forget(self, msg_id):
        """A call nobody waits for any more (timed out, cancelled)."""
        self.marks.pop(msg_id, None)


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
        self.client.hold(self.outbox)
        try:
            while True:
                reply = self.outbox.wait_reply(self.msg_id, _monotonic() + self.timeout)
                if reply is None:
                    self.finish()
                    self.client.timeouts += 1
                    raise Timeout(None, self.topic, self.method)
                if reply[0] != KIND_HEARTBEAT:         # a heartbeat restarts the wait
                    break
        finally:
            self.client.leave(self.outbox)
        kind, body = reply
        if kind == KIND_CHUNK:
            return self.client.decode_value(body)
        self.finish()
        if kind == KIND_END:
            raise StopIteration
        if kind == KIND_FAILURE:
            raise self.client.decode_failure(body)
        if kind == KIND_REFUSED:
            self.client.refused += 1
            self.client.routes.invalidate(self.topic)
            raise NoListeners(self.client.decode_value(body), self.topic, self.method)
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


SPARE_MAX = 256         # outboxes of ended threads kept for the next ones


class _Lease:
    """Held in a thread's locals beside its outbox: when the thread ends
    and its locals go, the outbox goes back to the client's spares."""
    __slots__ = ("client", "outbox")

    def __init__(self, client, outbox):
        self.client = client
        self.outbox = outbox

    def __del__(self):
        if not _finalizing():               # at interpreter exit: nothing to give back to
            self.client.give_back(self.outbox)


cdef class Client:
    """Everything a process needs to send: the route table, the per-thread
    outboxes and the counters.  One per Runtime."""

    def __cinit__(self, Context ctx not None, RouteTable routes not None, *,
                  double send_timeout, double response_timeout, Py_ssize_t max_message_size,
                  rebuild_exception, double linger=5.0, double connect_timeout=2.0,
                  int backlog=1000, int socket_buffer=0, bint green=False, tuple curve=None):
        self.ctx = ctx
        self.routes = routes
        self.tls = unpatched("threading").local()
        self.outboxes = weakref.WeakSet()
        self.spare = []
        self.spare_lock = unpatched("threading").Lock()
        self.rr = {}
        self.send_timeout = send_timeout
        self.response_timeout = response_timeout
        self.linger_ms = <int>(min(linger, 86400.0) * 1000)
        self.backlog = backlog
        self.socket_buffer = socket_buffer
        self.connect_timeout = connect_timeout
        self.green = green
        self.curve = curve
        self.max_message_size = max_message_size
        self.rebuild_exception = rebuild_exception
        self.lost = {}

    cdef Outbox enter(self):
        """This thread's outbox (a spare one, or a new one, the first time;
        it goes back to the spares when the thread ends), held for one
        operation, which ends with leave()."""
        cdef Outbox ob = getattr(self.tls, "outbox", None)
        if ob is None or ob.epoch != fork_epoch() or ob.sock == NULL:
            ob = self.lease()
        self.hold(ob)                       # before anything could let close() in
        try:
            if ob.dead_seen != self.routes.dead_count:
                self.account(ob.forget_peers(self.routes),
                             "sent to a server that died were never confirmed, so may be lost")
            if ob.routes_seen != self.routes.generation:
                ob.tidy(self.routes)
        except BaseException:
            self.leave(ob)
            raise
        return ob

    cdef void leave(self, Outbox ob) noexcept:
        """The operation holding `ob` ended.  If close() passed it over
        meanwhile, its owner closes it now (still holding it until then)."""
        if ob.waiters:
            ob.poke()                       # its last libzmq call may have taken the edge
        if ob.users == 1 and ob.retiring:
            self.retire(ob, 0)
        ob.users -= 1

    cdef void retire(self, Outbox ob, int linger_ms) noexcept:
        """Close an outbox its caller holds, which nobody will use again;
        what its peers never confirmed is counted as maybe lost (after the
        close: logging may let other threads run)."""
        if ob.sock == NULL:
            return
        lost = ob.unconfirmed()
        ob.close(linger_ms)
        try:
            self.account(lost, "sent by a thread that ended, or was busy at cleanup, were "
                               "never confirmed, so may be lost")
        except BaseException:
            pass                            # (a failing log handler)

    cdef Outbox lease(self):
        cdef Outbox ob = None
        with self.spare_lock:
            if self.closed:
                raise TransportClosed("this RPC client was cleaned up")
            while self.spare and ob is None:
                ob = self.spare.pop()
                if ob.sock == NULL or ob.epoch != fork_epoch():
                    ob = None
        if ob is None:
            ob = self.new_outbox(self.green)
        self.tls.outbox = ob
        self.tls.lease = _Lease(self, ob)
        return ob

    def give_back(self, Outbox ob not None):
        """A thread that used `ob` ended (its _Lease is collected)."""
        if ob.epoch != fork_epoch() or not ob.claim():
            return                          # closed, or held by close(), which closes it
        ob.streams.clear()                  # replies nobody waits for any more
        ob.last_peer = None
        with self.spare_lock:
            if not self.closed and len(self.spare) < SPARE_MAX:
                self.spare.append(ob)
                ob.users = 0
                return
        # Never more spares than SPARE_MAX: this one closes, what it
        # queued leaving within the linger.
        self.retire(ob, self.linger_ms)

    def new_outbox(self, bint green=False):
        """A new outbox: a thread's (lease()), or one of its own for an
        event loop's thread (aio), which is not this thread's outbox.
        Closed with the client."""
        cdef Outbox ob = Outbox(self.ctx, self.linger_ms, self.backlog, green, self.curve,
                                self.max_message_size, self.socket_buffer)
        ob.dead_seen = self.routes.dead_count
        ob.routes_seen = self.routes.generation
        with self.spare_lock:
            # Checked with the add, under the lock close() sets `closed`
            # under: close() either sees this outbox or it is never used.
            if self.closed:
                ob.close(0)
                raise TransportClosed("this RPC client was cleaned up")
            self.outboxes.add(ob)
            self.outboxes_made += 1
        return ob

    cdef hold(self, Outbox ob):
        """Hold `ob` for one operation, as enter() does; leave() ends it."""
        if self.closed or ob.sock == NULL or ob.retiring:
            raise TransportClosed("this RPC client was cleaned up")
        ob.users += 1

    def try_request(self, Outbox ob not None, int kind, context, topic, msg, bint multi=False,
                    set refused=None):
        """Send a CALL, CAST or NOTIFY (KINDS) without ever waiting, to the
        first consumer, round-robin, that is connected and has room.
        Returns the call's msg_id (0 for others), or None when no consumer
        could take it now (none connected yet: they are being dialled; or
        every queue is full): the caller waits and tries again.  With
        `refused`, skips the consumers in it and adds the one used.
        NoListeners or PeerUnreachable as the waiting API."""
        self.hold(ob)
        try:
            return self.request_now(ob, kind, context, topic, msg, multi, refused)
        finally:
            self.leave(ob)

    cdef object request_now(self, Outbox ob, int kind, context, topic, msg, bint multi,
                            set refused):
        cdef const char *t
        cdef Py_ssize_t tlen
        cdef char header[MAX_HEADER]
        cdef uint64_t msg_id = 0
        cdef Endpoint ep
        cdef int status
        cdef Py_ssize_t n, start, k
        cdef bint waiting = False
        if kind not in (KIND_CALL, KIND_CAST, KIND_NOTIFY):
            raise ValueError(f"not a request kind: {kind}")
        topic_utf8(topic, &t, &tlen)
        if kind == KIND_NOTIFY:
            if not isinstance(msg, dict):
                raise InvalidMessage(f"notification must be a dict, not {type(msg).__name__}")
            method = None
        else:
            method = method_of(msg)
        if ob.dead_seen != self.routes.dead_count:
            self.account(ob.forget_peers(self.routes),
                         "sent to a server that died were never confirmed, so may be lost")
        cdef bytes body = self.encode(ob, context, msg)
        if kind == KIND_CALL:
            ob.last_id += 1
            msg_id = ob.last_id
        cdef size_t hlen = write_header(header, kind, FLAG_MULTI if multi else 0, msg_id, t, tlen)
        endpoints = self.routes.lookup(topic)
        if refused:
            endpoints = tuple(e for e in endpoints if e not in refused)
        cdef tuple live = self.routes.live(endpoints)
        n = len(live)
        if n == 0:
            self.none_live(ob, endpoints, topic, method)
        start = self.turn(topic, n) if n > 1 else 0
        for k in range(n):
            ep = <Endpoint>live[(start + k) % n]
            status = ob.try_send(ep, header, hlen, body)
            if status == SENT:
                if refused is not None:
                    refused.add(ep)
                if kind == KIND_CALL:
                    if ob.last_peer is not None:
                        ob.marks[msg_id] = (ob.last_peer, ob.last_peer.total)
                    self.calls += 1
                elif kind == KIND_CAST:
                    self.casts += 1
                else:
                    self.notifies += 1
                return msg_id
            if status != NEVER:
                waiting = True
        if not waiting:
            raise PeerUnreachable(f"no consumer of {topic} may be dialled" +
                                  self.unreachable(ob, list(live)), topic, method)
        return None

    def try_fanout(self, Outbox ob not None, context, topic, msg, endpoints=None):
        """Send a FANOUT to each of `endpoints` (default: every live fanout
        consumer of `topic`) that is connected and has room, without
        waiting: (how many endpoints it may reach, those not sent to yet,
        to try again), leaving out (and counting) any that must never be
        dialled."""
        self.hold(ob)
        try:
            return self.fanout_now(ob, context, topic, msg, endpoints)
        finally:
            self.leave(ob)

    cdef tuple fanout_now(self, Outbox ob, context, topic, msg, endpoints):
        cdef const char *t
        cdef Py_ssize_t tlen
        cdef char header[MAX_HEADER]
        cdef Endpoint ep
        cdef int status
        topic_utf8(topic, &t, &tlen)
        method = method_of(msg)
        cdef bytes body = self.encode(ob, context, msg)
        cdef size_t hlen = write_header(header, KIND_FANOUT, 0, 0, t, tlen)
        if endpoints is None:
            endpoints = self.fanout_targets(topic, method)
        pending = []
        cdef Py_ssize_t never = 0
        for ep in endpoints:                # (a typed loop variable admits None)
            if ep is None:
                raise TypeError("endpoints must be Endpoints, not None")
            status = ob.try_send(ep, header, hlen, body)
            if status == UNCONNECTED or status == FULL:
                pending.append(ep)
            elif status == NEVER:
                never += 1
                self.fanout_unreachable += 1
        return len(endpoints) - never, pending

    def reply_value(self, bytes body not None):
        """A reply's body as its value (RPCException if malformed)."""
        return self.decode_value(body)

    def reply_failure(self, bytes body not None):
        """A FAILURE reply's body as the exception to raise."""
        return self.decode_failure(body)

    cdef account(self, dict lost, str how):
        """Count and report messages that may not have arrived."""
        if not lost:
            return
        for address, n in lost.items():
            self.lost[address] = self.lost.get(address, 0) + n
            self.discarded += n
        LOG.warning("%d message(s) %s: %s", sum(lost.values()), how,
                    ", ".join(f"{a}: {n}" for a, n in sorted(lost.items())))

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

    # -- where a message goes ----------------------------------------------

    cdef Py_ssize_t turn(self, object topic, Py_ssize_t n):
        """Round-robin: where, among a topic's n consumers, to start."""
        cdef Py_ssize_t i = self.rr.get(topic, 0)
        self.rr[topic] = i + 1
        return i % n

    cdef str unreachable(self, Outbox ob, list endpoints):
        """Why each of `endpoints` could not be reached, where known."""
        cdef Endpoint ep
        known = []
        for ep in endpoints:
            why = ob.refusal(ep) or ob.why(ep.address)
            if why:
                known.append(f"{ep.address}: {why}")
        return f" ({'; '.join(known)})" if known else ""

    cdef int none_live(self, Outbox ob, tuple endpoints, object topic,
                       object method) except -1:
        """Raise what a send with no live consumer to take it raises:
        PeerUnreachable if discovery knows some, else NoListeners."""
        if endpoints:
            raise PeerUnreachable(f"no consumer of {topic} can be reached now: each failed "
                                  f"to connect, or to answer a liveness probe, moments ago" +
                                  self.unreachable(ob, list(endpoints)), topic, method)
        self.no_listeners += 1
        raise NoListeners(None, topic, method)

    cdef tuple fanout_targets(self, object topic, object method):
        """The fanout consumers of `topic` that are not down.  Those that
        are (they failed to connect, or stopped answering probes) are
        passed over at once, as by every send, and skipped: counted, and
        named at a bounded rate (each fanout would, while they are down)."""
        cdef tuple endpoints = self.routes.lookup_fanout(topic)
        cdef tuple live = self.routes.live(endpoints)
        if len(live) != len(endpoints):
            down = [(<Endpoint>ep).address for ep in endpoints if ep not in live]
            self.fanout_unreachable += len(down)
            THROTTLED.warning(("down", topic), "fanout of %s to %s skipped %s: down (it failed "
                              "to connect, or stopped answering probes)", method, topic,
                              ", ".join(down))
        return live

    cdef Endpoint send_one(self, Outbox ob, tuple endpoints, const char *header, size_t hlen,
                           bytes body, double deadline, object topic, object method,
                           set refused=None):
        """Send to one consumer: the first, round-robin, that is connected
        and has room; see the module docstring.  Returns it.  `endpoints`
        leaves out `refused` (a call's consumers that refused it), and so
        does what discovery lists meanwhile."""
        cdef tuple live = self.routes.live(endpoints)
        cdef Py_ssize_t n = len(live), start, k
        cdef Endpoint ep, full = None
        cdef int status
        if n == 0:
            self.none_live(ob, endpoints, topic, method)
        cdef list reached = []
        cdef list waiting = []
        cdef list connected_full
        start = self.turn(topic, n) if n > 1 else 0
        for k in range(n):
            ep = <Endpoint>live[(start + k) % n]
            status = ob.try_send(ep, header, hlen, body)
            if status == SENT:
                return ep
            if status == UNCONNECTED:
                if k == 0 and n > 1 and ob.dialling(ep.rid):
                    self.wait_connected(ob, [ep], header, hlen, body,
                                        min(deadline, _monotonic() + FIRST_DIAL_GRACE),
                                        reached, [], True, None, None)
                    if reached:
                        return ep
                waiting.append(ep)
            elif status == FULL and full is None:
                full = ep
        if full is None and waiting:
            connected_full = []
            self.wait_connected(ob, waiting, header, hlen, body, deadline, reached,
                                connected_full, True, topic, refused)
            if reached:
                return <Endpoint>reached[0]
            if connected_full:
                full = <Endpoint>connected_full[0]
        if full is None:
            raise PeerUnreachable(
                f"no connection to any of the {n} consumer(s) of {topic} in time" +
                self.unreachable(ob, list(live)), topic, method)
        # Backpressure: every consumer that could take it is full.
        status = ob.send_blocking(full, header, hlen, body,
                                  min(deadline, _monotonic() + self.send_timeout))
        if status == FULL:
            raise Timeout(f"send queue to {full.address} is full", topic, method)
        if status != SENT:
            raise PeerUnreachable(f"connection to {full.address} was lost", topic, method)
        return full

    cdef list send_each(self, Outbox ob, tuple endpoints, const char *header, size_t hlen,
                        bytes body, double deadline, list full):
        """Send to every one of `endpoints`: first to each that is connected
        and has room, then to the others as they connect (up to the connect
        timeout) or make room (up to `deadline`), all at once, so that none
        waits behind another.  Returns those never connected, or that must
        never be dialled; those still full at `deadline` are left in `full`."""
        cdef list pending = []
        cdef list missed = []
        cdef Endpoint ep
        cdef int status
        for ep in endpoints:
            status = ob.try_send(ep, header, hlen, body)
            if status == FULL:
                full.append(ep)
            elif status == UNCONNECTED:
                pending.append(ep)
            elif status == NEVER:
                missed.append(ep)
        if pending or full:
            missed += self.wait_connected(ob, pending, header, hlen, body, deadline, [], full,
                                          False, None, None)
        return missed

    cdef list wait_connected(self, Outbox ob, list pending, const char *header, size_t hlen,
                             bytes body, double deadline, list reached, list full, bint one,
                             object topic, set refused):
        """Retry `pending` (not connected yet) until the connect timeout or
        `deadline`, sending as each connects: to the first only (one) or to
        each.  What was sent to goes into `reached`; returns those never
        reached, marked down if the whole connect timeout passed.  One that
        connects with a full queue goes into `full`: with `one` that ends
        the wait (the caller waits for room there); otherwise every one in
        `full` is retried too, until `deadline`, and those still full then
        are left in it.  With `topic`, discovery is asked again meanwhile
        (RouteTable.recheck), at once unless `pending` were dialled just
        now: consumers it lists since are tried too (but none in
        `refused`), those it no longer lists are let go (a server that
        restarted on a new port)."""
        cdef long pause_ns = PAUSE_MIN_NS
        cdef double until = min(deadline, _monotonic() + self.connect_timeout)
        cdef bint whole = until < deadline
        cdef double now
        cdef double recheck_at = _monotonic()
        cdef Endpoint ep
        cdef int status
        cdef list still
        cdef list missed = []
        cdef set tried = set(pending)
        if refused:
            tried |= refused
        if any(ob.dialling(ep.rid) for ep in pending):
            recheck_at += FIRST_DIAL_GRACE
        while pending or (full and not one):
            now = _monotonic()
            if topic is not None and pending and now >= recheck_at:
                recheck_at = now + FIRST_DIAL_GRACE
                listed = self.routes.live(self.routes.recheck(topic))
                pending = [ep for ep in pending if ep in listed]
                for ep in listed:
                    if ep not in tried:
                        tried.add(ep)
                        pending.append(ep)
            if pending and now >= until:
                if whole:
                    for ep in pending:
                        self.routes.mark_down(ep.address, DOWN_FOR)
                missed += pending
                pending = []
                continue
            if now >= deadline:
                break
            pause_ns = pause(pause_ns, self.green)
            still = []
            for ep in pending:
                status = ob.try_send(ep, header, hlen, body)
                if status == SENT:
                    reached.append(ep)
                    if one:
                        return []
                elif status == FULL:
                    full.append(ep)
                else:
                    still.append(ep)
            pending = still
            if one:
                if full:
                    break
                continue
            still = []
            for ep in full:
                status = ob.try_send(ep, header, hlen, body)
                if status == SENT:
                    reached.append(ep)
                elif status == FULL:
                    still.append(ep)
                else:
                    missed.append(ep)           # its connection was lost meanwhile
            full[:] = still
        return missed + pending

    # -- public operations -------------------------------------------------

    def cast(self, context, topic, msg, bint at_least_once=False):
        """Send to one consumer of `topic` (round-robin); no reply.  With
        `at_least_once`, the runtime's courier carries it until a consumer
        has handled it (see _courier.pyx); NoListeners at once if nobody
        consumes the topic now."""
        cdef const char *t
        cdef Py_ssize_t tlen
        cdef char header[MAX_HEADER]
        topic_utf8(topic, &t, &tlen)
        method = method_of(msg)
        cdef bytes body
        cdef size_t hlen
        cdef Outbox ob = self.enter()
        try:
            body = self.encode(ob, context, msg)
            if at_least_once:
                if not self.routes.lookup(topic):
                    self.no_listeners += 1
                    raise NoListeners(None, topic, method)
                self.courier.cast(topic, method, body)
                self.casts += 1
                return
            hlen = write_header(header, KIND_CAST, 0, 0, t, tlen)
            self.send_one(ob, self.routes.lookup(topic), header, hlen, body,
                          _monotonic() + self.send_timeout, topic, method)
            self.casts += 1
        finally:
            self.leave(ob)

    def cast_to(self, endpoints, context, topic, msg, bint fanout=False):
        """Send to each of the given endpoints, bypassing discovery;
        PeerUnreachable if one cannot be reached."""
        cdef const char *t
        cdef Py_ssize_t tlen
        cdef char header[MAX_HEADER]
        topic_utf8(topic, &t, &tlen)
        method = method_of(msg)
        endpoints = tuple(endpoints)
        for ep in endpoints:
            if not isinstance(ep, Endpoint):
                raise TypeError(f"expected an Endpoint, not {type(ep).__name__}")
        cdef bytes body
        cdef size_t hlen
        cdef list full = []
        cdef Outbox ob = self.enter()
        try:
            body = self.encode(ob, context, msg)
            hlen = write_header(header, KIND_FANOUT if fanout else KIND_CAST, 0, 0, t, tlen)
            missed = self.send_each(ob, endpoints, header, hlen, body,
                                    _monotonic() + self.send_timeout, full)
            if missed:
                raise PeerUnreachable(f"no connection to {(<Endpoint>missed[0]).address} "
                                      f"within {self.connect_timeout:g}s" +
                                      self.unreachable(ob, missed), topic, method)
            if full:
                raise Timeout(f"send queue to {(<Endpoint>full[0]).address} is full", topic,
                              method)
            self.casts += 1
        finally:
            self.leave(ob)

    def fanout_cast(self, context, topic, msg):
        """Send to every consumer registered with fanout=True on `topic`,
        once each; returns how many were sent to.  With none registered,
        nothing is sent.  One that is down or cannot be reached, or whose
        queue stays full for rpc_cast_timeout, is skipped (logged and
        counted); the others still get it."""
        cdef const char *t
        cdef Py_ssize_t tlen
        cdef char header[MAX_HEADER]
        topic_utf8(topic, &t, &tlen)
        method = method_of(msg)
        cdef bytes body
        cdef size_t hlen
        cdef list full = []
        cdef Outbox ob = self.enter()
        try:
            body = self.encode(ob, context, msg)
            hlen = write_header(header, KIND_FANOUT, 0, 0, t, tlen)
            live = self.fanout_targets(topic, method)
            missed = self.send_each(ob, live, header, hlen, body,
                                    _monotonic() + self.send_timeout, full)
            return len(live) - self.fanout_skipped(ob, topic, method, missed, full)
        finally:
            self.leave(ob)

    def fanout_skipped(self, Outbox ob not None, topic, method, list missed, list full):
        """A fanout is done: count it, and count and name the consumers
        it skipped, unreachable (`missed`) or whose queue stayed full for
        rpc_cast_timeout (`full`).  Returns how many were skipped."""
        cdef Endpoint ep
        for ep in missed:
            LOG.warning("fanout of %s to %s skipped %s: not reachable%s", method, topic,
                        ep.address, self.unreachable(ob, [ep]))
        for ep in full:
            LOG.warning("fanout of %s to %s skipped %s: its queue stayed full for %gs",
                        method, topic, ep.address, self.send_timeout)
        self.fanout_unreachable += len(missed) + len(full)
        self.fanouts += 1
        return len(missed) + len(full)

    def notify(self, context, topic, msg):
        """Deliver a notification (any dict) to one consumer of `topic`.
        With no consumer it is held for later (rpc_zmq_hold_notifications,
        True) or dropped and counted (False)."""
        cdef const char *t
        cdef Py_ssize_t tlen
        cdef char header[MAX_HEADER]
        topic_utf8(topic, &t, &tlen)
        if not isinstance(msg, dict):
            raise InvalidMessage(f"notification must be a dict, not {type(msg).__name__}")
        cdef bytes body
        cdef size_t hlen
        cdef Outbox ob = self.enter()
        try:
            body = self.encode(ob, context, msg)
            hlen = write_header(header, KIND_NOTIFY, 0, 0, t, tlen)
            try:
                self.send_one(ob, self.routes.lookup(topic), header, hlen, body,
                              _monotonic() + self.send_timeout, topic, None)
            except NoListeners:
                self.no_listeners -= 1                  # counted as held or dropped
                if self.courier is not None and self.courier.hold(topic, body):
                    return True
                self.notifications_dropped += 1
                return False
            self.notifies += 1
            return True
        finally:
            self.leave(ob)

    cdef uint64_t send_call(self, Outbox ob, object context, object topic, object msg,
                            int flags, double deadline, set refused) except? 0:
        """Validate and send a CALL to a consumer not in `refused`; returns
        its msg_id, whose replies `ob` keeps (its streams) until the caller
        pops it, and adds the consumer to `refused` for a retry."""
        cdef const char *t
        cdef Py_ssize_t tlen
        cdef char header[MAX_HEADER]
        topic_utf8(topic, &t, &tlen)
        method = method_of(msg)
        cdef bytes body = self.encode(ob, context, msg)
        ob.last_id += 1
        # Its own copy: while this waits to send, other green threads
        # sharing the outbox take ids of their own.
        cdef uint64_t msg_id = ob.last_id
        cdef size_t hlen = write_header(header, KIND_CALL, flags, msg_id, t, tlen)
        endpoints = self.routes.lookup(topic)
        if refused:
            endpoints = tuple(ep for ep in endpoints if ep not in refused)
        # Expected before it is sent: the reply may be read (by another
        # green thread, or this one's next call into libzmq) at once.
        ob.streams[msg_id] = []
        try:
            refused.add(self.send_one(ob, endpoints, header, hlen, body, deadline, topic,
                                      method, refused))
        except BaseException:
            ob.streams.pop(msg_id, None)
            raise
        self.calls += 1
        return msg_id

    def call(self, context, topic, msg, timeout=None, monitor_timeout=None):
        """Send to one consumer and wait for its result (or exception).

        `timeout` bounds the whole call: finding a connection, waiting for
        room and waiting for the reply.  With `monitor_timeout`, the call
        also fails when the server has sent neither the result nor a
        heartbeat for that long (oslo.messaging's call monitor); heartbeats
        let a long call run up to `timeout`."""
        cdef double wait = self.check_timeout(timeout)
        cdef double monitor = self.check_timeout(monitor_timeout) if monitor_timeout else 0
        cdef double deadline = _monotonic() + wait
        cdef double alive_until
        cdef set refused = set()
        cdef uint64_t msg_id = 0
        cdef Peer peer
        cdef unsigned long long sent_before
        cdef Outbox ob = self.enter()
        try:
            msg_id = self.send_call(ob, context, topic, msg, 0, deadline, refused)
            peer = ob.last_peer
            sent_before = peer.total if peer is not None else 0
            while True:
                alive_until = deadline if monitor == 0 else min(deadline, _monotonic() + monitor)
                reply = ob.wait_reply(msg_id, alive_until)
                if reply is not None and peer is not None and sent_before > peer.confirmed:
                    # Any answer means everything sent before the call arrived.
                    peer.confirmed = sent_before
                if reply is None:
                    self.timeouts += 1
                    if alive_until < deadline:
                        raise Timeout(f"no heartbeat for {monitor:g}s", topic, msg["method"])
                    raise Timeout(None, topic, msg["method"])
                if reply[0] == KIND_REFUSED:
                    # That server no longer serves the topic and did not run the
                    # call: ask discovery again and try another one.
                    self.refused += 1
                    self.routes.invalidate(topic)
                    ob.streams.pop(msg_id, None)
                    msg_id = 0
                    msg_id = self.send_call(ob, context, topic, msg, 0, deadline, refused)
                    peer = ob.last_peer
                    sent_before = peer.total if peer is not None else 0
                    continue
                if reply[0] != KIND_HEARTBEAT:
                    break
            kind, body = reply
            if kind == KIND_FAILURE:
                raise self.decode_failure(body)
            if kind == KIND_END:
                return None
            return self.decode_value(body)
        finally:
            ob.streams.pop(msg_id, None)
            self.leave(ob)

    def multicall(self, context, topic, msg, timeout=None):
        """Like call, but returns an iterator over every value the remote
        method yields, each delivered as soon as it is produced.  `timeout`
        bounds the wait for each value."""
        cdef double wait = self.check_timeout(timeout)
        cdef uint64_t msg_id
        cdef ReplyStream stream
        cdef Outbox ob = self.enter()
        try:
            msg_id = self.send_call(ob, context, topic, msg, FLAG_MULTI, _monotonic() + wait,
                                    set())
            stream = ReplyStream.__new__(ReplyStream)
            stream.msg_id = msg_id
            stream.client = self
            stream.outbox = ob
            stream.timeout = wait
            stream.topic = topic
            stream.method = msg["method"]
            stream.thread = _get_ident()
            stream.done = False               # its replies are kept since send_call
            return stream
        finally:
            self.leave(ob)

    def ping(self, Endpoint endpoint not None, topic, timeout=None, version=None,
             namespace=None):
        """Ask the server at `endpoint` whether it serves `topic` (and, with
        `version`, whether a consumer accepts that API version).  The answer
        comes from its receive loop, not the service's code: a dict with its
        host, address, pid, transport and envelope versions, and the round
        trip in seconds ("rtt").  NoListeners if it does not serve the topic,
        UnsupportedRpcVersion, PeerUnreachable or Timeout otherwise."""
        cdef const char *t
        cdef Py_ssize_t tlen
        cdef char header[MAX_HEADER]
        topic_utf8(topic, &t, &tlen)
        cdef double wait = self.check_timeout(timeout)
        msg = {}
        if version is not None:
            msg["version"] = str(version)
            if namespace is not None:
                msg["namespace"] = str(namespace)
        cdef bytes body
        cdef uint64_t msg_id = 0
        cdef size_t hlen
        cdef double start
        cdef double deadline
        cdef Outbox ob = self.enter()
        try:
            body = self.encode(ob, {}, msg)
            ob.last_id += 1
            msg_id = ob.last_id
            hlen = write_header(header, KIND_PING, 0, msg_id, t, tlen)
            start = _monotonic()
            deadline = start + wait
            full = []
            ob.streams[msg_id] = []
            if self.send_each(ob, (endpoint,), header, hlen, body, deadline, full):
                raise PeerUnreachable(f"no connection to {endpoint.address} in time" +
                                      self.unreachable(ob, [endpoint]), topic, "ping")
            if full:
                raise Timeout(f"send queue to {endpoint.address} is full", topic, "ping")
            reply = ob.wait_reply(msg_id, deadline)
            if reply is None:
                self.timeouts += 1
                raise Timeout(f"no answer from {endpoint.address}", topic, "ping")
            kind, body = reply
            if kind == KIND_REFUSED:
                raise NoListeners(self.decode_value(body), topic, "ping")
            if kind == KIND_FAILURE:
                raise self.decode_failure(body)
            about = self.decode_value(body)
            if not isinstance(about, dict):
                raise RPCException(f"malformed answer to a ping: {about!r}")
            about["rtt"] = _monotonic() - start
            return about
        finally:
            ob.streams.pop(msg_id, None)
            self.leave(ob)

    # -- helpers -----------------------------------------------------------

    cdef double check_timeout(self, timeout) except -1:
        if timeout is None:
            return self.response_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        return min(timeout, MAX_WAIT)         # inf: as long as can be waited

    cdef object decode_value(self, bytes body):
        if PyBytes_GET_SIZE(body) > self.max_message_size:
            raise MessageTooLarge(f"the reply is {PyBytes_GET_SIZE(body)} bytes; "
                                  f"rpc_zmq_max_message_size is {self.max_message_size}")
        try:
            return unpack(PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), self.max_message_size)
        except MalformedEnvelope as exc:
            raise RPCException(f"malformed reply: {exc}") from None

    cdef object decode_failure(self, bytes body):
        return self.rebuild_exception(self.decode_value(body))

    def stats(self):
        return {
            "casts": self.casts, "calls": self.calls, "fanouts": self.fanouts,
            "notifies": self.notifies, "timeouts": self.timeouts,
            "no_listeners": self.no_listeners, "refused": self.refused,
            "notifications_dropped": self.notifications_dropped,
            "fanout_unreachable": self.fanout_unreachable,
            "discarded": self.discarded,
            "outboxes": len(self.outboxes), "outboxes_made": self.outboxes_made,
        }

    def close(self, double linger=0.0):
        """Close every outbox, once each peer has confirmed what it was
        sent (Outbox.flush), waiting at most `linger` seconds.  Returns
        {address: messages not confirmed, so maybe lost}; they are counted
        in stats() and named in one warning.

        Other threads may be calling meanwhile.  An outbox is only ever
        used by one thread at a time: an outbox no operation holds is
        flushed and closed here (taken under the GIL, as enter() takes
        it), one an operation holds is left to it, and closed by its
        owner when the operation ends (leave()); this waits for those
        until `linger` runs out, then interrupt() ends them."""
        with self.spare_lock:
            self.closed = True
            spare, self.spare = self.spare, []      # kept alive until flushed below
        cdef Outbox ob
        cdef double deadline = _monotonic() + linger
        cdef long pause_ns = PAUSE_MIN_NS
        lost = {}
        busy = []
        for ob in list(self.outboxes):
            if ob.epoch != fork_epoch():
                continue
            if not ob.claim():              # ours now, unless an operation holds it
                if ob.sock != NULL:
                    ob.retiring = True
                    busy.append(ob)
                continue
            try:
                for address, n in ob.flush(deadline).items():
                    lost[address] = lost.get(address, 0) + n
            except Exception:
                LOG.exception("could not confirm what an outbox sent")
            finally:
                ob.close(0)
        self.tls = unpatched("threading").local()
        del spare
        self.account(lost, f"not confirmed by their peers within {linger:g}s at cleanup may "
                           f"be lost")
        while self.holding(busy) and _monotonic() < deadline:
            pause_ns = pause(pause_ns, self.green)
        # Everything this client could not vouch for, since it started.
        return dict(self.lost)

    def confirm_sent(self, str address not None):
        """Count everything the outboxes sent to `address` as arrived: this
        process's own server, which stopped once it had handled all it
        received (Runtime.release)."""
        cdef Outbox ob
        cdef Peer peer
        cdef bytes rid = address.encode()
        for ob in list(self.outboxes):
            peer = ob.peers.get(rid) if ob.peers is not None else None
            if peer is not None:
                peer.confirmed = peer.total

    def interrupt(self, double wait):
        """After close(): end the operations still holding an outbox (a
        call waiting for its reply, a send waiting for room): every wait
        in the context returns, and they raise RPCException.  Call it just
        before terminating the context, once nothing else in it is needed;
        waits up to `wait` seconds for them to close their outboxes.
        Returns how many are still open."""
        cdef long pause_ns = PAUSE_MIN_NS
        cdef double deadline = _monotonic() + wait
        busy = self.holding(list(self.outboxes))
        if busy:
            self.ctx.shutdown()
            while busy and _monotonic() < deadline:
                pause_ns = pause(pause_ns, self.green)
                busy = self.holding(busy)
        return len(busy)

    cdef list holding(self, list outboxes):
        """Those of `outboxes` still open and held by an operation."""
        cdef Outbox ob
        return [ob for ob in outboxes if ob.users and ob.sock != NULL]
