# The route table: which servers a message for a topic may go to.
# Behaviour and rules in _routes.pyx.

cdef class Endpoint:
    cdef readonly str host          # logical host name (rpc_zmq_host): what 'topic.host' names
    cdef readonly str address       # the ZeroMQ endpoint peers connect to
    cdef readonly bytes rid         # address as bytes: the routing id outboxes give its connection
    cdef readonly object key        # the server's CURVE public key (Z85 bytes), or None


cdef class Route:
    cdef tuple endpoints
    cdef bint used                  # looked up since the refresher last came by
    cdef double rechecked           # when a sender last asked the backend (recheck)


cdef class RouteTable:
    cdef readonly object backend
    cdef dict direct                # topic -> Route
    cdef dict fanout                # topic -> Route
    cdef dict prefixes              # prefix -> (expiry, topic names)
    cdef dict down                  # address -> monotonic time until which it is skipped
    cdef object dead                # OrderedDict: addresses the backend declared gone
    cdef readonly unsigned long dead_count   # bumped by forget(): outboxes compare it
    cdef readonly unsigned long generation   # bumped when an address may have left a route
    cdef readonly double interval   # seconds between refreshes of a route
    cdef object lock
    cdef public object on_route     # called when a route is first cached (starts the courier)
    cdef bint closed

    cdef tuple lookup(self, object topic)
    cdef tuple lookup_fanout(self, object topic)
    cdef tuple live(self, tuple endpoints)
    cdef tuple _miss(self, dict cache, object topic, bint fanout)
    cdef tuple _answer(self, endpoints)
    cdef tuple recheck(self, object topic)
    cdef _store(self, dict cache, object topic, tuple endpoints)
    cdef _refresh(self, dict cache, bint fanout)


cdef Py_ssize_t host_base_len(const char *topic, Py_ssize_t n,
                              const char *host, Py_ssize_t host_len) noexcept nogil
