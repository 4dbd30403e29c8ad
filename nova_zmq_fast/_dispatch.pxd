# Turning a received request into a call of the consumer's code.
# Behaviour and rules in _dispatch.pyx.

cdef class RpcContext:
    cdef dict _values

    @staticmethod
    cdef RpcContext wrap(dict values)


cdef enum ProxyKind:
    PROXY_DISPATCHER                # has dispatch(): version/namespace rules
    PROXY_DISPATCHER_2012           # ... Folsom's, without the namespace argument
    PROXY_CALLABLE                  # called as proxy(ctxt, msg) with raw messages
    PROXY_METHODS                   # its public method msg['method'] is called
    PROXY_DEFERRED                  # called as proxy(ctxt, msg, replier); replies later


cdef class Consumer:
    cdef readonly str topic
    cdef readonly bint fanout
    cdef readonly object proxy
    cdef readonly object owner      # the Connection that created it
    cdef object dispatch
    cdef int mode
    cdef readonly int active        # invocations running now
    cdef bint closing               # its Connection is closing: note each use
    cdef readonly double last_used  # monotonic time of the last use while closing

    @staticmethod
    cdef Consumer new(str topic, bint fanout, object proxy, bint deferred, object owner)
    cdef object invoke(self, RpcContext ctxt, dict msg, int kind)
    cdef bint accepts(self, object version, object namespace) except -1
    cdef void begin(self) noexcept
    cdef void end(self) noexcept


cdef class Subscription:
    cdef readonly tuple consumers   # every local consumer of one topic and kind
    cdef Py_ssize_t turn            # round-robin position among them

    @staticmethod
    cdef Subscription new(tuple consumers)
    cdef Consumer pick(self)
