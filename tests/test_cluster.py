"""Many hosts: Redis discovery across a cluster of network namespaces.

h0 runs Redis and the callers (agents); h1, h2 and h3 each run a service.
Every process is configured as an operator would on a real machine: the
Redis host by name and nothing else.  rpc_zmq_host defaults to the host's
hostname ("h1"), servers bind the wildcard and advertise the address that
name resolves to.  Failures are real: SIGKILL of every process of a host,
a host's cable pulled, Redis killed.
"""
import json
import sys
import threading
import time
import uuid

import pytest

from tests.conftest import wait_until
from tests.helpers import netns, service
from tests.helpers.agent import Agent, CallFailed

cluster = netns.fixture(hosts=4, name="cluster")

TTL = 2.0                   # matchmaker_heartbeat_ttl: a silent host is forgotten after it
HEARTBEAT_TIMEOUT = 1.5     # rpc_zmq_heartbeat_timeout: a silent connection is dropped after it
CALL_TIMEOUT = 3.0


def options(**kw):
    return dict({"rpc_zmq_matchmaker": "redis", "matchmaker_redis_host": "h0",
                 "matchmaker_heartbeat_freq": 0.5, "matchmaker_heartbeat_ttl": TTL,
                 "rpc_zmq_heartbeat_interval": 0.5,
                 "rpc_zmq_heartbeat_timeout": HEARTBEAT_TIMEOUT,
                 "rpc_zmq_linger": 1, "rpc_response_timeout": 10}, **kw)


def unique():
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def redis(cluster):
    return cluster.start_redis(cluster[0])


@pytest.fixture(scope="module")
def caller(cluster, redis):
    agent = Agent.start(cluster[0], options())
    yield agent
    assert agent.close() == 0


@pytest.fixture(scope="module")
def watcher(cluster, redis):
    """A second caller in h0, free while `caller` waits on a call."""
    agent = Agent.start(cluster[0], options())
    yield agent
    assert agent.close() == 0


@pytest.fixture
def services(cluster, redis):
    """A service on each of h1, h2, h3 (topic 'svc'); whatever a test cut
    is joined again, and every process it did not kill must exit cleanly."""
    started = {}
    killed = set()
    try:
        for host in cluster.hosts[1:]:
            started[host.name] = service.start_in(host, options=options())
        yield started, killed
    finally:
        cluster.restore_network()
        if not redis.running:
            redis.start()
        codes = {name: proc.stop() for name, proc in started.items() if name not in killed}
    assert codes == {name: 0 for name in codes}, codes


def hosts_answering(agent, topic, n, timeout=CALL_TIMEOUT):
    return [agent.call(topic, "whoami", timeout=timeout).result() for _ in range(n)]


def in_flight(caller, watcher, host, seconds=30):
    """Start a call that `host` holds for `seconds`, in a thread; returns
    (thread, box with its Outcome) once `host` reports it running."""
    key = unique()
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("outcome", caller.call(
        f"svc.{host}", "hold", {"key": key, "seconds": seconds}, timeout=CALL_TIMEOUT)))
    thread.start()
    assert wait_until(lambda: watcher.call(f"svc.{host}", "count", {"key": key}).result() == 1,
                      10)
    return thread, box


def bystander(cluster, redis, count):
    """Calls from h1 to h2 in a thread, while something else happens to h3:
    (thread, box with the batch summary)."""
    agent = Agent.start(cluster[1], options())
    box = {}

    def run():
        try:
            box["batch"] = agent.batch("svc.h2", "hold", {"key": "bystander", "seconds": 0.01},
                                       count=count, timeout=CALL_TIMEOUT)
        finally:
            box["code"] = agent.close()
    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def calls_after(watcher, started, seconds, topic="svc"):
    """Call `topic` one call at a time for `seconds`; [(time since
    `started`, Outcome)]."""
    made = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic() - started
        made.append((t, watcher.call(topic, "whoami", timeout=1)))
    return made


# -- a fabric across hosts ----------------------------------------------------------------

def test_servers_advertise_the_address_their_hostname_resolves_to(cluster, services):
    started, _ = services
    for host in cluster.hosts[1:]:
        assert started[host.name].ready[0].startswith(f"tcp://{host.ip}:")


def test_calls_casts_multicall_and_topic_host_across_hosts(cluster, services, caller):
    answered = hosts_answering(caller, "svc", 30)
    assert {h: answered.count(h) for h in ("h1", "h2", "h3")} == {"h1": 10, "h2": 10, "h3": 10}
    assert set(hosts_answering(caller, "svc.h2", 5)) == {"h2"}
    stream = caller.multicall("svc.h3", "stream", {"n": 3, "delay": 0}).result()
    assert [v["i"] for v in stream] == [0, 1, 2] and {v["host"] for v in stream} == {"h3"}
    key = unique()
    summary = caller.batch("svc", "record", {"key": key, "value": 1}, count=300, kind="cast")
    assert summary["ok"] == 300, summary

    def delivered():
        return sum(caller.call(f"svc.{h.name}", "count", {"key": key}).result()
                   for h in cluster.hosts[1:])
    assert wait_until(lambda: delivered() == 300, 15)
    time.sleep(0.3)                 # nothing more arrives: each cast handled exactly once
    assert delivered() == 300


def test_fanout_reaches_every_host_exactly_once(cluster, services, caller):
    key = unique()
    assert caller.fanout_cast("svc", "record", {"key": key, "value": "x"}).ok

    def arrived(host):
        # The call that looks may itself fail on a loaded machine (a
        # connection slow to come up): that is not what is tested here.
        try:
            return caller.call(f"svc.{host.name}", "records_for",
                               {"key": "fanout:" + key}).result() == ["x"]
        except CallFailed:
            return False
    for host in cluster.hosts[1:]:
        assert wait_until(lambda: arrived(host), 20)
    time.sleep(0.3)
    for host in cluster.hosts[1:]:
        assert caller.call(f"svc.{host.name}", "records_for",
                           {"key": "fanout:" + key}).result() == ["x"]


def test_ipv6_across_hosts(cluster, redis, caller):
    h1 = cluster[1]
    svc = service.start_in(h1, topic="v6", options=options(rpc_zmq_advertise_address=h1.ip6))
    try:
        assert svc.ready[0].startswith(f"tcp://[{h1.ip6}]:")
        assert caller.call("v6", "whoami", timeout=CALL_TIMEOUT).result() == "h1"
    finally:
        assert svc.stop() == 0


# -- losing a host --------------------------------------------------------------------------

def lose_h3(cluster, redis, caller, watcher, lose, window):
    """A call in flight to h3 and a bystander's 300 calls between other
    hosts while `lose()` takes h3 away: the call in flight times out at its
    timeout, calls after the TTL go to h1 and h2 only, the bystander sees
    no error."""
    thread, box = in_flight(caller, watcher, "h3")
    others, other_box = bystander(cluster, redis, 300)
    lose()
    started = time.monotonic()
    thread.join(CALL_TIMEOUT + 30)
    outcome = box["outcome"]
    assert outcome.raised("Timeout") and outcome.elapsed <= CALL_TIMEOUT * 1.1, outcome
    made = calls_after(watcher, started, window)
    # Calls that picked h3 before it was declared gone may time out; from
    # the TTL on, none is routed to it.
    late = [(t, o) for t, o in made if t > TTL]
    assert late and all(o.ok and o.value in ("h1", "h2") for t, o in late), made
    others.join(60)
    assert other_box["code"] == 0
    assert other_box["batch"]["ok"] == 300, other_box["batch"]


def test_host_killed(cluster, redis, services, caller, watcher):
    """Every process of h3 is SIGKILLed while a call is in flight to it."""
    _, killed = services

    def kill():
        cluster[3].kill_all()
        killed.add("h3")
    lose_h3(cluster, redis, caller, watcher, kill, TTL + 1.5)


def test_host_cut_off_then_healed(cluster, redis, services, caller, watcher):
    """h3's cable is pulled while a call is in flight to it, then plugged
    back: h3 is used again without any restart."""
    started_services, _ = services
    pid = caller.call("svc.h3", "pid").result()
    lose_h3(cluster, redis, caller, watcher, cluster[3].link_down, TTL + 2)

    cluster[3].link_up()
    # Each process finds h3 again on its own: its courier's next probe, on
    # a fresh connection, is answered.
    for agent in (watcher, caller):
        assert wait_until(lambda: agent.call("svc.h3", "pid", timeout=1).ok, 30)
    assert caller.call("svc.h3", "pid").result() == pid                  # the same process
    assert started_services["h3"].alive
    assert wait_until(lambda: "h3" in hosts_answering(watcher, "svc", 9), 15)


# -- losing Redis -----------------------------------------------------------------------------

def test_redis_outage(cluster, redis, services, caller, watcher):
    """Redis is killed mid-run: traffic between existing services goes on;
    a service started during the outage is found once Redis is back, and
    every server registered again."""
    started, _ = services
    assert set(hosts_answering(caller, "svc", 9)) == {"h1", "h2", "h3"}
    redis.stop(kill=True)
    assert not redis.running
    summary = caller.batch("svc", "whoami", count=300, timeout=CALL_TIMEOUT)
    assert summary["ok"] == 300, summary
    assert set(summary["results"]) == {"h1", "h2", "h3"}
    late = service.start_in(cluster[2], topic="latecomer", options=options(rpc_zmq_host="h2"),
                            name="late")
    try:
        assert caller.call("latecomer", "whoami", timeout=1).raised("NoListeners")
        redis.start()
        # Each process's lookups come back within its backoff (at most
        # BACKOFF_MAX, 5 s, after Redis does).
        for agent in (watcher, caller):
            assert wait_until(lambda: agent.call("latecomer", "whoami", timeout=1).ok, 20)
        assert caller.call("latecomer", "whoami").result() == "late"
        registered = set(json.loads(redis.cli(cluster[0], "--json", "SMEMBERS",
                                              "nzf:topic:d:svc").stdout or "[]"))
        assert wait_until(lambda: set(json.loads(redis.cli(
            cluster[0], "--json", "SMEMBERS", "nzf:topic:d:svc").stdout or "[]")) ==
            {p.ready[0] for p in started.values()}, 10), registered
    finally:
        assert late.stop() == 0


# -- ring, and oslo.messaging, across hosts -----------------------------------------------------

def test_ring_across_hosts_with_several_services_per_host(cluster, caller):
    """A static ring naming hosts as an operator would, two services on h1."""
    ring = cluster.write_ring({"rsvc": ["h1:9501", "h1:9502", "h2"]})
    common = {"rpc_zmq_matchmaker": "ring", "matchmaker_ringfile": ring, "rpc_zmq_linger": 1}
    # rpc_zmq_host is the host's name (the ring's), whoami answers h1a/h1b.
    on_h1 = dict(common, rpc_zmq_host="h1")
    procs = [service.start_in(cluster[1], topic="rsvc", options=dict(on_h1, rpc_zmq_port=9501),
                              name="h1a"),
             service.start_in(cluster[1], topic="rsvc", options=dict(on_h1, rpc_zmq_port=9502),
                              name="h1b"),
             service.start_in(cluster[2], topic="rsvc", options=common)]
    agent = Agent.start(cluster[0], common)
    try:
        assert {agent.call("rsvc", "whoami").result() for _ in range(12)} == {"h1a", "h1b", "h2"}
        assert {agent.call("rsvc.h1", "whoami").result() for _ in range(8)} == {"h1a", "h1b"}
        key = unique()
        assert agent.fanout_cast("rsvc", "record", {"key": key, "value": 1}).ok

        def tallies():
            seen = {}
            for topic in ("rsvc.h1", "rsvc.h1", "rsvc.h1", "rsvc.h1", "rsvc.h2"):
                pid, count = agent.call(topic, "tally", {"key": "fanout:" + key}).result()
                seen[pid] = count
            return seen
        assert wait_until(lambda: sorted(tallies().values()) == [1, 1, 1], 10)
    finally:
        codes = [agent.close()] + [p.stop() for p in procs]
    assert codes == [0, 0, 0, 0]


OSLO_CLIENT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import oslo_messaging as messaging
from oslo_config import cfg
cfg.CONF([], project="nzf-test")
transport = messaging.get_rpc_transport(cfg.CONF, url=sys.argv[1])
client = messaging.get_rpc_client(transport, messaging.Target(topic="osvc"), timeout=10)
out = {"spread": sorted(client.call({}, "whoami") for _ in range(20)),
       "server": [client.prepare(server=s).call({}, "whoami") for s in ("o1", "o2")]}
client.prepare(fanout=True).cast({}, "record", value=sys.argv[2])
client.cast({}, "record", value=sys.argv[3])
print(json.dumps(out), flush=True)
transport.cleanup()
"""


def test_oslo_messaging_across_hosts_over_redis(cluster, redis):
    """oslo.messaging servers in h1 and h2, a client in h0, one line of
    configuration each: transport_url = zmqfast+redis://h0:6379/."""
    query = "?matchmaker_heartbeat_freq=0.5&matchmaker_heartbeat_ttl=2&rpc_zmq_linger=1"
    url = f"zmqfast+redis://h0:{redis.port}/{query}"
    servers = [cluster[i].python("tests.helpers.oslo_service", "rpc", "--name", name,
                                 "--url", url, "--topic", "osvc")
               for i, name in ((1, "o1"), (2, "o2"))]
    try:
        fan, one = unique(), unique()
        run = cluster[0].run([sys.executable, "-c", OSLO_CLIENT, url, fan, one], timeout=60)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert out["spread"].count("o1") == out["spread"].count("o2") == 10
        assert out["server"] == ["o1", "o2"]
        def records(server):
            code = (r"import json, sys, warnings; warnings.filterwarnings('ignore');"
                    r"import oslo_messaging as m; from oslo_config import cfg;"
                    r"cfg.CONF([], project='nzf-test');"
                    r"t = m.get_rpc_transport(cfg.CONF, url=sys.argv[1]);"
                    r"c = m.get_rpc_client(t, m.Target(topic='osvc', server=sys.argv[2]));"
                    r"print(json.dumps(c.call({}, 'records'))); t.cleanup()")
            result = cluster[0].run([sys.executable, "-c", code, url, server], timeout=60)
            return json.loads(result.stdout)
        assert wait_until(lambda: sorted(records("o1") + records("o2")) ==
                          sorted([fan, fan, one]), 15)
        assert fan in records("o1") and fan in records("o2")
    finally:
        codes = [s.stop() for s in servers]
    assert codes == [0, 0]
