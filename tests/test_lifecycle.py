"""Shutdown is bounded, finishes accepted work, and releases every socket,
thread and descriptor (the `client` fixture checks threads and fds)."""
import json
import subprocess
import sys
import threading
import time

import pytest

from nova_zmq_fast import _zmq, rpc
from tests.conftest import ROOT, free_port, wait_until

CTX = {"user_id": "u"}


def sockets_open():
    return rpc._runtime().context.sockets


def test_exactly_one_libzmq_is_loaded(client):
    client.call  # noqa: B018 (import side effects are enough)
    files = _zmq.loaded_libzmq_files()
    assert len(files) == 1, files
    assert _zmq.libzmq_version()[:2] == _zmq.compiled_libzmq_version()[:2]


def test_everything_is_released_after_use(services, client):
    conn = client.create_connection()
    seen = []
    conn.create_consumer("local-topic", lambda ctxt, m: seen.append(m))
    conn.create_consumer("local-topic", lambda ctxt, m: seen.append(m), fanout=True)
    conn.consume_in_thread()

    errors = []

    def work():
        try:
            assert client.call(CTX, "svc", {"method": "echo", "args": {"value": 1}}) == 1
            assert list(client.multicall(CTX, "svc", {"method": "stream",
                                                      "args": {"n": 2, "delay": 0}}))
            client.cast(CTX, "local-topic", {"method": "x"})
            client.fanout_cast(CTX, "local-topic", {"method": "y"})
            client.notify(CTX, "local-topic", {"event_type": "z"})
        except Exception as exc:        # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    work()
    assert errors == []
    assert wait_until(lambda: len(seen) == 15, 10), len(seen)
    # The fixture then runs cleanup() and checks threads and descriptors.


def test_an_ended_threads_socket_serves_the_next_thread(services, client):
    """An ended thread's socket is kept (with its connections) for the next
    new thread, never one more per thread; cleanup() closes it (the
    fixture checks that nothing is left open)."""
    client.call(CTX, "svc", {"method": "echo", "args": {"value": 0}})
    before = sockets_open()
    for i in range(5):
        t = threading.Thread(target=lambda: client.call(CTX, "svc", {"method": "echo",
                                                                  "args": {"value": 1}}))
        t.start()
        t.join(10)
        assert sockets_open() == before + 1, (i, sockets_open(), before)


def test_close_finishes_accepted_work(client):
    done = []
    conn = client.create_connection()

    class Slow:
        def work(self, ctxt, i):
            time.sleep(0.02)
            done.append(i)

    conn.create_consumer("slow-work", Slow())
    conn.consume_in_thread()
    for i in range(30):
        client.cast(CTX, "slow-work", {"method": "work", "args": {"i": i}})
    time.sleep(0.05)
    conn.close()
    assert sorted(done) == list(range(30))


def test_close_is_bounded_by_the_linger_with_a_stuck_handler(client):
    client.init(rpc_zmq_ipc_dir=client._options.rpc_zmq_ipc_dir, rpc_zmq_host="client",
                rpc_zmq_linger=1)
    release = threading.Event()
    conn = client.create_connection()

    class Stuck:
        def hang(self, ctxt):
            release.wait(60)

    conn.create_consumer("stuck", Stuck())
    conn.consume_in_thread()
    try:
        try:
            client.call(CTX, "stuck", {"method": "hang"}, timeout=0.2)
        except client.Timeout:
            pass
        start = time.monotonic()
        conn.close()
        assert time.monotonic() - start < 2.5
    finally:
        release.set()           # lets the handler's thread end before the leak check


def test_a_cast_to_an_unreachable_peer_fails_loudly(client):
    client.init(rpc_zmq_ipc_dir=client._options.rpc_zmq_ipc_dir, rpc_zmq_host="client",
                rpc_zmq_connect_timeout=0.5)
    port = free_port()                      # nobody listens there
    start = time.monotonic()
    with pytest.raises(client.PeerUnreachable):
        client.cast_to_server(CTX, {"host": "127.0.0.1", "port": port}, "gone",
                              {"method": "x"})
    assert 0.4 < time.monotonic() - start < 2.0


def test_cleanup_is_bounded_with_casts_queued_for_a_stuck_peer(client):
    """A peer that never reads: its queues fill, the sender gets Timeout
    (back-pressure, not silent loss), and cleanup() still returns within
    the linger."""
    client.init(rpc_zmq_ipc_dir=client._options.rpc_zmq_ipc_dir, rpc_zmq_host="client",
                rpc_zmq_linger=1, rpc_cast_timeout=0.5)
    address = f"tcp://127.0.0.1:{free_port()}"
    sink = subprocess.Popen([sys.executable, "-m", "tests.helpers.sink", address],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "READY"
        big = {"method": "x", "args": {"pad": "x" * 60000}}
        with pytest.raises(client.Timeout):
            for _ in range(10000):
                client.cast_to_server(CTX, {"address": address}, "stuck", big)
        start = time.monotonic()
        client.cleanup()
        assert time.monotonic() - start < 2.5
    finally:
        sink.kill()
        sink.wait(10)
        sink.stdout.close()


def test_cleanup_closes_everything_when_discovery_fails_to_withdraw(client):
    """Discovery down at cleanup (Redis unreachable): withdrawing fails,
    is logged, and the server, its threads and the context still close."""
    from nova_zmq_fast.exceptions import DiscoveryUnavailable
    conn = client.create_connection()
    conn.create_consumer("withdraw-fails", lambda ctxt, msg: None)
    conn.consume_in_thread()
    rt = client._runtime()
    server = rt.server

    def unreachable(*args, **kwargs):
        raise DiscoveryUnavailable("discovery is down")
    rt.backend.unregister = unreachable
    client.cleanup()
    assert server.closed and rt.context.closed


def test_an_advertised_address_nobody_can_dial_leaves_nothing_bound(client):
    client.init(rpc_zmq_ipc_dir=client._options.rpc_zmq_ipc_dir, rpc_zmq_host="client",
                rpc_zmq_advertise_address="not a host")
    conn = client.create_connection()
    for _ in range(2):                  # refused each time, and nothing left behind
        with pytest.raises(ValueError, match="rpc_zmq_advertise_address"):
            conn.create_consumer("never-served", lambda ctxt, msg: None)
        assert client._runtime().server is None and sockets_open() == 0


def test_usable_again_after_cleanup(services, client):
    assert client.call(CTX, "svc", {"method": "echo", "args": {"value": 1}}) == 1
    client.cleanup()
    client.cleanup()                        # idempotent
    assert client.call(CTX, "svc", {"method": "echo", "args": {"value": 2}}) == 2


def test_a_process_serves_and_calls_itself(client):
    conn = client.create_connection()

    class Api:
        def double(self, ctxt, x):
            return 2 * x

    conn.create_consumer("self-served", Api())
    conn.consume_in_thread()
    assert [client.call(CTX, "self-served", {"method": "double", "args": {"x": i}})
            for i in range(5)] == [0, 2, 4, 6, 8]
    assert client.stats()["connections"][0]["handled"] == 5


def test_the_call_timeout_bounds_the_wait_for_a_connection(tmp_path, client):
    """Nobody listens where the ring points: a call with timeout=1 ends at
    its timeout, not at the longer rpc_zmq_connect_timeout."""
    ring = tmp_path / "ring.json"
    ring.write_text('{"gone": ["127.0.0.1:%d"]}' % free_port())
    client.init(rpc_zmq_host="client", rpc_zmq_matchmaker="ring",
                matchmaker_ringfile=str(ring), rpc_zmq_connect_timeout=5)
    start = time.monotonic()
    with pytest.raises(client.Timeout):
        client.call(CTX, "gone", {"method": "x"}, timeout=1)
    assert 0.9 < time.monotonic() - start < 1.1 * 1 + 0.5


@pytest.mark.parametrize("model", ["threads", "eventlet", "asyncio"])
def test_cleanup_while_other_threads_wait_in_calls(services, ipc_dir, model):
    """cleanup() from one thread while three others wait in calls (green
    threads under eventlet; also what atexit does to daemon threads): calls
    that end within the linger return their result, the others raise
    TransportClosed when cleanup() ends them; nothing crashes or hangs."""
    def run(seconds, linger):
        done = subprocess.run(
            [sys.executable, "-m", "tests.helpers.cleanup_race", model, str(ipc_dir),
             str(seconds), str(linger)],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    finished = run(seconds=0.5, linger=5)
    assert len(finished["outcomes"]) == 3, finished
    assert set(finished["outcomes"]) <= {"h1", "h2"}, finished     # each call's result
    assert finished["lost"] == {}, finished
    cut = run(seconds=20, linger=0.5)
    assert cut["outcomes"] == ["TransportClosed"] * 3, cut
    assert cut["took"] < 10, cut            # (the calls would have taken 20 s)
