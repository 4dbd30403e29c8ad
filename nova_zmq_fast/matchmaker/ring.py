"""Static discovery from the original driver's JSON ring file.

    {"compute": ["host1", "host2:9600"], "scheduler": ["[::1]:9601"]}

Each entry names a host (its logical name and network address at once, as
in the original driver) with an optional port; the default port is
rpc_zmq_port (9501).  'topic.host' goes to that host's entry for 'topic',
or straight to host:port when the ring does not list it.  Every entry of a
topic receives its fanouts.  The file is re-read when it changes.  The ring
has no liveness: servers it lists are always chosen.
"""
import json
import os
import threading

from nova_zmq_fast.matchmaker import Endpoint, MatchMaker, split_host_topic


def parse_entry(entry, default_port):
    """'host' / 'host:port' / '[v6]:port' -> Endpoint."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"ring entry {entry!r} is not a host name")
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        address_host = f"[{host}]"
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
        address_host = host
    elif ":" in entry:                      # a bare IPv6 address
        host, port, address_host = entry, "", f"[{entry}]"
    else:
        host, port, address_host = entry, "", entry
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"ring entry {entry!r} has a bad port")
        port = int(port)
    else:
        port = default_port
    return Endpoint(host, f"tcp://{address_host}:{port}")


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


class RingMatchMaker(MatchMaker):

    def __init__(self, options):
        super().__init__(options)
        self.path = options.matchmaker_ringfile
        self.default_port = options.port
        self._load_lock = threading.Lock()
        self._mtime = None
        self._ring = {}
        self._reload()

    def _reload(self):
        with self._load_lock:
            try:
                mtime = os.stat(self.path).st_mtime_ns
            except FileNotFoundError:
                raise ValueError(f"matchmaker_ringfile {self.path} does not exist") from None
            if mtime != self._mtime:
                self._ring = load_ring(self.path, self.default_port)
                self._mtime = mtime
                self.invalidate()

    def register(self, topic, host, address, fanout=False):
        pass        # the ring is static: servers are listed by the operator

    def unregister(self, topic, host, address, fanout=False):
        pass

    def _list_topics(self, prefix):
        return [topic for topic in self._ring if topic.startswith(prefix)]

    def _fetch(self, topic, fanout):
        try:
            self._reload()
        except (OSError, ValueError):
            pass                            # keep serving the last good ring
        entries = self._ring.get(topic)
        if entries is not None or fanout:
            return list(entries or ())
        split = split_host_topic(topic)
        if split is None:
            return []
        base, host = split
        listed = [ep for ep in self._ring.get(base, ()) if ep.host == host]
        return listed or [parse_entry(host, self.default_port)]
