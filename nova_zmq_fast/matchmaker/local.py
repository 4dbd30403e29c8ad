"""Embedded discovery for one machine: a registry directory, no daemon.

Layout under `<rpc_zmq_ipc_dir>/nova_zmq_fast-registry/`:

    nodes/<node>                    {"host": ..., "address": ...} (JSON)
    topics/<topic>/direct/<node>    empty file: <node> consumes <topic>
    topics/<topic>/fanout/<node>    empty file: ... with fanout=True

A node is one listening server.  Its process holds an exclusive flock on
its node file for as long as it lives.  The kernel releases that lock when
the process dies, however it dies, so a lookup that manages to take a
shared lock on a node file knows the node is dead: it removes the node's
entries and tells the outboxes to forget its address.  Lookups are cached
for CACHE_TTL (1 s), so a dead consumer stops being chosen within about a
second.
"""
import fcntl
import json
import os
import secrets
import threading
import weakref

from nova_zmq_fast.matchmaker import Endpoint, MatchMaker

REGISTRY = "nova_zmq_fast-registry"
_instances = weakref.WeakSet()


def _after_fork_in_child():
    # The child inherits the lock descriptors; closing its copies keeps the
    # parent's locks (they belong to the shared open file) and lets the
    # parent's nodes die with the parent.
    for mm in list(_instances):
        mm._disown()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _OwnNode:
    __slots__ = ("node_id", "fd", "endpoint", "entries")

    def __init__(self, node_id, fd, endpoint):
        self.node_id = node_id
        self.fd = fd
        self.endpoint = endpoint
        self.entries = set()            # (topic, fanout)


class LocalMatchMaker(MatchMaker):

    def __init__(self, options):
        super().__init__(options)
        self.root = os.path.join(options.ipc_dir(), REGISTRY)
        self.nodes_dir = os.path.join(self.root, "nodes")
        self.topics_dir = os.path.join(self.root, "topics")
        os.makedirs(self.nodes_dir, exist_ok=True)
        os.makedirs(self.topics_dir, exist_ok=True)
        self._own = {}                  # address -> _OwnNode
        self._own_ids = {}              # node id -> _OwnNode
        self._known = {}                # node id -> Endpoint (files never change)
        self._reg_lock = threading.Lock()
        _instances.add(self)

    # -- registration --------------------------------------------------------

    def _entry(self, topic, fanout, node_id=None):
        path = os.path.join(self.topics_dir, topic, "fanout" if fanout else "direct")
        return path if node_id is None else os.path.join(path, node_id)

    def register(self, topic, host, address, fanout=False):
        with self._reg_lock:
            node = self._own.get(address)
            if node is None:
                node = self._create_node(host, address)
            directory = self._entry(topic, fanout)
            os.makedirs(directory, exist_ok=True)
            os.close(os.open(os.path.join(directory, node.node_id),
                             os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            node.entries.add((topic, fanout))
        self.revive(address)
        self.forget_topic(topic, fanout)
        self._prefixes.clear()

    def unregister(self, topic, host, address, fanout=False):
        with self._reg_lock:
            node = self._own.get(address)
            if node is None or (topic, fanout) not in node.entries:
                return
            _unlink(self._entry(topic, fanout, node.node_id))
            node.entries.discard((topic, fanout))
            if not node.entries:
                self._remove_node(node)
        self.forget_topic(topic, fanout)

    def _create_node(self, host, address):
        node_id = f"{os.getpid()}-{secrets.token_hex(6)}"
        final = os.path.join(self.nodes_dir, node_id)
        temp = os.path.join(self.nodes_dir, f".new-{node_id}")
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps({"host": host, "address": address,
                                     "pid": os.getpid()}).encode())
            # Appear only once locked and complete: a reader never sees an
            # unlocked (i.e. "dead") node that is in fact being born.
            os.rename(temp, final)
        except BaseException:
            os.close(fd)
            _unlink(temp)
            raise
        node = _OwnNode(node_id, fd, Endpoint(host, address))
        self._own[address] = node
        self._own_ids[node_id] = node
        return node

    def _remove_node(self, node):
        for topic, fanout in node.entries:
            _unlink(self._entry(topic, fanout, node.node_id))
        _unlink(os.path.join(self.nodes_dir, node.node_id))
        os.close(node.fd)
        del self._own[node.endpoint.address]
        del self._own_ids[node.node_id]

    def close(self):
        with self._reg_lock:
            for node in list(self._own.values()):
                self._remove_node(node)
        super().close()

    def _disown(self):
        for node in self._own.values():
            try:
                os.close(node.fd)
            except OSError:
                pass
        self._own.clear()
        self._own_ids.clear()
        self.invalidate()

    # -- lookup ----------------------------------------------------------------

    def _fetch(self, topic, fanout):
        directory = self._entry(topic, fanout)
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        endpoints = []
        for node_id in names:
            endpoint = self._alive(node_id, directory)
            if endpoint is not None:
                endpoints.append(endpoint)
        endpoints.sort(key=lambda ep: ep.address)
        return endpoints

    def _list_topics(self, prefix):
        try:
            return [name for name in os.listdir(self.topics_dir) if name.startswith(prefix)]
        except FileNotFoundError:
            return []

    def _alive(self, node_id, directory):
        """The node's endpoint if its process is alive; otherwise clean up
        after it and return None."""
        own = self._own_ids.get(node_id)
        if own is not None:
            return own.endpoint
        path = os.path.join(self.nodes_dir, node_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            _unlink(os.path.join(directory, node_id))      # left by a reaped node
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                endpoint = self._known.get(node_id)
                if endpoint is None:
                    endpoint = self._known[node_id] = _read_endpoint(fd)
                if endpoint is not None and endpoint.address in self.forgotten:
                    self.revive(endpoint.address)
                return endpoint
            # Nobody holds the lock: the owner is gone.
            endpoint = self._known.pop(node_id, None) or _read_endpoint(fd)
            _unlink(path)
            _unlink(os.path.join(directory, node_id))
            if endpoint is not None:
                self.forget(endpoint.address)
            return None
        finally:
            os.close(fd)


def _read_endpoint(fd):
    try:
        data = json.loads(os.pread(fd, 65536, 0))
        return Endpoint(str(data["host"]), str(data["address"]))
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _unlink(path):
    # Best effort: another process may have removed it first, and a dead
    # node of another user may not be ours to remove.
    try:
        os.unlink(path)
    except OSError:
        pass
