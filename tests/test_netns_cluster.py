"""The multi-host cluster (tests.helpers.netns) and the agent, proved over
today's code with `ring` discovery.

Host h0 runs the agent (the calling side); h1 and h2 each run a service
listed in a ring file that names them by address.  The test process itself
is not on the test network.
"""
import ipaddress
import json
import os
import subprocess
import time
import uuid

import pytest

from tests.conftest import open_fds, os_threads, wait_until
from tests.helpers import netns, service
from tests.helpers.agent import Agent

cluster = netns.fixture(hosts=3)

CALL_TIMEOUT = 10
CUT_TIMEOUT = 2             # a call to a cut host: how long to wait for nothing
RECOVERY = 30               # loose bound for a healed link to carry calls again


def ring_options(ringfile, address):
    """rpc.init() options of a process on the ring, serving as `address`."""
    return {"rpc_zmq_matchmaker": "ring", "matchmaker_ringfile": ringfile,
            "rpc_zmq_host": address, "rpc_zmq_linger": 1,
            "rpc_response_timeout": CALL_TIMEOUT}


@pytest.fixture
def net(cluster):
    """The cluster; whatever a test cut is joined again afterwards."""
    try:
        yield cluster
    finally:
        cluster.restore_network()


def start_ring(cluster, family="ip"):
    """Services on h1 and h2 for topic 'svc', named in a ring file by their
    IPv4 (family "ip") or IPv6 ("ip6") address; an agent on h0."""
    h0, h1, h2 = cluster.hosts
    entries = [getattr(h, family) for h in (h1, h2)]
    ring = cluster.write_ring({"svc": [f"[{a}]" if ":" in a else a for a in entries]})
    services = {}
    agent = None
    try:
        for host, address in zip((h1, h2), entries):
            options = ring_options(ring, address)
            if family == "ip6":
                # Each listens on its own IPv6 address (a wildcard would
                # too, dual stack; this also checks a literal v6 bind).
                options["rpc_zmq_bind_address"] = address
            services[host.name] = service.start_in(host, options=options)
        agent = Agent.start(h0, ring_options(ring, h0.name))
    except BaseException:
        stop_ring(services, agent)
        raise
    return services, agent


def stop_ring(services, agent):
    codes = {}
    if agent is not None:
        codes["agent"] = agent.close()
    for name, process in services.items():
        codes[name] = process.stop()
    return codes


@pytest.fixture
def ring(net):
    """(services by host name, agent); every process must exit cleanly
    unless the test killed it (then `killed` lists its host)."""
    services, agent = start_ring(net)
    killed = []
    yield services, agent, killed
    codes = stop_ring(services, agent)
    assert {k: c for k, c in codes.items() if k not in killed} == \
        {k: 0 for k in codes if k not in killed}, codes


def topic_of(host):
    return f"svc.{host.ip}"


def call_until_answered(agent, topic, bound=RECOVERY):
    """Call `topic` until it answers; (outcome, seconds it took).  Bounded.
    A client skips a peer it could not connect to for a while (NoListeners
    at once), so some attempts fail without waiting."""
    start = time.monotonic()
    while True:
        outcome = agent.call(topic, "whoami", timeout=CUT_TIMEOUT)
        if outcome.ok or time.monotonic() - start > bound:
            return outcome, time.monotonic() - start
        time.sleep(0.05)


def fanout_records(agent, host, key):
    return agent.call(topic_of(host), "records_for", {"key": "fanout:" + key}).result()


# -- the cluster itself ---------------------------------------------------------------------

def addresses(netns_name=None):
    """{(interface, address)} of a namespace (default: the root one)."""
    argv = ["ip", "-j", "addr", "show"]
    if netns_name:
        argv[1:1] = ["-n", netns_name]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10)
    return {(link["ifname"], a["local"]) for link in json.loads(out.stdout)
            for a in link.get("addr_info", [])}


def test_each_host_has_its_own_addresses_and_the_root_namespace_none(cluster):
    assert sorted(cluster.namespaces()) == sorted(
        [cluster.switch] + [h.netns for h in cluster])
    assert all(name.startswith(f"nzft-{os.getpid()}-") for name in cluster.namespaces())
    for host in cluster:
        assert addresses(host.netns) >= {("lo", "127.0.0.1"), ("lo", "::1"),
                                          ("eth0", host.ip), ("eth0", host.ip6)}
    test_nets = [ipaddress.ip_network(f"{cluster[0].ip}/{netns.IPV4_PREFIXLEN}", strict=False),
                 ipaddress.ip_network(f"{cluster[0].ip6}/{netns.IPV6_PREFIXLEN}", strict=False)]
    for outside in (None, cluster.switch):
        assert [(ifname, a) for ifname, a in addresses(outside)
                if any(ipaddress.ip_address(a) in net for net in test_nets)] == [], outside


# -- calls, spread, fanout across hosts ---------------------------------------------------------

def test_an_agent_calls_each_host(ring, cluster):
    services, agent, _ = ring
    h0, h1, h2 = cluster.hosts
    assert services["h1"].ready == [f"tcp://{h1.ip}:9501"]
    assert agent.call(topic_of(h1), "whoami").result() == "h1"
    assert agent.call(topic_of(h2), "whoami").result() == "h2"
    values = agent.multicall(topic_of(h2), "stream", {"n": 3, "delay": 0.01}).result()
    assert [(v["i"], v["host"]) for v in values] == [(0, "h2"), (1, "h2"), (2, "h2")]


def test_calls_to_a_topic_spread_over_the_hosts(ring):
    _, agent, _ = ring
    report = agent.batch("svc", "whoami", count=20)
    assert report["errors"] == {}, report["messages"]
    assert report["results"] == {"h1": 10, "h2": 10}
    # From four threads at once; they stay, with their sockets, for the next batch.
    for _ in range(2):
        report = agent.batch("svc", "whoami", count=40, threads=4)
        assert report["errors"] == {}, report["messages"]
        assert report["results"].keys() == {"h1", "h2"}
        assert sum(report["results"].values()) == 40
        assert agent.stats()["client"]["outboxes"] == 1 + 4


def test_a_fanout_reaches_each_host_once(ring, cluster):
    _, agent, _ = ring
    key, last = uuid.uuid4().hex, uuid.uuid4().hex
    agent.fanout_cast("svc", "record", {"key": key, "value": 1}).result()
    # A second fanout, sent after it on the same connections, marks the
    # point by which a duplicate of the first would have arrived too.
    agent.fanout_cast("svc", "record", {"key": last, "value": 1}).result()
    for host in cluster.hosts[1:]:
        assert wait_until(lambda: fanout_records(agent, host, last), CALL_TIMEOUT) == [1]
        assert fanout_records(agent, host, key) == [1]


# -- losing a host -----------------------------------------------------------------------------

def cut_link(cluster, host):
    host.link_down()


def partition_away(cluster, host):
    cluster.partition([h for h in cluster if h is not host])


@pytest.mark.parametrize("cut", [cut_link, partition_away], ids=["link_down", "partition"])
def test_a_cut_host_times_out_and_answers_once_joined_again(ring, cluster, cut):
    _, agent, _ = ring
    h0, h1, h2 = cluster.hosts
    assert agent.call(topic_of(h2), "whoami").result() == "h2"     # connected
    cut(cluster, h2)
    assert h2.link_is_up == (cut is partition_away)
    outcome = agent.call(topic_of(h2), "whoami", timeout=CUT_TIMEOUT)
    assert outcome.raised("Timeout"), outcome
    assert outcome.elapsed >= CUT_TIMEOUT * 0.9, outcome
    assert agent.call(topic_of(h1), "whoami").result() == "h1"     # the rest still works
    cluster.restore_network()
    outcome, took = call_until_answered(agent, topic_of(h2))
    assert outcome.result() == "h2", f"no answer {took:.1f}s after the cut was repaired"


@pytest.mark.parametrize("lose", ["kill_all", "crash"])
def test_a_lost_hosts_service_is_gone(ring, cluster, lose):
    services, agent, killed = ring
    h0, h1, h2 = cluster.hosts
    assert agent.call(topic_of(h2), "whoami").result() == "h2"     # connected
    getattr(h2, lose)()
    killed.append("h2")
    assert services["h2"].returncode == -9
    assert h2.pids() == set()
    outcome = agent.call(topic_of(h2), "whoami", timeout=CUT_TIMEOUT)
    assert outcome.raised("Timeout"), outcome
    if lose == "kill_all":
        # The host's kernel still answers, refusing the connection: the
        # client skips that server and the other one serves every call.
        assert h2.link_is_up
        report = agent.batch("svc", "whoami", count=6, timeout=CUT_TIMEOUT)
        assert report["results"] == {"h1": 6}, report
    else:
        # Nothing answers at all: the request went out on a connection
        # that still looks alive, and the call waited for its reply.
        assert not h2.link_is_up
        assert outcome.error == "Timeout" and outcome.elapsed >= CUT_TIMEOUT * 0.9, outcome


# -- IPv6 ------------------------------------------------------------------------------------

def test_calls_cross_hosts_over_ipv6(net):
    services, agent = start_ring(net, family="ip6")
    try:
        h1, h2 = net[1], net[2]
        assert services["h2"].ready == [f"tcp://[{h2.ip6}]:9501"]
        assert agent.call(f"svc.{h1.ip6}", "whoami").result() == "h1"
        report = agent.batch("svc", "whoami", count=10)
        assert report["results"] == {"h1": 5, "h2": 5}, report
    finally:
        codes = stop_ring(services, agent)
    assert set(codes.values()) == {0}, codes


# -- Redis -------------------------------------------------------------------------------------

def test_redis_in_one_host_answers_from_the_others_only(net):
    h0, h1, h2 = net.hosts
    redis = net.start_redis(h0)
    try:
        assert redis.url == f"redis://{h0.ip}:{netns.REDIS_PORT}"
        assert redis.ping(h2) and redis.ping(h1)
        # Not from a namespace off the test network: the switch's has no address.
        off_net = redis.cli(net.switch, "ping")
        assert off_net.returncode != 0 and "unreachable" in off_net.stderr, off_net
        # An outage, then a restart on the same address.
        assert redis.stop() == 0
        refused = redis.cli(h2, "ping")
        assert refused.returncode != 0 and "refused" in refused.stderr, refused
        net.restart_redis()
        assert redis.ping(h2)
        net.stop_redis(kill=True)
        assert not redis.ping(h2)
    finally:
        redis.stop()


# -- cleanup ---------------------------------------------------------------------------------

class Boom(Exception):
    pass


def test_a_failing_body_still_removes_everything():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    fds, threads = open_fds(), os_threads()
    with pytest.raises(Boom):
        with netns.Cluster(hosts=2) as small:
            sleeper = small[1].spawn(["sh", "-c", "echo READY; exec sleep 60"])
            redis = small.start_redis(small[0]).process
            assert len(small.namespaces()) == 3
            tmpdir = small.tmpdir
            raise Boom
    assert sleeper.returncode == -9
    assert redis.returncode == -9
    assert [n for n in netns.namespaces() if n.startswith(small.prefix)] == []
    assert not os.path.exists(tmpdir)
    assert open_fds() == fds
    assert wait_until(lambda: os_threads() == threads, 5), "the Redis log drain leaked"


def test_a_new_cluster_sweeps_namespaces_of_dead_runs():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = netns.run_prefix(gone.pid) + "h0"       # its creator has exited
    netns.ip("netns", "add", stale)
    orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        assert wait_until(lambda: netns.namespace_pids(stale), 10) == {orphan.pid}
        with netns.Cluster(hosts=1):
            assert stale not in netns.namespaces()
        assert orphan.wait(10) == -9
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(10)
        if stale in netns.namespaces():
            netns.ip("netns", "delete", stale)
