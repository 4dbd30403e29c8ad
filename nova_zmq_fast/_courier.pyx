"""The courier: a runtime's background sender.

A calling thread sends on its own outbox and reads only the replies it waits
for.  What must go on after a call returns is the courier's: one thread per
Runtime, with an outbox of its own, woken by messages, replies and timers.

  * Liveness.  Every rpc_zmq_heartbeat_interval it PINGs the servers this
    process sends to (those of the routes in use).  A server's receive loop
    answers a PING itself, and PINGs travel on a connection of their own
    (the courier's probe outbox), which the server's ROUTER reads in turn
    with every other: an answer waits neither behind the service's code nor
    behind the casts queued for it, the courier's own included, so a server
    that is busy but reading is never taken for a dead one.
    A server that leaves a PING unanswered for rpc_zmq_heartbeat_timeout
    (frozen, cut off, or with every worker stuck) is marked down in the
    route table, and every thread passes it over until it answers again.
    (ZeroMQ's own ZMTP heartbeats cannot do this: with a full receive queue
    they abort libzmq 4.3, and they drop healthy connections that are
    merely slowed by backpressure.)
  * At-least-once casts.  It sends them with FLAG_ACK and keeps each until
    its server acknowledges it, after the handler returned.  One that was
    refused, whose connection was lost, whose server went silent, or that
    waited rpc_zmq_ack_timeout, goes to another consumer of the topic; the
    server's window of recent ids keeps a resend to the same server from
    running twice.  What is still unacknowledged at cleanup is counted and
    reported.
  * Held notifications.  With rpc_zmq_hold_notifications, a notification
    for a topic nobody listens to is kept, bounded in count, bytes and age,
    and delivered when a listener appears, in this process's lifetime only.
  * It refreshes the route table every backend.refresh_interval.
"""
import collections
import logging
import os
import time

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t

from nova_zmq_fast._libzmq cimport *
from nova_zmq_fast._zmq cimport (
    PAUSE_MIN_NS, check, fork_epoch, ms_until, now as _now, pause, raise_zmq_error)
from nova_zmq_fast._envelope cimport *
from nova_zmq_fast._client cimport FULL, NEVER, SENT, UNCONNECTED, Client, Outbox
from nova_zmq_fast._routes cimport Endpoint, RouteTable

from nova_zmq_fast import _zmq
from nova_zmq_fast._green import unpatched
from nova_zmq_fast.exceptions import (
    DiscoveryUnavailable, NoListeners, RPCException, Timeout, TransportClosed)
from nova_zmq_fast.logs import RateLimitedLog

LOG = logging.getLogger("nova_zmq_fast.courier")
THROTTLED = RateLimitedLog(LOG)
PROBE_TOPIC = b"nova_zmq_fast.probe"
SILENT_KEPT = 600.0     # seconds a silent server no route holds is still probed
# How soon casts no consumer could take are tried again: at once after any
# progress, then less often while none goes.
cdef double UNSENT_PAUSE_MIN = 0.005
cdef double UNSENT_PAUSE_MAX = 0.25
cdef bytes EMPTY_REQUEST = b"\x92\x80\x80"        # msgpack [{}, {}]


@cython.final
cdef class Probe:
    """What the courier knows of one server's liveness."""


@cython.final
@cython.freelist(64)
cdef class Parcel:
    """A message the courier carries: an at-least-once cast, or a held
    notification."""


cdef Parcel parcel(int kind, int flags, uint64_t msg_id, str topic, method, bytes body):
    cdef char header[MAX_HEADER]
    cdef const char *t
    cdef Py_ssize_t tlen
    topic_utf8(topic, &t, &tlen)            # a valid topic fits the header
    cdef Parcel p = Parcel.__new__(Parcel)
    p.topic = topic
    p.method = method
    p.msg_id = msg_id
    p.header = PyBytes_FromStringAndSize(header, write_header(
        header, kind, flags, msg_id, t, tlen))
    p.body = body
    p.refused = set()
    return p


cdef class Courier:

    def __cinit__(self, Client client not None, RouteTable routes not None, options):
        self.client = client
        self.routes = routes
        self.options = options
        self.jobs = collections.deque()
        self.start_lock = unpatched("threading").Lock()
        self.wake_read = self.wake_write = -1
        self.probe_every = options.rpc_zmq_heartbeat_interval
        self.probe_timeout = options.rpc_zmq_heartbeat_timeout
        self.ack_timeout = options.rpc_zmq_ack_timeout
        self.max_pending = 10 * options.rpc_zmq_topic_backlog
        self.hold_count = options.rpc_zmq_hold_notifications
        self.hold_bytes = options.rpc_zmq_hold_notifications_bytes
        self.hold_seconds = options.rpc_zmq_hold_notifications_seconds
        self.probes = {}
        self.probe_ids = {}
        self.unsent_pause = UNSENT_PAUSE_MIN
        self.pending = {}
        self.unsent = []
        self.held = {}
        # A random start: a server recognises a resent cast by its id
        # alone, so two senders' ids must not meet (nor a restart's).
        self.next_id = int.from_bytes(os.urandom(8), "little")
        self.epoch = fork_epoch()

    # -- for any thread --------------------------------------------------------------

    def start(self):
        """Start the thread, or wake it: it parks while it has nothing to
        do, and a route just cached means servers to probe."""
        with self.start_lock:               # callers race: one thread, one pipe
            if self.closed:
                return                      # a lookup racing with close()
            if self.thread is not None and self.epoch == fork_epoch():
                self._wake()
                return
            self._start_thread()

    cdef _start_thread(self):
        self.epoch = fork_epoch()
        self.os = unpatched("os")           # eventlet's os.read would wait, not fail
        self.wake_read, self.wake_write = self.os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)
        self.ob = Outbox(self.client.ctx, 0, self.client.backlog, False, self.client.curve,
                         self.client.max_message_size, self.client.socket_buffer)
        self.probe_ob = Outbox(self.client.ctx, 0, self.client.backlog, False,
                               self.client.curve, self.client.max_message_size,
                               self.client.socket_buffer)
        self.stopping = self.draining = False
        now = _now()
        self.next_probe = now + self.probe_every
        self.next_refresh = now + self.routes.interval
        self.thread = unpatched("threading").Thread(target=self._run, daemon=True,
                                                    name="nova_zmq_fast-courier")
        self.thread.start()

    cdef _wake(self):
        if self.sleeping:
            try:
                self.os.write(self.wake_write, b"!")
            except (BlockingIOError, OSError):
                pass                        # already woken

    def has_room(self):
        """Would cast() take one more without waiting?  (An event loop
        waits for room itself, by awaiting.)"""
        return len(self.pending) + len(self.unsent) + len(self.jobs) < self.max_pending

    def cast(self, str topic not None, method, bytes body not None):
        """Carry an encoded cast until a consumer of `topic` acknowledges
        it.  Waits (up to rpc_cast_timeout) while 10 x rpc_zmq_topic_backlog
        casts are already on their way: backpressure, as for any send."""
        cdef double deadline = _now() + self.client.send_timeout
        cdef long pause_ns = PAUSE_MIN_NS
        while not self.has_room():
            if self.closed:
                break                       # refused below
            # Every consumer gone meanwhile: NoListeners now, as for a cast
            # that found none.  (Down ones may come back: keep waiting.)
            try:
                listed = bool(self.routes.lookup(topic))
            except DiscoveryUnavailable:
                listed = True
            except NoListeners:
                listed = False
            if not listed:
                raise NoListeners(None, topic, method)
            if _now() >= deadline:
                raise Timeout(f"{self.max_pending} at-least-once casts are already waiting "
                              f"for acknowledgement", topic, method)
            pause_ns = pause(pause_ns, self.client.green)
        self.next_id += 1
        if not self._accept(parcel(KIND_CAST, FLAG_ACK, self.next_id, topic, method, body)):
            raise TransportClosed("the transport was cleaned up; this cast was not sent")
        self.start()
        self._wake()

    def hold(self, str topic not None, bytes body not None):
        """Keep a notification for `topic`, which nobody listens to yet;
        False if the bounds say no (then it is dropped and counted)."""
        cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
        if self.hold_count <= 0 or self.closed:
            return False
        if self.held_count >= self.hold_count or self.held_bytes + size > self.hold_bytes:
            self.held_dropped += 1
            return False
        cdef Parcel p = parcel(KIND_NOTIFY, 0, 0, topic, None, body)
        p.expires = _now() + self.hold_seconds
        if not self._accept(p):
            return False
        self.held_count += 1
        self.held_bytes += size
        self.held_total += 1
        self.start()
        self._wake()
        return True

    cdef bint _accept(self, Parcel p):
        """Queue `p` for the thread; False once close() began.  Under the
        lock close() takes: a parcel is either refused or queued before
        close() counts what it drops, never queued after, unseen."""
        with self.start_lock:
            if self.closed:
                return False
            self.jobs.append(p)
            return True

    def stats(self):
        return {"at_least_once_pending": len(self.pending) + len(self.unsent) + len(self.jobs),
                "at_least_once_acked": self.acked, "at_least_once_resent": self.resent,
                "at_least_once_rejected": self.rejected, "at_least_once_lost": self.lost,
                "notifications_held": self.held_count,
                "notifications_held_total": self.held_total,
                "notifications_held_delivered": self.held_delivered,
                "notifications_held_expired": self.held_expired,
                "notifications_held_dropped": self.held_dropped,
                "peers_probed": len(self.probes),
                "peers_down": sorted(a for a in self.probes if self.routes.is_down(a))}

    def close(self, double linger):
        """Stop once every at-least-once cast was acknowledged, and every
        held notification with a listener delivered, waiting at most
        `linger` seconds.  What is still unacknowledged then, and every
        notification still held, is dropped, counted and named in a
        warning; returns {topic: at-least-once casts and held notifications
        dropped}.  Counted
        also when the thread does not stop (stuck in a backend or a log
        handler): it keeps its socket until it ends, and a later close()
        releases it."""
        cdef double deadline = _now() + linger
        with self.start_lock:
            self.closed = True
        cdef bint stuck = False
        thread = self.thread
        if thread is not None and self.epoch == fork_epoch():
            if not self.abandoned:
                self.draining = True
                self.sleeping = True
                self._wake()
                while thread.is_alive() and _now() < deadline and (
                        self._busy() or self._held_deliverable()):
                    thread.join(0.01)
            self.stopping = True
            self.sleeping = True
            self._wake()
            thread.join(_zmq.STOP_WAIT)
            stuck = thread.is_alive()
        lost = {} if self.abandoned else self._count_dropped(linger)
        if stuck:
            # Its socket and pipe are its own until it ends: leave them.
            self.abandoned = True
            LOG.error("the courier thread did not stop within %gs; leaving its socket open",
                      _zmq.STOP_WAIT)
            return lost
        self.thread = None
        self.pending.clear()
        del self.unsent[:]
        self.jobs.clear()
        self.held.clear()
        self.held_count = self.held_bytes = 0
        for ob in (self.ob, self.probe_ob):
            if ob is not None:
                (<Outbox>ob).close(0)
        self.ob = self.probe_ob = None
        for fd in (self.wake_read, self.wake_write):
            if fd >= 0:
                os.close(fd)
        self.wake_read = self.wake_write = -1
        return lost

    cdef dict _count_dropped(self, double linger):
        """Count and report, once, what close() drops: {topic: casts}."""
        cdef Parcel p
        lost = {}
        # A set: a thread that did not stop may hold a parcel in two places.
        for p in set(list(self.pending.values()) + self.unsent + list(self.jobs)):
            if p.header[1] == KIND_CAST:
                lost[p.topic] = lost.get(p.topic, 0) + 1
        if lost:
            self.lost += sum(lost.values())
            LOG.warning("%d at-least-once cast(s) not acknowledged within %gs, dropped at "
                        "cleanup: %s", sum(lost.values()), linger,
                        ", ".join(f"{t}: {n}" for t, n in sorted(lost.items())))
        if self.held_count:
            held = {topic: len(queue) for topic, queue in self.held.items() if queue}
            for p in list(self.jobs):       # held, not taken by the thread yet
                if p.header[1] == KIND_NOTIFY:
                    held[p.topic] = held.get(p.topic, 0) + 1
            LOG.warning("%d held notification(s) not delivered within %gs, dropped at "
                        "cleanup: %s", self.held_count, linger,
                        ", ".join(f"{t}: {n}" for t, n in sorted(held.items())))
            self.held_dropped += self.held_count
            for topic, n in held.items():
                lost[topic] = lost.get(topic, 0) + n
        return lost

    def _held_deliverable(self):
        """Are notifications held for a topic that has a listener now?
        Asked of the route table from close(), whose wait ends otherwise."""
        for topic in list(self.held):       # (one C call: no other thread runs meanwhile)
            try:
                if self.routes.live(self.routes.lookup(topic)):
                    return True
            except Exception:               # noqa: BLE001 (discovery unreachable: no)
                pass
        return False

    def _busy(self):
        return bool(self.pending or self.unsent or self.jobs)

    # -- the thread ------------------------------------------------------------------

    def _run(self):
        # A zmq socket belongs to one thread: only the courier's own runs this.
        if self.thread is None or unpatched("threading").current_thread() is not self.thread:
            raise RuntimeError("Courier._run is the body of the courier's own thread")
        while not self.stopping:
            try:
                self._loop_once()
            except TransportClosed:
                return                      # the context is shut down: nothing can be sent
            except Exception:
                THROTTLED.error("loop", "the courier failed; going on", exc_info=True)
                time.sleep(0.1)

    cdef _loop_once(self):
        cdef zmq_pollitem_t items[3]
        cdef long timeout_ms
        cdef int rc = 0
        # Asleep from here on for _wake(): a route cached or a job queued
        # after this line writes to the pipe, so parking below cannot miss it.
        self.sleeping = True
        cdef double now = _now()
        cdef double due = min(self.next_probe, self.next_refresh)
        if self.unsent:
            due = now + self.unsent_pause   # a consumer may come within reach
        elif self.pending or self.held:
            due = min(due, now + 0.1)
        if self.routes.empty and not self._busy() and not self.held and not self.probes:
            timeout_ms = -1                 # nothing to do until woken
        else:
            timeout_ms = ms_until(due)
        items[0].socket = self.ob.sock
        items[0].events = ZMQ_POLLIN
        items[1].socket = self.probe_ob.sock
        items[1].events = ZMQ_POLLIN
        items[2].socket = NULL
        items[2].fd = self.wake_read
        items[2].events = ZMQ_POLLIN
        if not self.jobs and not self.stopping:
            with nogil:
                rc = zmq_poll(items, 3, timeout_ms)
        self.sleeping = False
        if rc == -1 and zmq_errno() != EINTR:
            raise_zmq_error(zmq_errno())    # ETERM (TransportClosed) above all
        try:
            self.os.read(self.wake_read, 4096)
        except BlockingIOError:
            pass
        if self.stopping:
            return
        now = _now()
        self._take_jobs()
        self._read_replies(self.ob)
        self._read_replies(self.probe_ob)
        if now >= self.next_refresh:
            self.next_refresh = now + self.routes.interval
            try:
                self.routes.refresh()
            except Exception:
                THROTTLED.error("refresh", "refreshing routes failed", exc_info=True)
        if now >= self.next_probe:
            self.next_probe = now + self.probe_every
            self._probe(now)
        self._check_acks(now)
        self._send_unsent(now)
        if self.held:
            self._deliver_held(now)

    cdef _take_jobs(self):
        cdef Parcel p
        while self.jobs:
            p = self.jobs.popleft()
            if p.header[1] == KIND_NOTIFY:
                self.held.setdefault(p.topic, collections.deque()).append(p)
            else:
                self.unsent.append(p)
                self.unsent_pause = UNSENT_PAUSE_MIN

    cdef _read_replies(self, Outbox ob):
        """Every reply waiting on one of the courier's outboxes, without
        blocking: probe answers, and ACK, REFUSED or FAILURE for
        at-least-once casts."""
        cdef zmq_msg_t part
        cdef Header h
        cdef Parcel p
        zmq_msg_init(&part)
        try:
            while zmq_msg_recv(&part, ob.sock, ZMQ_DONTWAIT) != -1:
                address = (<const char *>zmq_msg_data(&part))[:zmq_msg_size(&part)].decode(
                    "utf-8", "replace")
                if ob.read_reply(&part, &h) is None:
                    continue
                probed = self.probe_ids.pop(h.msg_id, None)
                if probed is not None:
                    probe = self.probes.get(probed)
                    if probe is not None and (<Probe>probe).ping_id == h.msg_id:
                        (<Probe>probe).ping_id = 0
                        (<Probe>probe).answered = _now()
                        (<Probe>probe).connected = True
                    self.routes.mark_up(probed)
                    continue
                p = self.pending.pop(h.msg_id, None)
                if p is None:
                    continue
                if h.kind == KIND_ACK:
                    self.acked += 1
                elif h.kind == KIND_REFUSED:
                    p.refused.add(address)
                    self.unsent.append(p)
                    self.unsent_pause = UNSENT_PAUSE_MIN
                    self.resent += 1
                elif h.kind == KIND_FAILURE:
                    # The server could not even decode it: sending it again
                    # anywhere would fail the same way.
                    self.rejected += 1
                    THROTTLED.error("rejected", "an at-least-once cast to %s was rejected by "
                                    "%s as malformed", p.topic, address)
                else:
                    self.pending[h.msg_id] = p
        finally:
            zmq_msg_close(&part)

    cdef _send_unsent(self, double now):
        cdef Parcel p
        cdef bint sent
        still = []
        for p in self.unsent:
            try:
                sent = self._send(p, now)
            except TransportClosed:
                raise
            except Exception:
                # What fails for one parcel (its topic's discovery) holds
                # up no other: it waits for the next pass.
                THROTTLED.error("send", "an at-least-once cast to %s could not be sent; "
                                "trying again", p.topic, exc_info=True)
                sent = False
            if not sent:
                still.append(p)
        # Nothing could go: try less often (nobody consumes, or every queue
        # is full), up to UNSENT_PAUSE_MAX; anything sent: soon again.
        if still and len(still) == len(self.unsent):
            self.unsent_pause = min(self.unsent_pause * 2, UNSENT_PAUSE_MAX)
        else:
            self.unsent_pause = UNSENT_PAUSE_MIN
        self.unsent[:] = still

    cdef bint _send(self, Parcel p, double now) except -1:
        """Send `p` to one consumer of its topic that has not refused it,
        is up, connected and has room; False if none can take it now."""
        cdef Endpoint ep
        cdef Py_ssize_t n, k, start
        try:
            endpoints = self.routes.live(self.routes.lookup(p.topic))
        except (NoListeners, DiscoveryUnavailable):
            return False
        candidates = [ep for ep in endpoints if ep.address not in p.refused]
        if not candidates:
            if not endpoints:
                return False
            p.refused.clear()               # every one refused once: try them all again
            candidates = list(endpoints)
        n = len(candidates)
        start = p.msg_id % n
        for k in range(n):
            ep = <Endpoint>candidates[(start + k) % n]
            if self.ob.try_send(ep, PyBytes_AS_STRING(p.header), PyBytes_GET_SIZE(p.header),
                                p.body) == SENT:
                p.endpoint = ep
                p.sent_at = now
                self.pending[p.msg_id] = p
                return True
        return False

    cdef _probe(self, double now):
        """PING each server in use; mark down those whose last PING stayed
        unanswered for the probe timeout, and move their casts elsewhere.

        A server stays probed after the routes that held it are dropped: a
        caller blocked on it for longer than a refresh interval leaves its
        route unused, and the server must not come back as new, and
        trusted, on the caller's next call.  A silent one is probed until it
        answers (or for SILENT_KEPT); one that answers, for a few probe
        timeouts more."""
        cdef Endpoint ep
        cdef Parcel p
        cdef Probe probe
        cdef char header[MAX_HEADER]
        cdef size_t hlen
        cdef int status
        for ep, topic, fanout in self.routes.endpoints():
            probe = self._probe_of(ep, now)
            probe.wanted = now
            probe.topic, probe.fanout = topic, fanout
        for p in self.pending.values():
            self._probe_of(p.endpoint, now).wanted = now
        gone = set(self.routes.forgotten())
        routed = None                       # addresses some cached route holds, if asked
        for address, probe in list(self.probes.items()):
            if address in gone:
                # Discovery knows it is dead: what it never acknowledged
                # goes elsewhere now, and there is nobody left to probe.
                self._resend_from(address, now)
                del self.probes[address]
                continue
            silent = probe.ping_id != 0 or self.routes.is_down(address)
            if now - probe.wanted >= (SILENT_KEPT if silent else 3 * self.probe_timeout):
                del self.probes[address]
                continue
            if now - probe.answered >= self.probe_timeout:
                # Not heard from for the timeout, whatever the reason: frozen,
                # cut off, every worker stuck, or never even connected.
                if routed is None:
                    routed = self.routes.addresses()
                if (probe.topic is not None and address not in routed
                        and now - probe.asked >= self.probe_timeout):
                    probe.asked = now           # discovery is asked at this pace, no faster
                    withdrew = self.routes.withdrew(address, probe.topic, probe.fanout)
                else:
                    withdrew = False
                if withdrew:
                    # ... or it closed cleanly: discovery no longer lists it
                    # where it was found.  Nothing to warn of, or to probe.
                    self._resend_from(address, now)
                    del self.probes[address]
                    continue
                if not self.routes.is_down(address):
                    LOG.warning("%s did not answer a probe for %gs: passed over until it "
                                "answers", address, self.probe_timeout)
                self.routes.mark_down(address, self.probe_timeout + 2 * self.probe_every)
                self._resend_from(address, now)
            if probe.ping_id and now - probe.sent >= self.probe_timeout:
                # Unanswered: ask again on new connections, for casts too.
                # The old ones may be stale (a link that was cut), and TCP
                # would take seconds to retransmit on them once it is back.
                self.probe_ids.pop(probe.ping_id, None)
                probe.ping_id = 0
                probe.connected = False
                self.probe_ob.hang_up(probe.ep.rid)
                self.ob.hang_up(probe.ep.rid)
            if probe.ping_id:
                continue                    # still waiting for the last one
            self.next_id += 1
            hlen = write_header(header, KIND_PING, 0, self.next_id, PyBytes_AS_STRING(PROBE_TOPIC),
                                PyBytes_GET_SIZE(PROBE_TOPIC))
            status = self.probe_ob.try_send(probe.ep, header, hlen, EMPTY_REQUEST)
            if status == SENT:
                probe.ping_id = self.next_id
                probe.sent = now
                self.probe_ids[self.next_id] = address
            elif status == UNCONNECTED:
                # A handshake that failed (a CURVE key refused, maybe allowed
                # by now) is never retried by libzmq: why() hangs such
                # connections up, so that the next probe, and cast, dials
                # afresh.
                self.probe_ob.why(address)
                self.ob.why(address)
                if probe.connected:         # it was, and the connection was lost
                    probe.connected = False
                    self._resend_from(address, now)
        if len(self.probe_ids) > 4 * len(self.probes) + 64:
            live = {(<Probe>probe).ping_id for probe in self.probes.values()}
            self.probe_ids = {k: v for k, v in self.probe_ids.items() if k in live}

    cdef Probe _probe_of(self, Endpoint ep, double now):
        cdef Probe probe = self.probes.get(ep.address)
        if probe is None:
            probe = Probe.__new__(Probe)
            probe.answered = now
            self.probes[ep.address] = probe
        probe.ep = ep                       # the latest, with the key discovery gives now
        return probe

    cdef _resend_from(self, str address, double now):
        cdef Parcel p
        for msg_id, p in list(self.pending.items()):
            if p.endpoint.address == address:
                del self.pending[msg_id]
                p.refused.add(address)
                self.unsent.append(p)
                self.unsent_pause = UNSENT_PAUSE_MIN
                self.resent += 1

    cdef _check_acks(self, double now):
        cdef Parcel p
        if not self.pending:
            return
        for msg_id, p in list(self.pending.items()):
            if now - p.sent_at >= self.ack_timeout:
                del self.pending[msg_id]
                p.refused.add(p.endpoint.address)
                self.unsent.append(p)
                self.unsent_pause = UNSENT_PAUSE_MIN
                self.resent += 1

    cdef _deliver_held(self, double now):
        cdef Parcel p
        cdef Endpoint ep
        for topic, queue in list(self.held.items()):
            while queue and (<Parcel>queue[0]).expires <= now:
                p = queue.popleft()
                self.held_expired += 1
                self.held_count -= 1
                self.held_bytes -= PyBytes_GET_SIZE(p.body)
            if queue:
                try:
                    endpoints = self.routes.live(self.routes.lookup(topic))
                except (NoListeners, DiscoveryUnavailable):
                    endpoints = ()
                while queue and endpoints:
                    p = queue[0]
                    ep = <Endpoint>endpoints[self.held_delivered % len(endpoints)]
                    if self.ob.try_send(ep, PyBytes_AS_STRING(p.header),
                                        PyBytes_GET_SIZE(p.header), p.body) != SENT:
                        break
                    queue.popleft()
                    self.held_delivered += 1
                    self.held_count -= 1
                    self.held_bytes -= PyBytes_GET_SIZE(p.body)
            if not queue:
                del self.held[topic]
