"""Discovery ("matchmaker"): which live servers consume a topic, and where.

A backend is one module in this package (or a class published under the
entry point group `nova_zmq_fast.matchmakers`) whose `BACKEND` is a
subclass of `Backend`.  It fills the route table (`_routes.RouteTable`),
which owns what every backend shares: the cache and its refresh, the
'topic.host' rule, and peers marked down or gone.  The backend carries its
own policy: its options, where servers bind, which address they advertise,
and how an oslo.messaging URL (`zmqfast+<name>://...`) maps onto its
options.  Adding a backend touches no other file.

Built in: `local` (embedded, one machine, no daemon), `ring` (a static JSON
file) and `redis` (many hosts; redis-py).
"""
import abc
import importlib
import ipaddress
import json
import logging
import pkgutil
import socket

from nova_zmq_fast._routes import Endpoint
from nova_zmq_fast.logs import RateLimitedLog

ENTRY_POINTS = "nova_zmq_fast.matchmakers"
WILDCARDS = ("*", "0.0.0.0", "::", "[::]", "")
BAD_ENTRIES = RateLimitedLog(logging.getLogger("nova_zmq_fast.matchmaker"))


class Backend(abc.ABC):
    """The discovery interface.  Implementations must be thread-safe: the
    route table's refresher and sending threads call `fetch` concurrently."""

    #: Options this backend adds (nova_zmq_fast.options.Option).
    OPTIONS = ()
    #: rpc_zmq_bind_address when it is unset.
    BIND_ADDRESS = "*"
    #: rpc_zmq_port when it is unset; 0 means any free port.
    PORT = 0
    #: Seconds between refreshes of a route in use (the route table's).
    refresh_interval = 1.0

    def __init__(self, options):
        self.options = options
        self.routes = None

    def attach(self, routes):
        """Called by the RouteTable this backend fills."""
        self.routes = routes

    # -- policy -------------------------------------------------------------

    @classmethod
    def validate(cls, options):
        """Raise ValueError for options this backend cannot work with."""

    @classmethod
    def advertise_host(cls, options):
        """The host part of this process's address, as peers must dial it.
        An explicit rpc_zmq_advertise_address wins, then a bind address that
        is not a wildcard; a wildcard is the backend's to resolve."""
        if options.rpc_zmq_advertise_address:
            return options.rpc_zmq_advertise_address.strip("[]")
        bind = options.bind_address.strip("[]")
        if bind not in WILDCARDS:
            return bind
        return cls.wildcard_advertise_host(options)

    @classmethod
    def wildcard_advertise_host(cls, options):
        """Servers bind a wildcard: by default, an address rpc_zmq_host
        resolves to that other machines can reach (not loopback)."""
        return reachable_address(options.rpc_zmq_host)

    @classmethod
    def url_options(cls, hosts, virtual_host):
        """Options from an oslo.messaging URL `zmqfast+<name>://...`:
        `hosts` is a list of (hostname, port, username, password)."""
        if hosts or virtual_host:
            raise ValueError(f"the {cls.__module__.rpartition('.')[2]} discovery "
                             f"takes no hosts in the URL")
        return {}

    # -- what a backend implements -------------------------------------------

    @abc.abstractmethod
    def register(self, node, topic, fanout=False):
        """Announce that `node` (this process's Endpoint) consumes `topic`."""

    @abc.abstractmethod
    def unregister(self, node, topic, fanout=False):
        """Withdraw one registration."""

    @abc.abstractmethod
    def fetch(self, topic, fanout):
        """Live endpoints registered for exactly `topic` (a list).  Raise
        DiscoveryUnavailable when the backend cannot be reached."""

    @abc.abstractmethod
    def list_topics(self, prefix):
        """Names of the registered topics that start with `prefix`."""

    def unlisted(self, candidates):
        """Endpoints for a 'topic.host' name whose host registered nothing
        (candidates as from _routes.host_candidates).  Only static
        discovery can answer; registries return nothing."""
        return []

    def nodes(self):
        """What the backend knows, for operators: a list of dicts with
        host, address, topics (names, ' (fanout)' marked) and alive."""
        return []

    def close(self):
        """Withdraw everything this process registered and release."""


def node_endpoint(text, where):
    """The Endpoint a registry's node entry describes (JSON with "host",
    "address" and, with CURVE, "key"), or None when it describes none that
    peers could dial: that server is passed over, and the entry (`where`)
    named in a warning at a bounded rate.  Every process of the cluster
    writes the registry, not only this one."""
    try:
        data = json.loads(text)
        key = data.get("key")
        return Endpoint(str(data["host"]), str(data["address"]),
                        key.encode() if isinstance(key, str) else None)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        BAD_ENTRIES.warning(where, "discovery entry %s names no server peers can dial, so it "
                            "is passed over: %s", where, exc)
        return None


def _builtin_names():
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def _entry_points():
    from importlib import metadata
    try:
        return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINTS)}
    except TypeError:                       # Python 3.8/3.9 API
        return {ep.name: ep for ep in metadata.entry_points().get(ENTRY_POINTS, ())}


_loaded = {}


def available():
    """Names of the discovery backends this installation has."""
    return sorted(set(_builtin_names()) | set(_entry_points()))


# The original driver named its matchmakers by class path, e.g.
# nova.openstack.common.rpc.matchmaker.MatchMakerRing: a Folsom or Grizzly
# configuration keeps working with the backend that does the same job.
CLASS_NAMES = {"MatchMakerRing": "ring", "MatchMakerRedis": "redis",
               "MatchMakerLocalhost": "local"}


def canonical(name):
    """A backend name for `name`, which may be an original class path."""
    if isinstance(name, str) and "." in name:
        return CLASS_NAMES.get(name.rpartition(".")[2], name)
    return name


def load(name):
    """The Backend class called `name`; ValueError if there is none."""
    cls = _loaded.get(name)
    if cls is not None:
        return cls
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"rpc_zmq_matchmaker {name!r} is not a backend name")
    if name in _builtin_names():
        cls = importlib.import_module(f"{__name__}.{name}").BACKEND
    else:
        ep = _entry_points().get(name)
        if ep is None:
            raise ValueError(f"rpc_zmq_matchmaker {name!r} does not exist; available: "
                             f"{', '.join(available())}")
        cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ValueError(f"discovery backend {name!r} is not a Backend subclass")
    _loaded[name] = cls
    return cls


def reachable_address(host):
    """An address `host` resolves to that is not loopback: what a server
    bound to a wildcard advertises to other machines.  Debian maps the
    hostname to 127.0.1.1 by default, which no other machine can dial, so
    loopback-only answers are refused with advice instead of advertised."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ValueError(f"rpc_zmq_host {host!r} does not resolve ({exc}); set "
                         f"rpc_zmq_advertise_address or bind to a specific address") from None
    addresses = [info[4][0] for info in infos]
    for family in (socket.AF_INET, socket.AF_INET6):
        for info, address in zip(infos, addresses):
            ip = ipaddress.ip_address(address.partition("%")[0])
            if info[0] == family and not (ip.is_loopback or ip.is_unspecified or ip.is_link_local):
                return address
    raise ValueError(f"rpc_zmq_host {host!r} resolves only to {', '.join(sorted(set(addresses)))}, "
                     f"which other machines cannot reach; set rpc_zmq_advertise_address "
                     f"or bind to a specific address")
