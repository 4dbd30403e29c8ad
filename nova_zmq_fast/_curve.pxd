# CURVE keys, the allow-list and the ZAP handler.  Behaviour in _curve.pyx.
from nova_zmq_fast._zmq cimport Context


cdef class AllowList:
    cdef readonly object path
    cdef readonly frozenset keys
    cdef readonly frozenset revoked_keys   # allowed once, since taken away
    cdef readonly bint revoked             # revoked_keys is not empty: the receive
                                           # loop checks each message's User-Id
    cdef object stamp                      # the files' names, times and sizes
    cdef readonly double checked           # monotonic time of the last look


cdef class Authenticator:
    cdef Context ctx
    cdef AllowList allow
    cdef object log
    cdef void *sock                 # REP at inproc://zeromq.zap.01
    cdef object thread
    cdef object serving             # the token start() gave its thread
    cdef bint stopping
    cdef readonly unsigned long long accepted, refused

    cdef list _receive(self)
    cdef _answer(self, list request)
    cdef tuple _decide(self, list request)
