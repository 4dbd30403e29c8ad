"""Embedded discovery for one machine: a registry directory, no daemon.

Layout under `<rpc_zmq_ipc_dir>/nova_zmq_fast-registry/`:

    nodes/<node>                    {"host": ..., "address": ..., "pid": ...} (JSON)
    topics/<topic>/direct/<node>    empty file: <node> consumes <topic>
    topics/<topic>/fanout/<node>    empty file: ... with fanout=True

A node is one listening process.  It holds an exclusive flock on its node
file for as long as it lives.  The kernel releases that lock when the
process dies, however it dies, so a lookup that manages to take a shared
lock on a node file knows the node is dead: it removes the node's entries
and tells the route table to forget its address (the table revives it
when a live node lists it again).  Routes are refreshed
every second, so a dead consumer stops being chosen within about a second.

The directories are made by the first registration in them: a process
that only looks up (a client, the operator's `nova-zmq-fast topics`) makes
nothing, and an absent registry is one where nothing is registered.

Servers listen on 127.0.0.1 and a free port by default: peers are on this
machine.
"""
import fcntl
import json
import os
import secrets
import stat
import threading
import weakref

from nova_zmq_fast.matchmaker import Backend, node_endpoint
from nova_zmq_fast.options import Option

REGISTRY = "nova_zmq_fast-registry"
_instances = weakref.WeakSet()


def _after_fork_in_child():
    # The child inherits the lock descriptors; closing its copies keeps the
    # parent's locks (they belong to the shared open file) and lets the
    # parent's nodes die with the parent.
    for backend in list(_instances):
        backend._disown()


os.register_at_fork(after_in_child=_after_fork_in_child)


def ipc_dir(path, create=True):
    """`path`, or a per-user directory when it is not writable (the
    original default needs root).  With create=False nothing is made: the
    same choice, for a directory that may not exist yet (`path` if it
    exists and is writable, or could be made)."""
    if create:
        try:
            os.makedirs(path, exist_ok=True)
            if os.access(path, os.W_OK | os.X_OK):
                return path
        except OSError:
            pass
    elif os.path.lexists(path):
        if os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
            return path
    elif _creatable(path):
        return path
    fallback = fallback_dir()
    if create:
        os.makedirs(fallback, mode=0o700, exist_ok=True)
    if create or os.path.lexists(fallback):
        _private(fallback)
    return fallback


def fallback_dir():
    """The per-user directory used when rpc_zmq_ipc_dir is not writable."""
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp",
                        f"nova_zmq_fast-{os.getuid()}")


def _creatable(path):
    """Whether os.makedirs(path) could make it: its nearest existing
    ancestor is a directory this process may write in."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    while not os.path.lexists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    return os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)


def _private(fallback):
    # In a shared /tmp someone else may have made it first.
    st = os.lstat(fallback)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"{fallback} is not a directory private to this user (owner uid "
                         f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): another user "
                         f"could publish addresses in it; remove it, or set rpc_zmq_ipc_dir")


def _closed_to_others(path):
    """Refuse a registry directory every local user can write: any of them
    could publish an address, and key, and receive this service's calls."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is not a directory")
    if st.st_mode & 0o002:
        raise ValueError(f"{path} is writable by every user (mode "
                         f"{stat.S_IMODE(st.st_mode):o}): the registry must be closed to others")


class _OwnNode:
    __slots__ = ("node_id", "fd", "endpoint", "entries")

    def __init__(self, node_id, fd, endpoint):
        self.node_id = node_id
        self.fd = fd
        self.endpoint = endpoint
        self.entries = set()            # (topic, fanout)


class LocalBackend(Backend):

    OPTIONS = (
        Option("rpc_zmq_ipc_dir", "str", "/var/run/openstack",
               "Directory of the embedded registry ('local' discovery); a per-user "
               "directory is used if it is not writable."),
    )
    BIND_ADDRESS = "127.0.0.1"
    PORT = 0

    def __init__(self, options):
        super().__init__(options)
        base = ipc_dir(options.rpc_zmq_ipc_dir, create=False)
        self._fallback = None if base == options.rpc_zmq_ipc_dir else base
        self.root = os.path.join(base, REGISTRY)
        self.nodes_dir = os.path.join(self.root, "nodes")
        self.topics_dir = os.path.join(self.root, "topics")
        self._present = False
        self._exists()                  # a registry others can write is refused at once
        self._own = {}                  # address -> _OwnNode
        self._own_ids = {}              # node id -> _OwnNode
        self._known = {}                # node id -> Endpoint (files never change)
        self._lock = threading.Lock()
        _instances.add(self)

    @classmethod
    def wildcard_advertise_host(cls, options):
        # Every peer is on this machine.
        return "::1" if options.bind_address.strip("[]") in ("::",) else "127.0.0.1"

    def _exists(self, create=False):
        """Whether the registry's directories exist (made first with
        `create`: by a registration).  Each is checked as soon as it is
        seen, whoever made it; until all three are there, a lookup finds
        nothing registered."""
        if self._present:
            return True
        if create:
            if self._fallback is not None:
                os.makedirs(self._fallback, mode=0o700, exist_ok=True)
            os.makedirs(self.nodes_dir, exist_ok=True)
            os.makedirs(self.topics_dir, exist_ok=True)
        if self._fallback is not None and os.path.lexists(self._fallback):
            _private(self._fallback)
        found = [path for path in (self.root, self.nodes_dir, self.topics_dir)
                 if os.path.lexists(path)]
        for path in found:
            _closed_to_others(path)
        self._present = len(found) == 3
        return self._present

    # -- registration --------------------------------------------------------

    def _entry(self, topic, fanout, node_id=None):
        path = os.path.join(self.topics_dir, topic, "fanout" if fanout else "direct")
        return path if node_id is None else os.path.join(path, node_id)

    def register(self, node, topic, fanout=False):
        with self._lock:
            own = self._own.get(node.address)
            if own is None:
                self._exists(create=True)
                own = self._create_node(node)
            directory = self._entry(topic, fanout)
            os.makedirs(directory, exist_ok=True)
            os.close(os.open(os.path.join(directory, own.node_id),
                             os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            own.entries.add((topic, fanout))
        if self.routes is not None:
            self.routes.invalidate(topic)

    def unregister(self, node, topic, fanout=False):
        with self._lock:
            own = self._own.get(node.address)
            if own is None or (topic, fanout) not in own.entries:
                return
            _unlink(self._entry(topic, fanout, own.node_id))
            own.entries.discard((topic, fanout))
            if not own.entries:
                self._remove_node(own)
        if self.routes is not None:
            self.routes.invalidate(topic)

    def _create_node(self, endpoint):
        node_id = f"{os.getpid()}-{secrets.token_hex(6)}"
        final = os.path.join(self.nodes_dir, node_id)
        temp = os.path.join(self.nodes_dir, f".new-{node_id}")
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            info = {"host": endpoint.host, "address": endpoint.address, "pid": os.getpid()}
            if endpoint.key is not None:
                info["key"] = endpoint.key.decode()
            os.write(fd, json.dumps(info).encode())
            # Appear only once locked and complete: a reader never sees an
            # unlocked (i.e. "dead") node that is in fact being born.
            os.rename(temp, final)
        except BaseException:
            os.close(fd)
            _unlink(temp)
            raise
        own = _OwnNode(node_id, fd, endpoint)
        self._own[endpoint.address] = own
        self._own_ids[node_id] = own
        return own

    def _remove_node(self, own):
        for topic, fanout in own.entries:
            _unlink(self._entry(topic, fanout, own.node_id))
        _unlink(os.path.join(self.nodes_dir, own.node_id))
        os.close(own.fd)
        del self._own[own.endpoint.address]
        del self._own_ids[own.node_id]

    def close(self):
        with self._lock:
            for own in list(self._own.values()):
                self._remove_node(own)

    def _disown(self):
        for own in self._own.values():
            try:
                os.close(own.fd)
            except OSError:
                pass
        self._own.clear()
        self._own_ids.clear()

    # -- lookup ----------------------------------------------------------------

    def fetch(self, topic, fanout):
        if not self._exists():
            return []
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

    def list_topics(self, prefix):
        if not self._exists():
            return []
        try:
            return [name for name in os.listdir(self.topics_dir) if name.startswith(prefix)]
        except FileNotFoundError:
            return []

    def nodes(self):
        found = {}
        for topic in self.list_topics(""):
            for fanout in (False, True):
                directory = self._entry(topic, fanout)
                try:
                    names = os.listdir(directory)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for node_id in names:
                    endpoint = self._alive(node_id, directory)
                    if endpoint is None:
                        continue
                    node = found.setdefault(endpoint.address, {
                        "host": endpoint.host, "address": endpoint.address,
                        "alive": True, "topics": []})
                    node["topics"].append(topic + (" (fanout)" if fanout else ""))
        return sorted(found.values(), key=lambda n: n["address"])

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
                    endpoint = self._known[node_id] = _read_endpoint(fd, path)
                return endpoint
            # Nobody holds the lock: the owner is gone.
            endpoint = self._known.pop(node_id, None) or _read_endpoint(fd, path)
            _unlink(path)
            _unlink(os.path.join(directory, node_id))
            if endpoint is not None and self.routes is not None:
                self.routes.forget(endpoint.address)
            return None
        finally:
            os.close(fd)


def _read_endpoint(fd, path):
    try:
        text = os.pread(fd, 65536, 0)
    except OSError:
        return None
    return node_endpoint(text, path)


def _unlink(path):
    # Best effort: another process may have removed it first, and a dead
    # node of another user may not be ours to remove.
    try:
        os.unlink(path)
    except OSError:
        pass


BACKEND = LocalBackend
