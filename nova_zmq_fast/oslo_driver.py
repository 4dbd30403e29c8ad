"""oslo.messaging driver: `transport_url = zmqfast://`.

An oslo.messaging application (RPCClient, RPC servers, Notifier,
notification listeners) runs on the project's own core: the same Cython
client, receive loop and discovery as nova_zmq_fast.rpc, one Runtime per
transport.  No broker.

Addresses.  A Target becomes a topic on the wire:
    exchange:topic            calls and casts (round-robin), and fanouts
    exchange:topic@server     Target(server=...)
    exchange:topic.priority%pool
                              notifications; one topic per listener pool
The exchange (Target.exchange, or the transport's control_exchange) is part
of every name, so two exchanges never see each other's traffic.

Servers.  The receive loop hands each request, as a "deferred" consumer
(no reply yet), to oslo.messaging: with threads, straight to the server's
executor; under eventlet (or for batches) through a queue that the
listener's poll() reads, waiting on a pipe with select(), which eventlet
makes cooperative.  The executor dispatches the request and replies from
its own thread through the receive loop's control socket.  Call-monitor
heartbeats travel the same way.  A listener's stop() withdraws its
consumers, as a broker cancels a consumer: the others of the topic or pool
get what is sent from then on, a call that still arrives is refused (its
caller tries another server), and the handlers still running reply until
cleanup().

Options live in [oslo_messaging_zmqfast] (`oslo-config-generator --namespace
nova_zmq_fast`) and can be overridden in the URL query:
`zmqfast://?rpc_zmq_host=node1&rpc_zmq_ipc_dir=/run/app`.
"""
import collections
import errno
import itertools
import logging
import select
import threading
import time

import msgpack
import oslo_messaging
from oslo_config import cfg
from oslo_messaging._drivers import base
from oslo_messaging._drivers import common as rpc_common
from oslo_serialization import jsonutils
from oslo_utils import eventletutils

from nova_zmq_fast import matchmaker
from nova_zmq_fast._dispatch import wrap
from nova_zmq_fast._envelope_py import to_primitive
from nova_zmq_fast._green import unpatched
from nova_zmq_fast.exceptions import (
    MessageTooLarge, NoListeners, RemoteError, RemoteFailure, SerializationError, Timeout,
    TransportClosed)
from nova_zmq_fast.exceptions import deserialize_remote_exception as native_exception
from nova_zmq_fast.logs import RateLimitedLog
from nova_zmq_fast.options import Options, oslo_opts
from nova_zmq_fast.runtime import Runtime

LOG = logging.getLogger(__name__)
_UNDELIVERED_LOG = RateLimitedLog(LOG)

GROUP = cfg.OptGroup("oslo_messaging_zmqfast",
                     title="nova_zmq_fast: broker-less ZeroMQ transport (zmqfast://)")
# oslo.messaging supplies these per call (timeout, allowed_remote_exmods).
_NOT_FOR_OSLO = {"rpc_response_timeout", "allowed_rpc_exception_modules"}


# An option not set in the group is read from [DEFAULT], where the
# native API (and Nova-era services) keep them, with oslo.config's
# deprecation warning: the command line reads a service's file the same way.
OPTS = oslo_opts(exclude=_NOT_FOR_OSLO, deprecated_group="DEFAULT")
_OPTS_BY_NAME = {opt.dest: opt for opt in OPTS}


def list_opts():
    """Entry point for oslo-config-generator."""
    return [(GROUP, OPTS)]


class _Inbox:
    """Requests waiting for poll(): a deque filled by the receive loop's
    threads, and a pipe that wakes a waiting poller.  select() on the pipe
    is cooperative when eventlet has patched it, and releases the GIL when
    it has not, so poll() never blocks a hub and returns within its
    timeout.

    Once stopped it takes nothing more (put() says so: whoever gave it the
    item must deal with it), and get() returns what it holds, then None.
    Once closed its descriptors are forgotten, under the lock that every
    use of them takes: their numbers may already belong to another file
    of the process, which nothing here reads or writes again."""

    def __init__(self):
        self.items = collections.deque()
        self._os = unpatched("os")          # eventlet's os.read would wait, not fail
        self._lock = unpatched("threading").Lock()
        self._read, self._write = self._os.pipe()
        self._os.set_blocking(self._read, False)
        self._os.set_blocking(self._write, False)
        self._waiting = False
        self.stopped = False

    def put(self, item):
        """Queue `item` for get(); False if stopped (nobody will take it)."""
        with self._lock:
            if self.stopped:
                return False
            self.items.append(item)
            if self._waiting:
                self._wake()
        return True

    def _wake(self):
        # Under the lock.
        if self._write < 0:                     # closed
            return
        try:
            self._os.write(self._write, b"!")
        except OSError as exc:
            if exc.errno != errno.EAGAIN:       # full pipe: already woken
                raise

    def get(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.items:
                    return self.items.popleft()
                if self.stopped or self._read < 0:
                    return None
                left = 1.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return None
                self._waiting = True            # put() wakes us from here on
                fd = self._read
            try:
                readable, _, _ = select.select([fd], [], [], min(left, 1.0))
            except (OSError, ValueError):
                readable = ()                   # closed meanwhile: seen below
            with self._lock:
                self._waiting = False
                if readable and self._read == fd:
                    try:
                        self._os.read(fd, 4096)
                    except BlockingIOError:
                        pass

    def stop(self):
        with self._lock:
            self.stopped = True
            self._wake()

    def close(self):
        """Stop, forget the descriptors and close them; returns the items
        never taken."""
        with self._lock:
            self.stopped = True
            left = list(self.items)
            self.items.clear()
            fds, self._read, self._write = (self._read, self._write), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    self._os.close(fd)
                except OSError:
                    pass
        return left


# Ids for incoming messages: oslo.messaging would otherwise draw a uuid4
# (a getrandom() call) for every message.
_incoming_ids = itertools.count()


# -- encoding, as oslo.messaging's own drivers encode ---------------------------------
#
# oslo.messaging's drivers write JSON with jsonutils.dumps, whose `default`,
# jsonutils.to_primitive, makes text of a UUID, a date, a Decimal...  The
# core packs with msgpack, whose `default` (_envelope_py.to_primitive)
# knows only a datetime and a set, and refuses the rest.  On this path
# alone, a message it refuses is sent again made primitive as jsonutils
# would make it; the native API is left as it is, and what the core
# encodes itself costs nothing more.

def _oslo_default(value):
    """msgpack's `default` here: the core's conversions first, so that what
    it encodes itself is sent as it always is, then jsonutils'."""
    try:
        return to_primitive(value)
    except TypeError:
        return jsonutils.to_primitive(value)


def _primitive(value, what):
    """`value` with each part msgpack cannot encode made primitive by
    _oslo_default, and nothing else changed (msgpack does the walk).
    SerializationError, naming `what`, for a part with no primitive form
    (an object jsonutils cannot convert; an int beyond 64 bits, which JSON
    carries but msgpack cannot)."""
    try:
        return msgpack.unpackb(msgpack.packb(value, use_bin_type=True, default=_oslo_default),
                               raw=False, use_list=False, strict_map_key=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"{what} cannot be encoded with msgpack, even made primitive "
                                 f"as oslo.messaging's jsonutils would: {exc}") from None


def _wrap(message):
    """A notification in the 2.0 envelope (JSON): the core's wrap(), or,
    for what it cannot write, oslo.messaging's own (jsonutils.dumps, as its
    drivers send it)."""
    try:
        return wrap(message)
    except SerializationError:
        pass
    try:
        return rpc_common.serialize_msg(message)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"notification cannot be encoded as JSON: {exc}") from None


# What the core raises when a message is not delivered that oslo.messaging
# has no name for: each becomes its MessageDeliveryFailure (_deliver).
_UNDELIVERED = (TransportClosed, MessageTooLarge, SerializationError)


def _serialize_failure(failure, method):
    """oslo.messaging's form of the exception a method raised, or, when
    its arguments cannot be written as JSON, a SerializationError that says
    what was raised: the caller gets a failure either way, not its timeout."""
    try:
        return rpc_common.serialize_remote_exception(failure)
    except (TypeError, ValueError) as exc:
        error = SerializationError(f"{method} raised {type(failure[1]).__name__}: "
                                   f"{failure[1]}, which cannot be encoded: {exc}")
    return rpc_common.serialize_remote_exception((SerializationError, error, None))


class ZmqFastIncomingMessage(base.RpcIncomingMessage):
    """A request received by an RPC server."""

    def __init__(self, ctxt, message, replier):
        client_timeout = message.pop("_cm_timeout", None)
        super().__init__(ctxt, message, msg_id=f"zmqfast-{next(_incoming_ids)}")
        self.client_timeout = client_timeout
        self._replier = replier

    def acknowledge(self):
        pass                                    # received means accepted: no broker

    def requeue(self):
        pass                                    # RPC servers never requeue

    def reply(self, reply=None, failure=None):
        # oslo's RPC server replies to every request once its method is
        # done: for an at-least-once cast, that is when its ACK goes (the
        # Replier's answer to such a cast is its ACK).
        if self._replier is None:               # a cast
            return
        method = self.message.get("method")
        try:
            if failure:
                self._replier.failure(_serialize_failure(failure, method))
            else:
                self._result(reply, method)
        except Exception:
            LOG.exception("could not send the reply to %s", method)

    def _result(self, reply, method):
        """The result, encoded as _deliver encodes a message; one with no
        form the transport can send fails the call at once."""
        try:
            self._replier.result(reply)
            return
        except SerializationError:
            pass
        try:
            reply = _primitive(reply, f"the reply of {method}")
        except SerializationError as exc:
            LOG.error("%s", exc)
            self._replier.failure(
                rpc_common.serialize_remote_exception((SerializationError, exc, None)))
            return
        self._replier.result(reply)

    def heartbeat(self):
        if self._replier is not None:
            self._replier.heartbeat()


class ZmqFastNotification(base.IncomingMessage):
    """A notification received by a notification listener.  requeue()
    hands it back to its pool, where any member (maybe this one) gets it."""

    def __init__(self, driver, topic, ctxt, message):
        super().__init__(ctxt, message, msg_id=f"zmqfast-{next(_incoming_ids)}")
        self._driver = driver
        self._topic = topic

    def acknowledge(self):
        pass

    def requeue(self):
        try:
            self._driver._runtime.client.notify(self.ctxt, self._topic, self.message)
        except Exception:
            LOG.exception("could not requeue a notification on %s", self._topic)


def _open_connection(driver, subscriptions, receive):
    """A Connection of the core consuming each (topic, fanout) with
    receive(topic) -> callable(ctxt, message, replier)."""
    conn = driver._runtime.connection()
    try:
        for topic, fanout in subscriptions:
            conn.create_consumer(topic, receive(topic), fanout=fanout, deferred=True)
        conn.consume_in_thread()
    except BaseException:
        conn.close()
        raise
    return conn


def _stop_consuming(driver, conn, subscriptions):
    """A listener's stop(): withdraw its consumers (Connection.stop_consuming:
    discovery stops offering this process for them, the requests already
    received are handed on, and a call that still arrives is refused, so
    that its caller tries another server), and forget this process's own
    routes to them, which may name itself."""
    conn.stop_consuming()
    for topic, _ in subscriptions:
        driver._runtime.routes.invalidate(topic)


_undelivered_lock = unpatched("threading").Lock()


def _undelivered(driver, topic, message, replier, why):
    """A request the listener can no longer hand to oslo.messaging (it
    came after the listener's stop(), or was never polled): never dropped
    silently.  Counted (driver.undelivered) and logged; an at-least-once
    cast is abandoned, so that its sender runs it elsewhere."""
    with _undelivered_lock:
        driver.undelivered += 1
    if replier is not None:
        replier.abandon()
    method = message.get("method") if isinstance(message, dict) else None
    _UNDELIVERED_LOG.warning(
        ("undelivered", topic), "%s on %s dropped: %s%s",
        repr(method) if method else "a notification", topic, why,
        " (its caller will time out)" if replier is not None and not replier.cast else "")


class _PollListener(base.PollStyleListener):
    """For eventlet and for batches: the receive loop's threads fill an
    _Inbox, and oslo.messaging's poller takes from it.

    stop() withdraws the consumers (_stop_consuming) once the requests
    already received are in the inbox; the poller then takes what is left
    and ends.  The listening socket stays until cleanup(): handlers still
    running send their replies."""

    def __init__(self, driver, subscriptions, make_incoming):
        super().__init__()
        self._driver = driver
        self._subscriptions = subscriptions
        self._inbox = _Inbox()
        self._make_incoming = make_incoming
        try:
            self._conn = _open_connection(driver, subscriptions, self._receive)
        except BaseException:
            self._inbox.close()
            raise

    def _receive(self, topic):
        inbox, driver = self._inbox, self._driver

        def receive(ctxt, message, replier):
            if not inbox.put((topic, ctxt.to_dict(), message, replier)):
                _undelivered(driver, topic, message, replier, "its listener has stopped")
        return receive

    @base.batch_poll_helper
    def poll(self, timeout=None):
        item = self._inbox.get(timeout)
        if item is None:
            return None
        return self._make_incoming(*item)

    def stop(self):
        _stop_consuming(self._driver, self._conn, self._subscriptions)
        self._inbox.stop()

    def cleanup(self):
        self._inbox.stop()
        self._conn.close()
        for topic, _, message, replier in self._inbox.close():
            _undelivered(self._driver, topic, message, replier,
                         "its listener was cleaned up before polling it")


class _PollAdapter(base.PollStyleListenerAdapter):
    """oslo.messaging's adapter (a thread polling a _PollListener), which
    also ends that thread when cleanup() comes first: transport.cleanup()
    before the server's stop() leaves no poller running on a closed
    listener."""

    JOIN_TIMEOUT = 10.0

    def __init__(self, driver, poll_style_listener, batch_size, batch_timeout):
        super().__init__(poll_style_listener, batch_size, batch_timeout)
        self._driver = driver
        driver._listeners.add(self)

    def cleanup(self):
        if self._started:
            # Never stopped: stop polling as stop() would (the poller hands
            # on what was received, then ends), before anything is closed.
            self._started = False
            self._poll_style_listener.stop()
            thread = self._listen_thread
            if thread is not threading.current_thread():
                thread.join(self.JOIN_TIMEOUT)
                if thread.is_alive():
                    LOG.warning("the poller of a listener did not end within %gs",
                                self.JOIN_TIMEOUT)
        self._poll_style_listener.cleanup()
        self._driver._listeners.discard(self)


class _PushListener(base.Listener):
    """With threads and single messages: the receive loop hands each
    message straight to oslo.messaging's executor, one thread hop fewer
    than polling.  stop() withdraws the consumers as _PollListener's does,
    handing what arrives until then to the executor."""

    def __init__(self, driver, subscriptions, make_incoming, batch_size, batch_timeout):
        super().__init__(batch_size, batch_timeout)
        self._driver = driver
        self._subscriptions = subscriptions
        self._make_incoming = make_incoming
        self._conn = None
        driver._listeners.add(self)

    def _receive(self, topic):
        def receive(ctxt, message, replier):
            callback = self.on_incoming_callback
            if callback is None:
                _undelivered(self._driver, topic, message, replier, "its listener has stopped")
                return
            callback([self._make_incoming(topic, ctxt.to_dict(), message, replier)])
        return receive

    def start(self, on_incoming_callback):
        super().start(on_incoming_callback)
        self._conn = _open_connection(self._driver, self._subscriptions, self._receive)

    def stop(self):
        # Once it returns no request reaches the callback: the drain waits
        # for those being handed over.
        if self._conn is not None:
            _stop_consuming(self._driver, self._conn, self._subscriptions)
        super().stop()

    def cleanup(self):
        if self._conn is not None:
            self._conn.close()
        self._driver._listeners.discard(self)


class ZmqFastDriver(base.BaseDriver):
    """The oslo.messaging driver (entry point `zmqfast`)."""

    def __init__(self, conf, url, default_exchange=None, allowed_remote_exmods=None):
        conf.register_group(GROUP)
        conf.register_opts(OPTS, group=GROUP)
        try:
            # The URL's query overrides the group: a bad value or an
            # unknown name in it is the URL's fault.
            for name, text in url.query.items():
                if name in _OPTS_BY_NAME:
                    try:
                        _OPTS_BY_NAME[name].type(text)
                    except ValueError as exc:
                        raise ValueError(f"{name}={text!r}: {exc}") from None
            conf = rpc_common.ConfigOptsProxy(conf, url, GROUP.name)
            group = conf[GROUP.name]
            values = {opt.dest: group[opt.dest] for opt in OPTS}
        except (ValueError, cfg.Error) as exc:
            raise oslo_messaging.InvalidTransportURL(str(url), str(exc)) from None
        super().__init__(conf, url, default_exchange, allowed_remote_exmods)
        # zmqfast+<backend>://...: the backend reads its own options from
        # the URL's hosts and virtual host (e.g. zmqfast+redis://host:6379/0).
        backend = url.transport.partition("+")[2]
        try:
            if backend:
                values["rpc_zmq_matchmaker"] = backend
            hosts = [(h.hostname, h.port, h.username, h.password) for h in url.hosts]
            values.update(matchmaker.load(values["rpc_zmq_matchmaker"]).url_options(
                hosts, url.virtual_host))
        except ValueError as exc:
            raise oslo_messaging.InvalidTransportURL(str(url), str(exc)) from None
        # Registered by oslo.messaging's RPC client, which may not exist yet.
        values["rpc_response_timeout"] = getattr(conf, "rpc_response_timeout", 60)
        try:
            self._options = Options.from_conf(values)
        except ValueError as exc:
            raise oslo_messaging.InvalidTransportURL(str(url), str(exc)) from None
        self._exchange = default_exchange or "openstack"
        self._listeners = set()
        self.undelivered = 0                # requests a stopped listener dropped (logged)
        # One runtime, and one listening socket, for every transport of the
        # process with these options.
        try:
            self._runtime = Runtime.shared(self._options,
                                           green=eventletutils.is_monkey_patched("thread"))
        except ValueError as exc:               # what discovery refuses (a missing ring file)
            raise oslo_messaging.InvalidTransportURL(str(url), str(exc)) from None
        self._released = False

    def require_features(self, requeue=False):
        pass                                    # notifications can be requeued

    # -- addresses ---------------------------------------------------------

    def _topic(self, target, server=None):
        topic = f"{target.exchange or self._exchange}:{target.topic}"
        return f"{topic}@{server}" if server else topic

    def _notification_topic(self, target, priority=None, pool=""):
        topic = f"{target.exchange or self._exchange}:{target.topic}"
        if priority is not None:
            topic += f".{priority}"
        return f"{topic}%{pool or ''}"

    def _rebuild_exception(self, failure):
        if isinstance(failure, str):            # oslo.messaging's serialization
            return rpc_common.deserialize_remote_exception(failure,
                                                           self._allowed_remote_exmods)
        exc = native_exception(failure, ["builtins"] + list(self._allowed_remote_exmods))
        if isinstance(exc, RemoteError):        # the transport's own refusal
            return oslo_messaging.RemoteError(exc.exc_type, exc.value, exc.traceback)
        return exc

    # -- sending -------------------------------------------------------------

    @staticmethod
    def _deliver(send, ctxt, message):
        """send(ctxt, message), a send of the core's client, as
        oslo.messaging expects it: a message msgpack cannot encode goes
        again, made primitive as oslo's drivers would (_primitive; each
        send of the client encodes before it sends anything), and the
        core's errors in _UNDELIVERED become MessageDeliveryFailure."""
        try:
            try:
                return send(ctxt, message)
            except SerializationError:
                ctxt, message = _primitive(ctxt, "context"), _primitive(message, "message")
            return send(ctxt, message)
        except _UNDELIVERED as exc:
            raise oslo_messaging.MessageDeliveryFailure(str(exc)) from exc

    def send(self, target, ctxt, message, wait_for_reply=None, timeout=None,
             call_monitor_timeout=None, retry=None, transport_options=None):
        # `retry` needs no handling: a message only ever enters the queue of
        # an established connection, and the core moves on to another server
        # when one cannot be reached, so nothing is sent twice.
        client = self._runtime.client
        at_least_once = bool(transport_options and transport_options.at_least_once)
        if target.fanout:
            topic = self._topic(target)
            if not self._deliver(lambda ctxt, message: client.fanout_cast(ctxt, topic, message),
                                 ctxt, message) and at_least_once:
                raise oslo_messaging.MessageUndeliverable(
                    NoListeners(None, topic, message.get("method")), target.exchange, topic,
                    message)
            return None
        topic = self._topic(target, target.server)
        if not wait_for_reply:
            # At least once (per call, or rpc_zmq_at_least_once): kept until
            # a server has handled it (the README's Delivery).
            at_least_once = at_least_once or self._options.rpc_zmq_at_least_once
            try:
                self._deliver(lambda ctxt, message: client.cast(ctxt, topic, message,
                                                                at_least_once),
                              ctxt, message)
            except NoListeners as exc:
                if at_least_once:
                    raise oslo_messaging.MessageUndeliverable(exc, target.exchange, topic,
                                                              message) from None
                LOG.debug("cast of %s to %s dropped: no server", message.get("method"), topic)
            except Timeout as exc:
                raise oslo_messaging.MessagingTimeout(str(exc)) from None
            return None
        if call_monitor_timeout:
            message = dict(message, _cm_timeout=call_monitor_timeout)
        deadline = time.monotonic() + (timeout or self._options.rpc_response_timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise oslo_messaging.MessagingTimeout(
                    f"No server for topic {topic} within the timeout")
            try:
                return self._deliver(lambda ctxt, message: client.call(
                    ctxt, topic, message, left, call_monitor_timeout), ctxt, message)
            except RemoteFailure as exc:
                raise self._rebuild_exception(exc.failure) from None
            except NoListeners as exc:
                # Nobody serves it (yet): wait for one until the timeout,
                # or fail at once if the caller asked for at-least-once.
                if at_least_once:
                    raise oslo_messaging.MessageUndeliverable(exc, target.exchange, topic,
                                                              message) from None
                time.sleep(min(0.05, max(0.0, left)))
            except Timeout as exc:
                raise oslo_messaging.MessagingTimeout(str(exc)) from None

    def send_notification(self, target, ctxt, message, version, retry=None):
        """One copy to each listener pool of the topic (round-robin within
        a pool).  With no listener up, it goes to the default pool, as a
        broker's notifier declares that queue: held for its first listener
        with rpc_zmq_hold_notifications, else dropped and counted."""
        client = self._runtime.client
        prefix = self._notification_topic(target)

        def notify(ctxt, message):
            if version == 2.0:
                message = _wrap(message)
            for topic in self._runtime.routes.topics(prefix) or (prefix,):
                client.notify(ctxt, topic, message)
        self._deliver(notify, ctxt, message)

    # -- listening -----------------------------------------------------------------

    def _listener(self, subscriptions, make_incoming, batch_size, batch_timeout):
        if self._runtime.client.green or batch_size > 1:
            return _PollAdapter(self, _PollListener(self, subscriptions, make_incoming),
                                batch_size, batch_timeout)
        return _PushListener(self, subscriptions, make_incoming, batch_size, batch_timeout)

    def listen(self, target, batch_size, batch_timeout):
        subscriptions = [(self._topic(target), False), (self._topic(target), True)]
        if target.server:
            subscriptions.append((self._topic(target, target.server), False))
        return self._listener(subscriptions, lambda topic, ctxt, message, replier:
                              ZmqFastIncomingMessage(ctxt, message, replier),
                              batch_size, batch_timeout)

    def listen_for_notifications(self, targets_and_priorities, pool, batch_size,
                                 batch_timeout):
        subscriptions = [(self._notification_topic(target, priority, pool), False)
                         for target, priority in targets_and_priorities]
        return self._listener(subscriptions, lambda topic, ctxt, message, replier:
                              ZmqFastNotification(self, topic, ctxt, message),
                              batch_size, batch_timeout)

    def cleanup(self):
        for listener in list(self._listeners):
            listener.cleanup()
        # Once: the runtime may be shared, and counts its transports.
        released, self._released = self._released, True
        if not released:
            self._runtime.close()
