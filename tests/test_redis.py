"""Redis discovery on one host: a redis-server of the test's own, service
processes and this test process as the client.  The same scenarios across
hosts run in network namespaces (test_cluster.py)."""
import json
import logging
import shutil
import subprocess
import sys
import time

import pytest

from nova_zmq_fast._routes import Endpoint, RouteTable
from nova_zmq_fast.exceptions import DiscoveryRefused, DiscoveryUnavailable
from nova_zmq_fast.matchmaker.redis import RedisBackend
from nova_zmq_fast.options import Options
from tests.conftest import (
    ROOT, RedisServer, ServiceProcess, free_port, make_certificates, stop_all, wait_until)

CTX = {"user_id": "u"}
TTL = {"matchmaker_heartbeat_freq": 0.25, "matchmaker_heartbeat_ttl": 1.5}


def options(redis_server, **kw):
    return dict(redis_server.options, rpc_zmq_bind_address="127.0.0.1", **TTL, **kw)


def service(host, redis_server, tmp_path, topic="svc"):
    return ServiceProcess(host, tmp_path, topic=topic, options=options(redis_server))


def msg(method, **args):
    return {"method": method, "args": args}


def test_register_lookup_unregister(redis_server):
    backend = RedisBackend(Options.from_conf(**options(redis_server)))
    routes = RouteTable(backend)
    me = Endpoint("h1", "tcp://127.0.0.1:1001")
    try:
        backend.register(me, "compute")
        backend.register(me, "compute", fanout=True)
        backend.register(Endpoint("h2", "tcp://127.0.0.1:1002"), "compute")
        assert [ep.address for ep in routes.route("compute")] == \
            ["tcp://127.0.0.1:1001", "tcp://127.0.0.1:1002"]
        assert [ep.host for ep in routes.route("compute.h2")] == ["h2"]
        assert [ep.address for ep in routes.route("compute", fanout=True)] == \
            ["tcp://127.0.0.1:1001"]
        assert routes.topics("comp") == ("compute",)
        backend.unregister(me, "compute")
        routes.invalidate()
        assert [ep.host for ep in routes.route("compute")] == ["h2"]
    finally:
        routes.close()
        backend.close()
    with redis_server.client() as r:
        # Everything this process registered is gone: h2's entries expire
        # on their own, never having heartbeats after close().
        assert r.get("nzf:node:tcp://127.0.0.1:1001") is None
        assert wait_until(lambda: r.get("nzf:node:tcp://127.0.0.1:1002") is None, 5)


def test_a_heartbeat_never_puts_back_what_was_unregistered_or_closed(redis_server):
    # A heartbeat that read the registrations just before unregister() or
    # close() must not write them back after: a topic left in Redis would be
    # routed to this live process for as long as it heartbeats.
    backend = RedisBackend(Options.from_conf(**dict(
        options(redis_server), matchmaker_heartbeat_freq=0.001)))
    me = Endpoint("h1", "tcp://127.0.0.1:1001")
    with redis_server.client() as r:
        try:
            backend.register(me, "stays")
            for _ in range(300):
                backend.register(me, "goes")
                backend.unregister(me, "goes")
                assert not r.sismember("nzf:topic:d:goes", me.address)
        finally:
            backend.close()
        assert r.get("nzf:node:tcp://127.0.0.1:1001") is None
        assert not r.sismember("nzf:topic:d:stays", me.address)


def test_a_node_peers_cannot_dial_is_passed_over_not_declared_dead(redis_server):
    """A node key whose address nobody can dial (a broken writer): its
    server is skipped, and neither forgotten nor removed, as a dead one
    would be (its writer is alive and heartbeats)."""
    backend = RedisBackend(Options.from_conf(**options(redis_server)))
    routes = RouteTable(backend)
    bad = "tcp://127.0.0.1:notaport"
    try:
        backend.register(Endpoint("h1", "tcp://127.0.0.1:1001"), "compute")
        with redis_server.client() as r:
            r.set(f"nzf:node:{bad}", json.dumps({"host": "h2", "address": bad, "pid": 1}))
            r.sadd("nzf:topic:d:compute", bad)
            assert [ep.address for ep in routes.route("compute")] == ["tcp://127.0.0.1:1001"]
            assert bad not in routes.forgotten()
            assert r.sismember("nzf:topic:d:compute", bad)
    finally:
        routes.close()
        backend.close()


# Two green threads change registrations while Redis stalls (it accepts
# and never answers): the second must wait without blocking the hub, or
# the first, waiting on its green socket, never runs again.
GREEN_CONTENTION = """
import eventlet
eventlet.monkey_patch()
import sys
from nova_zmq_fast._green import unpatched
from nova_zmq_fast._routes import Endpoint
from nova_zmq_fast.matchmaker.redis import RedisBackend
from nova_zmq_fast.options import Options

stalled = unpatched("socket").socket()
stalled.bind(("127.0.0.1", 0))
stalled.listen(8)
held = []
def accept():
    while True:
        held.append(stalled.accept()[0])
unpatched("threading").Thread(target=accept, daemon=True).start()
backend = RedisBackend(Options.from_conf(
    rpc_zmq_matchmaker="redis", matchmaker_redis_host="127.0.0.1",
    matchmaker_redis_port=stalled.getsockname()[1]))
me = Endpoint("h", "tcp://127.0.0.1:1")
ticks = [0]
def tick():
    while True:
        eventlet.sleep(0.01)
        ticks[0] += 1
ticker = eventlet.spawn(tick)
first = eventlet.spawn(backend.register, me, "a")
eventlet.sleep(0.1)                     # first now waits on Redis, holding the lock
second = eventlet.spawn(backend.unregister, me, "a")
first.wait()
print("hub ran while the first waited:", ticks[0] > 0, flush=True)
second.wait()
ticker.kill()
backend.close()
print("done", flush=True)
"""


@pytest.mark.parametrize("password", ["", "wrong", "right"])
def test_credentials_redis_refuses_fail_a_server_at_start(redis_server, password):
    """A wrong or missing password is a configuration error, not an
    outage: registering raises it, so the server fails at start instead of
    serving where nobody finds it.  (The right one, as a control, works.)"""
    import redis
    with redis_server.client() as r:
        r.config_set("requirepass", "right")
    try:
        backend = RedisBackend(Options.from_conf(**options(
            redis_server, matchmaker_redis_password=password)))
        me = Endpoint("h1", "tcp://127.0.0.1:1001")
        try:
            if password == "right":
                backend.register(me, "compute")
                assert [e.address for e in backend.fetch("compute", False)] == [me.address]
            else:
                with pytest.raises(DiscoveryRefused, match="refused this process's credentials"):
                    backend.register(me, "compute")
        finally:
            backend.close()
    finally:
        with redis.Redis(host="127.0.0.1", port=redis_server.port, password="right") as r:
            r.config_set("requirepass", "")


def test_green_threads_changing_registrations_never_block_the_hub():
    out = subprocess.run([sys.executable, "-c", GREEN_CONTENTION], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["hub ran while the first waited: True", "done"]


def test_calls_casts_fanout_and_topic_host(redis_server, tmp_path, client):
    services = [service(h, redis_server, tmp_path) for h in ("r1", "r2")]
    try:
        client.init(rpc_zmq_host="client", **options(redis_server))
        assert {client.call(CTX, "svc", msg("whoami")) for _ in range(10)} == {"r1", "r2"}
        assert {client.call(CTX, "svc.r2", msg("whoami")) for _ in range(4)} == {"r2"}
        assert [v["i"] for v in client.multicall(CTX, "svc.r1",
                                                 msg("stream", n=3, delay=0))] == [0, 1, 2]
        for i in range(100):
            client.cast(CTX, "svc", msg("record", key="c", value=i))
        client.fanout_cast(CTX, "svc", msg("record", key="f", value=1))
        assert wait_until(lambda: sum(client.call(CTX, f"svc.{h}", msg("count", key="c"))
                                      for h in ("r1", "r2")) == 100, 10)
        for h in ("r1", "r2"):
            assert wait_until(lambda: client.call(
                CTX, f"svc.{h}", msg("count", key="fanout:f")) == 1, 10)
    finally:
        codes = stop_all(services)
    assert codes == [0, 0]


def test_a_silently_dead_process_disappears_within_the_ttl(redis_server, tmp_path, client):
    a, b = (service(h, redis_server, tmp_path, topic="mortal") for h in ("d1", "d2"))
    try:
        client.init(rpc_zmq_host="client", **options(redis_server))
        assert {client.call(CTX, "mortal", msg("whoami")) for _ in range(10)} == {"d1", "d2"}
        with redis_server.client() as r:
            assert r.exists(f"nzf:node:{a.address}")
            a.kill()                                # SIGKILL: no goodbye
            killed = time.monotonic()
            assert wait_until(lambda: not r.exists(f"nzf:node:{a.address}"), 5)
            expired = time.monotonic() - killed
        assert expired <= TTL["matchmaker_heartbeat_ttl"] + 0.5
        # Only d2 is chosen from now on, and calls to d1 fail at once.
        assert {client.call(CTX, "mortal", msg("whoami")) for _ in range(10)} == {"d2"}
        with pytest.raises(client.NoListeners):
            client.call(CTX, "mortal.d1", msg("whoami"), timeout=5)
    finally:
        a.kill()
        assert b.stop() == 0


def test_a_server_back_at_a_forgotten_address_is_trusted_again(redis_server, tmp_path, client):
    """A server killed at a fixed port is forgotten once its node key
    expires; a new one at the same port must be trusted again, not stay
    forgotten: the courier would drop its probe and move its at-least-once
    casts elsewhere (here: run them twice) on every pass."""
    opts = options(redis_server, rpc_zmq_port=free_port())
    first = ServiceProcess("back", tmp_path, topic="back", options=opts)
    try:
        client.init(rpc_zmq_host="client", rpc_zmq_heartbeat_interval=0.2,
                    rpc_zmq_heartbeat_timeout=5, **options(redis_server))
        routes = client._runtime().routes
        assert client.call(CTX, "back", msg("whoami")) == "back"
        first.kill()

        def forgotten():
            routes.route("back")            # a lookup meets the expired node key
            return first.address in routes.forgotten()
        assert wait_until(forgotten, 10)
    finally:
        first.kill()
    second = ServiceProcess("back", tmp_path, topic="back", options=opts)
    try:
        assert second.address == first.address
        assert client.call(CTX, "back", msg("whoami")) == "back"
        assert first.address not in routes.forgotten()
        key = "once"
        client.cast(CTX, "back", msg("slow_record", key=key, value=1, seconds=1.0),
                    at_least_once=True)
        assert wait_until(lambda: client.stats()["client"]["at_least_once_acked"] == 1, 15)
        assert client.stats()["client"]["at_least_once_resent"] == 0
        assert client.call(CTX, "back", msg("stats"))["duplicates"] == 0
        assert client.call(CTX, "back", msg("count", key=key)) == 1
    finally:
        assert second.stop() == 0


def test_a_clean_close_withdraws_at_once(redis_server, tmp_path, client):
    svc = service("w1", redis_server, tmp_path, topic="leaving")
    with redis_server.client() as r:
        assert r.sismember("nzf:topic:d:leaving", svc.address)
        assert svc.stop() == 0
        # Gone before the process exited, not a TTL later.
        assert not r.sismember("nzf:topic:d:leaving", svc.address)
        assert not r.exists(f"nzf:node:{svc.address}")


def test_redis_outage_existing_traffic_goes_on(redis_server, tmp_path, client, caplog):
    """Redis stops: cached routes keep serving, a topic never seen fails at
    once, nothing floods the log; Redis returns: a service started during
    the outage is found, and every live server is registered again."""
    first = service("o1", redis_server, tmp_path, topic="steady")
    late = None
    try:
        client.init(rpc_zmq_host="client", **options(redis_server))
        assert client.call(CTX, "steady", msg("whoami")) == "o1"
        caplog.set_level(logging.WARNING, logger="nova_zmq_fast")
        redis_server.stop()
        for _ in range(20):                         # over several refresh intervals
            assert client.call(CTX, "steady", msg("whoami"), timeout=5) == "o1"
            time.sleep(0.1)
        start = time.monotonic()
        with pytest.raises(DiscoveryUnavailable):
            client.call(CTX, "never-seen", msg("whoami"), timeout=30)
        assert time.monotonic() - start < 1.5
        assert isinstance(DiscoveryUnavailable(), client.NoListeners)
        late = ServiceProcess("o2", tmp_path, topic="latecomer",
                              options=options(redis_server))     # registers in vain
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        redis_server.start()                        # empty: no persistence
        assert wait_until(lambda: _answers(client, "latecomer") == "o2", 15)
        with redis_server.client() as r:
            assert wait_until(lambda: r.sismember("nzf:topic:d:steady", first.address), 10)
        assert client.call(CTX, "steady", msg("whoami")) == "o1"
    finally:
        codes = stop_all([s for s in (first, late) if s is not None])
    assert set(codes) == {0}


def _answers(client, topic):
    try:
        return client.call(CTX, topic, msg("whoami"), timeout=2)
    except client.NoListeners:
        return None


def test_redis_through_sentinel(redis_server, tmp_path, client):
    through_sentinel(redis_server, tmp_path, client)


def through_sentinel(redis_server, tmp_path, client):
    """A Sentinel monitoring `redis_server` (over TLS too if it speaks TLS),
    and a service and a client that find Redis through it."""
    sentinel_port = free_port()
    tls_options = {k: v for k, v in redis_server.options.items() if "_ssl" in k}
    certs = redis_server.certs
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        (f"port 0\ntls-port {sentinel_port}\ntls-replication yes\ntls-auth-clients yes\n"
         f"tls-cert-file {certs['server.crt']}\ntls-key-file {certs['server.key']}\n"
         f"tls-ca-cert-file {certs['ca.crt']}\n" if certs else f"port {sentinel_port}\n") +
        f"bind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor nzf 127.0.0.1 {redis_server.port} 1\n")
    sentinel = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    svc = None
    try:
        via_sentinel = {"rpc_zmq_matchmaker": "redis", "rpc_zmq_bind_address": "127.0.0.1",
                        "matchmaker_redis_sentinels": [f"127.0.0.1:{sentinel_port}"],
                        "matchmaker_redis_sentinel_service": "nzf", **tls_options, **TTL}
        assert wait_until(lambda: _sentinel_knows(sentinel_port, redis_server.tls), 10)
        svc = ServiceProcess("s1", tmp_path, topic="guarded", options=via_sentinel)
        client.init(rpc_zmq_host="client", **via_sentinel)
        assert client.call(CTX, "guarded", msg("whoami")) == "s1"
        with redis_server.client() as r:              # it really went through the master
            assert r.sismember("nzf:topic:d:guarded", svc.address)
    finally:
        if svc is not None:
            assert svc.stop() == 0
        sentinel.kill()
        sentinel.wait(10)


def _sentinel_knows(port, tls):
    import redis
    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, **tls) as s:
            return bool(s.sentinel_get_master_addr_by_name("nzf"))
    except (redis.RedisError, OSError):
        return False


def test_url_options():
    assert RedisBackend.url_options([("10.0.0.5", 6380, None, "s3cret")], "2") == {
        "matchmaker_redis_host": "10.0.0.5", "matchmaker_redis_port": 6380,
        "matchmaker_redis_password": "s3cret", "matchmaker_redis_db": 2}
    assert RedisBackend.url_options([("a", None, None, None), ("b", 26380, None, None)],
                                    None) == {"matchmaker_redis_sentinels": ["a:26379",
                                                                             "b:26380"]}
    with pytest.raises(ValueError):
        RedisBackend.url_options([("a", 1, None, None)], "zero")
    with pytest.raises(ValueError, match="ttl"):
        Options.from_conf(rpc_zmq_matchmaker="redis", matchmaker_heartbeat_freq=5,
                          matchmaker_heartbeat_ttl=2)


# -- TLS ----------------------------------------------------------------------------

@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server that speaks only TLS and requires a client certificate."""
    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        pytest.skip("redis-server and openssl are needed (scripts/bootstrap.sh installs them)")
    (tmp_path / "certs").mkdir()
    server = RedisServer(tmp_path, make_certificates(tmp_path / "certs")).start()
    try:
        yield server
    finally:
        server.stop()


def test_discovery_over_tls(tls_redis, tmp_path, client):
    svc = service("t1", tls_redis, tmp_path, topic="sealed")
    try:
        client.init(rpc_zmq_host="client", **options(tls_redis))
        assert client.call(CTX, "sealed", msg("whoami")) == "t1"
        with tls_redis.client() as r:
            assert r.sismember("nzf:topic:d:sealed", svc.address)
    finally:
        assert svc.stop() == 0


@pytest.mark.parametrize("change", [
    "plaintext", "a CA that did not sign Redis's certificate", "no client certificate",
    "a host name the certificate does not name"])
def test_discovery_refuses_a_tls_redis_it_cannot_verify_or_is_refused_by(tls_redis, change):
    certs = tls_redis.certs
    opts = options(tls_redis, matchmaker_redis_ssl=True, matchmaker_redis_ssl_ca_certs="",
                   matchmaker_redis_ssl_certfile="", matchmaker_redis_ssl_keyfile="")
    opts.update({
        "plaintext": {"matchmaker_redis_ssl": False},
        "a CA that did not sign Redis's certificate": {
            "matchmaker_redis_ssl_ca_certs": certs["other-ca.crt"],
            "matchmaker_redis_ssl_certfile": certs["client.crt"],
            "matchmaker_redis_ssl_keyfile": certs["client.key"]},
        "no client certificate": {"matchmaker_redis_ssl_ca_certs": certs["ca.crt"]},
        "a host name the certificate does not name": {      # it names 127.0.0.1 only
            "matchmaker_redis_host": "localhost",
            "matchmaker_redis_ssl_ca_certs": certs["ca.crt"],
            "matchmaker_redis_ssl_certfile": certs["client.crt"],
            "matchmaker_redis_ssl_keyfile": certs["client.key"]},
    }[change])
    backend = RedisBackend(Options.from_conf(**opts))
    try:
        with pytest.raises(DiscoveryUnavailable):
            backend.fetch("sealed", False)
    finally:
        backend.close()


def test_a_client_key_that_is_not_the_certificates_is_refused_at_init(tls_redis, client):
    certs = tls_redis.certs
    with pytest.raises(ValueError, match="matchmaker_redis_ssl files"):
        client.init(**dict(tls_redis.options, matchmaker_redis_ssl_keyfile=certs["server.key"]))


def test_tls_options_are_checked_before_anything_is_sent(tmp_path, client):
    with pytest.raises(ValueError, match="matchmaker_redis_ssl is not"):
        client.init(rpc_zmq_matchmaker="redis", matchmaker_redis_ssl_ca_certs=str(tmp_path))
    for path in (tmp_path / "missing.crt", tmp_path):
        with pytest.raises(ValueError, match="not a readable file"):
            client.init(rpc_zmq_matchmaker="redis", matchmaker_redis_ssl=True,
                        matchmaker_redis_ssl_ca_certs=str(path))
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    with pytest.raises(ValueError, match="matchmaker_redis_ssl files"):
        client.init(rpc_zmq_matchmaker="redis", matchmaker_redis_ssl=True,
                    matchmaker_redis_ssl_ca_certs=str(tmp_path / "garbage.pem"))
    with pytest.raises(ValueError, match="needs matchmaker_redis_ssl_certfile"):
        client.init(rpc_zmq_matchmaker="redis", matchmaker_redis_ssl=True,
                    matchmaker_redis_ssl_keyfile=str(tmp_path))


def test_redis_through_sentinel_over_tls(tls_redis, tmp_path, client):
    through_sentinel(tls_redis, tmp_path, client)


def test_sentinel_addresses_parse_like_ring_entries():
    from nova_zmq_fast.matchmaker.redis import _parse_host_port
    assert _parse_host_port("s1", 26379) == ("s1", 26379)
    assert _parse_host_port("s1:26380", 26379) == ("s1", 26380)
    assert _parse_host_port("[::1]:26380", 26379) == ("::1", 26380)
    assert _parse_host_port("2001:db8:0:0:0:0:0:5", 26379) == ("2001:db8:0:0:0:0:0:5", 26379)
    for bad in ("s1:port", ":26379", "[::1]:x"):
        with pytest.raises(ValueError):
            _parse_host_port(bad, 26379)
