"""The behaviour suite (tests/helpers/suite.py) run under each
concurrency model: threads, eventlet-monkey-patched processes and
asyncio, each client against a service process of its own model, and
across models on the same wire and discovery."""
import json
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT, ChildProcess, stop_all, wait_until

MODELS = ("threads", "eventlet", "asyncio")


def model_service(model, host, topic, ipc_dir):
    return ChildProcess(host, [
        sys.executable, "-m", "tests.helpers.model_service", model, "--host", host,
        "--topic", topic, "--ipc-dir", str(ipc_dir)])


@pytest.fixture(scope="module")
def model_services(ipc_dir):
    started = {}
    try:
        for model in MODELS:
            started[model] = model_service(model, f"svc-{model}", f"conc-{model}", ipc_dir)
        yield started
    finally:
        codes = dict(zip(started, stop_all(list(started.values()))))
    assert codes == {m: 0 for m in started}, f"services exited with {codes}"


def run_suite(model, topic, ipc_dir):
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.suite", model, "--topic", topic,
                           "--ipc-dir", str(ipc_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {name: why for name, why in results.items() if why != "ok"}
    assert not failed, "\n".join(f"{name}:\n{why}" for name, why in failed.items())
    return results


@pytest.mark.parametrize("client,service", [(m, m) for m in MODELS] + [
    ("threads", "asyncio"), ("asyncio", "eventlet"), ("eventlet", "asyncio"),
    ("asyncio", "threads")])
def test_behaviour_suite(model_services, ipc_dir, client, service):
    results = run_suite(client, f"conc-{service}", ipc_dir)
    assert "nested call into its own process" in results
    assert "multicall streams" in results
    if client == "eventlet":
        assert "the issue's reproduction, in this process" in results


def test_a_crowd_of_green_callers_shares_one_socket(model_services, ipc_dir):
    """600 green threads calling at once, in a process allowed 128 file
    descriptors: every call is answered, timed out or streamed as it
    should be, killed callers confuse no one, and the green threads of
    the thread share its one outbox (a socket each would need a thousand
    descriptors)."""
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.green_crowd", "--topic",
                           "conc-threads", "--ipc-dir", str(ipc_dir), "--callers", "600",
                           "--fds", "128"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["errors"] == [] and got["wrong"] == [], got
    assert (got["echo"], got["timeout"], got["stream"], got["killed"]) == (361, 60, 180, 20)
    assert got["victims_started"] == 20
    assert got["outboxes"] == 1


def test_green_callers_end_at_once_when_the_transport_is_ended_under_them(ipc_dir):
    """Green threads wait for replies; the context is shut down (as
    cleanup's interrupt() does) and another green thread's send meets it
    before the hub looks at the socket: every waiter still ends at once,
    with TransportClosed, not when its reply would have come."""
    service = model_service("threads", "svc-shutdown", "green-shutdown", ipc_dir)
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.helpers.green_shutdown", "--topic",
                               "green-shutdown", "--ipc-dir", str(ipc_dir)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    finally:
        assert service.stop() == 0
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"cast": "TransportClosed", "waiters": ["TransportClosed"] * 5}, got


def test_services_report_their_model(model_services, client):
    for model in MODELS:
        assert client.call({}, f"conc-{model}", {"method": "model"}) == model


@pytest.mark.parametrize("model", MODELS)
def test_an_at_least_once_cast_is_acknowledged_when_its_handler_ends(ipc_dir, client, model):
    """Killed while its handler runs (a coroutine, a green thread, a
    thread), the cast was never acknowledged: it goes to another server."""
    client.init(rpc_zmq_ipc_dir=str(ipc_dir), rpc_zmq_host="client",
                rpc_zmq_heartbeat_interval=0.3, rpc_zmq_heartbeat_timeout=1.0,
                rpc_zmq_ack_timeout=30)
    topic, key = f"alo-hold-{model}", f"k-{model}"
    victim = model_service(model, f"victim-{model}", topic, ipc_dir)
    survivor = None
    try:
        client.cast({}, topic, {"method": "hold", "args": {"key": key, "on": victim.name}},
                    at_least_once=True)
        # Its handler has started (and stays busy on that host) ...
        assert client.call({}, f"{topic}.{victim.name}", {
            "method": "wait_for", "args": {"key": key, "n": 1}}) == 1
        assert client.stats()["client"]["at_least_once_pending"] == 1
        survivor = model_service("threads", f"survivor-{model}", topic, ipc_dir)
        victim.kill()
        # ... so the cast is sent again, and the other server runs it.
        assert client.call({}, f"{topic}.{survivor.name}", {
            "method": "wait_for", "args": {"key": key, "n": 1}}) == 1
        assert wait_until(lambda: client.stats()["client"]["at_least_once_acked"] == 1, 10)
        assert client.stats()["client"]["at_least_once_resent"] >= 1
    finally:
        victim.kill()
        if survivor is not None:
            assert survivor.stop() == 0


def test_an_asyncio_at_least_once_cast_awaits_room_without_blocking_the_loop(ipc_dir, client):
    """A full at-least-once window (10 x rpc_zmq_topic_backlog casts not yet
    acknowledged) holds the next cast back: awaited, so other tasks run,
    and bounded by rpc_cast_timeout."""
    import asyncio

    from nova_zmq_fast import aio
    from tests.helpers.ticking import ticking
    # The ten casts are never acknowledged: the fixture's cleanup() waits
    # the whole linger for them, so a short one.
    client.init(rpc_zmq_ipc_dir=str(ipc_dir), rpc_zmq_host="client",
                rpc_zmq_topic_backlog=1, rpc_cast_timeout=1, rpc_zmq_ack_timeout=60,
                rpc_zmq_linger=0.5)
    service = model_service("threads", "alo-window", "alo-window", ipc_dir)

    async def scenario():
        for _ in range(10):                 # handlers that hold their acks back
            await aio.cast({}, "alo-window", {"method": "pause", "args": {"seconds": 30}},
                           at_least_once=True)
        async with ticking() as ticks:
            with pytest.raises(aio.Timeout, match="fill the window"):
                await aio.cast({}, "alo-window", {"method": "pause", "args": {"seconds": 0}},
                               at_least_once=True)
        return len(ticks)
    try:
        ticks = asyncio.run(scenario())
        # A loop blocked for the second of waiting would have ticked once.
        assert ticks >= 10, ticks
        assert client.stats()["client"]["at_least_once_pending"] == 10
    finally:
        service.kill()


def run_stream_scenario(key, n, scenario):
    """Runs `scenario(open_stream, done)` on a new event loop.
    open_stream() is an aio.multicall of n values (0 .. n-1) from the
    asyncio model service, which records `key` once it has sent them all:
    done() returns once the service reports that.  Returns the scenario's
    result and what the loop's caller still holds after it: how many
    streams are in its waiter table, and how many replies they keep."""
    import asyncio

    from nova_zmq_fast import aio
    topic = "conc-asyncio.svc-asyncio"

    def open_stream():
        return aio.multicall({}, topic, {"method": "stream_and_record",
                                         "args": {"n": n, "key": key}})

    async def done():
        assert await aio.call({}, topic, {"method": "wait_for",
                                          "args": {"key": key, "n": 1}}) == 1

    async def main():
        result = await scenario(open_stream, done)
        waiters = waiter_table()
        return result, len(waiters), sum(len(w.replies) for w in waiters.values())
    return asyncio.run(main())


def waiter_table():
    """The running loop's calls and streams waiting for replies."""
    import asyncio

    from nova_zmq_fast import aio
    return aio._callers[asyncio.get_running_loop()].waiters


async def next_or_end(stream):
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return "end"


def test_an_asyncio_multicall_dropped_early_is_forgotten_at_once(model_services, client):
    """Leaving `async for` over aio.multicall with break, nothing else
    holding the stream, drops it: it leaves the caller's waiter table then
    and there (not at some later turn of the loop, or at its shutdown) and
    keeps none of the values the service goes on sending."""
    async def scenario(open_stream, done):
        async for first in open_stream():
            break
        forgotten = not waiter_table()
        await done()                        # the service has sent all its values
        return first, forgotten
    (first, forgotten), streams, kept = run_stream_scenario("dropped", 2000, scenario)
    assert first == 0
    assert forgotten, "the dropped stream was still waited for"
    assert (streams, kept) == (0, 0)


def test_an_asyncio_multicall_closed_early_is_forgotten(model_services, client):
    """`async with` around aio.multicall, or aclose(), ends the stream at
    once: it leaves the waiter table, keeps nothing, and reading it again
    ends the iteration."""
    async def with_block(open_stream, done):
        async with open_stream() as stream:
            async for first in stream:
                break
        forgotten = not waiter_table()
        await done()
        return first, forgotten, await next_or_end(stream)
    assert run_stream_scenario("closed", 2000, with_block) == ((0, True, "end"), 0, 0)

    async def aclose(open_stream, done):
        stream = open_stream()
        first = await stream.__anext__()
        await stream.aclose()
        forgotten = not waiter_table()
        await done()
        return first, forgotten, await next_or_end(stream)
    assert run_stream_scenario("aclosed", 2000, aclose) == ((0, True, "end"), 0, 0)


def test_an_asyncio_multicall_left_unread_keeps_a_bounded_backlog(
        model_services, client, monkeypatch):
    """A stream its caller stops reading but keeps (break, the stream still
    referenced) holds at most aio.STREAM_BACKLOG replies: later values are
    dropped as they arrive, as a lagging threaded caller's full queue drops
    them.  Read again, it gives the values it kept, in order, then
    StreamTruncated saying how many were lost, and is forgotten."""
    from nova_zmq_fast import aio
    from nova_zmq_fast.exceptions import StreamTruncated
    monkeypatch.setattr(aio, "STREAM_BACKLOG", 10)
    n = 2000

    async def scenario(open_stream, done):
        stream = open_stream()
        async for first in stream:
            break
        await done()                        # every value has reached this process
        held = sum(len(w.replies) for w in waiter_table().values())
        values = [first]
        with pytest.raises(StreamTruncated) as ended:
            async for value in stream:
                values.append(value)
        return held, values, ended.value.kwargs["lost"]
    (held, values, lost), streams, kept = run_stream_scenario("unread", n, scenario)
    assert held <= 10 + 1, held             # and the stream's end, once it came
    assert values == list(range(len(values))) and len(values) <= 11, values
    assert lost == n - len(values)
    assert (streams, kept) == (0, 0)


@pytest.mark.parametrize("model", MODELS)
def test_a_stopping_service_answers_the_calls_it_is_running(ipc_dir, client, model):
    """SIGTERM while handlers run (threads, green threads, coroutines):
    the service closes its connection and cleans up, and every caller
    still gets its answer, sent before the socket closed."""
    client.init(rpc_zmq_ipc_dir=str(ipc_dir), rpc_zmq_host="client")
    topic, key, n = f"stopping-{model}", "running", 4
    service = model_service(model, f"stopping-{model}", topic, ipc_dir)
    answers = []

    def caller():
        try:
            answers.append(client.call({}, topic, {
                "method": "busy", "args": {"key": key, "seconds": 0.5}}, timeout=20))
        except Exception as exc:                            # noqa: BLE001
            answers.append(repr(exc))
    callers = [threading.Thread(target=caller) for _ in range(n)]
    try:
        for t in callers:
            t.start()
        assert client.call({}, topic, {"method": "wait_for", "args": {"key": key, "n": n}}) == n
    finally:
        code = service.stop()
        for t in callers:
            t.join(30)
    assert code == 0
    assert answers == [0.5] * n


@pytest.mark.parametrize("model", MODELS)
def test_a_waiting_handler_holds_up_no_request_queued_behind_it(ipc_dir, client, model):
    """A cast right behind one whose handler waits, on the same connection,
    with nothing else reaching the service meanwhile (probes far apart, a
    service that calls nobody): handled while the first still waits."""
    client.init(rpc_zmq_ipc_dir=str(ipc_dir), rpc_zmq_host="client",
                rpc_zmq_heartbeat_interval=30, rpc_zmq_heartbeat_timeout=90)
    topic, pause = f"hold-up-{model}", 8
    service = model_service(model, f"hold-up-{model}", topic, ipc_dir)
    got = threading.Event()
    conn = client.create_connection()
    try:
        conn.create_consumer(f"back-{model}", lambda ctxt, msg: got.set())
        conn.consume_in_thread()
        client.cast({}, topic, {"method": "pause", "args": {"seconds": pause}})
        client.cast({}, topic, {"method": "cast_back",
                                "args": {"topic": f"back-{model}", "value": 1}})
        assert got.wait(pause / 2), "held up behind the waiting handler"
    finally:
        conn.close()
        assert service.stop() == 0


def test_errors_of_cast_handlers_are_counted_and_logged_at_a_bounded_rate(
        model_services, client):
    """Under every model, not only where the receive loop runs handlers:
    a peer that makes a cast handler raise by the hundred cannot flood the
    service's log, and stats() counts every error."""
    n = 200
    topics = {model: f"conc-{model}.svc-{model}" for model in MODELS}
    before = {m: client.call({}, t, {"method": "handler_errors"}) for m, t in topics.items()}
    for topic in topics.values():
        for _ in range(n):
            client.cast({}, topic, {"method": "fail", "args": {"text": "x"}})
    for model, topic in topics.items():
        def counted():
            return client.call({}, topic, {"method": "handler_errors"})["counted"]
        assert wait_until(lambda: counted() >= before[model]["counted"] + n, 20), model
        seen = client.call({}, topic, {"method": "handler_errors"})
        assert seen["counted"] == before[model]["counted"] + n, (model, seen)
        # At most one record per 10 s interval, the rest held back.
        assert seen["logged"] - before[model]["logged"] <= 3, (model, before[model], seen)


def leader_scenario(*args):
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.leaders", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["eventlet", "asyncio"])
def test_a_loop_leads_again_after_a_close_with_no_linger(tmp_path, model):
    """stop() closes the sockets without a leader having read its STOP:
    the loop must leave the socket's fd first, and lead the next server."""
    assert leader_scenario(model, "linger0", str(tmp_path)) == {"answers": list(range(10))}


def test_the_socket_is_read_while_the_leader_that_owned_it_is_parked(tmp_path):
    """The owner of the fd parks in a nested call into its own process
    while another leader wakes in the same hub turn: the nested call is
    still answered."""
    result = leader_scenario("eventlet", "parked-owner", str(tmp_path), "8")
    assert result["nested"] == ["ok"] * 8, result
