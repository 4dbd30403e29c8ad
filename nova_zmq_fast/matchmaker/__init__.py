"""Discovery ("matchmaker"): which live servers consume a topic, and where.

A backend implements `register`, `unregister`, `_fetch` (the live endpoints
of one topic, direct or fanout) and `_list_topics` (names by prefix).  This base class adds what every backend
needs on the message path: a short cache so that a cast costs a dict lookup
rather than a registry read, the 'topic.host' rule, and the list of
endpoints declared dead so outboxes can drop their queues to them.

Backends: `local` (embedded, one machine, no daemon) and `ring` (a static
JSON file).  A new backend is one new module with one MatchMaker subclass.
"""
import abc
import collections
import threading
import time

# How long a lookup result is reused.  A consumer whose process died stops
# being chosen within this time plus one liveness check.
CACHE_TTL = 1.0
FORGOTTEN_MAX = 4096


class Endpoint:
    """A server a message can be sent to: its logical host and its ZeroMQ
    address.  The address is also the server's routing id (servers announce
    it as such), so `rid` is what outboxes connect to and send to."""

    __slots__ = ("host", "address", "rid")

    def __init__(self, host, address):
        self.host = host
        self.address = address
        self.rid = address.encode()

    def __eq__(self, other):
        return isinstance(other, Endpoint) and other.address == self.address

    def __hash__(self):
        return hash(self.address)

    def __repr__(self):
        return f"Endpoint({self.host!r}, {self.address!r})"


def split_host_topic(topic):
    """'compute.host1' -> ('compute', 'host1'); None if there is no dot."""
    base, dot, host = topic.partition(".")
    if not dot or not base or not host:
        return None
    return base, host


class MatchMaker(abc.ABC):
    """The discovery interface, with caching.  Thread-safe."""

    def __init__(self, options):
        self.options = options
        # topic -> (expiry, endpoints), for direct and for fanout lookups.
        # The client reads `routes` itself on the message path.
        self.routes = {}
        self.fanout_routes = {}
        self._prefixes = {}                 # prefix -> (expiry, topic names)
        self._lock = threading.Lock()
        self._forgotten = collections.OrderedDict()
        self.forgotten_count = 0

    # -- what a backend implements -----------------------------------------

    @abc.abstractmethod
    def register(self, topic, host, address, fanout=False):
        """Announce that `address` consumes `topic`."""

    @abc.abstractmethod
    def unregister(self, topic, host, address, fanout=False):
        """Withdraw a registration."""

    @abc.abstractmethod
    def _fetch(self, topic, fanout):
        """Registered live endpoints for exactly `topic` (a list)."""

    @abc.abstractmethod
    def _list_topics(self, prefix):
        """Names of the topics registered that start with `prefix`."""

    def close(self):
        """Withdraw everything this process registered."""
        self.invalidate()

    # -- what the message path uses ----------------------------------------

    def lookup(self, topic):
        """Endpoints that may receive a cast or call to `topic`: the
        consumers of `topic`, or for 'topic.host' (when nothing registered
        that exact name) the consumers of 'topic' on that host."""
        entry = self.routes.get(topic)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        endpoints = self._fetch(topic, False)
        if not endpoints:
            split = split_host_topic(topic)
            if split is not None:
                base, host = split
                endpoints = [ep for ep in self._fetch(base, False) if ep.host == host]
        return self._remember(self.routes, topic, endpoints)

    def lookup_fanout(self, topic):
        """Every endpoint registered with fanout=True on `topic`, once each."""
        entry = self.fanout_routes.get(topic)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        return self._remember(self.fanout_routes, topic, self._fetch(topic, True))

    @staticmethod
    def _remember(cache, topic, endpoints):
        # De-duplicate, keep order; never cache "nobody": a server that just
        # registered must be found on the next try.
        endpoints = tuple(dict.fromkeys(endpoints))
        if endpoints:
            cache[topic] = (time.monotonic() + CACHE_TTL, endpoints)
        else:
            cache.pop(topic, None)
        return endpoints

    def topics(self, prefix):
        """Registered topic names starting with `prefix` (cached like
        lookups).  The oslo.messaging driver finds notification pools with
        it: one topic per pool."""
        entry = self._prefixes.get(prefix)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        names = tuple(sorted(self._list_topics(prefix)))
        if names:
            self._prefixes[prefix] = (time.monotonic() + CACHE_TTL, names)
        else:
            self._prefixes.pop(prefix, None)
        return names

    def forget_topic(self, topic, fanout):
        (self.fanout_routes if fanout else self.routes).pop(topic, None)

    def invalidate(self):
        self.routes.clear()
        self.fanout_routes.clear()
        self._prefixes.clear()

    # -- dead endpoints ------------------------------------------------------

    @property
    def forgotten(self):
        return self._forgotten

    def forget(self, address):
        """A backend found `address` dead: stop choosing it, and let
        outboxes drop what they queued for it."""
        with self._lock:
            self._forgotten[address] = True
            self._forgotten.move_to_end(address)
            while len(self._forgotten) > FORGOTTEN_MAX:
                self._forgotten.popitem(last=False)
            self.forgotten_count += 1
        for cache in (self.routes, self.fanout_routes):
            for topic, (expiry, endpoints) in list(cache.items()):
                if any(ep.address == address for ep in endpoints):
                    cache.pop(topic, None)

    def revive(self, address):
        """`address` is registered and alive again (a restart on the same
        port)."""
        if address in self._forgotten:
            with self._lock:
                self._forgotten.pop(address, None)


def create(options):
    """The backend named by options.rpc_zmq_matchmaker."""
    name = options.rpc_zmq_matchmaker
    if name == "local":
        from nova_zmq_fast.matchmaker.local import LocalMatchMaker
        return LocalMatchMaker(options)
    if name == "ring":
        from nova_zmq_fast.matchmaker.ring import RingMatchMaker
        return RingMatchMaker(options)
    raise ValueError(f"matchmaker {name!r} is not available in this version")
