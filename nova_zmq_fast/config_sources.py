"""Where a tool's options come from: config files, the environment and
the command line, over the defaults declared in options.py.

The command line (cli.py) reads the options a service reads, from the same
file, without oslo.config or oslo.messaging:

- a Nova-era service keeps its rpc_zmq_* and matchmaker_* options in
  [DEFAULT] (other [DEFAULT] entries are the service's own, and ignored);
- an oslo.messaging service keeps them in [oslo_messaging_zmqfast], over
  [DEFAULT], and may name the backend and its hosts in [DEFAULT]
  transport_url = zmqfast+<backend>://..., whose query sets options too.
  The URL maps onto options as the oslo.messaging driver maps it: the
  backend's `url_options`, then the query, over the group.

Then environment variables NOVA_ZMQ_FAST_<NAME> (NAME in capitals), then
the command line's (name, text) pairs.  Text values are converted by each
option's kind and checked at once, so an error names where the value came
from; an unknown option name is an error everywhere except [DEFAULT].
"""
import configparser
import difflib
import os
import urllib.parse

from nova_zmq_fast import matchmaker
from nova_zmq_fast.options import Options, all_options

ENV_PREFIX = "NOVA_ZMQ_FAST_"
ENV_CONFIG_FILE = ENV_PREFIX + "CONFIG_FILE"
# The oslo.messaging driver's group (oslo_driver.GROUP, which needs oslo.config).
OSLO_GROUP = "oslo_messaging_zmqfast"
TRANSPORT = "zmqfast"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where."""


def load_options(config_files, flags, environ):
    """Options from, lowest precedence first: the defaults, `config_files`
    (else those named by $NOVA_ZMQ_FAST_CONFIG_FILE), `environ`, and
    `flags` ((name, text) pairs, the last one winning)."""
    known = {opt.name: opt for opt in all_options()}
    if not config_files and environ.get(ENV_CONFIG_FILE):
        config_files = [p for p in environ[ENV_CONFIG_FILE].split(os.pathsep) if p]
    values = {}
    for path in config_files:
        values.update(from_file(path, known))
    values.update(from_environ(environ, known))
    for name, text in flags:
        values[name] = typed(_known(known, name, "command line"), text, "command line")
    try:
        return Options.from_conf(values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _known(known, name, where):
    opt = known.get(name)
    if opt is None:
        close = difflib.get_close_matches(name, known, 1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{where}: unknown option {name!r}{hint}")
    return opt


def typed(opt, text, where):
    """`text` as option `opt` wants it, checked, with `where` it came from
    in the error.  An empty value leaves a port unset (the backend's
    default)."""
    text = text.strip()
    try:
        if opt.kind in ("int", "port"):
            value = int(text) if text else None
        elif opt.kind == "float":
            value = float(text) if text else None
        else:
            value = text
    except ValueError:
        raise ConfigError(f"{where}: {opt.name} must be a number, not {text!r}") from None
    try:
        return opt.value(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def from_file(path, known):
    """The options a service would read from the INI file at `path`."""
    # No default section: [DEFAULT] must not leak into the group.
    parser = configparser.ConfigParser(interpolation=None, strict=False,
                                       default_section="\0")
    parser.optionxform = str
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    values = {}
    if parser.has_section("DEFAULT"):
        for name, text in parser.items("DEFAULT"):
            if name in known:
                values[name] = typed(known[name], text, f"{path} [DEFAULT]")
    if parser.has_section(OSLO_GROUP):
        for name, text in parser.items(OSLO_GROUP):
            where = f"{path} [{OSLO_GROUP}]"
            values[name] = typed(_known(known, name, where), text, where)
    url = parser.get("DEFAULT", "transport_url", fallback="").strip()
    if url:
        values.update(from_url(url, values.get("rpc_zmq_matchmaker", "local"), known,
                               f"{path} [DEFAULT] transport_url"))
    return values


def from_environ(environ, known):
    """Options from NOVA_ZMQ_FAST_<NAME> variables; any other name with
    the prefix is an error (a typo would otherwise be ignored)."""
    values = {}
    for var, text in sorted(environ.items()):
        if var.startswith(ENV_PREFIX) and var != ENV_CONFIG_FILE:
            where = f"environment variable {var}"
            name = var[len(ENV_PREFIX):].lower()
            values[name] = typed(_known(known, name, where), text, where)
    return values


def from_url(url, backend, known, where):
    """Options from transport_url zmqfast[+backend]://hosts/virtual_host?query,
    read as oslo.messaging reads a URL; `backend` when the scheme names none."""
    scheme, sep, _ = url.partition("://")
    transport, _, named = scheme.partition("+")
    if not sep or transport != TRANSPORT:
        # Never the whole URL: it may hold a password.
        raise ConfigError(f"{where}: a {scheme or 'scheme-less'} URL does not use "
                          f"nova_zmq_fast ({TRANSPORT}://)")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    values = {}
    if named:
        values["rpc_zmq_matchmaker"] = typed(known["rpc_zmq_matchmaker"], named, where)
        backend = named
    hosts = []
    for item in parts.netloc.split(","):
        if not item:
            continue
        username = password = None
        if "@" in item:
            username, item = item.rsplit("@", 1)
            if ":" in username:
                username, password = username.split(":", 1)
                password = urllib.parse.unquote(password)
            username = urllib.parse.unquote(username)
        host, port = _host_port(item, where)
        hosts.append((host, port, username, password))
    virtual_host = urllib.parse.unquote(parts.path[1:]) if parts.path.startswith("/") else None
    try:
        values.update(matchmaker.load(backend).url_options(hosts, virtual_host))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for name, texts in urllib.parse.parse_qs(parts.query).items():
        values[name] = typed(_known(known, name, where), ",".join(texts), where)
    return values


def _host_port(text, where):
    """'host', 'host:port', '[v6]:port' or a bare IPv6 address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if port and not port.isdigit():
        raise ConfigError(f"{where}: {text!r} is not host:port")
    return host, int(port) if port else None
