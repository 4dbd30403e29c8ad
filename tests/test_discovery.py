"""Discovery: the route table, the 'topic.host' rule, the backend interface,
and the embedded registry and ring file backends (Redis: test_redis.py)."""
import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nova_zmq_fast import matchmaker, rpc
from nova_zmq_fast._routes import Endpoint, RouteTable, host_candidates
from nova_zmq_fast.matchmaker.local import LocalBackend
from nova_zmq_fast.matchmaker.ring import RingBackend, parse_entry
from nova_zmq_fast.options import Options
from tests.conftest import ROOT, ServiceProcess, free_port, stop_all, wait_until


def local(tmp_path, **kw):
    backend = LocalBackend(Options.from_conf(rpc_zmq_ipc_dir=str(tmp_path), **kw))
    return RouteTable(backend), backend


def addresses(endpoints):
    return [ep.address for ep in endpoints]


def node(host, port):
    return Endpoint(host, f"tcp://127.0.0.1:{port}")


@pytest.fixture
def tables(tmp_path):
    """Two processes' worth of discovery on one registry; closed after."""
    made = []

    def make(**kw):
        made.append(local(tmp_path, **kw))
        return made[-1]
    yield make
    for routes, backend in made:
        routes.close()
        backend.close()


# -- the 'topic.host' rule ------------------------------------------------------

def test_host_candidates_allow_dots_in_host_names():
    assert host_candidates("compute") == []
    assert host_candidates("compute.node7") == [("compute", "node7")]
    assert host_candidates("compute.node7.example.com") == [
        ("compute", "node7.example.com"), ("compute.node7", "example.com"),
        ("compute.node7.example", "com")]
    assert host_candidates("compute.10.0.0.13")[0] == ("compute", "10.0.0.13")
    # oslo.messaging's server names split at the '@' only.
    assert host_candidates("openstack:compute@10.0.0.13") == [("openstack:compute", "10.0.0.13")]
    assert host_candidates("a.") == [] and host_candidates(".a") == []


def test_topic_host_with_dotted_host_names(tables):
    routes, server = tables()
    server.register(node("node7.example.com", 1007), "compute")
    server.register(node("10.0.0.13", 1013), "compute")
    assert addresses(routes.route("compute.node7.example.com")) == ["tcp://127.0.0.1:1007"]
    assert addresses(routes.route("compute.10.0.0.13")) == ["tcp://127.0.0.1:1013"]
    assert routes.route("compute.0.0.13") == ()


def test_explicit_topic_with_a_dot_wins_over_the_host_rule(tables):
    routes, server = tables()
    server.register(node("h9", 1009), "notifications.info")
    server.register(node("info", 1010), "notifications")
    assert addresses(routes.route("notifications.info")) == ["tcp://127.0.0.1:1009"]


def test_a_server_answers_topic_host_for_a_dotted_host_name(ipc_dir, client):
    """The server's side of the rule: a process whose rpc_zmq_host is an
    FQDN serves 'topic.<fqdn>' and 'topic@<fqdn>'."""
    svc = ServiceProcess("node7.example.com", ipc_dir, topic="dotted")
    try:
        assert client.call({}, "dotted.node7.example.com", {"method": "whoami"}) == \
            "node7.example.com"
        assert client.cast_to_server(
            {}, {"address": svc.address}, "dotted@node7.example.com",
            {"method": "record", "args": {"key": "at", "value": 1}}) is None
        assert wait_until(lambda: client.call(
            {}, "dotted.node7.example.com", {"method": "count", "args": {"key": "at"}}), 10) == 1
    finally:
        assert svc.stop() == 0


# -- the route table and the embedded registry -----------------------------------

def test_register_lookup_unregister(tables, tmp_path):
    routes, server = tables()
    other, _ = tables()
    server.register(node("h1", 1001), "compute")
    server.register(node("h1", 1001), "compute", fanout=True)
    server.register(node("h2", 1002), "compute")
    assert addresses(other.route("compute")) == ["tcp://127.0.0.1:1001", "tcp://127.0.0.1:1002"]
    assert addresses(other.route("compute", fanout=True)) == ["tcp://127.0.0.1:1001"]
    assert addresses(other.route("compute.h2")) == ["tcp://127.0.0.1:1002"]
    assert other.route("compute.h3") == ()
    assert other.route("scheduler") == ()
    server.unregister(node("h2", 1002), "compute")
    other.invalidate()
    assert addresses(other.route("compute")) == ["tcp://127.0.0.1:1001"]
    server.close()
    assert os.listdir(os.path.join(tmp_path, "nova_zmq_fast-registry", "nodes")) == []


def test_routes_are_cached_and_refreshed_but_nobody_is_never_cached(tables):
    routes, server = tables()
    other, _ = tables()
    assert other.route("late") == ()
    server.register(node("h1", 1001), "late")
    assert len(other.route("late")) == 1                # found at once
    server.register(node("h2", 1002), "late")
    assert len(other.route("late")) == 1                # cached...
    other.refresh()                                     # ...until the next pass (the courier's)
    assert len(other.route("late")) == 2
    other.refresh()                                     # used since: kept
    assert "late" in other.topics("la") and len(other.route("late")) == 2
    other.refresh()
    other.refresh()                                     # unused for a pass: dropped, fetched anew
    server.unregister(node("h2", 1002), "late")
    assert len(other.route("late")) == 1


def test_a_backend_answer_must_be_endpoints(tmp_path):
    class Broken(LocalBackend):
        def fetch(self, topic, fanout):
            return ["tcp://127.0.0.1:1"]
    backend = Broken(Options.from_conf(rpc_zmq_ipc_dir=str(tmp_path)))
    routes = RouteTable(backend)
    with pytest.raises(TypeError, match="not an Endpoint"):
        routes.route("t")
    routes.close()


@pytest.mark.parametrize("address", [
    "tcp://127.0.0.1:notaport", "tcp://127.0.0.1", "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536",
    "tcp://:9501", "tcp://host name:9501", "tcp://-host:9501", "tcp://a;b:9501", "tcp://*:9501",
    "tcp://h\u00f6st:9501", "udp://127.0.0.1:9501", "ipc:///tmp/x", "127.0.0.1:9501", ""])
def test_an_endpoint_is_an_address_peers_can_dial(address):
    """One rule, where endpoints are built: what zmq_connect() would refuse
    never reaches the sending path (it would raise there, not skip)."""
    with pytest.raises(ValueError, match="not an address peers can dial"):
        Endpoint("h", address)


def test_endpoints_peers_can_dial():
    for address in ("tcp://127.0.0.1:1", "tcp://[::1]:9501", "tcp://compute-7.example.com:65535",
                    "tcp://[fe80::1%eth0]:9501", "tcp://node_7:9501"):
        assert Endpoint("h", address).address == address
    with pytest.raises(TypeError):
        Endpoint.__new__(Endpoint)                  # no unchecked Endpoint either


@contextlib.contextmanager
def undiallable_node(ipc_dir, topic):
    """A live node of the embedded registry (its lock is held, here) that
    consumes `topic`, direct and fanout, at an address nobody can dial: a
    mistyped advertise address, an entry written by a broken peer."""
    registry = os.path.join(str(ipc_dir), "nova_zmq_fast-registry")
    node_id = f"undiallable-{os.getpid()}"
    path = os.path.join(registry, "nodes", node_id)
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    entries = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"host": "bad", "address": "tcp://127.0.0.1:notaport",
                                 "pid": os.getpid()}).encode())
        for kind in ("direct", "fanout"):
            directory = os.path.join(registry, "topics", topic, kind)
            os.makedirs(directory, exist_ok=True)
            entries.append(os.path.join(directory, node_id))
            os.close(os.open(entries[-1], os.O_CREAT | os.O_WRONLY, 0o644))
        yield path
    finally:
        for name in entries + [path]:
            os.unlink(name)
        os.close(fd)


def test_a_server_restarted_on_a_new_port_is_found_by_the_next_send(ipc_dir, client,
                                                                      monkeypatch):
    """A service restarts (a new process, a new port) while callers still
    hold its old address: the next cast and call ask discovery again as
    soon as they find nobody connected, and reach the new process, instead
    of waiting out the connect timeout on the old address and failing.
    (Routes are refreshed only every minute here, so only that can find it.)"""
    monkeypatch.setattr(LocalBackend, "refresh_interval", 60.0)
    first = ServiceProcess("phoenix", ipc_dir, topic="phoenix")
    try:
        assert client.call({}, "phoenix", {"method": "whoami"}) == "phoenix"
    finally:
        assert first.stop() == 0
    second = ServiceProcess("phoenix", ipc_dir, topic="phoenix")
    try:
        assert second.address != first.address
        client.cast({}, "phoenix", {"method": "record", "args": {"key": "again", "value": 1}})
        assert client.call({}, "phoenix", {"method": "records_for", "args": {"key": "again"}},
                           timeout=30) == [1]
        assert client.call({}, "phoenix.phoenix", {"method": "whoami"}, timeout=30) == "phoenix"
    finally:
        assert second.stop() == 0


def test_a_server_that_closes_cleanly_is_not_taken_for_a_silent_one(ipc_dir, client,
                                                                     caplog):
    """A process that withdrew from discovery and exited leaves its PINGs
    unanswered, as a frozen one would; but discovery no longer lists it,
    so its probe ends quietly instead of warning that it went silent."""
    tidy = ServiceProcess("tidy", ipc_dir, topic="tidy")
    try:
        assert client.call({}, "tidy", {"method": "whoami"}) == "tidy"
        assert wait_until(lambda: rpc.stats()["client"]["peers_probed"] >= 1, 10)
    finally:
        assert tidy.stop() == 0                 # withdraws, closes, exits
    with caplog.at_level(logging.WARNING, logger="nova_zmq_fast"):
        assert wait_until(lambda: rpc.stats()["client"]["peers_probed"] == 0, 20)
    assert not [r for r in caplog.records if "did not answer a probe" in r.getMessage()]


def test_a_server_whose_entry_peers_cannot_dial_is_passed_over(ipc_dir, client, caplog):
    """Calls, at-least-once casts and fanouts go to the consumers that can
    be dialled, as if the bad entry were not there (never a ZMQError, never
    a cast stuck behind it), and the entry is named in a warning, at a
    bounded rate."""
    caplog.set_level(logging.WARNING, logger="nova_zmq_fast")
    svc = ServiceProcess("dialled", ipc_dir, topic="mixed")
    try:
        with undiallable_node(ipc_dir, "mixed") as entry:
            assert [client.call({}, "mixed", {"method": "whoami"}) for _ in range(6)] == \
                ["dialled"] * 6
            for i in range(6):
                client.cast({}, "mixed", {"method": "record", "args": {"key": "alo", "value": i}},
                            at_least_once=True)
            client.fanout_cast({}, "mixed", {"method": "record", "args": {"key": "f", "value": 0}})
            assert wait_until(lambda: client.stats()["client"]["at_least_once_acked"] == 6, 10), \
                client.stats()["client"]
            assert sorted(client.call({}, "mixed", {"method": "records_for",
                                                    "args": {"key": "alo"}})) == list(range(6))
            assert wait_until(lambda: client.call({}, "mixed", {"method": "count",
                                                                "args": {"key": "fanout:f"}}), 10)
        warnings = [r.getMessage() for r in caplog.records if entry in r.getMessage()]
        # At most one per 10 s, however many lookups met it.
        assert 1 <= len(warnings) <= 2 and "passed over" in warnings[0], warnings
    finally:
        assert svc.stop() == 0


REGISTER_AND_SLEEP = """
import sys, time
from nova_zmq_fast._routes import Endpoint
from nova_zmq_fast.matchmaker.local import LocalBackend
from nova_zmq_fast.options import Options
backend = LocalBackend(Options.from_conf(rpc_zmq_ipc_dir=sys.argv[1]))
backend.register(Endpoint("victim", "tcp://127.0.0.1:1099"), "doomed")
print("registered", flush=True)
time.sleep(60)
"""


def test_a_dead_process_is_dropped_and_forgotten(tables, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", REGISTER_AND_SLEEP, str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    routes, backend = tables()
    try:
        assert proc.stdout.readline().strip() == "registered"
        assert addresses(routes.route("doomed")) == ["tcp://127.0.0.1:1099"]
        count = routes.dead_count
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        def gone():
            routes.refresh()
            return routes.route("doomed") == ()
        assert wait_until(gone, 10)
        assert "tcp://127.0.0.1:1099" in routes.forgotten()
        assert routes.dead_count == count + 1
        registry = os.path.join(tmp_path, "nova_zmq_fast-registry")
        assert os.listdir(os.path.join(registry, "nodes")) == []
        assert os.listdir(os.path.join(registry, "topics", "doomed", "direct")) == []
        backend.register(Endpoint("again", "tcp://127.0.0.1:1099"), "doomed")  # port reused
        assert addresses(routes.route("doomed")) == ["tcp://127.0.0.1:1099"]
        assert "tcp://127.0.0.1:1099" not in routes.forgotten()
    finally:
        proc.kill()
        proc.stdout.close()


@pytest.mark.parametrize("kind", ["local", "ring"])
def test_an_address_a_backend_lists_again_is_not_left_forgotten(kind, tables, tmp_path):
    """A server back at an address discovery once declared gone (a new
    process on the same port) is trusted again as soon as the backend
    lists it, whichever backend: the route table owns the rule.  (Redis:
    test_redis.py.)"""
    address = "tcp://127.0.0.1:1300"
    if kind == "local":
        routes, backend = tables()
        backend.register(node("back", 1300), "back")
    else:
        routes, _ = ring(tmp_path, {"back": ["127.0.0.1:1300"]})
    routes.forget(address)              # as when the earlier process there died
    assert addresses(routes.route("back")) == [address]
    assert address not in routes.forgotten()
    if kind == "ring":
        routes.close()


def test_a_forked_child_does_not_keep_the_parents_nodes_alive(tables):
    routes, backend = tables()
    backend.register(node("p", 1200), "parental")
    pid = os.fork()
    if pid == 0:
        # The child holds no lock of the parent's: it dropped its copies.
        code = 0 if not backend._own else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert addresses(routes.route("parental")) == ["tcp://127.0.0.1:1200"]


def test_ipc_dir_fallback(tmp_path):
    from nova_zmq_fast.matchmaker.local import ipc_dir
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert ipc_dir(str(blocked / "sub")) != str(blocked / "sub")
    assert os.path.isdir(ipc_dir(str(blocked / "sub")))


def test_a_registry_others_can_write_is_refused(tmp_path, monkeypatch):
    """Whoever can write the registry can publish an address (and a CURVE
    key) for any topic and receive its calls."""
    from nova_zmq_fast.matchmaker.local import REGISTRY
    shared = tmp_path / "shared"
    (shared / REGISTRY).mkdir(parents=True)
    os.chmod(shared / REGISTRY, 0o777)
    with pytest.raises(ValueError, match="writable by every user"):
        local(shared)
    # The per-user fallback in a shared directory, made first by someone
    # else (or with the wrong mode), is refused too.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    squatted = tmp_path / f"nova_zmq_fast-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    os.chmod(squatted, 0o777)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(ValueError, match="not a directory private to this user"):
        local(blocked / "sub")
    os.chmod(squatted, 0o700)
    routes, backend = local(blocked / "sub")
    try:
        assert backend.root.startswith(str(squatted))
    finally:
        routes.close()
        backend.close()


def test_a_lookup_makes_no_registry_and_finds_one_made_later(tmp_path):
    """A process that only looks up makes no directory: an absent registry
    has nothing registered.  Once a server has registered there, the same
    backend finds it."""
    where = tmp_path / "later" / "ipc"
    routes, reader = local(where)
    server_routes, server = local(where)
    try:
        assert routes.route("t") == () and reader.nodes() == []
        assert routes.topics("") == ()
        assert not (tmp_path / "later").exists()
        server.register(node("h1", 1401), "t")
        routes.invalidate("t")
        assert addresses(routes.route("t")) == ["tcp://127.0.0.1:1401"]
    finally:
        for table, backend in ((routes, reader), (server_routes, server)):
            table.close()
            backend.close()


def test_topics_by_prefix(tables, tmp_path):
    routes, server = tables()
    other, _ = tables()
    assert other.topics("ex:notifications.info%") == ()
    for topic in ("ex:notifications.info%", "ex:notifications.info%billing",
                  "ex:notifications.error%"):
        server.register(node("h1", 1001), topic)
    assert other.topics("ex:notifications.info%") == ("ex:notifications.info%",
                                                      "ex:notifications.info%billing")
    ring_routes, _ = ring(tmp_path, {"a.x": ["h"], "a.y": ["h"], "b": ["h"]})
    assert ring_routes.topics("a.") == ("a.x", "a.y")
    ring_routes.close()


def test_status_lists_nodes_and_their_topics(ipc_dir, client):
    svc = ServiceProcess("status-1", ipc_dir, topic="status")
    try:
        backend = LocalBackend(Options.from_conf(rpc_zmq_ipc_dir=str(ipc_dir)))
        nodes = {n["address"]: n for n in backend.nodes()}
        assert nodes[svc.address]["host"] == "status-1"
        assert set(nodes[svc.address]["topics"]) >= {"status", "status (fanout)", "status-raw"}
        assert nodes[svc.address]["alive"] is True
    finally:
        assert svc.stop() == 0


# -- the backend interface ----------------------------------------------------------

def test_unknown_backends_fail_at_init():
    with pytest.raises(ValueError, match="zookeeper.*available: local, redis, ring"):
        rpc.init(rpc_zmq_matchmaker="zookeeper")
    assert matchmaker.available() == ["local", "redis", "ring"]


def test_the_original_drivers_class_paths_name_the_same_backends():
    for path, name in [("nova.openstack.common.rpc.matchmaker.MatchMakerRing", "ring"),
                       ("ceilometer.openstack.common.rpc.matchmaker_ring.MatchMakerRing",
                        "ring"),
                       ("nova.openstack.common.rpc.matchmaker_redis.MatchMakerRedis", "redis"),
                       ("nova.openstack.common.rpc.matchmaker.MatchMakerLocalhost", "local")]:
        assert Options.from_conf(rpc_zmq_matchmaker=path).rpc_zmq_matchmaker == name
    with pytest.raises(ValueError, match="not a backend name"):
        Options.from_conf(rpc_zmq_matchmaker="nova.openstack.common.rpc.matchmaker.Other")


def test_each_backend_carries_its_own_policy():
    local_opts = Options.from_conf()
    assert (local_opts.bind_address, local_opts.port) == ("127.0.0.1", 0)
    assert local_opts.advertised_host() == "127.0.0.1"
    ring_opts = Options.from_conf(rpc_zmq_matchmaker="ring", rpc_zmq_host="node7")
    assert (ring_opts.bind_address, ring_opts.port) == ("*", 9501)
    assert ring_opts.advertised_host() == "node7"        # ring files list these names
    redis_opts = Options.from_conf(rpc_zmq_matchmaker="redis", rpc_zmq_host="node7",
                                   rpc_zmq_advertise_address="10.1.2.3")
    assert (redis_opts.bind_address, redis_opts.port) == ("*", 0)
    assert redis_opts.advertised_host() == "10.1.2.3"
    bound = Options.from_conf(rpc_zmq_matchmaker="redis", rpc_zmq_bind_address="10.9.8.7")
    assert bound.advertised_host() == "10.9.8.7"


def test_a_wildcard_is_never_advertised():
    # localhost resolves to loopback only: refused with advice, never '*'.
    opts = Options.from_conf(rpc_zmq_matchmaker="redis", rpc_zmq_host="localhost")
    with pytest.raises(ValueError, match="rpc_zmq_advertise_address"):
        opts.advertised_host()
    opts = Options.from_conf(rpc_zmq_matchmaker="redis", rpc_zmq_host="no-such-host.invalid")
    with pytest.raises(ValueError, match="does not resolve"):
        opts.advertised_host()
    # Nor one given as the address to advertise: refused at init.
    for wildcard in ("*", "0.0.0.0", "::", "[::]"):
        with pytest.raises(ValueError, match="is a wildcard"):
            Options.from_conf(rpc_zmq_matchmaker="redis", rpc_zmq_advertise_address=wildcard)


PLUGIN = '''
from nova_zmq_fast._routes import Endpoint
from nova_zmq_fast.matchmaker import Backend
from nova_zmq_fast.options import Option

class StaticBackend(Backend):
    """Every topic is served by the one address in static_address."""
    OPTIONS = (Option("static_address", "str", "", "Where everything is served."),)
    BIND_ADDRESS = "127.0.0.1"

    def register(self, node, topic, fanout=False):
        pass

    def unregister(self, node, topic, fanout=False):
        pass

    def fetch(self, topic, fanout):
        return [Endpoint("static", self.options.static_address)]

    def list_topics(self, prefix):
        return []
'''


def test_a_new_backend_is_one_module_and_touches_no_other_file(tmp_path, ipc_dir):
    """A backend published under the entry point group, with an option of
    its own, works end to end without any change to the package."""
    (tmp_path / "static_discovery.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "static_discovery-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: static-discovery\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[nova_zmq_fast.matchmakers]\nstatic = static_discovery:StaticBackend\n")
    svc = ServiceProcess("plugin-1", ipc_dir, topic="anything")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from nova_zmq_fast import matchmaker, rpc
        assert "static" in matchmaker.available()
        rpc.init(rpc_zmq_matchmaker="static", static_address={svc.address!r})
        print(rpc.call({{}}, "anything", {{"method": "whoami"}}, timeout=10))
        rpc.cleanup()
        """)
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    finally:
        assert svc.stop() == 0
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "plugin-1"


# -- ring -------------------------------------------------------------------------

def ring(tmp_path, data, **kw):
    path = tmp_path / "ring.json"
    path.write_text(json.dumps(data))
    backend = RingBackend(Options.from_conf(rpc_zmq_matchmaker="ring",
                                            matchmaker_ringfile=str(path), **kw))
    return RouteTable(backend), path


def test_a_server_the_ring_does_not_list_is_told_at_once(tmp_path, caplog):
    """Peers dial what the ring lists and name the server by it: a server
    listening under another name is never reached, and says so (once)."""
    routes, _ = ring(tmp_path, {"svc": ["127.0.0.1:9611"], "other": ["localhost:9611"]})
    with caplog.at_level("WARNING", logger="nova_zmq_fast.matchmaker.ring"):
        for _ in range(2):
            routes.backend.register(Endpoint("localhost", "tcp://localhost:9611"), "svc")
        routes.backend.register(Endpoint("localhost", "tcp://localhost:9611"), "other")
        routes.backend.register(Endpoint("localhost", "tcp://localhost:9611"), "svc.localhost")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned
    assert "lists tcp://127.0.0.1:9611 for 'svc', not this process's address " \
           "tcp://localhost:9611" in warned[0] and "list it as localhost:9611" in warned[0]
    routes.close()


def test_ring_entries():
    assert parse_entry("host1", 9501).address == "tcp://host1:9501"
    assert parse_entry("host1:9600", 9501).address == "tcp://host1:9600"
    assert parse_entry("[::1]:9600", 9501).address == "tcp://[::1]:9600"
    assert parse_entry("::1", 9501).address == "tcp://[::1]:9501"
    for bad in ("", "h:x", "h:0", "h:70000", "a b", 5, None):
        with pytest.raises(ValueError):
            parse_entry(bad, 9501)


def test_ring_lookups(tmp_path):
    routes, _ = ring(tmp_path, {"compute": ["h1", "h2:9600", "h2:9601"], "sched": ["h3"]})
    assert addresses(routes.route("compute")) == ["tcp://h1:9501", "tcp://h2:9600",
                                                  "tcp://h2:9601"]
    assert addresses(routes.route("compute", fanout=True)) == addresses(routes.route("compute"))
    # Several services on one host: 'topic.host' reaches each of them.
    assert addresses(routes.route("compute.h2")) == ["tcp://h2:9600", "tcp://h2:9601"]
    assert addresses(routes.route("compute.h7")) == ["tcp://h7:9501"]   # straight to the host
    assert routes.route("unknown") == ()
    routes.close()


def test_a_bare_ring_entry_means_the_same_port_in_every_process(tmp_path):
    """A second service on a host listens on its own port; the ring it
    reads must not change meaning for it (it would dial itself)."""
    data = {"a": ["h1:9502"], "b": ["h2"]}
    for kw in ({}, {"rpc_zmq_port": 9502}):
        routes, _ = ring(tmp_path, data, **kw)
        assert addresses(routes.route("b")) == ["tcp://h2:9501"]
        assert addresses(routes.route("b.h9")) == ["tcp://h9:9501"]
        routes.close()
    routes, _ = ring(tmp_path, data, matchmaker_ring_port=9600, rpc_zmq_port=9502)
    assert addresses(routes.route("b")) == ["tcp://h2:9600"]
    routes.close()


def test_ring_fallback_keeps_dotted_host_names_whole(tmp_path):
    routes, _ = ring(tmp_path, {"compute": ["h1"]})
    assert addresses(routes.route("compute.node7.example.com")) == \
        ["tcp://node7.example.com:9501"]
    # An oslo.messaging server named by its IP address.
    assert addresses(routes.route("openstack:compute@10.0.0.13")) == ["tcp://10.0.0.13:9501"]
    routes.close()


def test_ring_is_reloaded_when_it_changes(tmp_path):
    routes, path = ring(tmp_path, {"compute": ["h1"]})
    assert addresses(routes.route("compute")) == ["tcp://h1:9501"]
    path.write_text(json.dumps({"compute": ["h1", "h2"]}))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    routes.refresh()
    assert len(routes.route("compute")) == 2
    routes.close()


@pytest.mark.parametrize("content", ['["h1"]', '{"compute": "h1"}', '{"compute": ["h:x"]}',
                                     "not json"])
def test_bad_ring_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "ring.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        RingBackend(Options.from_conf(rpc_zmq_matchmaker="ring", matchmaker_ringfile=str(path)))


def test_missing_ring_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        RingBackend(Options.from_conf(rpc_zmq_matchmaker="ring",
                                      matchmaker_ringfile=str(tmp_path / "none.json")))


def test_ring_end_to_end_with_several_services_per_host(tmp_path, client):
    """Two hosts (loopback addresses), two services on the first: found
    through a ring file listing host:port entries."""
    entries = [("127.0.0.2", free_port("127.0.0.2")), ("127.0.0.2", free_port("127.0.0.2")),
               ("127.0.0.3", free_port("127.0.0.3"))]
    path = tmp_path / "ring.json"
    path.write_text(json.dumps({"svc": [f"{h}:{p}" for h, p in entries]}))
    common = {"rpc_zmq_matchmaker": "ring", "matchmaker_ringfile": str(path)}
    servers = [ServiceProcess(h, tmp_path, options=dict(common, rpc_zmq_bind_address=h,
                                                        rpc_zmq_port=p))
               for h, p in entries]
    try:
        client.init(rpc_zmq_host="client", **common)
        pids = {client.call({}, "svc", {"method": "pid"}, timeout=10) for _ in range(12)}
        assert len(pids) == 3
        on_first = {client.call({}, "svc.127.0.0.2", {"method": "pid"}) for _ in range(8)}
        assert len(on_first) == 2
        assert {client.call({}, "svc.127.0.0.3", {"method": "whoami"}) for _ in range(4)} \
            == {"127.0.0.3"}
        client.fanout_cast({}, "svc", {"method": "record", "args": {"key": "r", "value": 1}})
        tallies = {}                # pid -> fanouts it recorded

        def each_once():
            for host in ("127.0.0.2", "127.0.0.3"):
                pid, count = client.call({}, f"svc.{host}", {"method": "tally",
                                                             "args": {"key": "fanout:r"}})
                tallies[pid] = count
            return len(tallies) == 3 and set(tallies.values()) == {1}
        assert wait_until(each_once, 10), tallies
    finally:
        codes = stop_all(servers)
    assert codes == [0, 0, 0]


def test_a_dead_ring_host_is_skipped_while_another_is_up(tmp_path, client):
    """The ring lists a host that is down: calls and casts go to the live
    one without waiting for the dead one's connect timeout, and a fanout
    still reaches the live one, counting the other."""
    live_port, dead_port = free_port("127.0.0.2"), free_port("127.0.0.3")
    path = tmp_path / "ring.json"
    path.write_text(json.dumps({"svc": [f"127.0.0.2:{live_port}",
                                        f"127.0.0.3:{dead_port}"]}))
    common = {"rpc_zmq_matchmaker": "ring", "matchmaker_ringfile": str(path)}
    server = ServiceProcess("127.0.0.2", tmp_path, options=dict(
        common, rpc_zmq_bind_address="127.0.0.2", rpc_zmq_port=live_port))
    try:
        client.init(rpc_zmq_host="client", rpc_zmq_connect_timeout=5, **common)
        start = time.monotonic()
        hosts = [client.call({}, "svc", {"method": "whoami"}, timeout=10) for _ in range(20)]
        assert set(hosts) == {"127.0.0.2"}
        # Twenty calls, none of which waited out the 5 s connect timeout.
        assert time.monotonic() - start < 5
        msg = {"method": "record", "args": {"key": "k", "value": 1}}
        client.init(rpc_zmq_host="client", rpc_zmq_connect_timeout=0.3, **common)
        start = time.monotonic()
        client.fanout_cast({}, "svc", msg)
        assert time.monotonic() - start < 2.0
        client.fanout_cast({}, "svc", msg)          # the dead one is skipped at once
        assert wait_until(lambda: client.call(
            {}, "svc.127.0.0.2", {"method": "count", "args": {"key": "fanout:k"}}) == 2, 10)
        # Counted by each fanout: after the connect timeout, then as down.
        assert client.stats()["client"]["fanout_unreachable"] == 2
    finally:
        assert server.stop() == 0
