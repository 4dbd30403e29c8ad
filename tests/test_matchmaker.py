"""Discovery: the embedded registry and the ring file."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from nova_zmq_fast import matchmaker
from nova_zmq_fast.matchmaker.local import LocalMatchMaker
from nova_zmq_fast.matchmaker.ring import RingMatchMaker, parse_entry
from nova_zmq_fast.options import Options
from tests.conftest import ROOT, ServiceProcess, wait_until


def local(tmp_path, **kw):
    return LocalMatchMaker(Options.from_conf(rpc_zmq_ipc_dir=str(tmp_path), **kw))


def addresses(endpoints):
    return [ep.address for ep in endpoints]


def test_register_lookup_unregister(tmp_path):
    mm = local(tmp_path)
    other = local(tmp_path)
    try:
        mm.register("compute", "h1", "tcp://127.0.0.1:1001")
        mm.register("compute", "h1", "tcp://127.0.0.1:1001", fanout=True)
        mm.register("compute", "h2", "tcp://127.0.0.1:1002")
        assert addresses(other.lookup("compute")) == ["tcp://127.0.0.1:1001",
                                                      "tcp://127.0.0.1:1002"]
        assert addresses(other.lookup_fanout("compute")) == ["tcp://127.0.0.1:1001"]
        assert addresses(other.lookup("compute.h2")) == ["tcp://127.0.0.1:1002"]
        assert other.lookup("compute.h3") == ()
        assert other.lookup("scheduler") == ()
        mm.unregister("compute", "h2", "tcp://127.0.0.1:1002")
        other.invalidate()
        assert addresses(other.lookup("compute")) == ["tcp://127.0.0.1:1001"]
    finally:
        mm.close()
        other.close()
    assert os.listdir(os.path.join(tmp_path, "nova_zmq_fast-registry", "nodes")) == []


def test_explicit_topic_with_a_dot_wins_over_the_host_rule(tmp_path):
    mm = local(tmp_path)
    try:
        mm.register("notifications.info", "h9", "tcp://127.0.0.1:1009")
        mm.register("notifications", "info", "tcp://127.0.0.1:1010")
        assert addresses(mm.lookup("notifications.info")) == ["tcp://127.0.0.1:1009"]
    finally:
        mm.close()


def test_lookups_are_cached_but_nobody_is_never_cached(tmp_path):
    mm = local(tmp_path)
    other = local(tmp_path)
    try:
        assert other.lookup("late") == ()
        mm.register("late", "h1", "tcp://127.0.0.1:1001")
        assert len(other.lookup("late")) == 1           # found at once
        mm.register("late", "h2", "tcp://127.0.0.1:1002")
        assert len(other.lookup("late")) == 1           # cached...
        assert wait_until(lambda: len(other.lookup("late")) == 2,
                          matchmaker.CACHE_TTL + 1)     # ...for CACHE_TTL only
    finally:
        mm.close()
        other.close()


REGISTER_AND_SLEEP = """
import sys, time
from nova_zmq_fast.matchmaker.local import LocalMatchMaker
from nova_zmq_fast.options import Options
mm = LocalMatchMaker(Options.from_conf(rpc_zmq_ipc_dir=sys.argv[1]))
mm.register("doomed", "victim", "tcp://127.0.0.1:1099")
print("registered", flush=True)
time.sleep(60)
"""


def test_a_dead_process_is_dropped_and_forgotten(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", REGISTER_AND_SLEEP, str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    mm = local(tmp_path)
    try:
        assert proc.stdout.readline().strip() == "registered"
        assert addresses(mm.lookup("doomed")) == ["tcp://127.0.0.1:1099"]
        count = mm.forgotten_count
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_until(lambda: mm.lookup("doomed") == (), matchmaker.CACHE_TTL + 1)
        assert "tcp://127.0.0.1:1099" in mm.forgotten
        assert mm.forgotten_count == count + 1
        registry = os.path.join(tmp_path, "nova_zmq_fast-registry")
        assert os.listdir(os.path.join(registry, "nodes")) == []
        assert os.listdir(os.path.join(registry, "topics", "doomed", "direct")) == []
        mm.register("doomed", "again", "tcp://127.0.0.1:1099")   # same port reused
        assert "tcp://127.0.0.1:1099" not in mm.forgotten
    finally:
        proc.kill()
        proc.stdout.close()
        mm.close()


def test_a_forked_child_does_not_keep_the_parents_nodes_alive(tmp_path):
    mm = local(tmp_path)
    mm.register("parental", "p", "tcp://127.0.0.1:1200")
    pid = os.fork()
    if pid == 0:
        # The child holds no lock of the parent's: it dropped its copies.
        code = 0 if not mm._own else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert addresses(mm.lookup("parental")) == ["tcp://127.0.0.1:1200"]
    mm.close()


def test_advertise_and_ipc_dir_fallback(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    opts = Options.from_conf(rpc_zmq_ipc_dir=str(blocked / "sub"))
    assert opts.ipc_dir() != str(blocked / "sub")
    assert os.path.isdir(opts.ipc_dir())


# -- ring ---------------------------------------------------------------------

def ring(tmp_path, data, **kw):
    path = tmp_path / "ring.json"
    path.write_text(json.dumps(data))
    return RingMatchMaker(Options.from_conf(rpc_zmq_matchmaker="ring",
                                            matchmaker_ringfile=str(path), **kw)), path


def test_ring_entries():
    assert parse_entry("host1", 9501).address == "tcp://host1:9501"
    assert parse_entry("host1:9600", 9501).address == "tcp://host1:9600"
    assert parse_entry("[::1]:9600", 9501).address == "tcp://[::1]:9600"
    assert parse_entry("::1", 9501).address == "tcp://[::1]:9501"
    for bad in ("", "h:x", "h:0", "h:70000", 5, None):
        with pytest.raises(ValueError):
            parse_entry(bad, 9501)


def test_ring_lookups(tmp_path):
    mm, _ = ring(tmp_path, {"compute": ["h1", "h2:9600"], "sched": ["h3"]})
    assert addresses(mm.lookup("compute")) == ["tcp://h1:9501", "tcp://h2:9600"]
    assert addresses(mm.lookup_fanout("compute")) == ["tcp://h1:9501", "tcp://h2:9600"]
    assert addresses(mm.lookup("compute.h2")) == ["tcp://h2:9600"]
    assert addresses(mm.lookup("compute.h7")) == ["tcp://h7:9501"]   # straight to the host
    assert mm.lookup("unknown") == ()


def test_ring_is_reloaded_when_it_changes(tmp_path):
    mm, path = ring(tmp_path, {"compute": ["h1"]})
    assert addresses(mm.lookup("compute")) == ["tcp://h1:9501"]
    path.write_text(json.dumps({"compute": ["h1", "h2"]}))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert wait_until(lambda: len(mm.lookup("compute")) == 2, matchmaker.CACHE_TTL + 1)


@pytest.mark.parametrize("content", ['["h1"]', '{"compute": "h1"}', '{"compute": ["h:x"]}',
                                     "not json"])
def test_bad_ring_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "ring.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        RingMatchMaker(Options.from_conf(rpc_zmq_matchmaker="ring",
                                         matchmaker_ringfile=str(path)))


def test_missing_ring_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        RingMatchMaker(Options.from_conf(rpc_zmq_matchmaker="ring",
                                         matchmaker_ringfile=str(tmp_path / "none.json")))


def free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_ring_end_to_end_across_processes(tmp_path, client):
    """Two servers on two loopback addresses, found through a ring file."""
    hosts = ["127.0.0.2", "127.0.0.3"]
    port = free_port("127.0.0.2")
    path = tmp_path / "ring.json"
    path.write_text(json.dumps({"svc": [f"{h}:{port}" for h in hosts]}))
    common = {"rpc_zmq_matchmaker": "ring", "matchmaker_ringfile": str(path),
              "rpc_zmq_port": port}
    servers = [ServiceProcess(h, tmp_path, options=dict(common, rpc_zmq_bind_address=h))
               for h in hosts]
    try:
        client.init(rpc_zmq_host="client", **common)
        seen = [client.call({}, "svc", {"method": "whoami"}, timeout=10) for _ in range(6)]
        assert sorted(set(seen)) == hosts
        assert {client.call({}, "svc.127.0.0.3", {"method": "whoami"}) for _ in range(4)} \
            == {"127.0.0.3"}
        client.fanout_cast({}, "svc", {"method": "record", "args": {"key": "r", "value": 1}})
        for h in hosts:
            assert wait_until(lambda: client.call(
                {}, f"svc.{h}", {"method": "count", "args": {"key": "fanout:r"}}) == 1, 10)
    finally:
        codes = [s.stop() for s in servers]
    assert codes == [0, 0]


def test_topics_by_prefix(tmp_path):
    mm = local(tmp_path)
    other = local(tmp_path)
    try:
        assert other.topics("ex:notifications.info%") == ()
        mm.register("ex:notifications.info%", "h1", "tcp://127.0.0.1:1001")
        mm.register("ex:notifications.info%billing", "h1", "tcp://127.0.0.1:1001")
        mm.register("ex:notifications.error%", "h1", "tcp://127.0.0.1:1001")
        assert other.topics("ex:notifications.info%") == ("ex:notifications.info%",
                                                          "ex:notifications.info%billing")
    finally:
        mm.close()
        other.close()
    ring_mm, _ = ring(tmp_path, {"a.x": ["h"], "a.y": ["h"], "b": ["h"]})
    assert ring_mm.topics("a.") == ("a.x", "a.y")


def test_fanout_skips_an_unreachable_server_and_reaches_the_others(tmp_path, client):
    """The ring lists a server that is not running: a fanout still reaches
    the live one, and counts the other instead of failing."""
    live_port, dead_port = free_port("127.0.0.2"), free_port("127.0.0.3")
    path = tmp_path / "ring.json"
    path.write_text(json.dumps({"svc": [f"127.0.0.2:{live_port}",
                                        f"127.0.0.3:{dead_port}"]}))
    common = {"rpc_zmq_matchmaker": "ring", "matchmaker_ringfile": str(path)}
    server = ServiceProcess("127.0.0.2", tmp_path, options=dict(
        common, rpc_zmq_bind_address="127.0.0.2", rpc_zmq_port=live_port))
    try:
        client.init(rpc_zmq_host="client", rpc_zmq_connect_timeout=0.3, **common)
        msg = {"method": "record", "args": {"key": "k", "value": 1}}
        start = time.monotonic()
        client.fanout_cast({}, "svc", msg)
        assert time.monotonic() - start < 2.0
        client.fanout_cast({}, "svc", msg)          # the dead one is skipped at once
        assert wait_until(lambda: client.call(
            {}, "svc.127.0.0.2", {"method": "count", "args": {"key": "fanout:k"}}) == 2, 10)
        assert client.stats()["client"]["fanout_unreachable"] == 1
    finally:
        assert server.stop() == 0
