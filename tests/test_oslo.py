"""The oslo.messaging driver: real RPCClient, RPC servers, Notifier and
notification listeners, across processes, over `zmqfast://`."""
import datetime
import decimal
import json
import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings

import pytest

warnings.filterwarnings("ignore", module="oslo_messaging")
messaging = pytest.importorskip("oslo_messaging")
from oslo_config import cfg  # noqa: E402
from oslo_serialization import jsonutils  # noqa: E402

from nova_zmq_fast.oslo_driver import _NOT_FOR_OSLO  # noqa: E402
from tests.conftest import (  # noqa: E402
    ROOT, ChildProcess, free_port, make_certificates, no_new_threads, open_fds, os_threads,
    stop_all, wait_until)
from tests.helpers.errors import CustomError  # noqa: E402

RABBIT = "rabbit://guest:guest@127.0.0.1:5672/"
cfg.CONF([], project="nzf-test")


def zmqfast_url(registry, **query):
    params = "&".join(f"{k}={v}" for k, v in dict(rpc_zmq_ipc_dir=registry, **query).items())
    return f"zmqfast://?{params}"


def service(mode, name, url, **opts):
    argv = [sys.executable, "-m", "tests.helpers.oslo_service", mode, "--name", name,
            "--url", url]
    for key, value in opts.items():
        argv += [f"--{key}", str(value)]
    return ChildProcess(name, argv, wait=False)


def start_all(*procs):
    for proc in procs:
        proc.wait_ready()
    return procs


def rabbit_reachable():
    try:
        socket.create_connection(("127.0.0.1", 5672), 1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return str(tmp_path_factory.mktemp("oslo-registry"))


@pytest.fixture(scope="module")
def servers(registry):
    """Two threading-executor servers on 'svc', one eventlet-executor server
    on 'svc-green', and one on 'svc' in another exchange."""
    url = zmqfast_url(registry)
    procs = start_all(service("rpc", "s1", url), service("rpc", "s2", url),
                      service("rpc", "g1", url, topic="svc-green", executor="eventlet"),
                      service("rpc", "x1", url, exchange="other"))
    yield {p.name: p for p in procs}
    codes = stop_all(procs)
    assert codes == [0] * len(procs)


@pytest.fixture
def no_leaks():
    """Set up first, torn down last: every transport a test made must have
    released its threads and descriptors."""
    fds, threads = open_fds(), os_threads()
    yield
    assert wait_until(lambda: no_new_threads(threads), 5), "threads leaked"
    assert open_fds() == fds, "descriptors leaked"


@pytest.fixture
def transport(no_leaks, registry):
    """An RPC transport in this process, cleaned up after the test."""
    transport = messaging.get_rpc_transport(
        cfg.CONF, url=zmqfast_url(registry),
        allowed_remote_exmods=["tests.helpers.errors"])
    yield transport
    transport.cleanup()


def client(transport, topic="svc", **kw):
    kw.setdefault("timeout", 10)
    return messaging.get_rpc_client(transport, messaging.Target(topic=topic), **kw)


def records(transport, server, topic="svc", exchange=None):
    target = messaging.Target(topic=topic, server=server, exchange=exchange)
    return messaging.get_rpc_client(transport, target, timeout=10).call({}, "records")


# -- routing -------------------------------------------------------------------------

def test_calls_and_casts_spread_over_the_servers(servers, transport):
    rpc = client(transport)
    assert {rpc.call({}, "whoami") for _ in range(20)} == {"s1", "s2"}
    key = uuid.uuid4().hex
    for i in range(40):
        rpc.cast({}, "record", value=f"{key}-{i}")

    def mine():
        return [v for s in ("s1", "s2") for v in records(transport, s) if v.startswith(key)]
    assert wait_until(lambda: len(mine()) >= 40, 10)
    got = mine()
    assert sorted(got) == sorted(f"{key}-{i}" for i in range(40))
    per_server = [len([v for v in records(transport, s) if v.startswith(key)])
                  for s in ("s1", "s2")]
    assert min(per_server) > 0


def test_target_server_reaches_that_server_only(servers, transport):
    rpc = client(transport).prepare(server="s2")
    assert {rpc.call({}, "whoami") for _ in range(10)} == {"s2"}


def test_fanout_reaches_each_server_once(servers, transport):
    key = uuid.uuid4().hex
    client(transport).prepare(fanout=True).cast({}, "record", value=key)
    for server in ("s1", "s2"):
        assert wait_until(lambda: key in records(transport, server), 10)
        assert records(transport, server).count(key) == 1
    assert key not in records(transport, "x1", exchange="other")


def test_the_context_arrives_as_sent(servers, transport):
    ctxt = {"user_id": "u1", "project_id": "p1", "request_id": "req-9"}
    assert client(transport).call(ctxt, "context") == ctxt


def test_exchanges_are_separate_worlds(servers, transport):
    other = messaging.get_rpc_client(
        transport, messaging.Target(topic="svc", exchange="other"), timeout=10)
    assert {other.call({}, "whoami") for _ in range(6)} == {"x1"}
    key = uuid.uuid4().hex
    other.prepare(fanout=True).cast({}, "record", value=key)
    assert wait_until(lambda: key in records(transport, "x1", exchange="other"), 10)
    assert all(key not in records(transport, s) for s in ("s1", "s2"))
    nowhere = messaging.get_rpc_client(
        transport, messaging.Target(topic="svc", exchange="nowhere"), timeout=0.5)
    with pytest.raises(messaging.MessagingTimeout):
        nowhere.call({}, "whoami")


# -- timeouts ----------------------------------------------------------------------

def test_call_with_no_server_times_out_at_its_timeout(servers, transport):
    start = time.monotonic()
    with pytest.raises(messaging.MessagingTimeout):
        client(transport, topic="nobody", timeout=1).call({}, "whoami")
    assert 0.9 <= time.monotonic() - start < 2.0


def test_at_least_once_fails_fast_when_nobody_listens(servers, transport):
    options = messaging.TransportOptions(at_least_once=True)
    rpc = client(transport, topic="nobody", timeout=30, transport_options=options)
    start = time.monotonic()
    with pytest.raises(messaging.MessageUndeliverable):
        rpc.call({}, "whoami")
    with pytest.raises(messaging.MessageUndeliverable):
        rpc.cast({}, "whoami")
    assert time.monotonic() - start < 1.0
    client(transport, topic="nobody").cast({}, "whoami")    # default: dropped quietly


def test_at_least_once_casts_are_acknowledged_by_the_server(servers, transport):
    """TransportOptions(at_least_once=True) makes a cast at-least-once:
    kept by the sender until a server acknowledges it has run it."""
    options = messaging.TransportOptions(at_least_once=True)
    rpc = client(transport, transport_options=options)
    courier = transport._driver._runtime.courier
    before = courier.stats()["at_least_once_acked"]
    key = uuid.uuid4().hex
    for i in range(20):
        rpc.cast({}, "record", value=f"{key}-{i}")
    assert wait_until(lambda: courier.stats()["at_least_once_acked"] - before == 20, 10), \
        courier.stats()
    got = [v for s in ("s1", "s2") for v in records(transport, s) if v.startswith(key)]
    assert sorted(got) == sorted(f"{key}-{i}" for i in range(20))


def test_an_at_least_once_cast_is_acknowledged_once_its_method_returns(registry, transport):
    """The ACK goes when the RPC server replies, after the endpoint's
    method: a server killed while the method runs never acknowledged it,
    and the cast runs on another server."""
    url = zmqfast_url(registry)
    victim, = start_all(service("rpc", "v1", url, topic="alo-hold"))
    survivor = None
    try:
        rpc = client(transport, topic="alo-hold",
                     transport_options=messaging.TransportOptions(at_least_once=True))
        courier = transport._driver._runtime.courier
        key = uuid.uuid4().hex
        rpc.cast({}, "hold", value=key, on="v1")
        assert wait_until(lambda: key in records(transport, "v1", topic="alo-hold"), 10)
        assert courier.stats()["at_least_once_pending"] == 1     # still running: no ACK
        survivor, = start_all(service("rpc", "v2", url, topic="alo-hold"))
        victim.kill()
        assert wait_until(lambda: key in records(transport, "v2", topic="alo-hold"), 30)
        assert wait_until(lambda: courier.stats()["at_least_once_pending"] == 0, 10)
    finally:
        victim.kill()
        if survivor is not None:
            assert survivor.stop() == 0


def test_concurrent_calls_time_out_each_on_its_own(servers, transport):
    results = {}

    def call(timeout):
        start = time.monotonic()
        try:
            client(transport, timeout=timeout).prepare(server="s1").call(
                {}, "sleep", seconds=6)
            results[timeout] = "returned"
        except messaging.MessagingTimeout:
            results[timeout] = time.monotonic() - start

    threads = [threading.Thread(target=call, args=(t,)) for t in (0.5, 1.5, 2.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for timeout, elapsed in results.items():
        assert elapsed != "returned"
        assert timeout - 0.05 <= elapsed < timeout + 0.9, (timeout, elapsed)
    assert len(results) == 3


# -- errors and endpoints ----------------------------------------------------------------

def test_remote_exceptions(servers, transport, registry):
    rpc = client(transport)
    with pytest.raises(ValueError, match="plain"):
        rpc.call({}, "fail", kind="value", text="plain")
    with pytest.raises(CustomError, match="allowed"):
        rpc.call({}, "fail", kind="custom", text="allowed")
    strict = messaging.get_rpc_transport(cfg.CONF, url=zmqfast_url(registry))
    try:
        with pytest.raises(messaging.RemoteError) as info:
            client(strict).call({}, "fail", kind="custom", text="not allowed")
        assert info.value.exc_type == "CustomError"
    finally:
        strict.cleanup()


# -- values and failures, as oslo.messaging's own drivers give them ----------------------

def as_rabbit_delivers(value):
    """What a value becomes over oslo.messaging's rabbit driver: its JSON,
    written by jsonutils.dumps (to_primitive for what JSON lacks)."""
    return jsonutils.loads(jsonutils.dumps(value))


# msgpack has no form for these; jsonutils turns each into its text.
NOT_MSGPACK = {"uuid": uuid.UUID(int=7), "date": datetime.date(2024, 5, 6),
               "decimal": decimal.Decimal("2.5")}


def test_values_msgpack_cannot_encode_arrive_as_over_rabbit(servers, transport):
    rpc = client(transport, timeout=5)
    for kind, value in NOT_MSGPACK.items():
        expected = as_rabbit_delivers(value)
        assert isinstance(expected, str)
        assert rpc.call({}, "echo", value=value) == expected, kind      # an argument
        assert rpc.call({}, "give", kind=kind) == expected, kind        # a result
    assert rpc.call({"request_uuid": uuid.UUID(int=9)}, "context") == \
        {"request_uuid": str(uuid.UUID(int=9))}
    # Only those change: what the core encodes itself stays as it was.
    mixed = {"uuid": uuid.UUID(int=7), "bytes": b"\xff",
             "datetime": datetime.datetime(2024, 5, 6, 7, 8, 9), "set": {3}}
    native = {"uuid": str(uuid.UUID(int=7)), "bytes": b"\xff",
              "datetime": "2024-05-06T07:08:09.000000", "set": [3]}
    assert rpc.call({}, "echo", value=mixed) == native
    assert rpc.call({}, "give", kind="mixed") == native
    key = uuid.uuid4().hex
    rpc.prepare(server="s1").cast({}, "record", value=[key, NOT_MSGPACK["decimal"]])
    assert wait_until(lambda: [key, "2.5"] in records(transport, "s1"), 10)


def test_values_that_cannot_be_encoded_are_an_oslo_error_at_once(servers, transport):
    """No primitive form (an object), or none msgpack has (an int beyond
    64 bits, which JSON would carry): MessageDeliveryFailure, not sent."""
    rpc = client(transport)
    for value in (object(), 2 ** 70):
        for send in (rpc.call, rpc.cast, rpc.prepare(fanout=True).cast):
            with pytest.raises(messaging.MessageDeliveryFailure, match="cannot be encoded") \
                    as info:
                send({}, "echo", value=value)
            assert info.value.__cause__ is not None


def test_a_reply_that_cannot_be_encoded_fails_the_call_at_once(servers, transport):
    """A result, or an exception's arguments, with no form the transport
    can send: the caller gets a RemoteError naming it, not its timeout."""
    rpc = client(transport, timeout=8)
    for method, args in [("give", {"kind": "opaque"}), ("give", {"kind": "bigint"}),
                         ("fail", {"kind": "opaque", "text": "unsendable"})]:
        start = time.monotonic()
        with pytest.raises(messaging.RemoteError) as info:
            rpc.call({}, method, **args)
        assert time.monotonic() - start < 4, (method, args)
        assert info.value.exc_type == "SerializationError"
        assert "cannot be encoded" in info.value.value and method in info.value.value
    assert "unsendable" in info.value.value and "ValueError" in info.value.value
    assert rpc.call({}, "whoami") in ("s1", "s2")


@pytest.mark.parametrize("driver", ["messaging", "messagingv2"])
def test_notification_payloads_msgpack_cannot_encode_arrive(registry, notifier, transport,
                                                            driver):
    topic = f"values-{uuid.uuid4().hex[:8]}"
    name = f"values-{driver}"
    listener = service("notify", name, zmqfast_url(registry), topic=topic).wait_ready()
    try:
        n = messaging.Notifier(notifier, driver=driver, topics=[topic], publisher_id="t")
        payload = dict(NOT_MSGPACK, datetime=datetime.datetime(2024, 5, 6, 7, 8, 9))
        n.info({}, "event", payload)
        n.info({}, "event", {"last": True})
        assert wait_until(lambda: len(listener_records(transport, name)) == 2, 10)
        got = [r["payload"] for r in listener_records(transport, name)]
        assert as_rabbit_delivers(payload) in got
    finally:
        assert listener.stop() == 0


def test_after_cleanup_calls_and_casts_fail_as_oslo_exceptions(registry, transport):
    """A call waiting when its transport is cleaned up, and any call or
    cast after: MessageDeliveryFailure, caused by the core's TransportClosed."""
    server = service("rpc", "held", zmqfast_url(registry), topic="inflight").wait_ready()
    # Options of its own: transports with the same options share one runtime.
    doomed = messaging.get_rpc_transport(cfg.CONF,
                                         url=zmqfast_url(registry, rpc_zmq_linger=0.5))
    outcome = []
    try:
        rpc = client(doomed, topic="inflight", timeout=30)
        key = uuid.uuid4().hex

        def waiting_call():
            start = time.monotonic()
            try:
                rpc.call({}, "hold", value=key, on="held")      # busy for 10 s there
                outcome.append(("returned", time.monotonic() - start))
            except Exception as exc:
                outcome.append((exc, time.monotonic() - start))

        caller = threading.Thread(target=waiting_call)
        caller.start()
        assert wait_until(lambda: key in records(transport, "held", topic="inflight"), 10)
        doomed.cleanup()
        caller.join(15)
        assert len(outcome) == 1
        exc, elapsed = outcome[0]
        assert isinstance(exc, messaging.MessageDeliveryFailure), exc
        assert elapsed < 5
        for send in (rpc.call, rpc.cast):
            with pytest.raises(messaging.MessageDeliveryFailure, match="cleaned up") as info:
                send({}, "whoami")
            assert type(info.value.__cause__).__name__ == "TransportClosed"
    finally:
        doomed.cleanup()
        server.kill()


def test_a_message_over_the_size_limit_is_an_oslo_error(servers, registry, no_leaks):
    small = messaging.get_rpc_transport(
        cfg.CONF, url=zmqfast_url(registry, rpc_zmq_max_message_size=65536))
    try:
        rpc = client(small, topic="anyone")
        big = "x" * 100000
        for send in (rpc.call, rpc.cast):
            with pytest.raises(messaging.MessageDeliveryFailure,
                               match="rpc_zmq_max_message_size") as info:
                send({}, "echo", value=big)
            assert type(info.value.__cause__).__name__ == "MessageTooLarge"
        # A reply over this transport's limit (not the server's):
        with pytest.raises(messaging.MessageDeliveryFailure,
                           match="the reply is .* rpc_zmq_max_message_size is 65536"):
            client(small).call({}, "give", kind="100kB")
        # A Notifier logs what its driver raises; the driver's own error:
        with pytest.raises(messaging.MessageDeliveryFailure, match="rpc_zmq_max_message_size"):
            small._driver.send_notification(messaging.Target(topic="anyone"), {},
                                            {"payload": big}, 2.0)
    finally:
        small.cleanup()


def endpoint_outcomes(transport, topic):
    rpc = client(transport, topic=topic)
    outcomes = {}
    for name, prepared, method in [
            ("same minor", rpc.prepare(version="1.3"), "whoami"),
            ("older minor", rpc.prepare(version="1.1"), "whoami"),
            ("newer minor", rpc.prepare(version="1.4"), "whoami"),
            ("newer major", rpc.prepare(version="2.0"), "whoami"),
            ("namespace", rpc.prepare(namespace="admin", version="2.0"), "describe"),
            ("wrong namespace", rpc.prepare(namespace="nope"), "describe"),
            ("no such method", rpc, "nope")]:
        try:
            prepared.call({}, method)
            outcomes[name] = "ok"
        except messaging.RemoteError as exc:
            outcomes[name] = exc.exc_type
    return outcomes


def test_endpoint_rules_match_the_rabbitmq_driver(servers, transport):
    mine = endpoint_outcomes(transport, "svc")
    assert mine == {"same minor": "ok", "older minor": "ok",
                    "newer minor": "UnsupportedVersion", "newer major": "UnsupportedVersion",
                    "namespace": "ok", "wrong namespace": "UnsupportedVersion",
                    "no such method": "NoSuchMethod"}
    if not rabbit_reachable():
        pytest.skip("no RabbitMQ at 127.0.0.1:5672 to compare with")
    topic = f"nzf-test-{uuid.uuid4().hex[:8]}"
    rabbit_server = service("rpc", "r1", RABBIT, topic=topic).wait_ready()
    rabbit = messaging.get_rpc_transport(cfg.CONF, url=RABBIT)
    try:
        assert endpoint_outcomes(rabbit, topic) == mine
    finally:
        rabbit.cleanup()
        assert rabbit_server.stop() == 0


# -- call monitor ---------------------------------------------------------------------

def test_call_monitor_keeps_a_long_call_alive(servers, transport):
    rpc = client(transport, timeout=20, call_monitor_timeout=2).prepare(server="s2")
    start = time.monotonic()
    assert rpc.call({}, "sleep", seconds=4) == "s2"
    assert time.monotonic() - start >= 4


def test_call_monitor_notices_a_dead_server(registry, transport):
    doomed = service("rpc", "doomed", zmqfast_url(registry), topic="mortal").wait_ready()
    rpc = client(transport, topic="mortal", timeout=60, call_monitor_timeout=2)
    threading.Timer(1.0, doomed.kill).start()
    start = time.monotonic()
    try:
        with pytest.raises(messaging.MessagingTimeout):
            rpc.call({}, "sleep", seconds=30)
        assert time.monotonic() - start < 1.0 + 2 + 1.5
    finally:
        doomed.kill()


# -- executors -----------------------------------------------------------------------

def test_eventlet_executor_serves_concurrently(servers, transport):
    rpc = client(transport, topic="svc-green")
    assert rpc.call({}, "executor_is_green") is True
    results = []
    threads = [threading.Thread(target=lambda: results.append(rpc.call({}, "sleep", seconds=1)))
               for _ in range(5)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == ["g1"] * 5
    assert time.monotonic() - start < 3.0


GREEN_POLL = """
import eventlet
eventlet.monkey_patch()
import sys, time, warnings
warnings.filterwarnings("ignore")
import oslo_messaging as messaging
from oslo_config import cfg
cfg.CONF([], project="nzf-test")
transport = messaging.get_rpc_transport(cfg.CONF, url=sys.argv[1])
listener = transport._driver.listen(messaging.Target(topic="green-poll", server="p1"), 1, None)
poller = listener._poll_style_listener       # eventlet: the polling listener
ticks = []
def tick():
    while True:
        ticks.append(time.monotonic())
        eventlet.sleep(0.01)
eventlet.spawn(tick)
eventlet.sleep(0.05)
start = time.monotonic()
got = poller.poll(timeout=0.5)
elapsed = time.monotonic() - start
during = len([t for t in ticks if start <= t <= start + elapsed])
listener.cleanup()
transport.cleanup()
print(got, round(elapsed, 2), during)
"""


def test_a_listener_poll_never_blocks_the_eventlet_hub(registry):
    out = subprocess.run([sys.executable, "-c", GREEN_POLL, zmqfast_url(registry)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    got, elapsed, ticks = out.stdout.split()
    assert got == "[]"
    assert 0.45 <= float(elapsed) < 1.0
    assert int(ticks) >= 20            # the hub kept running other greenlets


GREEN_CALLS = """
import eventlet
eventlet.monkey_patch()
import sys, time, warnings
warnings.filterwarnings("ignore")
import oslo_messaging as messaging
from oslo_config import cfg
cfg.CONF([], project="nzf-test")
transport = messaging.get_rpc_transport(cfg.CONF, url=sys.argv[1])
client = messaging.get_rpc_client(transport, messaging.Target(topic="svc", server="s1"),
                                  timeout=10)
ticks = []
def tick():
    while True:
        ticks.append(time.monotonic())
        eventlet.sleep(0.01)
eventlet.spawn(tick)
pool = eventlet.GreenPool()
start = time.monotonic()
results = list(pool.imap(lambda i: client.call({}, "sleep", seconds=0.5), range(4)))
elapsed = time.monotonic() - start
during = len([t for t in ticks if start <= t <= start + elapsed])
transport.cleanup()
print(",".join(results), round(elapsed, 2), during)
"""


def test_calls_from_greenthreads_never_block_the_hub(servers, registry):
    out = subprocess.run([sys.executable, "-c", GREEN_CALLS, zmqfast_url(registry)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    results, elapsed, ticks = out.stdout.split()
    assert results == "s1,s1,s1,s1"
    assert float(elapsed) < 2.0               # the four calls waited side by side
    assert int(ticks) >= 0.25 * float(elapsed) / 0.01  # and the hub kept running


# -- notifications ---------------------------------------------------------------------

@pytest.fixture
def notifier(no_leaks, registry):
    """A notification transport in this process, cleaned up after the test."""
    transport = messaging.get_notification_transport(cfg.CONF, url=zmqfast_url(registry))
    yield transport
    transport.cleanup()


def listener_records(transport, name):
    target = messaging.Target(topic="ctl", server=name)
    return messaging.get_rpc_client(transport, target, timeout=10).call({}, "records")


def test_every_priority_is_delivered(registry, notifier, transport):
    topic = f"notes-{uuid.uuid4().hex[:8]}"
    listener = service("notify", "n1", zmqfast_url(registry), topic=topic).wait_ready()
    try:
        n = messaging.Notifier(notifier, driver="messaging", topics=[topic], publisher_id="t")
        for priority in ("audit", "debug", "info", "warn", "error", "critical", "sample"):
            getattr(n, priority)({}, f"event.{priority}", {"p": priority})
        assert wait_until(lambda: len(listener_records(transport, "n1")) == 7, 10)
        got = listener_records(transport, "n1")
        assert sorted(r["priority"] for r in got) == sorted(
            ["audit", "debug", "info", "warn", "error", "critical", "sample"])
        assert all(r["payload"] == {"p": r["priority"]} for r in got)
    finally:
        assert listener.stop() == 0


def test_pools_split_and_each_pool_gets_everything(registry, notifier, transport):
    topic = f"pools-{uuid.uuid4().hex[:8]}"
    url = zmqfast_url(registry)
    a1, a2, b1 = start_all(service("notify", "a1", url, topic=topic, pool="A"),
                           service("notify", "a2", url, topic=topic, pool="A"),
                           service("notify", "b1", url, topic=topic, pool="B"))
    try:
        n = messaging.Notifier(notifier, driver="messaging", topics=[topic], publisher_id="t")
        for i in range(20):
            n.info({}, "event", {"i": i})
        in_a = lambda: [r["payload"]["i"] for s in ("a1", "a2")  # noqa: E731
                        for r in listener_records(transport, s)]
        assert wait_until(lambda: len(in_a()) == 20, 10)
        assert wait_until(lambda: len(listener_records(transport, "b1")) == 20, 10)
        time.sleep(0.3)
        assert sorted(in_a()) == list(range(20))                 # each once in pool A
        assert min(len(listener_records(transport, s)) for s in ("a1", "a2")) > 0
        assert sorted(r["payload"]["i"] for r in listener_records(transport, "b1")) == \
            list(range(20))
    finally:
        assert stop_all([a1, a2, b1]) == [0, 0, 0]


def test_batch_listener_receives_batches(registry, notifier, transport):
    topic = f"batch-{uuid.uuid4().hex[:8]}"
    listener = service("notify", "bt", zmqfast_url(registry), topic=topic,
                       batch=5).wait_ready()
    try:
        n = messaging.Notifier(notifier, driver="messaging", topics=[topic], publisher_id="t")
        for i in range(12):
            n.info({}, "event", {"i": i})
        batches = lambda: [r["batch"] for r in listener_records(transport, "bt")]  # noqa: E731
        assert wait_until(lambda: sum(len(b) for b in batches()) == 12, 10)
        sizes = [len(b) for b in batches()]
        assert max(sizes) <= 5 and max(sizes) >= 2
        assert sorted(p["i"] for b in batches() for p in b) == list(range(12))
    finally:
        assert listener.stop() == 0


def test_a_notification_with_no_listener_is_dropped_and_counted(notifier):
    n = messaging.Notifier(notifier, driver="messaging", topics=["nobody-listens"],
                           publisher_id="t")
    n.info({}, "event", {})
    assert notifier._driver._runtime.client.stats()["notifications_dropped"] == 1


def test_held_notifications_reach_the_default_pool_that_starts_later(registry, no_leaks,
                                                                     transport):
    notifier = messaging.get_notification_transport(
        cfg.CONF, url=zmqfast_url(registry, rpc_zmq_hold_notifications=10))
    topic = f"held-{uuid.uuid4().hex[:8]}"
    listener = None
    try:
        n = messaging.Notifier(notifier, driver="messaging", topics=[topic], publisher_id="t")
        for i in range(3):
            n.info({}, "event", {"i": i})
        courier = notifier._driver._runtime.courier
        assert courier.stats()["notifications_held"] == 3
        listener = service("notify", "late", zmqfast_url(registry), topic=topic).wait_ready()
        assert wait_until(lambda: len(listener_records(transport, "late")) == 3, 15)
        assert sorted(r["payload"]["i"] for r in listener_records(transport, "late")) == \
            [0, 1, 2]
        assert courier.stats()["notifications_held"] == 0
        assert courier.stats()["notifications_held_delivered"] == 3
        assert notifier._driver._runtime.client.stats()["notifications_dropped"] == 0
    finally:
        if listener is not None:
            assert listener.stop() == 0
        notifier.cleanup()


# -- configuration and cleanup ----------------------------------------------------------

def test_url_query_overrides_options(registry):
    transport = messaging.get_rpc_transport(
        cfg.CONF, url=zmqfast_url(registry, rpc_zmq_host="from-url", rpc_zmq_linger=1))
    try:
        options = transport._driver._options
        assert options.rpc_zmq_host == "from-url" and options.rpc_zmq_linger == 1
        assert options.rpc_zmq_ipc_dir == registry
    finally:
        transport.cleanup()


def test_the_backend_is_named_in_the_scheme(tmp_path):
    ring = tmp_path / "ring.json"
    ring.write_text('{"t": ["h1"]}')
    transport = messaging.get_rpc_transport(
        cfg.CONF, url=f"zmqfast+ring://?matchmaker_ringfile={ring}")
    try:
        options = transport._driver._options
        assert options.rpc_zmq_matchmaker == "ring" and options.matchmaker_ringfile == str(ring)
    finally:
        transport.cleanup()
    transport = messaging.get_rpc_transport(
        cfg.CONF, url="zmqfast+redis://:s3cret@10.0.0.5:6380/3")
    try:
        options = transport._driver._options
        assert (options.rpc_zmq_matchmaker, options.matchmaker_redis_host,
                options.matchmaker_redis_port, options.matchmaker_redis_password,
                options.matchmaker_redis_db) == ("redis", "10.0.0.5", 6380, "s3cret", 3)
    finally:
        transport.cleanup()
    ca = make_certificates(tmp_path)["ca.crt"]
    transport = messaging.get_rpc_transport(
        cfg.CONF, url=f"zmqfast+redis://127.0.0.1:6380/?matchmaker_redis_ssl=true"
                      f"&matchmaker_redis_ssl_ca_certs={ca}")
    try:
        options = transport._driver._options
        assert (options.matchmaker_redis_ssl, options.matchmaker_redis_ssl_ca_certs) == \
            (True, ca)
    finally:
        transport.cleanup()


@pytest.mark.parametrize("url", ["zmqfast+zookeeper://127.0.0.1:2181/",
                                 "zmqfast+redis://127.0.0.1:6379/not-a-db",
                                 "zmqfast+redis://127.0.0.1:6379/?matchmaker_redis_ssl_certfile=x",
                                 "zmqfast://?rpc_zmq_port=not-a-port",
                                 "zmqfast://?rpc_zmq_matchmaker=bogus",
                                 "zmqfast://?rpc_cast_timeout=-1",
                                 "zmqfast://?no_such_option=1",
                                 "zmqfast+ring://?matchmaker_ringfile=/nonexistent/ring.json"])
def test_bad_urls_are_clear_errors(url):
    with pytest.raises(messaging.InvalidTransportURL) as info:
        messaging.get_rpc_transport(cfg.CONF, url=url)
    if "redis" in url:
        assert "redis" in str(info.value)
    elif "?" in url:                    # the option at fault is named
        assert url.partition("?")[2].partition("=")[0] in str(info.value)


def test_options_in_default_are_read_as_the_command_line_reads_them(tmp_path):
    """A service's file may keep the options in [DEFAULT], as Nova-era
    services did: the driver reads what its group does not set from there
    (a CURVE key included: never a silent fall back to plaintext), exactly
    as `nova-zmq-fast --config-file` reads the same file."""
    from nova_zmq_fast._curve import write_keypair
    from nova_zmq_fast.config_sources import load_options
    write_keypair(str(tmp_path / "svc"))
    (tmp_path / "allowed").mkdir()
    path = tmp_path / "service.conf"
    path.write_text(f"""[DEFAULT]
transport_url = zmqfast://
rpc_zmq_ipc_dir = {tmp_path / "registry"}
rpc_zmq_host = from-default
rpc_zmq_linger = 7.5
rpc_zmq_secret_key_file = {tmp_path / "svc.key"}
rpc_zmq_allowed_keys = {tmp_path / "allowed"}

[oslo_messaging_zmqfast]
rpc_zmq_linger = 3
""")
    conf = cfg.ConfigOpts()
    conf(["--config-file", str(path)])
    transport = messaging.get_rpc_transport(conf)
    try:
        theirs = transport._driver._options
        ours = load_options([str(path)], [], {})
        assert (theirs.rpc_zmq_host, theirs.rpc_zmq_linger) == ("from-default", 3)
        assert theirs.curve_keys() is not None and theirs.curve_keys() == ours.curve_keys()
        assert {name: getattr(theirs, name) for name, *_ in ours.describe()
                if name not in _NOT_FOR_OSLO} == \
            {name: getattr(ours, name) for name, *_ in ours.describe()
             if name not in _NOT_FOR_OSLO}
    finally:
        transport.cleanup()


def test_options_are_listed_for_the_config_generator():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable),
                                       "oslo-config-generator"),
                          "--namespace", "nova_zmq_fast"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "[oslo_messaging_zmqfast]" in out.stdout
    assert "#rpc_zmq_ipc_dir = /var/run/openstack" in out.stdout


def test_cleanup_leaves_no_threads_sockets_or_registry_entries(tmp_path):
    registry = str(tmp_path)
    fds, threads = open_fds(), os_threads()
    url = zmqfast_url(registry)
    transport = messaging.get_rpc_transport(cfg.CONF, url=url)
    ntransport = messaging.get_notification_transport(cfg.CONF, url=url)

    class Endpoint:
        def ping(self, ctxt, n):
            return n

        def info(self, ctxt, publisher_id, event_type, payload, metadata):
            pass

    server = messaging.get_rpc_server(transport, messaging.Target(topic="t", server="me"),
                                      [Endpoint()], executor="threading")
    listener = messaging.get_notification_listener(
        ntransport, [messaging.Target(topic="n")], [Endpoint()], executor="threading")
    server.start()
    listener.start()
    assert client(transport, topic="t").call({}, "ping", n=3) == 3
    messaging.Notifier(ntransport, driver="messaging", topics=["n"]).info({}, "e", {})
    nodes = os.path.join(registry, "nova_zmq_fast-registry", "nodes")
    assert len(os.listdir(nodes)) == 1         # both transports share one socket
    for s in (server, listener):
        s.stop()
        s.wait()
    transport.cleanup()
    ntransport.cleanup()
    assert os.listdir(nodes) == []
    assert wait_until(lambda: no_new_threads(threads), 5), "threads leaked"
    assert open_fds() == fds, "descriptors leaked"


@pytest.mark.parametrize("transport_url", ["zmqfast", "rabbit"])
def test_the_readme_example_app_runs_on_either_transport(tmp_path, transport_url):
    if transport_url == "rabbit" and not rabbit_reachable():
        pytest.skip("no RabbitMQ at 127.0.0.1:5672")
    url = zmqfast_url(str(tmp_path)) if transport_url == "zmqfast" else RABBIT
    # Its own topic names: a broker's queues outlive the run, and are
    # shared with any other run against the same broker.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "oslo_app.py"),
                          "--transport-url", url, "--prefix", f"example{uuid.uuid4().hex[:8]}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "notifications -> ['compute.instance.create', 'compute.instance.delete']" \
        in out.stdout


def test_a_processs_rpc_and_notification_transports_share_one_socket(no_leaks, registry):
    """An oslo.messaging service opens an RPC transport and a notification
    transport: with the same options they share one listening socket (a
    fixed port, as with ring, could not be bound twice), and a process is
    one address in discovery.  The shared runtime closes with the last."""
    url = zmqfast_url(registry, rpc_zmq_port=free_port(), rpc_zmq_host="both")
    rpc_transport = messaging.get_rpc_transport(cfg.CONF, url=url)
    notes = messaging.get_notification_transport(cfg.CONF, url=url)
    topic = f"shared-{uuid.uuid4().hex[:8]}"
    got = []

    class Endpoint:
        def whoami(self, ctxt):
            return "both"

        def info(self, ctxt, publisher_id, event_type, payload, metadata):
            got.append(payload)

    server = messaging.get_rpc_server(rpc_transport, messaging.Target(topic=topic, server="both"),
                                      [Endpoint()], executor="threading")
    listener = messaging.get_notification_listener(
        notes, [messaging.Target(topic=topic)], [Endpoint()], executor="threading")
    server.start()
    listener.start()
    try:
        runtime = rpc_transport._driver._runtime
        assert notes._driver._runtime is runtime
        assert client(notes, topic).call({}, "whoami") == "both"
        messaging.Notifier(rpc_transport, driver="messaging", topics=[topic],
                           publisher_id="t").info({}, "e", {"n": 1})
        assert wait_until(lambda: got == [{"n": 1}], 10), got
        mine = [n for n in runtime.backend.nodes() if n["host"] == "both"]
        assert [n["address"] for n in mine] == [runtime.server.address], mine
        assert {f"openstack:{topic}", f"openstack:{topic}.info%"} <= set(mine[0]["topics"])
    finally:
        for s in (listener, server):
            s.stop()
            s.wait()
        notes.cleanup()
        notes.cleanup()                         # counted once: transports, not calls
        assert not runtime.context.closed       # still the RPC transport's
        rpc_transport.cleanup()
    assert runtime.context.closed


# -- stopping and cleaning up listeners -----------------------------------------------------

def read_line(proc, word, timeout=30):
    """The next line of a helper's output starting with `word` (bounded)."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            line = proc.proc.stdout.readline()
            if not line:
                break
            if line.startswith(word):
                return line[len(word):].strip()
    raise AssertionError(f"{proc.name}: no {word} line within {timeout}s")


def addresses(transport, topic):
    return {ep.address for ep in transport._driver._runtime.routes.route(topic)}


@pytest.mark.parametrize("executor", ["threading", "eventlet"])
def test_a_stopped_server_hands_its_share_to_the_others_while_it_finishes(
        registry, tmp_path, notifier, transport, executor):
    """Between oslo's server.stop() and the end of its wait() (a long call
    still running), a server no longer takes requests: as with a broker,
    whose consumer stop() cancels, the other servers of its topic get them
    all, and the other listeners of its pool its notifications.  Its
    running call still replies.  Calls that reach it on a route cached
    before the stop are refused, and the caller tries another server;
    casts and notifications, which have no answer, reach the others once
    the sender's routes no longer list it (discovery stopped offering it
    at stop())."""
    key = uuid.uuid4().hex[:8]
    topic, notes = f"handover-{key}", f"handover-notes-{key}"
    url = zmqfast_url(registry)
    h1, h2, hn = start_all(
        service("rpc", "h1", url, topic=topic, executor=executor, **{"notify-topic": notes},
                pool="A"),
        service("rpc", "h2", url, topic=topic),
        service("notify", f"hn-{key}", url, topic=notes, pool="A"))
    release = tmp_path / "release"
    blocked = {}
    caller = None
    try:
        rpc = client(transport, topic)
        # Both serve, and this process's routes name both (as cached).
        assert {rpc.call({}, "whoami") for _ in range(10)} == {"h1", "h2"}
        assert notifier._driver._runtime is transport._driver._runtime    # one route table
        n = messaging.Notifier(notifier, driver="messaging", topics=[notes], publisher_id="t")
        for i in range(4):
            n.info({}, "warm", {"k": "warm", "i": i})

        def warm_notes(name):
            return [r for r in records(transport, name, topic) if isinstance(r, dict)] \
                if name == "h1" else listener_records(transport, name)
        assert wait_until(lambda: len(warm_notes("h1")) + len(warm_notes(hn.name)) == 4, 10)
        assert warm_notes("h1") and warm_notes(hn.name)     # the pool is h1 and hn
        h1_address, = addresses(transport, f"openstack:{topic}@h1")
        notes_topic = f"openstack:{notes}.info%A"
        assert h1_address in addresses(transport, notes_topic)

        def long_call():
            blocked["result"] = rpc.prepare(server="h1", timeout=60).call(
                {}, "block", marker=f"{key}-running", release=str(release))
        caller = threading.Thread(target=long_call)
        caller.start()
        assert wait_until(lambda: f"{key}-running" in records(transport, "h1", topic), 10)

        h1.proc.stdin.write("stop\n")
        h1.proc.stdin.flush()
        read_line(h1, "STOPPED")                # h1's stop() returned; its wait() runs

        # Calls at once, on the route cached before the stop: all answered
        # by h2 (those sent to h1 are refused there and sent again).
        who = [client(transport, topic, timeout=5).call({}, "whoami") for _ in range(10)]
        assert who == ["h2"] * 10
        # Discovery no longer offers h1: the routes move on.
        assert wait_until(lambda: h1_address not in addresses(transport, f"openstack:{topic}"),
                          5)
        assert wait_until(lambda: h1_address not in addresses(transport, notes_topic), 5)
        for i in range(20):
            rpc.cast({}, "record", value=f"{key}-{i}")
        for i in range(10):
            n.info({}, "event", {"k": key, "i": i})
        assert wait_until(lambda: len([v for v in records(transport, "h2", topic)
                                       if str(v).startswith(f"{key}-")]) == 20, 10)
        got = [v for v in records(transport, "h2", topic) if str(v).startswith(f"{key}-")]
        assert sorted(got) == sorted(f"{key}-{i}" for i in range(20))

        def notes_at_hn():
            return sorted(r["payload"]["i"] for r in listener_records(transport, hn.name)
                          if r["payload"]["k"] == key)
        assert wait_until(lambda: notes_at_hn() == list(range(10)), 10), notes_at_hn()
        assert caller.is_alive()                # all of it within h1's stop window
        release.touch()
        caller.join(30)
        assert blocked == {"result": "h1"}      # the running call still replied
        h1_records = json.loads(read_line(h1, "RECORDS"))
        assert [r for r in h1_records if isinstance(r, str) and r.startswith(f"{key}-")] == \
            [f"{key}-running"]
        assert not [r for r in h1_records if isinstance(r, dict) and r["payload"]["k"] == key]
        assert h1.proc.wait(30) == 0            # it exits on its own after a "stop"
    finally:
        release.touch()
        if caller is not None:
            caller.join(30)
        codes = stop_all([h1, h2, hn])
    assert codes == [0, 0, 0]


def test_a_transport_cleaned_up_before_its_servers_stop_ends_their_poller(
        no_leaks, registry, caplog):
    """transport.cleanup() before server.stop(): the listeners' poller ends
    at once and touches no descriptor of theirs again (their numbers are
    reused by the application's next files), nothing logs an error, and the
    servers' stop() and wait() still work."""
    url = zmqfast_url(registry)
    transport = messaging.get_rpc_transport(cfg.CONF, url=url)
    ntransport = messaging.get_notification_transport(cfg.CONF, url=url)
    topic = f"early-{uuid.uuid4().hex[:8]}"
    got = []

    class Endpoint:
        def ping(self, ctxt, n):
            return n

        def info(self, messages):
            got.extend(m["payload"] for m in messages)

    server = messaging.get_rpc_server(transport, messaging.Target(topic=topic, server="me"),
                                      [Endpoint()], executor="threading")
    listener = messaging.get_batch_notification_listener(
        ntransport, [messaging.Target(topic=topic)], [Endpoint()], executor="threading",
        batch_size=5, batch_timeout=0.2)
    server.start()
    listener.start()
    pipes = []
    try:
        assert client(transport, topic).call({}, "ping", n=1) == 1
        messaging.Notifier(ntransport, driver="messaging", topics=[topic],
                           publisher_id="t").info({}, "e", {"n": 1})
        assert wait_until(lambda: got == [{"n": 1}], 10), got
        inbox = listener.listener._poll_style_listener._inbox
        poller = listener.listener._listen_thread
        inbox_fds = {inbox._read, inbox._write}
        with caplog.at_level(logging.WARNING):
            transport.cleanup()
            ntransport.cleanup()
            # The application's next pipes take the numbers the listener's
            # wake-up pipe had.
            while not inbox_fds <= {fd for pipe in pipes for fd in pipe} and len(pipes) < 64:
                pipes.append(os.pipe())
            assert inbox_fds <= {fd for pipe in pipes for fd in pipe}
            for i, (r, w) in enumerate(pipes):
                os.write(w, b"application data %d" % i)
            assert wait_until(lambda: not poller.is_alive(), 5), "the poller still runs"
            for i, (r, w) in enumerate(pipes):
                os.set_blocking(r, False)
                assert os.read(r, 100) == b"application data %d" % i
            for s in (server, listener):
                s.stop()
            for s in (server, listener):
                s.wait()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
    finally:
        for pipe in pipes:
            for fd in pipe:
                os.close(fd)
