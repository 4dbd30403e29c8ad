"""Running the service's code away from the receive loop's threads.

The receive loop (_server.pyx) runs in real OS threads.  Under eventlet
(a monkey-patched process, detected by the runtime) and under asyncio
(nova_zmq_fast.aio) the service's code must run elsewhere: in green
threads on the hub's thread, or on the event loop.  A consumer is then
*deferred* (_dispatch.pyx): the receive loop hands (context, message,
replier) to a `Deferred` proxy, which queues it for the other side and
returns at once; that side calls into the service's proxy with the same
rules as the receive loop (`Runner`) and answers through the Replier.

`GreenHandoff` is the eventlet side.  When the process's server is not
serving yet as its consumers start, the hub leads it itself
(Server.lead_here), as green leaders and followers: one leader, the
owner, waits on the socket's ZMQ_FD and takes a turn (Server.serve_ready)
each time it signals, running the requests' handlers itself, replies
going straight out.  A handler that returns without waiting costs no
green thread and no hand-off.  One that waits (green I/O, sleep, a nested
call) parks its leader mid-turn; at the hub's next turn a check sees it
and another leader takes the turns and the fd, up to
rpc_thread_pool_size leaders, so a waiting handler holds up nothing
queued behind it.  Otherwise (threads serve) the
receive loop's threads fill a deque, a pipe wakes the hub's dispatcher
only while it sleeps, and handlers run in a GreenPool of that size.
"""
import collections
import errno
import inspect
import logging
import sys

from nova_zmq_fast._dispatch import consumer as _standalone
from nova_zmq_fast._green import unpatched
from nova_zmq_fast._server import log_handler_error
from nova_zmq_fast.exceptions import serialize_remote_exception

LOG = logging.getLogger("nova_zmq_fast.handoff")


class Runner:
    """Calls into a proxy as the receive loop does, and answers."""

    # Told of an error no caller sees: the serving Server's handler_error()
    # once the runtime attached this runner to it (it counts too).
    errors = staticmethod(log_handler_error)

    def __init__(self, topic, proxy):
        self.topic = topic
        self.target = _standalone(topic, False, proxy)

    def accepts(self, version, namespace):
        return self.target.accepts(version, namespace)

    def invoke(self, ctxt, msg):
        return self.target.run(ctxt, msg)

    def answer(self, replier, result):
        """Send a result that is not awaitable (a generator streams).  A
        cast has no replier, or one whose answer is its ACK (at least
        once), sent once the handler is done."""
        if not inspect.isgenerator(result):
            if replier is not None:
                replier.result(result)
            return
        if replier is None or replier.cast:
            for _ in result:
                pass
            if replier is not None:
                replier.result(None)
        elif replier.multi:
            for value in result:
                replier.chunk(value)
            replier.end()
        else:
            last = None
            for last in result:
                pass
            replier.result(last)

    def fail(self, replier, msg, exc):
        if replier is not None and not replier.done and not replier.cast:
            try:
                replier.failure(serialize_remote_exception(exc))
            except Exception:
                replier.failure(["builtins", "RuntimeError",
                                 "the remote exception could not be encoded", [], ""])
            return
        self.errors(self.topic, msg.get("method", "<notification>"), exc)
        if replier is not None:
            replier.result(None)        # an at-least-once cast that raised was handled: ACK

    def run(self, ctxt, msg, replier):
        """The whole request, synchronously (a green thread's body)."""
        try:
            self.answer(replier, self.invoke(ctxt, msg))
        except BaseException as exc:
            self.fail(replier, msg, exc)


class Deferred:
    """The proxy the core calls, in a receive-loop thread: hands each
    request to `put(runner, ctxt, msg, replier)` and returns."""

    def __init__(self, runner, put):
        self.runner = runner
        self.put = put

    def __call__(self, ctxt, msg, replier):
        self.put(self.runner, ctxt, msg, replier)

    def accepts(self, version, namespace):
        return self.runner.accepts(version, namespace)


class GreenHandoff:
    """Requests from the receive loop's OS threads to green threads on the
    hub of the thread that created it (see the module docstring)."""

    def __init__(self, pool_size):
        import eventlet
        import eventlet.greenpool
        import eventlet.hubs
        import eventlet.queue
        self._eventlet = eventlet
        self._os = unpatched("os")          # eventlet's os.read would wait, not fail
        self._ident = unpatched("threading").get_ident   # the OS thread's, not a greenlet's
        self._thread = self._ident()
        self.items = collections.deque()
        self.pool = eventlet.greenpool.GreenPool(max(1, pool_size))
        self._read, self._write = self._os.pipe()
        self._os.set_blocking(self._read, False)
        self._os.set_blocking(self._write, False)
        self._pipe_fds = (self._read, self._write)     # until closed
        self._sleeping = False
        self._stopped = False
        self.server = None                  # the server this hub leads, if any
        self._turns = eventlet.queue.LightQueue()
        self._leaders = 0                   # leader green threads (hub-led server)
        self._max_leaders = max(1, pool_size)
        self._owner = None                  # the leader that waits on the socket's fd,
        self._fd_waiter = None              # ... while it waits there,
        self._wake_due = False              # ... and a wake for it is scheduled
        self._runs = 0                      # handlers run by leaders: the last one's number,
        self._active = {}                   # ... those not returned yet (their leaders),
        self._checking = False              # ... and a park check due at the hub's next turn
        self._hub = eventlet.hubs.get_hub()
        self._current = eventlet.getcurrent
        self._dispatcher = eventlet.spawn(self._dispatch)

    def wrap(self, topic, proxy):
        return Deferred(Runner(topic, proxy), self.put)

    def put(self, runner, ctxt, msg, replier):
        """From any thread: queue a request; wake the hub if it sleeps.  In
        a leader's turn (on the hub's thread): run it there and then."""
        if self.server is not None and self._ident() == self._thread:
            self._runs = run = self._runs + 1
            self._active[run] = self._current()
            if not self._checking:
                self._checking = True
                self._hub.schedule_call_global(0, self._check_parked)
            try:
                runner.run(ctxt, msg, replier)
            finally:
                del self._active[run]
            return
        self.items.append((runner, ctxt, msg, replier))
        if self._sleeping:
            self._wake()

    def lead(self, server):
        """Lead `server` from this hub if it does not serve yet (on the
        hub's thread only): no receive threads, no hand-off."""
        if (self.server is not None or self._stopped or
                self._ident() != self._thread or not server.lead_here()):
            return
        self.server = server
        self._fd = server.fd
        server.before_close = self._server_closing
        self._dispatcher.kill()
        self._turns.put(None)               # whatever came before the watch began
        self._start_leader()

    def _start_leader(self):
        self._leaders += 1
        self._eventlet.spawn_n(self._lead_turns)

    def _check_parked(self):
        """In the hub, at its first turn after a leader ran a handler.
        Every handler not returned by now waits (green I/O, sleep, a call),
        parking its leader mid-turn.  If the last one started is parked,
        requests may be queued behind it: another leader takes a turn.  If
        the owner is parked (whichever handler it ran), it gives up the fd,
        which another leader takes, so that the socket is always read."""
        self._checking = False
        owner = self._owner
        if owner is not None and owner in self._active.values():
            self._owner = None
        if self._runs in self._active or self._owner is None:
            self.kick()

    def kick(self):
        """A turn is due: to the owner waiting on the fd, else to a leader
        waiting for one, or, with every leader parked in a handler, to a
        new one."""
        if self.server is None:
            return
        if self._fd_waiter is not None:
            self._wake_owner()
            return
        if not self._turns.getting() and self._leaders < self._max_leaders:
            self._start_leader()
        self._turns.put(None)

    def _wait_fd(self, me):
        """The owner's wait: until the socket's fd signals, or a wake."""
        hub = self._hub
        listener = hub.add(hub.READ, self._fd, self._fd_ready, me.throw, lambda: None)
        try:
            self._fd_waiter = me
            hub.switch()
        finally:
            self._fd_waiter = None
            hub.remove(listener)

    def _fd_ready(self, _=None):
        """The fd signalled (or a wake is due): the owner takes a turn."""
        self._wake_due = False
        waiter, self._fd_waiter = self._fd_waiter, None
        if waiter is not None:
            waiter.switch()

    def _wake_owner(self, now=False):
        """The owner waiting on the fd takes a turn at the hub's next turn,
        or with `now`, runs at once (until it next yields) and is off the
        fd when this returns: the socket, and its fd, may close next."""
        if self._fd_waiter is None:
            return
        if not now:
            if not self._wake_due:
                self._wake_due = True
                self._hub.schedule_call_global(0, self._fd_ready)
            return
        waiter, self._fd_waiter = self._fd_waiter, None
        current = self._current()
        if current is not self._hub.greenlet:
            self._hub.schedule_call_global(0, current.switch)
        waiter.switch()

    def _lead_turns(self):
        """One leader: a turn each time one is due, until the server stops.
        One leader at a time owns the socket's fd and takes a turn whenever
        it signals; the others wait for a kick.  The last leader out goes
        back to the pipe (a later server may serve with threads)."""
        items, turns = self.items, self._turns
        me = self._current()
        try:
            while not self._stopped and self.server is not None:
                if turns.qsize():
                    while turns.qsize():        # a kick: a turn now
                        turns.get_nowait()
                elif self._owner is None or self._owner is me:
                    self._owner = me
                    self._wait_fd(me)
                else:
                    turns.get()
                server = self.server
                if server is None or self._stopped:
                    break                       # (its turn was the signal to go)
                while items:                    # put() from another thread meanwhile
                    runner, ctxt, msg, replier = items.popleft()
                    self.pool.spawn_n(runner.run, ctxt, msg, replier)
                if not server.serve_ready() and self.server is server:
                    # Stopped: let the owner and the other leaders go.
                    self._release_leaders()
        finally:
            self._leaders -= 1
            if self._owner is me:
                self._owner = None
            if self._leaders == 0:
                if self._stopped:
                    self._close_pipe()      # close() came from another thread
                else:
                    self._dispatcher = self._eventlet.spawn(self._dispatch)

    def _server_closing(self, server):
        """Server.stop() closes the sockets next, its deadline passed with
        no leader having read the STOP (a leader that reads it releases the
        others itself): release them now, so that none stays on the fd."""
        if self.server is server and self._ident() == self._thread:
            self._release_leaders()

    def _release_leaders(self):
        """The server stopped (or this handoff closes): every leader ends,
        the owner first, off the socket's fd before the socket closes."""
        self.server = None
        self._wake_owner(now=True)
        for _ in range(self._leaders):
            self._turns.put(None)

    def _wake(self):
        if not self._pipe_fds:
            return                              # closed: its number may be reused
        try:
            self._os.write(self._write, b"!")
        except OSError as exc:
            if exc.errno != errno.EAGAIN:       # a full pipe is already awake
                raise

    def _dispatch(self):
        from eventlet.hubs import trampoline
        items = self.items
        spawn = self.pool.spawn_n
        while not self._stopped:
            while items:
                runner, ctxt, msg, replier = items.popleft()
                spawn(runner.run, ctxt, msg, replier)       # waits while the pool is full
            self._sleeping = True
            try:
                if not items and not self._stopped:         # put() may have raced us
                    trampoline(self._read, read=True)
                    self._drain_pipe()
            finally:
                self._sleeping = False
        self._close_pipe()          # close() came from another thread

    def _drain_pipe(self):
        try:
            while self._os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def idle(self):
        return not self.items and self.pool.running() == 0 and not self._active

    def wait_idle(self, timeout):
        """Wait (cooperatively on the hub's thread) until every request
        handed over has finished, at most `timeout` seconds."""
        time = unpatched("time")
        deadline = time.monotonic() + max(0.0, timeout)
        on_hub = self._ident() == self._thread
        while not self.idle() and time.monotonic() < deadline:
            if on_hub:
                self._eventlet.sleep(0.002)
            else:
                time.sleep(0.002)
        return self.idle()

    def close(self):
        """Stop the dispatcher and release the pipe; from the hub's thread
        (elsewhere the dispatcher is only told to stop)."""
        if self._stopped:
            return
        self._stopped = True
        if self._ident() != self._thread:
            self._wake()
            return
        if self.server is not None:
            self._release_leaders()             # each leader ends at its next turn
        self._dispatcher.kill()
        self._close_pipe()

    def _close_pipe(self):
        fds, self._pipe_fds = self._pipe_fds, ()
        for fd in fds:
            self._os.close(fd)


class ThreadHandoff:
    """Requests to a pool of OS threads: for the consumers of plain
    (blocking) code in a process whose server an event loop leads
    (nova_zmq_fast.aio), so that their methods never run on the loop."""

    def __init__(self, pool_size):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(max(1, pool_size),
                                       thread_name_prefix="nova_zmq_fast-handler")
        self._lock = unpatched("threading").Lock()
        self._pending = 0

    def wrap(self, topic, proxy):
        return Deferred(Runner(topic, proxy), self.put)

    def put(self, runner, ctxt, msg, replier):
        with self._lock:
            self._pending += 1
        self.pool.submit(self._run, runner, ctxt, msg, replier)

    def _run(self, runner, ctxt, msg, replier):
        try:
            runner.run(ctxt, msg, replier)
        finally:
            with self._lock:
                self._pending -= 1

    def wait_idle(self, timeout):
        """Wait until every request handed over has finished, at most
        `timeout` seconds."""
        time = unpatched("time")
        deadline = time.monotonic() + max(0.0, timeout)
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.002)
        return not self._pending

    def close(self):
        """Stop taking work; threads end once what they run returns.  What
        was handed over and not started yet is dropped, and said so."""
        with self._lock:
            pending = self._pending
        self.pool.shutdown(wait=False, cancel_futures=True)
        if pending:
            LOG.warning("%d handed-over request(s) still queued or running at close: those "
                        "not started are dropped (their callers time out; at-least-once "
                        "casts run when they are sent again)", pending)


def monkey_patched():
    """Has eventlet patched this process's threads?"""
    patcher = sys.modules.get("eventlet.patcher")
    return patcher is not None and patcher.is_monkey_patched("thread")
