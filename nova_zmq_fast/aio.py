"""The RPC API for asyncio services: the same wire, discovery and options
as `nova_zmq_fast.rpc` (and the same process runtime, so `rpc.init()`
configures both).

    from nova_zmq_fast import aio

    value = await aio.call(ctxt, "compute", {"method": "resize", "args": {...}})
    async for line in aio.multicall(ctxt, "compute.node7", {"method": "console_log"}):
        ...
    await aio.cast(ctxt, "compute", msg); await aio.fanout_cast(ctxt, "compute", msg)
    await aio.notify(ctxt, "notifications.info", {...})

    conn = aio.create_connection()
    conn.create_consumer("compute", ComputeManager())   # methods may be coroutines
    conn.consume_in_thread()
    ...
    await conn.close(); await aio.cleanup()

Calling: each event loop has an outbox of its own (_client.Outbox), used
only from the loop's thread.  Sends never wait in the core
(Client.try_request); a consumer not connected yet, or a full queue, is
retried after a short asyncio.sleep.  Replies are read when the socket's
ZMQ_FD becomes readable (loop.add_reader, edge-triggered: the queue is
drained after every wake-up and every send) and handed to the waiting
task by msg_id.  Cancelling the task forgets its msg_id: a late reply is
dropped.  A multicall stream is forgotten as soon as its caller is done
with it: at its end, at aclose() or the end of an `async with`, or when
the stream object is dropped (a `break` out of `async for`); one kept but
not read holds at most STREAM_BACKLOG replies, then loses values as a
threaded caller's full queue does (StreamTruncated).

Serving: when an asyncio Connection is the first to serve in its process,
the event loop leads the process's server itself (_server.Server.lead_here):
it watches the socket's ZMQ_FD, receives each request on the loop's thread,
runs the method there (a coroutine or async generator as a task) and sends
the reply straight out, with no thread hand-off.  Otherwise (the process
already serves with threads) the receive loop's threads hand each request
to the event loop (call_soon_threadsafe, _handoff.Deferred) and replies go
back through the server's control socket (waiting there, on the loop, only
while the receive loop is too far behind to take them: at most
rpc_cast_timeout).  Either way a Replier answers.
"""
import asyncio
import collections
import concurrent.futures
import inspect
import weakref

from nova_zmq_fast import rpc
from nova_zmq_fast._client import KINDS
from nova_zmq_fast._dispatch import wrap as _wrap_notification
from nova_zmq_fast._green import unpatched
from nova_zmq_fast._handoff import Deferred, Runner
from nova_zmq_fast.exceptions import (
    InvalidMessage, NoListeners, PeerUnreachable, RPCException, StreamTruncated, Timeout,
    TransportClosed)

__all__ = ["call", "multicall", "cast", "fanout_cast", "notify", "create_connection",
           "cleanup", "Connection"]

CALL, CAST, NOTIFY = KINDS["call"], KINDS["cast"], KINDS["notify"]
CHUNK, END, FAILURE = KINDS["chunk"], KINDS["end"], KINDS["failure"]
HEARTBEAT, REFUSED = KINDS["heartbeat"], KINDS["refused"]
PAUSE_MIN, PAUSE_MAX = 0.0002, 0.005
# Replies a multicall stream keeps for a caller that does not read them
# (as many as a threaded caller's socket queue holds): a CHUNK beyond them
# is lost, and the stream ends in StreamTruncated instead of its end.
STREAM_BACKLOG = 100000
_TRUNCATED = -1                 # in a waiter's replies: (_TRUNCATED, values lost)

_callers = weakref.WeakKeyDictionary()          # event loop -> _Caller
_get_ident = unpatched("threading").get_ident
_NEVER = float("inf")


class _Waiter:
    __slots__ = ("replies", "future", "deadline", "lost")

    def __init__(self):
        self.replies = collections.deque()
        self.future = None
        self.deadline = _NEVER                  # loop time, while it awaits a reply
        self.lost = 0                           # CHUNKs dropped: its backlog was full


class _Caller:
    """One event loop's outbox and the tasks waiting on it."""

    def __init__(self, loop, runtime):
        self.loop = loop
        self.runtime = runtime
        self.client = runtime.client
        self.outbox = self.client.new_outbox()
        self.fd = self.outbox.fd
        self.waiters = {}                       # msg_id -> _Waiter
        self.watching = False
        self.closed = False
        # One timer for every waiter, at the earliest deadline, rather than
        # one a call: calls end long before their deadlines, which mostly
        # come in order, so it is seldom moved.
        self.timer = None
        self.timer_at = None

    def readable(self):
        for msg_id, kind, body in self.outbox.replies():
            waiter = self.waiters.get(msg_id)
            if waiter is None:
                continue                        # abandoned (timeout, cancelled, closed)
            if waiter.lost or len(waiter.replies) >= STREAM_BACKLOG:
                # A stream whose caller stopped reading: once one value
                # is lost, every later one is too (no gap), and its end
                # becomes StreamTruncated, as the server does for a
                # caller whose queue is full.
                if kind == HEARTBEAT:
                    continue
                if kind == CHUNK:
                    waiter.lost += 1
                    continue
                self.forget(msg_id)             # its last reply: nothing more comes
                if waiter.lost and kind != FAILURE:
                    kind, body = _TRUNCATED, waiter.lost
            waiter.replies.append((kind, body))
            future = waiter.future
            if future is not None and not future.done():
                future.set_result(None)

    def expect(self, msg_id):
        waiter = self.waiters[msg_id] = _Waiter()
        if not self.watching:
            self.loop.add_reader(self.fd, self.readable)
            self.watching = True
        self.readable()                 # a send may have eaten the fd's edge
        return waiter

    def forget(self, msg_id):
        # The reader stays: adding and removing it per call would cost two
        # epoll_ctl calls a call.  Until close() it drops what nobody awaits.
        self.waiters.pop(msg_id, None)
        self.outbox.forget(msg_id)

    def _arm(self, when):
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.loop.call_at(when, self._expire)

    def _expire(self):
        """Wake every waiter past its deadline; the timer moves on to the
        earliest of the others."""
        self.timer = self.timer_at = None
        now = self.loop.time()
        earliest = _NEVER
        for waiter in self.waiters.values():
            if waiter.deadline <= now:
                future = waiter.future
                if future is not None and not future.done():
                    future.set_result(None)
            elif waiter.deadline < earliest:
                earliest = waiter.deadline
        if earliest < _NEVER:
            self._arm(earliest)

    async def next_reply(self, waiter, deadline):
        """The next reply for `waiter`, or None at `deadline` (loop time);
        TransportClosed once cleanup() closed this caller."""
        while not waiter.replies:
            if self.closed:
                raise TransportClosed("the transport was cleaned up while this call waited")
            if self.loop.time() >= deadline:
                return None
            waiter.deadline = deadline
            if self.timer_at is None or deadline < self.timer_at:
                self._arm(deadline)
            future = waiter.future = self.loop.create_future()
            try:
                await future
            finally:
                waiter.future = None
        return waiter.replies.popleft()

    async def send(self, kind, context, topic, msg, deadline, multi=False, refused=None):
        """try_request until a consumer takes it; within the connect and
        send timeouts and `deadline`."""
        client = self.client
        pause = PAUSE_MIN
        limit = min(deadline, self.loop.time() + max(client.connect_timeout, client.send_timeout))
        while True:
            msg_id = client.try_request(self.outbox, kind, context, topic, msg, multi, refused)
            if msg_id is not None:
                return msg_id
            if self.loop.time() >= limit:
                method = msg.get("method") if isinstance(msg, dict) else None
                raise PeerUnreachable(f"no consumer of {topic} connected with room in its "
                                      f"queue in time", topic, method)
            await asyncio.sleep(pause)
            pause = min(pause * 2, PAUSE_MAX)

    def close(self):
        self.closed = True                      # waiting calls raise TransportClosed
        if self.timer is not None:
            self.timer.cancel()
            self.timer = self.timer_at = None
        if self.watching:
            self.loop.remove_reader(self.fd)
            self.watching = False
        for waiter in self.waiters.values():
            if waiter.future is not None and not waiter.future.done():
                waiter.future.set_result(None)
        self.waiters.clear()


def _caller():
    loop = asyncio.get_running_loop()
    caller = _callers.get(loop)
    runtime = rpc._runtime()
    if caller is None or caller.runtime is not runtime:
        if caller is not None:
            caller.close()
        caller = _callers[loop] = _Caller(loop, runtime)
    return caller


def _wait_for(caller, timeout):
    if timeout is None:
        return caller.client.response_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    return timeout


def _value(caller, kind, body):
    if kind == FAILURE:
        raise caller.client.reply_failure(body)
    if kind == END:
        return None
    return caller.client.reply_value(body)


async def call(context, topic, msg, timeout=None):
    """Invoke a method on one consumer of `topic` and return its result;
    as rpc.call (Timeout, NoListeners, the remote exception)."""
    caller = _caller()
    loop = caller.loop
    deadline = loop.time() + _wait_for(caller, timeout)
    client = caller.client
    refused = set()
    while True:
        msg_id = client.try_request(caller.outbox, CALL, context, topic, msg, False, refused)
        if msg_id is None:                      # not connected yet, or full: wait and retry
            msg_id = await caller.send(CALL, context, topic, msg, deadline, refused=refused)
        waiter = caller.expect(msg_id)
        try:
            while True:
                reply = await caller.next_reply(waiter, deadline)
                if reply is None:
                    caller.client.timeouts += 1
                    raise Timeout(None, topic, msg["method"])
                if reply[0] != HEARTBEAT:
                    break
        finally:
            caller.forget(msg_id)
        if reply[0] != REFUSED:
            return _value(caller, *reply)
        # Not served there any more, and not run: try another consumer.
        caller.client.refused += 1
        caller.client.routes.invalidate(topic)


def multicall(context, topic, msg, timeout=None):
    """`async for` over every value the remote method yields, each as it
    is produced; `timeout` bounds the wait for each.  The request leaves
    at the first iteration.  To stop early, `break` (the stream is
    forgotten when dropped), `await stream.aclose()`, or read it in
    `async with aio.multicall(...) as stream:`; later values are dropped
    as they arrive."""
    return _Stream(context, topic, msg, timeout)


class _Stream:
    """What multicall() returns: an asynchronous iterator, to be read from
    its event loop's tasks, one at a time.  It holds its waiter, and
    nothing holds it: when it is dropped it forgets its msg_id at once
    (an async generator would only be closed at a later turn of the loop,
    or never while its frame is part of a reference cycle)."""

    __slots__ = ("_context", "_topic", "_msg", "_timeout", "_caller", "_wait", "_msg_id",
                 "_waiter", "_reading", "_done")

    def __init__(self, context, topic, msg, timeout):
        self._context = context
        self._topic = topic
        self._msg = msg
        self._timeout = timeout
        self._caller = self._waiter = self._msg_id = None
        self._wait = None
        self._reading = self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        if self._reading:
            raise RuntimeError("this multicall stream is already being read by another task")
        self._reading = True
        try:
            return await self._next()
        except BaseException:
            self._finish()                      # its end, a failure, a timeout, cancelled
            raise
        finally:
            self._reading = False

    async def _next(self):
        caller = self._caller
        if caller is None:
            caller = _caller()
            self._wait = _wait_for(caller, self._timeout)
            msg_id = await caller.send(CALL, self._context, self._topic, self._msg,
                                       caller.loop.time() + self._wait, multi=True,
                                       refused=set())
            self._caller, self._msg_id = caller, msg_id
            self._waiter = caller.expect(msg_id)
        waiter = self._waiter
        while True:
            reply = await caller.next_reply(waiter, caller.loop.time() + self._wait)
            if reply is None:
                caller.client.timeouts += 1
                raise Timeout(None, self._topic, self._msg["method"])
            kind, body = reply
            if kind == CHUNK:
                return caller.client.reply_value(body)
            if kind == HEARTBEAT:
                continue
            self._finish()
            if kind == END:
                raise StopAsyncIteration
            if kind == _TRUNCATED:
                raise StreamTruncated(lost=body)
            if kind == REFUSED:
                caller.client.refused += 1
                caller.client.routes.invalidate(self._topic)
                raise NoListeners(caller.client.reply_value(body), self._topic,
                                  self._msg["method"])
            return _value(caller, kind, body)   # a plain method's one value, or its failure

    def _finish(self):
        """Stop listening: later replies are dropped as they arrive."""
        if self._done:
            return
        self._done = True
        waiter, self._waiter = self._waiter, None       # and what it kept
        if waiter is not None:
            self._caller.forget(self._msg_id)

    async def aclose(self):
        """Stop reading: the stream ends here, and what the server still
        sends for it is dropped."""
        if self._reading:
            raise RuntimeError("this multicall stream is being read by another task")
        self._finish()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()

    def __del__(self):
        self._finish()


async def cast(context, topic, msg, at_least_once=None):
    """Invoke a method on one consumer of `topic`; no result.  With
    at_least_once (default: rpc_zmq_at_least_once) the runtime's courier
    carries it until a consumer has handled it."""
    caller = _caller()
    options = caller.runtime.options
    if options.rpc_zmq_at_least_once if at_least_once is None else at_least_once:
        # Backpressure as for any cast, awaited: the courier takes it once
        # its window has room, and then handing it over does not wait.
        courier = caller.client.courier
        deadline = caller.loop.time() + options.rpc_cast_timeout
        pause = PAUSE_MIN
        while not courier.has_room():
            if caller.loop.time() >= deadline:
                raise Timeout("at-least-once casts already waiting for acknowledgement "
                              "fill the window", topic,
                              msg.get("method") if isinstance(msg, dict) else None)
            await asyncio.sleep(pause)
            pause = min(pause * 2, PAUSE_MAX)
        caller.client.cast(context, topic, msg, True)
        return
    if caller.client.try_request(caller.outbox, CAST, context, topic, msg) is None:
        await caller.send(CAST, context, topic, msg,
                          caller.loop.time() + options.rpc_cast_timeout)


async def fanout_cast(context, topic, msg):
    """Invoke a method on every fanout consumer of `topic`, once each;
    returns how many were reached (one that cannot be is skipped)."""
    caller = _caller()
    client = caller.client
    total, pending = client.try_fanout(caller.outbox, context, topic, msg)
    pause = PAUSE_MIN
    limit = caller.loop.time() + client.connect_timeout
    while pending and caller.loop.time() < limit:
        await asyncio.sleep(pause)
        pause = min(pause * 2, PAUSE_MAX)
        _, pending = client.try_fanout(caller.outbox, context, topic, msg, pending)
    method = msg.get("method") if isinstance(msg, dict) else None
    return total - client.fanout_skipped(caller.outbox, topic, method, pending, [])


async def notify(context, topic, msg, envelope=False):
    """A notification to one consumer of `topic`, as rpc.notify."""
    if envelope:
        if not isinstance(msg, dict):
            raise InvalidMessage(f"notification must be a dict, not {type(msg).__name__}")
        msg = _wrap_notification(msg)
    caller = _caller()
    try:
        await caller.send(NOTIFY, context, topic, msg,
                          caller.loop.time() + caller.runtime.options.rpc_cast_timeout)
    except NoListeners:
        caller.client.no_listeners -= 1
        return caller.client.notify(context, topic, msg)     # held or dropped, at once
    return True


# -- serving ---------------------------------------------------------------------

class _LoopRunner(Runner):
    """Runs requests on the event loop; coroutines and async generators
    as tasks."""

    def __init__(self, topic, proxy, handoff):
        super().__init__(topic, proxy)
        self.loop = handoff.loop
        self.tasks = handoff.tasks
        self.handoff = handoff

    def start(self, runner, ctxt, msg, replier):
        try:
            result = self.invoke(ctxt, msg)
            # (None, what most casts return, skips the costlier checks.)
            if result is not None and (inspect.isawaitable(result) or
                                       inspect.isasyncgen(result)):
                task = self.loop.create_task(self.finish(replier, msg, result))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                return
            self.answer(replier, result)
        except BaseException as exc:
            self.fail(replier, msg, exc)

    async def finish(self, replier, msg, result):
        try:
            if not inspect.isasyncgen(result):
                self.answer(replier, await result)
            elif replier is None or replier.cast:
                async for _ in result:
                    pass
                if replier is not None:
                    replier.result(None)        # the at-least-once cast's ACK
            elif replier.multi:
                async for value in result:
                    replier.chunk(value)
                replier.end()
            else:
                last = None
                async for last in result:
                    pass
                replier.result(last)
        except BaseException as exc:
            self.fail(replier, msg, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.handoff.kick()


class _LoopHandoff:
    """Requests to this event loop's consumers: taken by the loop itself
    when it leads the server, else handed over by the receive loop."""

    def __init__(self, loop):
        self.loop = loop
        self.tasks = set()
        self.server = None              # the server this loop leads, if any
        self.thread = _get_ident()
        self.turn_due = False

    def wrap(self, topic, proxy):
        runner = _LoopRunner(topic, proxy, self)
        loop, thread = self.loop, self.thread

        def put(_, ctxt, msg, replier):
            if _get_ident() == thread:
                runner.start(runner, ctxt, msg, replier)        # led here: run now
            else:
                loop.call_soon_threadsafe(runner.start, runner, ctxt, msg, replier)
        return Deferred(runner, put)

    def lead(self, server):
        """Lead `server` from this loop if it does not serve yet."""
        if self.server is None and server.lead_here():
            self.server = server
            self.fd = server.fd
            server.before_close = self._server_closing
            self.loop.add_reader(self.fd, self.turn)
            self.kick()

    def turn(self):
        self.turn_due = False
        server = self.server
        if server is not None and not server.serve_ready():
            self._unlead(server)

    def _unlead(self, server):
        if self.server is server:
            self.loop.remove_reader(self.fd)
            self.server = None

    def _server_closing(self, server):
        """Server.stop() closes the sockets next, with no turn having read
        its STOP: off the fd first, or a later fd of the same number would
        call turn().  stop() usually runs in an executor thread (close()),
        while this loop runs: it waits, briefly, for the loop to do it."""
        if _get_ident() == self.thread:
            self._unlead(server)
            return
        done = unpatched("threading").Event()
        try:
            self.loop.call_soon_threadsafe(lambda: (self._unlead(server), done.set()))
        except RuntimeError:                # the loop is closed: nothing watches the fd
            return
        done.wait(1.0)

    def wait_idle(self, timeout):
        """From a thread other than the loop's (Connection.close() runs in
        an executor): wait until the handler tasks this loop runs have
        finished, at most `timeout` seconds, so their replies leave before
        the server closes.  Requests already handed over are queued on the
        loop ahead of this wait, so their tasks exist by the time it runs."""
        if not self.tasks:
            return True
        if _get_ident() == self.thread or not self.loop.is_running():
            return False                    # nothing could finish them meanwhile

        async def finished():
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=timeout)
            return not self.tasks
        try:
            future = asyncio.run_coroutine_threadsafe(finished(), self.loop)
        except RuntimeError:                # the loop closed meanwhile
            return False
        try:
            return future.result(timeout + 1.0)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            return False

    def kick(self):
        """A reply left outside a turn (from a task): the send may have
        consumed the fd's edge, so take a turn soon."""
        if self.server is not None and not self.turn_due:
            self.turn_due = True
            self.loop.call_soon(self.turn)


class Connection:
    """A set of consumers whose methods run on this event loop."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._handoff = _LoopHandoff(self._loop)
        self._conn = rpc.create_connection()

    @property
    def address(self):
        return self._conn.address

    def create_consumer(self, topic, proxy, fanout=False):
        """As rpc's: `proxy`'s methods (plain or coroutines, generators
        or async generators for multicall) run on the event loop."""
        self._conn.create_consumer(topic, proxy, fanout, runner=self._handoff)

    def consume_in_thread(self):
        """Start serving and announce the consumers: this event loop leads
        the process's server if nothing serves in it yet, else the receive
        loop's threads hand requests over."""
        if self._conn._consumers:
            self._handoff.lead(rpc._runtime().serve())
        self._conn.consume_in_thread()

    def stats(self):
        return self._conn.stats()

    async def close(self):
        """Withdraw, finish what was handed over, its replies sent (bounded
        by rpc_zmq_linger), release.  The event loop keeps running
        meanwhile, so its handlers can finish.  Returns as rpc's close()."""
        return await self._loop.run_in_executor(None, self._conn.close)

    async def wait(self):
        """Until the connection is closed."""
        await self._loop.run_in_executor(None, self._conn.wait)


def create_connection():
    """A Connection consuming on the running event loop."""
    return Connection()


async def cleanup():
    """rpc.cleanup() without blocking the event loop (handlers still
    running on it can finish): run it from asyncio code instead.  Calls
    this loop's tasks are waiting on get up to rpc_zmq_linger to end, then
    raise TransportClosed.  (Another event loop's calls are not waited for:
    clean each loop up from itself.)"""
    loop = asyncio.get_running_loop()
    caller = _callers.pop(loop, None)
    if caller is not None:
        # As for threads: calls that end within the linger return their
        # result, those still waiting then raise TransportClosed.
        deadline = loop.time() + caller.runtime.options.rpc_zmq_linger
        pause = PAUSE_MIN
        while caller.waiters and loop.time() < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, PAUSE_MAX)
        caller.close()
    return await loop.run_in_executor(None, rpc.cleanup)
