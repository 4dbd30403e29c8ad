# The courier: a runtime's background sender.  Behaviour in _courier.pyx.
from libc.stdint cimport uint64_t

from nova_zmq_fast._client cimport Client, Outbox
from nova_zmq_fast._routes cimport Endpoint, RouteTable


cdef class Parcel:
    cdef str topic
    cdef object method
    cdef bytes header               # written once: a resend is the same message
    cdef bytes body
    cdef uint64_t msg_id
    cdef Endpoint endpoint          # where it was last sent
    cdef double sent_at
    cdef double expires             # held notifications: dropped after
    cdef set refused                # addresses that refused it or went silent


cdef class Probe:
    cdef Endpoint ep
    cdef uint64_t ping_id           # the PING awaiting an answer, or 0
    cdef double sent                # when it was sent
    cdef double answered            # when the server last answered (or was first probed)
    cdef double wanted              # when a route in use last held it
    cdef bint connected             # answered on the current probe connection
    cdef str topic                  # a route that held it when last wanted, to ask
    cdef bint fanout                # discovery whether it withdrew (RouteTable.withdrew)
    cdef double asked               # ... when it last asked


cdef class Courier:
    cdef Client client
    cdef RouteTable routes
    cdef object options
    cdef Outbox ob                  # used by the courier's thread only: casts
    cdef Outbox probe_ob            # ... and PINGs, on connections of their own
    cdef object jobs                # deque of Parcels from any thread
    cdef int wake_read, wake_write
    cdef object os                  # the unpatched os module (eventlet)
    cdef bint sleeping
    cdef object thread
    cdef bint stopping
    cdef bint draining              # close() waits for what is pending
    cdef bint closed                # close() began: never start again
    cdef bint abandoned             # close() left a thread that would not stop, having
                                    # counted what it carried
    cdef object start_lock          # start() and close() from any thread
    cdef int epoch
    cdef double next_probe, next_refresh
    # liveness
    cdef double probe_every, probe_timeout
    cdef dict probes                # address -> Probe
    cdef dict probe_ids             # msg_id -> address
    # at-least-once casts
    cdef dict pending               # msg_id -> Parcel sent, not yet acknowledged
    cdef list unsent                # Parcels waiting for a consumer that can take them
    cdef double unsent_pause        # until they are tried again
    cdef uint64_t next_id
    cdef double ack_timeout
    cdef Py_ssize_t max_pending
    # held notifications
    cdef dict held                  # topic -> deque of Parcels
    cdef Py_ssize_t held_count, held_bytes, hold_count, hold_bytes
    cdef double hold_seconds
    cdef readonly unsigned long long acked, resent, rejected, lost
    cdef readonly unsigned long long held_total, held_delivered, held_expired, held_dropped

    cdef bint _accept(self, Parcel p)
    cdef dict _count_dropped(self, double linger)
    cdef _start_thread(self)
    cdef _wake(self)
    cdef _loop_once(self)
    cdef _take_jobs(self)
    cdef _read_replies(self, Outbox ob)
    cdef _send_unsent(self, double now)
    cdef bint _send(self, Parcel p, double now) except -1
    cdef _probe(self, double now)
    cdef Probe _probe_of(self, Endpoint ep, double now)
    cdef _resend_from(self, str address, double now)
    cdef _check_acks(self, double now)
    cdef _deliver_held(self, double now)
