"""The Nova RPC API across processes: two services (h1, h2) on the embedded
discovery, and this test process as the client."""
import os
import signal
import threading
import time
import uuid

import pytest

from tests.conftest import ServiceProcess, wait_until
from tests.helpers.errors import CustomError

CTX = {"user_id": "u-1", "project_id": "p-1", "request_id": "req-1"}


def msg(method, **args):
    return {"method": method, "args": args}


def unique():
    return uuid.uuid4().hex


def total(rpc, key, hosts=("h1", "h2")):
    return sum(rpc.call(CTX, f"svc.{h}", msg("count", key=key)) for h in hosts)


def test_call_returns_the_result(services, client):
    assert client.call(CTX, "svc", msg("add", a=2, b=3)) == 5
    assert client.call(CTX, "svc", msg("echo", value={"nested": [1, "x", None]})) == \
        {"nested": [1, "x", None]}


def test_server_gets_the_context_with_attributes_and_to_dict(services, client):
    class Ctx:
        def to_dict(self):
            return dict(CTX)

    for context in (CTX, Ctx()):
        seen = client.call(context, "svc", msg("context"))
        assert seen == {"values": CTX, "user_id": "u-1"}


def test_calls_spread_over_every_live_consumer(services, client):
    hosts = [client.call(CTX, "svc", msg("whoami")) for _ in range(20)]
    assert set(hosts) == {"h1", "h2"}
    assert abs(hosts.count("h1") - hosts.count("h2")) <= 2


def test_topic_dot_host_reaches_that_host_only(services, client):
    for host in ("h1", "h2"):
        topic = client.queue_get_for(CTX, "svc", host)
        assert topic == f"svc.{host}"
        assert {client.call(CTX, topic, msg("whoami")) for _ in range(10)} == {host}


def test_multicall_delivers_each_value_as_it_is_produced(services, client):
    delay = 0.4
    start = time.monotonic()
    arrivals = []
    values = []
    for value in client.multicall(CTX, "svc.h1", msg("stream", n=3, delay=delay), timeout=10):
        arrivals.append(time.monotonic() - start)
        values.append(value["i"])
    ended = time.monotonic() - start
    assert values == [0, 1, 2]
    # The first value arrived before the method had produced the others...
    assert arrivals[0] < arrivals[2] - 1.5 * delay
    # ...and the stream ended at the server's explicit end, not a timeout.
    assert ended - arrivals[2] < 1.0


def test_multicall_of_a_plain_method_yields_its_one_value(services, client):
    assert list(client.multicall(CTX, "svc", msg("add", a=1, b=1))) == [2]


def test_call_of_a_generator_returns_its_last_value(services, client):
    assert client.call(CTX, "svc", msg("stream", n=3, delay=0))["i"] == 2


def test_remote_builtin_exception_is_reraised_as_its_type(services, client):
    with pytest.raises(ValueError, match="bad value"):
        client.call(CTX, "svc", msg("fail", kind="value", text="bad value"))
    with pytest.raises(KeyError):
        client.call(CTX, "svc", msg("fail", kind="key", text="k"))


def test_remote_exception_from_an_allowed_module(services, client):
    with pytest.raises(CustomError, match="custom text") as info:
        client.call(CTX, "svc", msg("fail", kind="custom", text="custom text"))
    assert "Traceback" in info.value.remote_traceback


def test_remote_exception_from_another_module_is_a_remote_error(services, client):
    client.init(rpc_zmq_ipc_dir=client._options.rpc_zmq_ipc_dir, rpc_zmq_host="client")
    with pytest.raises(client.RemoteError) as info:
        client.call(CTX, "svc", msg("fail", kind="custom", text="custom text"))
    assert info.value.exc_type == "CustomError"
    assert info.value.value == "custom text"
    assert "CustomError" in info.value.traceback


def test_error_in_the_middle_of_a_stream(services, client):
    stream = client.multicall(CTX, "svc", msg("stream_then_fail"))
    assert next(stream) == 1
    with pytest.raises(ValueError, match="stream broke"):
        next(stream)


def test_unknown_method_is_an_attribute_error(services, client):
    with pytest.raises(AttributeError, match="nope"):
        client.call(CTX, "svc", msg("nope"))
    with pytest.raises(AttributeError):
        client.call(CTX, "svc", msg("_private"))


def test_result_that_cannot_be_encoded_is_a_clear_error(services, client):
    with pytest.raises(client.SerializationError):
        client.call(CTX, "svc", msg("unencodable"))


def test_version_rules(services, client):
    call = client.call
    assert call(CTX, "svc", {"method": "add", "args": {"a": 1, "b": 1}}) == 2     # 1.0
    assert call(CTX, "svc", {"method": "add", "args": {"a": 1, "b": 1},
                             "version": "1.3"}) == 2
    with pytest.raises(client.UnsupportedRpcVersion):
        call(CTX, "svc", {"method": "add", "args": {"a": 1, "b": 1}, "version": "1.4"})
    with pytest.raises(client.UnsupportedRpcVersion):
        call(CTX, "svc", {"method": "add", "args": {"a": 1, "b": 1}, "version": "2.0"})
    assert call(CTX, "svc", {"method": "describe", "version": "2.0",
                             "namespace": "v2"}) == "v2"
    with pytest.raises(client.UnsupportedRpcVersion):
        call(CTX, "svc", {"method": "describe", "version": "1.0", "namespace": "v2"})


def test_call_times_out_on_a_slow_server(services, client):
    start = time.monotonic()
    with pytest.raises(client.Timeout) as info:
        client.call(CTX, "svc.h1", msg("sleep", seconds=3), timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.45 <= elapsed < 1.5
    assert info.value.topic == "svc.h1" and info.value.method == "sleep"
    # The late reply is dropped, not mistaken for the next call's.
    assert client.call(CTX, "svc.h1", msg("echo", value=1), timeout=10) == 1


def test_call_with_no_live_consumer_fails_fast(services, client):
    start = time.monotonic()
    with pytest.raises(client.NoListeners) as info:
        client.call(CTX, "nobody-listens", msg("echo", value=1), timeout=30)
    assert time.monotonic() - start < 1.0
    assert isinstance(info.value, client.Timeout)
    with pytest.raises(client.NoListeners):
        client.cast(CTX, "nobody-listens", msg("echo", value=1))


def test_cast_is_delivered_exactly_once(services, client):
    key = unique()
    for i in range(50):
        client.cast(CTX, "svc", msg("record", key=key, value=i))
    assert wait_until(lambda: total(client, key) == 50, 10)
    time.sleep(0.2)
    got = (client.call(CTX, "svc.h1", msg("records_for", key=key)) +
           client.call(CTX, "svc.h2", msg("records_for", key=key)))
    assert sorted(got) == list(range(50))


def test_fanout_reaches_each_consumer_once(services, client):
    key = unique()
    client.fanout_cast(CTX, "svc", msg("record", key=key, value="hello"))
    for host in ("h1", "h2"):
        assert wait_until(lambda: client.call(
            CTX, f"svc.{host}", msg("count", key="fanout:" + key)), 10) == 1
    time.sleep(0.2)
    for host in ("h1", "h2"):
        assert client.call(CTX, f"svc.{host}", msg("records_for", key="fanout:" + key)) \
            == ["hello"]
    assert total(client, key) == 0          # fanout did not reach direct consumers


def test_fanout_with_no_consumer_sends_nothing(services, client):
    client.fanout_cast(CTX, "nobody-listens", msg("record", key="x", value=1))
    assert client.stats()["client"]["fanouts"] == 1


def test_no_cast_is_lost_under_load(services, client):
    key = unique()
    n = 20000
    for i in range(n):
        client.cast(CTX, "svc", msg("record", key=key, value=i))
    assert wait_until(lambda: total(client, key) == n, 60, 0.1), total(client, key)


def test_casts_to_one_host_survive_backpressure(services, ipc_dir):
    """A tiny send queue and a slow consumer: casts block the sender instead
    of being dropped."""
    from nova_zmq_fast import rpc
    rpc.init(rpc_zmq_ipc_dir=str(ipc_dir), rpc_zmq_host="client", rpc_cast_timeout=20)
    try:
        key = unique()
        for i in range(300):
            rpc.cast(CTX, "svc.h2", msg("slow_record", key=key, value=i, seconds=0.002))
        assert wait_until(lambda: rpc.call(CTX, "svc.h2", msg("count", key=key)) == 300,
                          30, 0.1)
    finally:
        rpc.cleanup()
        rpc.init()


def test_slow_method_does_not_block_other_calls(services, client):
    result = {}
    slow = threading.Thread(target=lambda: result.setdefault(
        "slow", client.call(CTX, "svc.h1", msg("sleep", seconds=2), timeout=10)))
    slow.start()
    try:
        time.sleep(0.2)
        start = time.monotonic()
        for _ in range(5):
            assert client.call(CTX, "svc.h1", msg("echo", value=7), timeout=10) == 7
        assert time.monotonic() - start < 1.0
    finally:
        slow.join(15)
    assert result == {"slow": "h1"}


def test_several_slow_methods_run_concurrently(services, client):
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        client.call(CTX, "svc.h2", msg("sleep", seconds=1), timeout=10))) for _ in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert results == ["h2"] * 4
    assert time.monotonic() - start < 3.0


def test_call_and_cast_are_safe_from_many_threads(services, client):
    errors = []
    key = unique()

    def work(tid):
        try:
            for i in range(40):
                value = f"{tid}-{i}"
                assert client.call(CTX, "svc", msg("echo", value=value)) == value
                client.cast(CTX, "svc", msg("record", key=key, value=value))
        except Exception as exc:        # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert wait_until(lambda: total(client, key) == 12 * 40, 10)


def test_a_forked_child_gets_fresh_sockets(services, client):
    assert client.call(CTX, "svc", msg("echo", value="parent")) == "parent"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child
        code = 1
        try:
            os.close(read)
            value = client.call(CTX, "svc", msg("echo", value="child"), timeout=10)
            os.write(write, value.encode())
            client.cleanup()
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        assert f.read() == "child"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert client.call(CTX, "svc", msg("echo", value="parent again")) == "parent again"


def test_a_forked_child_gets_a_shared_runtime_of_its_own(services, ipc_dir):
    """oslo.messaging workers fork after the parent opened its transport:
    the child's transport must not reuse the parent's runtime (its context
    belongs to the parent)."""
    from nova_zmq_fast.options import Options
    from nova_zmq_fast.runtime import Runtime
    opts = Options.from_conf(rpc_zmq_ipc_dir=str(ipc_dir), rpc_zmq_host="forking", rpc_zmq_linger=2)
    parent = Runtime.shared(opts)
    try:
        assert parent.client.call(CTX, "svc", msg("echo", value="parent")) == "parent"
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # child
            code = 1
            try:
                os.close(read)
                child = Runtime.shared(opts)
                value = child.client.call(CTX, "svc", msg("echo", value="child"), timeout=10)
                os.write(write, f"{child is parent} {value}".encode())
                child.close()
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read) as f:
            assert f.read() == "False child"
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        parent.close()


def test_notify_reaches_a_raw_consumer(services, client):
    key = unique()
    event = {"event_type": "compute.start", "payload": {"key": key}, "priority": "INFO"}
    assert client.notify(CTX, "svc-raw", event) is True
    assert client.notify(CTX, "svc-raw", event, envelope=True) is True

    def received():
        return [m for h in ("h1", "h2")
                for m in client.call(CTX, f"svc.{h}", msg("records_for", key="raw"))
                if m.get("payload", {}).get("key") == key]
    assert wait_until(lambda: len(received()) == 2, 10)
    assert received() == [event, event]


def test_notify_with_no_consumer_is_dropped_and_counted(services, client):
    assert client.notify(CTX, "nobody-listens", {"event_type": "x"}) is False
    assert client.stats()["client"]["notifications_dropped"] == 1


def test_cast_to_server_bypasses_discovery(services, client):
    key = unique()
    address = services["h2"].address
    client.cast_to_server(CTX, {"address": address}, "svc", msg("record", key=key, value=1))
    host, port = address.rsplit(":", 1)
    client.cast_to_server(CTX, {"host": host.split("//")[1], "port": int(port)}, "svc",
                          msg("record", key=key, value=2))
    client.fanout_cast_to_server(CTX, {"address": address}, "svc",
                                 msg("record", key=key, value=3))
    assert wait_until(lambda: client.call(CTX, "svc.h2", msg("count", key=key)) == 2, 10)
    assert client.call(CTX, "svc.h2", msg("count", key="fanout:" + key)) == 1
    assert client.call(CTX, "svc.h1", msg("count", key=key)) == 0


def test_server_side_counters(services, client):
    stats = client.call(CTX, "svc.h1", msg("stats"))
    assert stats["handled"] > 0 and stats["replies"] > 0
    assert stats["topics"] == ["svc", "svc (fanout)", "svc-raw"]


def test_killed_server_is_no_longer_chosen(ipc_dir, client):
    a = ServiceProcess("k1", ipc_dir, topic="mortal")
    b = ServiceProcess("k2", ipc_dir, topic="mortal")
    try:
        hosts = {client.call(CTX, "mortal", msg("whoami")) for _ in range(10)}
        assert hosts == {"k1", "k2"}
        a.kill()                                    # SIGKILL: no goodbye
        killed_at = time.monotonic()

        def only_k2():
            seen = set()
            for _ in range(6):
                try:
                    seen.add(client.call(CTX, "mortal", msg("whoami"), timeout=0.3))
                except client.Timeout:
                    seen.add("lost")
            return seen == {"k2"}
        assert wait_until(only_k2, 8, 0.1)
        assert time.monotonic() - killed_at < 5 + 2     # 5 s, plus this loop's own calls
        with pytest.raises(client.NoListeners):
            client.call(CTX, "mortal.k1", msg("whoami"), timeout=5)
    finally:
        a.kill()
        assert b.stop() == 0


def test_closed_connection_is_withdrawn(ipc_dir, client):
    conn = client.create_connection()

    class Api:
        def hello(self, ctxt):
            return "hi"

    conn.create_consumer("ephemeral", Api())
    with pytest.raises(client.NoListeners):          # not consuming yet
        client.call(CTX, "ephemeral", msg("hello"))
    conn.consume_in_thread()
    assert client.call(CTX, "ephemeral", msg("hello")) == "hi"
    conn.close()
    with pytest.raises(client.NoListeners):
        client.call(CTX, "ephemeral", msg("hello"))
    with pytest.raises(client.RPCException):
        conn.create_consumer("ephemeral", Api())


def test_wait_returns_when_closed_from_another_thread(ipc_dir, client):
    conn = client.create_connection()
    conn.create_consumer("waiter", lambda ctxt, m: None)
    conn.consume_in_thread()
    threading.Timer(0.3, conn.close).start()
    start = time.monotonic()
    conn.wait()
    assert time.monotonic() - start < 5


def test_wait_returns_when_a_signal_handler_closes_the_connection(ipc_dir, client):
    # The way a service stops on SIGTERM: the handler runs on the thread
    # that waits.
    conn = client.create_connection()
    conn.create_consumer("waiter-signal", lambda ctxt, m: None)
    conn.consume_in_thread()
    old = signal.signal(signal.SIGALRM, lambda *_: conn.close())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        conn.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    with pytest.raises(client.NoListeners):
        client.call(CTX, "waiter-signal", msg("anything"))


def test_shared_connection(ipc_dir, client):
    assert client.create_connection(new=False) is client.create_connection(new=False)
    assert client.create_connection() is not client.create_connection(new=False)


def test_ping_reaches_each_consumer_and_names_it(services, client):
    answers = client.ping("svc", timeout=5)
    assert sorted(a["host"] for a in answers) == ["h1", "h2"]
    for a in answers:
        assert a["address"] == services[a["host"]].address
        assert a["envelope"] == 1 and a["rtt"] > 0 and isinstance(a["pid"], int)
    assert [a["host"] for a in client.ping("svc.h2")] == ["h2"]
    with pytest.raises(client.NoListeners):
        client.ping("nobody-listens")


def test_ping_checks_the_api_version(services, client):
    assert all("error" not in a for a in client.ping("svc.h1", version="1.3"))
    [refused] = client.ping("svc.h1", version="1.4")
    assert isinstance(refused["error"], client.UnsupportedRpcVersion)
    [other] = client.ping("svc.h1", version="2.0", namespace="v2")
    assert "error" not in other


def test_ping_of_a_server_that_does_not_serve_the_topic(services, client):
    from nova_zmq_fast._routes import Endpoint
    rt = client._runtime()
    with pytest.raises(client.NoListeners, match="not served"):
        rt.client.ping(Endpoint("h1", services["h1"].address), "elsewhere", timeout=5)
