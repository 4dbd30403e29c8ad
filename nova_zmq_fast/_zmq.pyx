"""libzmq context, fork safety and error mapping.

Every libzmq return code in the package goes through `check()` /
`raise_zmq_error()`, so errors look the same wherever they come from: an
`OSError` subclass carrying libzmq's errno and message.  An interrupted call
first gives Python signal handlers a chance to run (Ctrl-C raises
KeyboardInterrupt), and otherwise surfaces as `InterruptedError`, which the
blocking loops catch and retry.
"""
import os
import re
import time

from nova_zmq_fast.exceptions import TransportClosed

from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno as c_errno
from posix.time cimport nanosleep, timespec

from nova_zmq_fast._libzmq cimport *


class ZMQError(OSError):
    """A libzmq call failed; `errno` is libzmq's error number."""


cdef int _fork_epoch = 0


def _after_fork_in_child():
    global _fork_epoch
    _fork_epoch += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


cdef int fork_epoch() noexcept:
    """Incremented in every forked child: objects remember the epoch they were
    made in and know they belong to the parent when it differs."""
    return _fork_epoch


cdef int raise_zmq_error(int err) except -1:
    if err == EINTR:
        PyErr_CheckSignals()
        raise InterruptedError(err, "interrupted system call")
    if err == ETERM:
        # Context.shutdown(): cleanup ended what was still waiting.
        raise TransportClosed("the transport was cleaned up while this was in progress")
    raise ZMQError(err, zmq_strerror(err).decode("utf-8", "replace"))


cdef inline int check(int rc) except -1:
    if rc == -1:
        raise_zmq_error(zmq_errno())
    return rc


cdef int set_int(void *sock, int option, int value) except -1:
    return check(zmq_setsockopt(sock, option, &value, sizeof(int)))


cdef long pause(long pause_ns, bint green):
    """Sleep `pause_ns` (cooperatively under eventlet, GIL released
    otherwise); returns the next, longer pause.  Every wait for room that
    cannot block in libzmq itself polls with it."""
    cdef timespec ts
    if green:
        time.sleep(pause_ns * 1e-9)         # patched: yields to other greenlets
    else:
        ts.tv_sec = 0
        ts.tv_nsec = pause_ns
        with nogil:
            nanosleep(&ts, NULL)
    return min(pause_ns * 2, PAUSE_MAX_NS)


def libzmq_version():
    """The (major, minor, patch) of the libzmq actually loaded."""
    cdef int major, minor, patch
    zmq_version(&major, &minor, &patch)
    return (major, minor, patch)


def compiled_libzmq_version():
    """The libzmq version the core was compiled against."""
    return (ZMQ_VERSION_MAJOR, ZMQ_VERSION_MINOR, ZMQ_VERSION_PATCH)


def loaded_libzmq_files():
    """Paths of every libzmq shared object mapped into this process.  There
    must be exactly one: two copies would each run their own I/O threads and
    could not share sockets."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip("\n").rpartition(" ")[2]
            if re.search(r"/libzmq[^/]*\.so", path):
                found.add(os.path.realpath(path))
    return sorted(found)


# libzmq 4.3.3 fixed a denial of service of CURVE servers by unauthenticated
# peers (CVE-2020-15166) and overflows on malformed ZMTP input.  Checked on
# the library actually loaded, which may differ from the headers compiled
# against (csrc/zmq_compat.h refuses old headers), and here because every
# extension imports this module first.
MIN_LIBZMQ = (4, 3, 3)


def require_libzmq(version, where):
    """Raise ImportError unless `version` (major, minor, patch) is at least
    MIN_LIBZMQ; `where` names the loaded library in the message."""
    if tuple(version) < MIN_LIBZMQ:
        raise ImportError(
            "nova_zmq_fast needs libzmq >= %d.%d.%d (CURVE and ZMTP security fixes), "
            "but libzmq %d.%d.%d is loaded from %s: upgrade it, or install the "
            "nova-zmq-fast wheel, which bundles its own" % (*MIN_LIBZMQ, *version, where))


require_libzmq(libzmq_version(), " and ".join(loaded_libzmq_files()) or "an unknown path")


# Seconds a close waits for a thread of ours told to stop (the courier's,
# the ZAP handler's) before it gives up on it and leaves its socket open.
# Read at each use, as _zmq.STOP_WAIT, so that tests can shorten it.
STOP_WAIT = 5.0


cdef class Context:
    """One libzmq context per process.  It counts the sockets it hands out so
    that `term()` can refuse to hang on a socket somebody forgot, and tests
    can assert that everything was closed."""

    def __cinit__(self, int io_threads=1):
        self.handle = zmq_ctx_new()
        if self.handle == NULL:
            raise_zmq_error(zmq_errno())
        self.epoch = _fork_epoch
        self.sockets = 0
        if io_threads != 1:
            check(zmq_ctx_set(self.handle, ZMQ_IO_THREADS, io_threads))

    cdef bint usable(self) noexcept:
        # A forked child must never touch its parent's context: its I/O
        # threads do not exist here.
        return self.handle != NULL and self.epoch == _fork_epoch

    cdef void *socket(self, int kind) except NULL:
        if not self.usable():
            raise ZMQError(ETERM, "context is closed or belongs to another process")
        cdef void *sock = zmq_socket(self.handle, kind)
        if sock == NULL:
            raise_zmq_error(zmq_errno())
        self.sockets += 1
        return sock

    cdef void close_socket(self, void *sock, int linger_ms) noexcept:
        """Close with a bounded linger: queued messages get `linger_ms` to
        leave, then are dropped, so term() never waits forever."""
        if sock == NULL or not self.usable():
            return
        zmq_setsockopt(sock, ZMQ_LINGER, &linger_ms, sizeof(int))
        zmq_close(sock)
        self.sockets -= 1

    def shutdown(self):
        """End every wait on this context's sockets, in any thread: they
        return ETERM (TransportClosed), and no socket can be opened any
        more.  The sockets must still be closed before term()."""
        if self.usable():
            zmq_ctx_shutdown(self.handle)

    def term(self):
        """Terminate the context, waiting at most for the sockets' linger.
        Refuses (RuntimeError) while sockets are still open."""
        if self.handle == NULL:
            return
        if self.epoch != _fork_epoch:
            self.handle = NULL      # the parent's: leave it alone
            return
        if self.sockets:
            raise RuntimeError(f"{self.sockets} socket(s) still open")
        cdef void *handle = self.handle
        cdef int rc
        self.handle = NULL
        while True:
            with nogil:
                rc = zmq_ctx_term(handle)
            if rc == 0 or zmq_errno() != EINTR:
                break

    @property
    def closed(self):
        return self.handle == NULL

    def __dealloc__(self):
        if self.handle != NULL and self.epoch == _fork_epoch and self.sockets == 0:
            zmq_ctx_term(self.handle)
