"""The route table: where a message for a topic may go.

Discovery backends (nova_zmq_fast/matchmaker/) know which servers consume a
topic; this table is what the sending path asks, and the one home of the
rules every backend shares:

  * a cache.  A cast or call costs a dict lookup.  The runtime's courier
    (_courier.pyx) re-fetches every route in use each
    `backend.refresh_interval` seconds and drops the routes nobody used
    since its last pass, so the message path only waits on the backend for
    a topic it has never seen.  When the
    backend fails (Redis is down), routes already known are kept: the
    cluster goes on serving on what it knew.  "Nobody" is never cached: a
    server that just registered is found on the next try;
  * the 'topic.host' rule (host_candidates / host_base_len below), used by
    the client to find a host's consumers and by the server to recognise a
    message meant for it;
  * what an address must be to be dialled (Endpoint);
  * peers marked down (a connection that could not be made, or a server
    that stopped answering the courier's probes: skipped until it answers)
    and peers the backend declared gone (outboxes disconnect from them,
    dropping what they queued there) until it lists them again.
"""
import collections
import logging
import re

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memcmp
from nova_zmq_fast._zmq cimport now as _now


from nova_zmq_fast._green import unpatched
from nova_zmq_fast.exceptions import DiscoveryUnavailable

LOG = logging.getLogger("nova_zmq_fast.routes")

DEAD_MAX = 4096                     # forgotten addresses remembered
cdef double RECHECK_EVERY = 0.25    # seconds between rechecks of one topic

# What peers can dial: tcp://<host>:<port>, as every server binds and
# advertises (options.tcp_endpoint).  Stricter than zmq_connect()'s own
# check, so an Endpoint is never refused there: the sending path would
# raise instead of passing that server over.
cdef object _DIALLABLE = re.compile(
    r"tcp://(?:\[[0-9A-Za-z.:%_-]+\]|[0-9A-Za-z:][0-9A-Za-z.:%_-]*):([0-9]{1,5})")


cdef class Endpoint:
    """A server a message can be sent to: its logical host, the address
    peers connect to and, with CURVE, its public key.  ValueError for an
    address peers could not dial: a backend passes such a server over."""

    def __cinit__(self, str host not None, str address not None, key=None):
        # (In __cinit__: no Endpoint escapes the check, not even by __new__.)
        match = _DIALLABLE.fullmatch(address)
        if match is None or not 0 < int(match.group(1)) < 65536:
            raise ValueError(f"{address!r} is not an address peers can dial "
                             f"(tcp://<host>:<port>)")
        if key is not None and not isinstance(key, bytes):
            raise TypeError("key must be bytes (Z85) or None")
        self.host = host
        self.address = address
        self.rid = address.encode()
        self.key = key

    def __eq__(self, other):
        if isinstance(other, Endpoint):
            return (<Endpoint>other).address == self.address
        return NotImplemented

    def __hash__(self):
        return hash(self.address)

    def __repr__(self):
        return f"Endpoint({self.host!r}, {self.address!r})"

    def __reduce__(self):
        return (Endpoint, (self.host, self.address, self.key))


# -- the 'topic.host' rule ----------------------------------------------------

cdef tuple _keys(endpoints):
    return tuple([(<Endpoint>ep).key for ep in endpoints])


def host_candidates(str topic not None):
    """The (base topic, host) pairs a name such as 'compute.node7' may mean,
    most likely first.  oslo.messaging's 'exchange:topic@server' splits at
    the last '@'.  Otherwise the split is tried at each '.' from the left, so
    host names may contain dots ('compute.node7.example.com',
    'compute.10.0.0.13'); a topic registered under its full dotted name
    always wins over this rule, because it is looked up first."""
    cdef Py_ssize_t at = topic.rfind("@")
    if 0 < at < len(topic) - 1:
        return [(topic[:at], topic[at + 1:])]
    found = []
    cdef Py_ssize_t i = topic.find(".")
    while i != -1:
        if 0 < i < len(topic) - 1:
            found.append((topic[:i], topic[i + 1:]))
        i = topic.find(".", i + 1)
    return found


cdef Py_ssize_t host_base_len(const char *topic, Py_ssize_t n,
                              const char *host, Py_ssize_t host_len) noexcept nogil:
    """The server's side of the rule: if `topic` is '<base>.<host>' or
    '<base>@<host>' for this server's `host`, the length of <base>; else -1."""
    cdef Py_ssize_t base = n - host_len - 1
    if host_len == 0 or base <= 0:
        return -1
    if topic[base] != b'.' and topic[base] != b'@':
        return -1
    if memcmp(topic + base + 1, host, host_len) != 0:
        return -1
    return base


# -- the table ----------------------------------------------------------------

cdef class Route:
    pass


cdef class RouteTable:
    """Routes of one Runtime, filled by its discovery backend.  Thread-safe:
    the message path reads plain dicts, the refresher replaces whole values."""

    def __init__(self, backend):
        self.backend = backend
        self.direct = {}
        self.fanout = {}
        self.prefixes = {}
        self.down = {}
        self.dead = collections.OrderedDict()
        self.dead_count = 0
        self.interval = float(backend.refresh_interval)
        self.lock = unpatched("threading").Lock()
        self.on_route = None
        self.closed = False
        backend.attach(self)

    # -- the message path --------------------------------------------------

    cdef tuple lookup(self, object topic):
        """Endpoints that may receive a cast or call to `topic`."""
        cdef Route route = self.direct.get(topic)
        if route is not None:
            route.used = True
            return route.endpoints
        return self._miss(self.direct, topic, False)

    cdef tuple lookup_fanout(self, object topic):
        """Every endpoint registered with fanout=True on `topic`, once each."""
        cdef Route route = self.fanout.get(topic)
        if route is not None:
            route.used = True
            return route.endpoints
        return self._miss(self.fanout, topic, True)

    cdef tuple live(self, tuple endpoints):
        """`endpoints` without those marked down."""
        if not self.down:
            return endpoints
        cdef double now = _now()
        for address, until in list(self.down.items()):
            if until <= now:
                self.down.pop(address, None)
        return tuple(ep for ep in endpoints if (<Endpoint>ep).address not in self.down)

    cdef tuple _miss(self, dict cache, object topic, bint fanout):
        cdef tuple endpoints
        try:
            endpoints = self._answer(self._fetch(topic, fanout))
        except DiscoveryUnavailable as exc:
            raise DiscoveryUnavailable(exc.info, topic) from None
        self._store(cache, topic, endpoints)
        return endpoints

    cdef tuple recheck(self, object topic):
        """Ask the backend again about `topic` now, for a send that found
        none of its consumers connected: a server that restarted on a new
        address is found at once, not at the next refresh.  At most once
        per RECHECK_EVERY seconds a topic, however many senders wait; what
        was known is kept if the backend fails."""
        cdef Route route = self.direct.get(topic)
        cdef double now = _now()
        if route is not None and now < route.rechecked + RECHECK_EVERY:
            return route.endpoints
        if route is not None:
            route.rechecked = now
        try:
            endpoints = self._answer(self._fetch(topic, False))
        except Exception:
            return route.endpoints if route is not None else ()
        self._store(self.direct, topic, endpoints)
        route = self.direct.get(topic)
        if route is not None:
            route.rechecked = now
        return endpoints

    cdef _store(self, dict cache, object topic, tuple endpoints):
        """Put the backend's answer for `topic` in `cache`: a route that
        changed bumps `generation`; nobody listed removes the route."""
        cdef Route route = cache.get(topic)
        if route is None:
            if endpoints and not self.closed:
                route = Route.__new__(Route)
                route.endpoints = endpoints
                route.used = True
                cache[topic] = route
                if self.on_route is not None:
                    self.on_route()             # the courier starts refreshing
            return
        # (Endpoints are equal by address: a new key is a change too.)
        if endpoints != route.endpoints or _keys(endpoints) != _keys(route.endpoints):
            self.generation += 1
        if endpoints:
            route.endpoints = endpoints
        elif cache.get(topic) is route:
            cache.pop(topic, None)

    cdef tuple _answer(self, endpoints):
        """A backend's answer as the sending path needs it: Endpoints only
        (the client reads their fields without checks), de-duplicated, in
        order.  An address it lists is alive, whatever it was declared
        before (a new process on the same port): revived here, for every
        backend, so that none can leave it forgotten."""
        for ep in endpoints:
            if type(ep) is not Endpoint:
                raise TypeError(f"a discovery backend returned {type(ep).__name__}, "
                                f"not an Endpoint")
        if self.dead:
            for ep in endpoints:
                if (<Endpoint>ep).address in self.dead:
                    self.revive((<Endpoint>ep).address)
        return tuple(dict.fromkeys(endpoints))

    def _fetch(self, topic, bint fanout):
        """Ask the backend, applying the 'topic.host' rule to direct topics
        nobody registered under their full name."""
        backend = self.backend
        endpoints = backend.fetch(topic, fanout)
        if endpoints or fanout:
            return endpoints
        candidates = host_candidates(topic)
        for base, host in candidates:
            endpoints = [ep for ep in backend.fetch(base, False) if ep.host == host]
            if endpoints:
                return endpoints
        return backend.unlisted(candidates) if candidates else []

    # -- Python-level access (tests, tools, the oslo.messaging driver) -----

    def route(self, str topic not None, bint fanout=False):
        """What a send to `topic` would choose from (cached like a send)."""
        return self.lookup_fanout(topic) if fanout else self.lookup(topic)

    def topics(self, str prefix not None):
        """Registered topic names starting with `prefix`, cached for one
        refresh interval (the last answer is kept while the backend fails).
        The oslo.messaging driver finds notification pools with it."""
        entry = self.prefixes.get(prefix)
        now = _now()
        if entry is not None and entry[0] > now:
            return entry[1]
        try:
            names = tuple(sorted(self.backend.list_topics(prefix)))
        except DiscoveryUnavailable:
            if entry is not None:
                return entry[1]
            raise
        if names:
            self.prefixes[prefix] = (now + self.interval, names)
        else:
            self.prefixes.pop(prefix, None)
        return names

    def invalidate(self, topic=None):
        """Forget cached routes (all, or those of one topic)."""
        self.generation += 1
        if topic is None:
            self.direct.clear()
            self.fanout.clear()
        else:
            self.direct.pop(topic, None)
            self.fanout.pop(topic, None)
        self.prefixes.clear()

    def mark_down(self, str address not None, double seconds):
        """Skip `address` for `seconds`: a connection to it could not be
        made, or it stopped answering the courier's probes."""
        self.down[address] = _now() + seconds

    def mark_up(self, str address not None):
        """`address` answers again."""
        self.down.pop(address, None)

    def is_down(self, str address not None):
        until = self.down.get(address)
        return until is not None and until > _now()

    def forget(self, str address not None):
        """The backend knows `address` is gone: stop choosing it, and let
        outboxes drop their connections (and what they queued) to it."""
        with self.lock:
            self.dead[address] = True
            self.dead.move_to_end(address)
            while len(self.dead) > DEAD_MAX:
                self.dead.popitem(last=False)
            self.dead_count += 1
        self.generation += 1
        for cache in (self.direct, self.fanout):
            for topic, route in list(cache.items()):
                endpoints = (<Route>route).endpoints
                if any((<Endpoint>ep).address == address for ep in endpoints):
                    (<Route>route).endpoints = tuple(
                        ep for ep in endpoints if (<Endpoint>ep).address != address)
                    if not (<Route>route).endpoints:
                        cache.pop(topic, None)

    def revive(self, str address not None):
        """`address` is alive again (a new process on the same port).
        Every answer of the backend that lists it does this (_answer)."""
        if address in self.dead:
            with self.lock:
                self.dead.pop(address, None)

    def addresses(self):
        """Every address some cached route holds."""
        found = set()
        for cache in (self.direct, self.fanout):
            for route in list(cache.values()):
                found.update((<Endpoint>ep).address for ep in (<Route>route).endpoints)
        return found

    def forgotten(self):
        """The addresses declared gone, oldest first."""
        with self.lock:
            return list(self.dead)

    # -- refreshing (the runtime's courier calls this every interval) -------

    def refresh(self):
        """One pass: re-fetch every route used since the last pass, drop
        the others and stale prefix answers."""
        self._refresh(self.direct, False)
        self._refresh(self.fanout, True)
        now = _now()
        for prefix, entry in list(self.prefixes.items()):
            if entry[0] <= now - self.interval:
                self.prefixes.pop(prefix, None)

    cdef _refresh(self, dict cache, bint fanout):
        cdef Route route
        for topic, route in list(cache.items()):
            if not route.used:
                if cache.get(topic) is route:
                    cache.pop(topic, None)
                continue
            route.used = False
            try:
                endpoints = self._answer(self._fetch(topic, fanout))
            except Exception:
                # The backend reports its own outages; keep serving on what
                # we knew.  Marked used so it is tried again next pass.
                route.used = True
                continue
            self._store(cache, topic, endpoints)

    def endpoints(self):
        """Every Endpoint some cached route holds, once each, as (endpoint,
        topic, fanout) of one route that holds it."""
        found = {}
        for fanout, cache in ((False, self.direct), (True, self.fanout)):
            for topic, route in list(cache.items()):
                for ep in (<Route>route).endpoints:
                    found[(<Endpoint>ep).address] = (ep, topic, fanout)
        return list(found.values())

    def withdrew(self, str address not None, str topic not None, bint fanout):
        """Does discovery no longer list `address` for `topic`, which it
        did?  (A process that withdrew cleanly, rather than one gone
        silent.)  False when discovery cannot say."""
        try:
            endpoints = self._fetch(topic, fanout)
        except Exception:                   # noqa: BLE001 (unreachable: it cannot say)
            return False
        return all((<Endpoint>ep).address != address for ep in endpoints)

    @property
    def empty(self):
        return not self.direct and not self.fanout and not self.prefixes

    def close(self):
        """Stop caching; the backend is closed by its owner."""
        self.closed = True
        self.invalidate()

