"""Configuration: the original ZeroMQ driver's option names and defaults.

The core's options are declared here once; each discovery backend declares
its own (`OPTIONS` in its module) and its defaults for binding and
advertising.  The oslo.messaging driver builds its [oslo_messaging_zmqfast]
group from the same declarations.

`Options.from_conf(conf, **overrides)` reads them from an oslo.config
ConfigOpts, a dict, or any object with attributes.  Unknown keyword
overrides are an error, so a typo does not silently fall back to a default,
and so is a discovery backend that does not exist.
"""
import socket

from nova_zmq_fast import matchmaker


class Option:
    """One option: name, kind, default and help text.

    kinds: 'str', 'backend' (a discovery backend that exists, by name or
    by an original class path; normalised to its name), 'host' (a host name), 'int' (>= 1), 'count' (>= 0), 'float'
    (> 0, or >= 0 with zero_ok), 'bool', 'port' (0..65535, or None), 'list'
    (of str), 'secret'.  Numbers have a `maximum` too: by default a year
    of seconds, or what a C int holds."""

    __slots__ = ("name", "kind", "default", "help", "zero_ok", "maximum")

    def __init__(self, name, kind, default, help, zero_ok=False, maximum=None):
        self.name = name
        self.kind = kind
        self.default = default
        self.help = help
        self.zero_ok = zero_ok
        self.maximum = maximum or (365 * 86400 if kind == "float" else 2 ** 31 - 1)

    def value(self, value):
        """`value` checked and normalised; ValueError says what is wrong."""
        name, kind = self.name, self.kind
        if value is None:
            if kind in ("int", "count", "float", "bool", "list", "host"):
                raise ValueError(f"{name} must be set")
            return None
        if kind in ("str", "secret", "backend"):
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, not {value!r}")
            if kind == "backend":
                value = matchmaker.canonical(value)
                matchmaker.load(value)          # ValueError if there is none
            return value
        if kind == "host":
            if not isinstance(value, str) or not value or value.strip() != value or \
                    any(c in value for c in "/\\\0"):
                raise ValueError(f"{name} {value!r} is not a valid host name")
            return value
        if kind == "list":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of strings, not {value!r}")
            return list(value)
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no",
                                                            "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, not {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, not {value!r}")
        if kind == "port":
            if not isinstance(value, int) or not 0 <= value <= 65535:
                raise ValueError(f"{name} must be 0..65535, not {value!r}")
            return value
        if value > self.maximum:
            raise ValueError(f"{name} must be at most {self.maximum}, not {value!r}")
        if kind in ("int", "count"):
            if not isinstance(value, int) or value < (1 if kind == "int" else 0):
                raise ValueError(f"{name} must be a {'positive' if kind == 'int' else 'non-negative'}"
                                 f" integer, not {value!r}")
            return value
        if not value >= 0 or (value == 0 and not self.zero_ok):      # also NaN
            raise ValueError(f"{name} must be positive, not {value!r}")
        return float(value)


CORE = [
    Option("rpc_zmq_host", "host", None,
           "Logical host name of this process: 'topic.host' reaches it. "
           "Default: the machine's hostname."),
    Option("rpc_zmq_matchmaker", "backend", "local",
           "Discovery backend: 'local' (embedded, one machine), 'ring' (a JSON "
           "ring file) or 'redis'. The original driver's class paths "
           "(...matchmaker.MatchMakerRing, MatchMakerRedis, MatchMakerLocalhost) name "
           "the same backends."),
    Option("rpc_zmq_bind_address", "str", None,
           "Address servers listen on. Default: the discovery backend's "
           "(127.0.0.1 for 'local', '*' otherwise)."),
    Option("rpc_zmq_advertise_address", "str", None,
           "Address (IP or resolvable name) peers use to reach this process. "
           "Default: the bind address if it is not a wildcard, else the "
           "discovery backend's rule (see the README)."),
    Option("rpc_zmq_port", "port", None,
           "TCP port servers listen on. Default: the discovery backend's "
           "(a free port for 'local' and 'redis', 9501 for 'ring')."),
    Option("rpc_response_timeout", "float", 60,
           "Seconds call() and multicall() wait for a reply."),
    Option("rpc_cast_timeout", "float", 30,
           "Seconds a send may wait for room in a full peer queue before Timeout."),
    Option("rpc_zmq_connect_timeout", "float", 2,
           "Seconds a send waits for a connection when no consumer of the topic "
           "is connected yet."),
    Option("rpc_zmq_heartbeat_interval", "float", 1,
           "Seconds between the liveness probes (PINGs) a process sends to the "
           "servers it uses."),
    Option("rpc_zmq_heartbeat_timeout", "float", 3,
           "Seconds a probe may stay unanswered before its server (frozen, cut off, "
           "or overloaded) is passed over, until it answers again."),
    Option("rpc_zmq_at_least_once", "bool", False,
           "Casts are at-least-once unless a call says otherwise: kept until a "
           "consumer has handled them, sent again elsewhere when needed, never run "
           "twice by one server."),
    Option("rpc_zmq_ack_timeout", "float", 30,
           "Seconds an at-least-once cast waits for its acknowledgement before it "
           "goes to another consumer (a lost connection or a silent server sends it "
           "sooner)."),
    Option("rpc_zmq_hold_notifications", "count", 0,
           "Notifications kept, per process, while their topic has no listener, and "
           "delivered when one appears (0: none, they are dropped and counted). Not "
           "kept across a restart of the notifier."),
    Option("rpc_zmq_hold_notifications_bytes", "count", 16 * 1024 * 1024,
           "Most bytes of held notifications."),
    Option("rpc_zmq_hold_notifications_seconds", "float", 300,
           "Seconds a held notification waits for a listener before it expires "
           "(counted)."),
    Option("rpc_zmq_secret_key_file", "str", None,
           "This process's CURVE secret key: a file only its owner can read, as "
           "`nova-zmq-fast keygen` writes it. When set, every connection is "
           "encrypted, and both ends authenticated, with CURVE."),
    Option("rpc_zmq_allowed_keys", "str", None,
           "With CURVE: the clients a server accepts: a directory of public key "
           "files (`*.pub`), or a file with one key per line. Re-read when it "
           "changes; a key no longer listed is revoked at once. Unset or empty: "
           "nobody. Neither it nor its files may be writable by others."),
    Option("rpc_zmq_topic_backlog", "int", 1000,
           "Most messages queued on one connection, each way: a faster sender then "
           "waits (up to rpc_cast_timeout) instead of queueing minutes of work. It "
           "also bounds what one peer can make a server hold: this many messages "
           "of up to rpc_zmq_max_message_size."),
    Option("rpc_zmq_socket_buffer", "count", 262144,
           "Bytes of kernel socket buffer per connection (a sender's SO_SNDBUF, a "
           "server's SO_RCVBUF). Together with rpc_zmq_topic_backlog it bounds how much "
           "work can queue up before a sender waits. 0: the OS's own, which on loopback "
           "grows to megabytes."),
    Option("rpc_thread_pool_size", "int", 64, "Most worker threads a server runs at once."),
    Option("allowed_rpc_exception_modules", "list",
           ["nova.exception", "cinder.exception", "builtins"],
           "Modules whose remote exceptions are re-raised as their own type."),
    Option("rpc_zmq_max_message_size", "int", 16 * 1024 * 1024,
           "Largest message body in bytes sent or accepted (at most 1 GiB).",
           maximum=2 ** 30),
    Option("rpc_zmq_linger", "float", 5,
           "Seconds close()/cleanup() give queued work and outgoing messages to finish "
           "(at most a day).", zero_ok=True, maximum=86400),
]


def all_options():
    """Every option: the core's, then each available backend's."""
    found = {opt.name: opt for opt in CORE}
    for name in matchmaker.available():
        for opt in matchmaker.load(name).OPTIONS:
            found.setdefault(opt.name, opt)
    return list(found.values())


class Options:
    """Validated option values, as attributes.  Immutable by convention."""

    def __init__(self, values):
        self.__dict__.update(values)

    def key(self):
        """The values, hashable: equal options have equal keys."""
        return tuple(sorted((name, tuple(v) if isinstance(v, list) else v)
                            for name, v in vars(self).items()))

    @classmethod
    def describe(cls):
        """(name, kind, default, help) of every option."""
        return [(o.name, o.kind, o.default, o.help) for o in all_options()]

    @classmethod
    def names(cls):
        return [o.name for o in all_options()]

    @classmethod
    def from_conf(cls, conf=None, **overrides):
        options = all_options()
        unknown = set(overrides) - {o.name for o in options}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        values = {}
        for opt in options:
            if opt.name in overrides:
                value = overrides[opt.name]
            elif isinstance(conf, dict):
                value = conf.get(opt.name, opt.default)
            elif conf is not None:
                try:
                    value = getattr(conf, opt.name)
                except AttributeError:      # includes oslo's NoSuchOptError
                    value = opt.default
            else:
                value = opt.default
            if value is None and opt.name == "rpc_zmq_host":
                value = socket.gethostname()
            values[opt.name] = opt.value(value)
        # Fails at init, for a backend that does not exist (its option's
        # value(), above), and here for CURVE that cannot work: a libzmq
        # without it, a key others can read.
        backend = matchmaker.load(values["rpc_zmq_matchmaker"])
        advertise = values["rpc_zmq_advertise_address"]
        if advertise and advertise.strip("[]") in matchmaker.WILDCARDS:
            raise ValueError(f"rpc_zmq_advertise_address {advertise!r} is a wildcard: it must "
                             f"be an address or name other processes can dial")
        opts = cls(values)
        backend.validate(opts)
        if opts.rpc_zmq_secret_key_file:
            opts.curve_keys()
            if opts.rpc_zmq_allowed_keys:
                opts.allow_list()
        return opts

    # -- derived values: the backend's policy --------------------------------

    @property
    def backend(self):
        """The discovery backend class named by rpc_zmq_matchmaker."""
        return matchmaker.load(self.rpc_zmq_matchmaker)

    @property
    def bind_address(self):
        return self.rpc_zmq_bind_address or self.backend.BIND_ADDRESS

    @property
    def port(self):
        """The fixed port servers listen on; 0 means any free port."""
        if self.rpc_zmq_port is not None:
            return self.rpc_zmq_port
        return self.backend.PORT

    def bind_endpoint(self, port=None):
        """The endpoint a server binds, e.g. tcp://127.0.0.1:5000 ."""
        return tcp_endpoint(self.bind_address, port if port is not None else self.port or "*")

    def advertised_host(self):
        """The host part of the address peers connect to: never a wildcard."""
        return self.backend.advertise_host(self)

    def curve_keys(self):
        """(public, secret) Z85 keys from rpc_zmq_secret_key_file, or None
        without CURVE; ValueError if CURVE cannot be used."""
        if not self.rpc_zmq_secret_key_file:
            return None
        from nova_zmq_fast import _curve
        why = _curve.unavailable_reason()
        if why:
            raise ValueError(f"CURVE (rpc_zmq_secret_key_file) cannot be used: {why}")
        secret = _curve.load_secret_key(self.rpc_zmq_secret_key_file)
        return _curve.public_key(secret), secret

    def allow_list(self):
        """The AllowList of rpc_zmq_allowed_keys; ValueError if it is
        missing, malformed or open to others."""
        from nova_zmq_fast import _curve
        return _curve.AllowList(self.rpc_zmq_allowed_keys)


def tcp_endpoint(host, port):
    host = str(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def oslo_opts(exclude=(), deprecated_group=None):
    """Every option in oslo.config's form (which this needs): for the
    oslo.messaging driver's group, which also reads an option it does not
    set from `deprecated_group` ([DEFAULT], where Nova-era services keep
    them), and for [DEFAULT] (rpc.register_opts)."""
    from oslo_config import cfg

    def opt(name, kind, default, help):
        common = dict(default=default, help=help, deprecated_group=deprecated_group)
        if kind == "backend":
            return cfg.StrOpt(name, choices=matchmaker.available(), **common)
        if kind == "host":
            return cfg.HostAddressOpt(name, sample_default="<hostname>", **common)
        if kind in ("str", "secret"):
            return cfg.StrOpt(name, secret=kind == "secret", **common)
        if kind == "port":
            return cfg.PortOpt(name, **common)
        if kind == "bool":
            return cfg.BoolOpt(name, **common)
        if kind in ("int", "count"):
            return cfg.IntOpt(name, min=1 if kind == "int" else 0, **common)
        if kind == "float":
            return cfg.FloatOpt(name, min=0, **common)
        if kind == "list":
            return cfg.ListOpt(name, **common)
        raise TypeError(f"no oslo.config type for option {name} ({kind})")
    return [opt(*described) for described in Options.describe() if described[0] not in exclude]
