"""Configuration: the original ZeroMQ driver's option names and defaults.

Each option's help text lives here once; the oslo.messaging driver builds
its [oslo_messaging_zmqfast] options from the same list.

`Options.from_conf(conf, **overrides)` reads them from an oslo.config
ConfigOpts, a dict, or any object with attributes; unknown keyword overrides
are an error, so a typo does not silently fall back to a default.
"""
import dataclasses
import os
import socket
from typing import List, Optional

DEFAULT_RING_PORT = 9501
MATCHMAKERS = ("local", "ring", "redis")


def tcp_endpoint(host, port):
    if ":" in str(host) and not str(host).startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def _opt(default=None, help="", factory=None):
    meta = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class Options:
    rpc_zmq_host: str = _opt(
        factory=socket.gethostname,
        help="Logical host name of this process: 'topic.host' reaches it.")
    rpc_zmq_matchmaker: str = _opt(
        "local", "Discovery: 'local' (embedded, one machine) or 'ring' (a JSON ring file).")
    matchmaker_ringfile: str = _opt(
        "/etc/oslo/matchmaker_ring.json",
        'Ring file for the ring matchmaker: {"topic": ["host", "host:port"]}.')
    rpc_zmq_bind_address: Optional[str] = _opt(
        None, "Address servers listen on; unset: 127.0.0.1 for 'local', '*' otherwise.")
    rpc_zmq_port: Optional[int] = _opt(
        None, "TCP port servers listen on; unset: a free port for 'local', 9501 for 'ring'.")
    rpc_zmq_ipc_dir: str = _opt(
        "/var/run/openstack",
        "Directory of the embedded registry (a per-user directory if not writable).")
    rpc_response_timeout: float = _opt(60, "Seconds call() and multicall() wait for a reply.")
    rpc_cast_timeout: float = _opt(
        30, "Seconds a send may wait for room in a full peer queue before Timeout.")
    rpc_zmq_connect_timeout: float = _opt(
        2, "Seconds a send waits for a connection to a peer before trying another.")
    rpc_thread_pool_size: int = _opt(64, "Most worker threads a server runs at once.")
    allowed_rpc_exception_modules: List[str] = _opt(
        factory=lambda: ["nova.exception", "cinder.exception", "builtins"],
        help="Modules whose remote exceptions are re-raised as their own type.")
    rpc_zmq_max_message_size: int = _opt(
        16 * 1024 * 1024, "Largest message body in bytes sent or accepted.")
    rpc_zmq_linger: float = _opt(
        5, "Seconds close()/cleanup() give queued work and outgoing messages to finish.")

    @classmethod
    def describe(cls):
        """(name, type, default, help) of every option."""
        probe = cls()
        return [(f.name, f.type, getattr(probe, f.name), f.metadata["help"])
                for f in dataclasses.fields(cls)]

    @classmethod
    def names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_conf(cls, conf=None, **overrides):
        unknown = set(overrides) - set(cls.names())
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        values = {}
        for name in cls.names():
            if name in overrides:
                values[name] = overrides[name]
            elif isinstance(conf, dict):
                if name in conf:
                    values[name] = conf[name]
            elif conf is not None:
                try:
                    values[name] = getattr(conf, name)
                except AttributeError:      # includes oslo's NoSuchOptError
                    pass
        opts = cls(**values)
        opts.validate()
        return opts

    def validate(self):
        def positive(name, allow_zero=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, not {value!r}")
            if value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"{name} must be positive, not {value!r}")

        if not isinstance(self.rpc_zmq_host, str) or not self.rpc_zmq_host:
            raise ValueError("rpc_zmq_host must be a non-empty string")
        if any(c in self.rpc_zmq_host for c in "/\\\0") or self.rpc_zmq_host.strip() != self.rpc_zmq_host:
            raise ValueError(f"rpc_zmq_host {self.rpc_zmq_host!r} is not a valid host name")
        if self.rpc_zmq_matchmaker not in MATCHMAKERS:
            raise ValueError(f"rpc_zmq_matchmaker must be one of {', '.join(MATCHMAKERS)}, "
                             f"not {self.rpc_zmq_matchmaker!r}")
        if self.rpc_zmq_port is not None:
            if isinstance(self.rpc_zmq_port, bool) or not isinstance(self.rpc_zmq_port, int) \
                    or not 0 <= self.rpc_zmq_port <= 65535:
                raise ValueError(f"rpc_zmq_port must be 0..65535, not {self.rpc_zmq_port!r}")
        for name in ("rpc_response_timeout", "rpc_cast_timeout", "rpc_zmq_connect_timeout"):
            positive(name)
        positive("rpc_zmq_linger", allow_zero=True)
        for name in ("rpc_thread_pool_size", "rpc_zmq_max_message_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if isinstance(self.allowed_rpc_exception_modules, str):
            self.allowed_rpc_exception_modules = [self.allowed_rpc_exception_modules]
        self.allowed_rpc_exception_modules = list(self.allowed_rpc_exception_modules)

    # -- derived values ------------------------------------------------------

    @property
    def bind_address(self):
        if self.rpc_zmq_bind_address:
            return self.rpc_zmq_bind_address
        return "127.0.0.1" if self.rpc_zmq_matchmaker == "local" else "*"

    @property
    def port(self):
        if self.rpc_zmq_port is not None:
            return self.rpc_zmq_port
        return DEFAULT_RING_PORT if self.rpc_zmq_matchmaker == "ring" else 0

    def bind_endpoint(self, port=None):
        """The endpoint a server binds, e.g. tcp://127.0.0.1:5000 ."""
        return tcp_endpoint(self.bind_address, port if port is not None else self.port or "*")

    def advertised_host(self):
        """The host part of the address peers connect to.  With the
        embedded registry peers are on this machine: the bind address, or
        loopback for a wildcard.  Otherwise rpc_zmq_host, as the original
        driver did (ring files list those names)."""
        if self.rpc_zmq_matchmaker == "local":
            address = self.bind_address
            if address in ("*", "0.0.0.0"):
                return "127.0.0.1"
            if address in ("::", "[::]"):
                return "::1"
            return address.strip("[]")
        return self.rpc_zmq_host

    def ipc_dir(self):
        """rpc_zmq_ipc_dir, or a per-user directory when it is not writable
        (the original default needs root)."""
        path = self.rpc_zmq_ipc_dir
        try:
            os.makedirs(path, exist_ok=True)
            if os.access(path, os.W_OK | os.X_OK):
                return path
        except OSError:
            pass
        fallback = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp",
                                f"nova_zmq_fast-{os.getuid()}")
        os.makedirs(fallback, mode=0o700, exist_ok=True)
        return fallback
