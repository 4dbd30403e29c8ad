"""Static discovery from the original driver's JSON ring file.

    {"compute": ["host1", "host2:9600"], "scheduler": ["[::1]:9601"]}

With CURVE, an entry carries the server's public key too:
{"host": "host2:9600", "key": "<Z85>"}.  Each entry names a host (its logical name and network address at once, as
in the original driver) with an optional port; an entry without one means
matchmaker_ring_port (9501), the same for every process reading the ring,
whatever port it listens on itself.  Several services on one host each
listen on their own port (rpc_zmq_port) and are listed as host:port.
'topic.host' goes to that host's entries for 'topic', or straight to
host:matchmaker_ring_port when the ring does not list it.  Every
entry of a topic receives its fanouts.  The file is re-read when it changes.

The ring says who may serve a topic, not who is up.  Liveness comes from
the connections themselves: a message goes to an entry with an established
connection, so a dead host is skipped while another is up, and ZMTP
heartbeats drop the connection to a host that stops answering.
"""
import json
import logging
import os
import threading

from nova_zmq_fast._routes import Endpoint
from nova_zmq_fast.matchmaker import Backend
from nova_zmq_fast.options import Option, tcp_endpoint

LOG = logging.getLogger("nova_zmq_fast.matchmaker.ring")


def parse_entry(entry, default_port):
    """'host' / 'host:port' / '[v6]:port' / a bare IPv6 address, or
    {"host": one of those, "key": its CURVE public key} -> Endpoint."""
    key = None
    if isinstance(entry, dict):
        key = entry.get("key")
        if not isinstance(key, str) or len(key) != 40 or set(entry) - {"host", "key"}:
            raise ValueError(f"ring entry {entry!r} must be {{'host': ..., 'key': <Z85>}}")
        key = key.encode()
        entry = entry.get("host")
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"ring entry {entry!r} is not a host name")
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    elif ":" in entry:                      # a bare IPv6 address
        host, port = entry, ""
    else:
        host, port = entry, ""
    if not host or any(c in host for c in "/\\ \t"):
        raise ValueError(f"ring entry {entry!r} is not a host name")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"ring entry {entry!r} has a bad port")
        port = int(port)
    else:
        port = default_port
    return Endpoint(host, tcp_endpoint(host, port), key)


def load_ring(path, default_port):
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the ring must be a JSON object of topic -> [hosts]")
    ring = {}
    for topic, hosts in data.items():
        if not isinstance(hosts, list):
            raise ValueError(f"{path}: hosts of topic {topic!r} must be a list")
        ring[topic] = [parse_entry(h, default_port) for h in hosts]
    return ring


class RingBackend(Backend):

    OPTIONS = (
        Option("matchmaker_ringfile", "str", "/etc/oslo/matchmaker_ring.json",
               'Ring file for the ring discovery: {"topic": ["host", "host:port"]}.'),
        Option("matchmaker_ring_port", "int", 9501,
               "The port of a ring entry that names none (and of 'topic.host' for a "
               "host the ring does not list). The same in every process: a service "
               "listening on another rpc_zmq_port is listed as host:port."),
    )
    BIND_ADDRESS = "*"
    PORT = 9501

    def __init__(self, options):
        super().__init__(options)
        self.path = options.matchmaker_ringfile
        self.default_port = options.matchmaker_ring_port
        self._load_lock = threading.Lock()
        self._mtime = None
        self._ring = {}
        self._unlisted = set()              # (topic, address) already warned about
        self._reload()

    @classmethod
    def wildcard_advertise_host(cls, options):
        return options.rpc_zmq_host         # ring files list these names

    def _reload(self):
        with self._load_lock:
            try:
                mtime = os.stat(self.path).st_mtime_ns
            except FileNotFoundError:
                raise ValueError(f"matchmaker_ringfile {self.path} does not exist") from None
            if mtime != self._mtime:
                self._ring = load_ring(self.path, self.default_port)
                self._mtime = mtime
                if self.routes is not None:
                    self.routes.invalidate()

    def register(self, node, topic, fanout=False):
        # The ring is static: servers are listed by the operator.  Peers
        # dial a listed address and name the server by it, so a server
        # whose own address the ring does not list for a topic it serves
        # is never reached: say so at once, not only through timeouts.
        listed = self.fetch(topic, fanout)
        if listed and node.address not in {ep.address for ep in listed} and \
                (topic, node.address) not in self._unlisted:
            self._unlisted.add((topic, node.address))
            LOG.warning("the ring lists %s for %r, not this process's address %s: peers "
                        "will not reach it; list it as %s, or set rpc_zmq_host (or "
                        "rpc_zmq_advertise_address) to the name the ring uses",
                        ", ".join(ep.address for ep in listed), topic, node.address,
                        node.address.partition("://")[2])

    def unregister(self, node, topic, fanout=False):
        pass

    def fetch(self, topic, fanout):
        try:
            self._reload()
        except (OSError, ValueError):
            pass                            # keep serving the last good ring
        return list(self._ring.get(topic, ()))

    def unlisted(self, candidates):
        # A host the ring does not list for the topic: dial it directly on
        # the default port, as the original driver did.
        chosen = next(((b, h) for b, h in candidates if b in self._ring), candidates[0])
        try:
            return [parse_entry(chosen[1], self.default_port)]
        except ValueError:
            return []

    def list_topics(self, prefix):
        return [topic for topic in self._ring if topic.startswith(prefix)]

    def nodes(self):
        found = {}
        for topic, endpoints in sorted(self._ring.items()):
            for ep in endpoints:
                # Listed is not alive: only a failed connection is known.
                node = found.setdefault(ep.address, {
                    "host": ep.host, "address": ep.address, "topics": [],
                    "alive": False if self.routes is not None and
                    self.routes.is_down(ep.address) else None})
                node["topics"].append(topic)
        return sorted(found.values(), key=lambda n: n["address"])


BACKEND = RingBackend
