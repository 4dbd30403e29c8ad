"""Discovery for many hosts through Redis (redis-py).

Keys, all under the `nzf:` prefix of one Redis database:

    nzf:node:<address>          JSON {"host", "address", "pid", "key"?}, expires
                                after matchmaker_heartbeat_ttl seconds
    nzf:topic:d:<topic>         set of the addresses consuming <topic>
    nzf:topic:f:<topic>         ... with fanout=True
    nzf:boot                    a random token: gone or changed means Redis
                                lost its data (a restart without persistence)

A serving process re-writes its node key and its topic memberships every
matchmaker_heartbeat_freq seconds from a heartbeat thread.  That one
idempotent write keeps it alive, and it also registers it again from
scratch after Redis comes back empty.  A process that dies silently
disappears when its node key expires; a clean close() deletes it at once.
A lookup reads a topic's set and the members' node keys in one round trip;
members without a node key are dead and are removed.

The route table caches lookups and refreshes them in the background, so the
message path waits on Redis only for a topic it has never seen.  When Redis
cannot be reached, lookups fail fast for a backoff period instead of waiting
on the socket each time, the cached routes stay in use, and registrations
are retried with backoff.  The outage is logged once, and the recovery once.
For `matchmaker_heartbeat_ttl` seconds after Redis lost its data, an empty
answer is not believed, because servers are still registering again.

With `matchmaker_redis_ssl`, every connection (to Redis and to Sentinels)
is TLS with Redis's certificate and host name verified; a Redis that fails
verification is unreachable, like any other outage, never used in clear.
"""
import contextlib
import json
import logging
import os
import secrets
import ssl
import threading
import time

from nova_zmq_fast._green import unpatched
from nova_zmq_fast.exceptions import DiscoveryRefused, DiscoveryUnavailable
from nova_zmq_fast.matchmaker import Backend, node_endpoint
from nova_zmq_fast.options import Option

LOG = logging.getLogger("nova_zmq_fast.matchmaker.redis")
PREFIX = "nzf:"
BOOT_KEY = PREFIX + "boot"
BACKOFF_MAX = 5.0
# Seconds one Redis command may take.  An outage costs it once: after that,
# lookups fail fast until the backoff has passed.
SOCKET_TIMEOUT = 1.0


def _topic_key(topic, fanout):
    return f"{PREFIX}topic:{'f' if fanout else 'd'}:{topic}"


def _node_key(address):
    return f"{PREFIX}node:{address}"


def _parse_host_port(text, default_port):
    """'host', 'host:port', '[v6]' or '[v6]:port', or a bare IPv6 address
    (more than one ':' and no brackets: no port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port) if port else default_port


class RedisBackend(Backend):

    OPTIONS = (
        Option("matchmaker_redis_host", "str", "127.0.0.1", "Redis host ('redis' discovery)."),
        Option("matchmaker_redis_port", "port", 6379, "Redis port."),
        Option("matchmaker_redis_password", "secret", "", "Redis password (empty: none)."),
        Option("matchmaker_redis_db", "count", 0, "Redis database number."),
        Option("matchmaker_redis_sentinels", "list", [],
               "host:port of Redis Sentinels; when set, discovery uses the master they "
               "name (matchmaker_redis_sentinel_service) instead of matchmaker_redis_host."),
        Option("matchmaker_redis_sentinel_service", "str", "mymaster",
               "Name of the Redis master the Sentinels monitor."),
        Option("matchmaker_redis_ssl", "bool", False,
               "Talk to Redis (and its Sentinels) over TLS, verifying its certificate "
               "and host name."),
        Option("matchmaker_redis_ssl_ca_certs", "str", "",
               "CA bundle that signed Redis's certificate (empty: the system's)."),
        Option("matchmaker_redis_ssl_certfile", "str", "",
               "This process's client certificate, for a Redis that requires one "
               "(tls-auth-clients)."),
        Option("matchmaker_redis_ssl_keyfile", "str", "",
               "The private key of matchmaker_redis_ssl_certfile (empty: in that file)."),
        Option("matchmaker_heartbeat_freq", "float", 1,
               "Seconds between a server's registration heartbeats."),
        Option("matchmaker_heartbeat_ttl", "float", 5,
               "Seconds after its last heartbeat that a server is forgotten."),
    )
    BIND_ADDRESS = "*"
    PORT = 0

    def __init__(self, options):
        super().__init__(options)
        import redis                        # only this backend needs redis-py
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors = (redis.RedisError, OSError)
        self._refusal = redis.AuthenticationError
        self.refused = None                 # why Redis refused our credentials, if it did
        timeout = SOCKET_TIMEOUT
        # Retries and backoff are ours (see _execute): redis-py's own would
        # make every lookup during an outage wait seconds.
        tls = _tls_options(options)
        common = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                  "retry": Retry(NoBackoff(), 0),
                  "password": options.matchmaker_redis_password or None,
                  "db": options.matchmaker_redis_db, **tls}
        if options.matchmaker_redis_sentinels:
            from redis.sentinel import Sentinel
            sentinels = [_parse_host_port(s, 26379) for s in options.matchmaker_redis_sentinels]
            sentinel = Sentinel(sentinels, sentinel_kwargs={
                "socket_timeout": timeout, "socket_connect_timeout": timeout,
                "retry": Retry(NoBackoff(), 0), **tls})
            self._sentinels = sentinel.sentinels
            self.redis = sentinel.master_for(options.matchmaker_redis_sentinel_service, **common)
            self._where = f"sentinels {', '.join(options.matchmaker_redis_sentinels)}"
        else:
            self._sentinels = []
            self.redis = redis.Redis(host=options.matchmaker_redis_host,
                                     port=options.matchmaker_redis_port, **common)
            self._where = f"{options.matchmaker_redis_host}:{options.matchmaker_redis_port}"
        self.ttl_ms = int(options.matchmaker_heartbeat_ttl * 1000)
        self.freq = options.matchmaker_heartbeat_freq
        self._own = {}                      # address -> (Endpoint, set of (topic, fanout))
        # Held across a change to _own and its write to Redis, so writes
        # reach Redis in the order _own changed: a heartbeat cannot put back
        # what unregister() or close() just removed.  Taken with _locked().
        self._lock = unpatched("threading").Lock()
        self._wake = unpatched("threading").Event()
        self._thread = None
        self._closed = False
        self._boot = None                   # the nzf:boot token last seen
        self._resync_until = 0.0            # empty answers are not believed until then
        self._failures = 0
        self._retry_at = 0.0                # fail fast until then after an error
        self.outages = 0

    @classmethod
    def validate(cls, options):
        if options.matchmaker_heartbeat_ttl <= options.matchmaker_heartbeat_freq:
            raise ValueError("matchmaker_heartbeat_ttl must exceed matchmaker_heartbeat_freq")
        _tls_options(options)

    @classmethod
    def url_options(cls, hosts, virtual_host):
        """zmqfast+redis://[:password@]host:port[/db]"""
        if len(hosts) > 1:
            return {"matchmaker_redis_sentinels": [f"{h}:{p or 26379}" for h, p, _, _ in hosts]}
        options = {}
        if hosts:
            host, port, _, password = hosts[0]
            if host:
                options["matchmaker_redis_host"] = host
            if port:
                options["matchmaker_redis_port"] = int(port)
            if password:
                options["matchmaker_redis_password"] = password
        if virtual_host:
            if not str(virtual_host).isdigit():
                raise ValueError(f"redis database {virtual_host!r} is not a number")
            options["matchmaker_redis_db"] = int(virtual_host)
        return options

    # -- talking to Redis ------------------------------------------------------

    def _execute(self, build):
        """Run the pipeline `build(pipe)` fills, with the outage policy:
        after a failure, calls fail fast until the backoff has passed."""
        now = time.monotonic()
        if now < self._retry_at:
            raise DiscoveryUnavailable(f"Redis at {self._where} is unreachable")
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(BOOT_KEY, secrets.token_hex(8), nx=True)
            pipe.get(BOOT_KEY)
            build(pipe)
            results = pipe.execute()
        except self._errors as exc:
            self._failed(exc)
            raise DiscoveryUnavailable(f"Redis at {self._where}: {exc}") from None
        boot = results[1]
        if boot != self._boot:
            if self._boot is not None:
                LOG.warning("discovery: Redis at %s lost its data; servers register again",
                            self._where)
                self._resync_until = time.monotonic() + self.ttl_ms / 1000.0
                self._wake.set()            # re-register our own at once
            self._boot = boot
        if self._failures:
            LOG.warning("discovery: Redis at %s is reachable again", self._where)
            self.refused = None
            self._failures = 0
            self._retry_at = 0.0
            self._wake.set()
        return results[2:]

    @contextlib.contextmanager
    def _locked(self):
        """self._lock, taken without blocking an eventlet hub: the green
        thread that holds it may be waiting on Redis, and it can only go on
        if the hub runs.  So a contender polls (time.sleep yields under
        eventlet) rather than block its OS thread.  Registrations are rare;
        the message path never takes this lock."""
        while not self._lock.acquire(False):
            time.sleep(0.001)
        try:
            yield
        finally:
            self._lock.release()

    def _write(self, build):
        """_execute for a registration change: a failure is left to the
        heartbeat thread to repair (or to the TTL).  Returns whether it
        reached Redis."""
        try:
            self._execute(build)
            return True
        except DiscoveryUnavailable:
            return False

    def _failed(self, exc):
        # Wrong or missing credentials are a configuration error, not an
        # outage: said as such, and register() raises it (see there).
        self.refused = exc if isinstance(exc, self._refusal) else None
        if self._failures == 0 and self.refused is not None:
            self.outages += 1
            LOG.error("discovery: Redis at %s refused this process's credentials "
                      "(matchmaker_redis_password): %s", self._where, exc)
        elif self._failures == 0:
            self.outages += 1
            LOG.warning("discovery: Redis at %s is unreachable (%s); serving on cached "
                        "routes and retrying with backoff", self._where, exc)
        self._failures += 1
        delay = min(BACKOFF_MAX, 0.1 * 2 ** min(self._failures, 8))
        self._retry_at = time.monotonic() + delay

    # -- registration ----------------------------------------------------------

    def _write_node(self, pipe, node, entries):
        info = {"host": node.host, "address": node.address, "pid": os.getpid()}
        if node.key is not None:
            info["key"] = node.key.decode()
        pipe.set(_node_key(node.address), json.dumps(info), px=self.ttl_ms)
        for topic, fanout in entries:
            pipe.sadd(_topic_key(topic, fanout), node.address)

    def register(self, node, topic, fanout=False):
        with self._locked():
            if self._closed:
                return
            entry = self._own.setdefault(node.address, (node, set()))
            entry[1].add((topic, fanout))
            if (not self._write(lambda pipe: self._write_node(pipe, node, [(topic, fanout)]))
                    and self.refused is not None):
                # During an outage a server starts and registers when Redis
                # returns; with credentials Redis refuses, it never would.
                entry[1].discard((topic, fanout))
                if not entry[1]:
                    del self._own[node.address]
                raise DiscoveryRefused(f"Redis at {self._where} refused this process's "
                                       f"credentials (matchmaker_redis_password): {self.refused}")
        self._ensure_heartbeat()
        if self.routes is not None:
            self.routes.invalidate(topic)

    def unregister(self, node, topic, fanout=False):
        with self._locked():
            entry = self._own.get(node.address)
            if entry is None or (topic, fanout) not in entry[1]:
                return
            entry[1].discard((topic, fanout))
            last = not entry[1]
            if last:
                del self._own[node.address]

            def build(pipe):
                pipe.srem(_topic_key(topic, fanout), node.address)
                if last:
                    pipe.delete(_node_key(node.address))
            self._write(build)              # on failure its node key expires within the TTL
        if self.routes is not None:
            self.routes.invalidate(topic)

    def _ensure_heartbeat(self):
        with self._locked():
            if self._thread is not None or self._closed:
                return
            self._thread = unpatched("threading").Thread(
                target=self._heartbeat_loop, name="nova_zmq_fast-redis-heartbeat", daemon=True)
            self._thread.start()

    def _heartbeat_loop(self):
        while not self._closed:
            delay = self.freq
            with self._locked():
                own = [(node, list(entries)) for node, entries in self._own.values()]
                if own and not self._write(lambda pipe: [self._write_node(pipe, node, entries)
                                                         for node, entries in own]):
                    delay = max(0.05, min(self.freq, self._retry_at - time.monotonic()))
            self._wake.wait(delay)
            self._wake.clear()

    def close(self):
        with self._locked():
            self._closed = True
            own, self._own = list(self._own.values()), {}
            if own:
                def build(pipe):
                    for node, entries in own:
                        for topic, fanout in entries:
                            pipe.srem(_topic_key(topic, fanout), node.address)
                        pipe.delete(_node_key(node.address))
                self._retry_at = 0.0        # one last try, even during a backoff
                self._write(build)
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not unpatched("threading").current_thread():
            thread.join(5)
        self.redis.close()
        for sentinel in self._sentinels:
            sentinel.close()

    # -- lookup ------------------------------------------------------------------

    def fetch(self, topic, fanout):
        key = _topic_key(topic, fanout)
        members, = self._execute(lambda pipe: pipe.smembers(key))
        if not members:
            if time.monotonic() < self._resync_until:
                raise DiscoveryUnavailable("Redis lost its data; servers are registering again")
            return []
        addresses = sorted(m.decode() for m in members)
        values = self._execute(lambda pipe: pipe.mget([_node_key(a) for a in addresses]))[0]
        endpoints, gone = [], []
        for address, value in zip(addresses, values):
            if value is None:               # its node key expired: dead
                gone.append(address)
                continue
            endpoint = node_endpoint(value, _node_key(address))
            if endpoint is not None:
                endpoints.append(endpoint)
        if gone:
            try:
                self._execute(lambda pipe: pipe.srem(key, *gone))
            except DiscoveryUnavailable:
                pass
            if self.routes is not None:
                for address in gone:
                    self.routes.forget(address)
        return endpoints

    def list_topics(self, prefix):
        pattern = _topic_key(_glob_escape(prefix), False) + "*"
        start = len(_topic_key("", False))
        names = set()
        cursor = 0
        for _ in range(10000):              # bounded: SCAN ends at cursor 0
            cursor, keys = self._execute(lambda pipe: pipe.scan(cursor, match=pattern,
                                                                 count=1000))[0]
            names.update(k.decode()[start:] for k in keys)
            if cursor == 0:
                break
        return sorted(names)

    def nodes(self):
        found = {}
        for fanout in (False, True):
            pattern = _topic_key("*", fanout)
            start = len(_topic_key("", fanout))
            cursor = 0
            for _ in range(10000):
                cursor, keys = self._execute(lambda pipe: pipe.scan(cursor, match=pattern,
                                                                     count=1000))[0]
                for key in keys:
                    topic = key.decode()[start:]
                    for ep in self.fetch(topic, fanout):
                        node = found.setdefault(ep.address, {
                            "host": ep.host, "address": ep.address, "alive": True,
                            "topics": []})
                        node["topics"].append(topic + (" (fanout)" if fanout else ""))
                if cursor == 0:
                    break
        return sorted(found.values(), key=lambda n: n["address"])


def _tls_options(options):
    """redis-py's keyword arguments for TLS, with Redis's certificate and
    host name verified.  ValueError for a file that cannot be read or
    loaded, or for TLS files without matchmaker_redis_ssl (they would go
    unused)."""
    files = {arg: getattr(options, "matchmaker_redis_" + arg)
             for arg in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")}
    if not options.matchmaker_redis_ssl:
        for arg, path in files.items():
            if path:
                raise ValueError(f"matchmaker_redis_{arg} is set but matchmaker_redis_ssl is not")
        return {}
    if files["ssl_keyfile"] and not files["ssl_certfile"]:
        raise ValueError("matchmaker_redis_ssl_keyfile needs matchmaker_redis_ssl_certfile")
    for arg, path in files.items():
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ValueError(f"matchmaker_redis_{arg} {path!r} is not a readable file")
    # Load them once here, so that a file that is not PEM, or a key that is
    # not the certificate's, is an error now rather than an endless outage.
    try:
        context = ssl.create_default_context(cafile=files["ssl_ca_certs"] or None)
        if files["ssl_certfile"]:
            context.load_cert_chain(files["ssl_certfile"], files["ssl_keyfile"] or None,
                                    password=_no_passphrase)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ValueError(f"matchmaker_redis_ssl files: {exc}") from None
    return dict({arg: path for arg, path in files.items() if path}, ssl=True,
                ssl_cert_reqs="required", ssl_check_hostname=True)


def _no_passphrase():
    raise ValueError("the key of matchmaker_redis_ssl_certfile is encrypted: give it in clear "
                     "(a file readable by this service only)")


def _glob_escape(text):
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


BACKEND = RedisBackend
