# The libzmq context, the single place where libzmq errors become Python
# exceptions, and the pause of every polling wait.  Every other module
# cimports these.
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef class Context:
    cdef void *handle
    cdef int epoch                  # fork_epoch() when it was created
    cdef readonly int sockets       # open sockets, for leak accounting

    cdef void *socket(self, int kind) except NULL
    cdef void close_socket(self, void *sock, int linger_ms) noexcept
    cdef bint usable(self) noexcept

cdef int raise_zmq_error(int err) except -1
cdef int check(int rc) except -1
cdef int set_int(void *sock, int option, int value) except -1
cdef int fork_epoch() noexcept

cdef enum:                          # pause(): the first wait, and the longest
    PAUSE_MIN_NS = 20000
    PAUSE_MAX_NS = 5000000

cdef long pause(long pause_ns, bint green)


cdef inline double now() noexcept nogil:
    """Monotonic seconds, without the GIL (time.monotonic's clock)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline int ms_until(double deadline) noexcept nogil:
    """Milliseconds from now to `deadline`, rounded up, within what
    libzmq's int timeouts hold (0 .. 2e9: about 23 days; a longer wait
    takes several)."""
    cdef double ms = (deadline - now()) * 1000.0
    if ms <= 0:
        return 0
    if ms >= 2e9:
        return 2000000000
    return <int>ms + 1
