"""The operator's command line: `nova-zmq-fast` (or `python -m nova_zmq_fast`).

Where it sits: it is a client process like any other.  It reads its
options from the sources a service reads (config_sources.py), opens one
Runtime (discovery, the route table and the client, never a server), asks
discovery what it knows or sends PINGs, calls and casts, prints the answer
and closes.  PINGs are answered by each server's receive loop, not by the
service's code (docs/envelope.md).

A command is a function `func(session, args)` that returns a Report,
registered with `@command(name, summary, *arguments)`; its docstring is its
--help.  Failures are exceptions, which `classify` maps to the exit codes
(`Exit`) in one place.
"""
import argparse
import concurrent.futures
import enum
import inspect
import json
import logging
import math
import os
import sys
import textwrap
import time
import traceback

import nova_zmq_fast
from nova_zmq_fast._routes import Endpoint
from nova_zmq_fast.config_sources import ENV_CONFIG_FILE, ENV_PREFIX, ConfigError, load_options
from nova_zmq_fast.exceptions import (
    DiscoveryUnavailable, NoListeners, PeerUnreachable, RemoteError, RPCException, Timeout,
    UnsupportedRpcVersion, deserialize_remote_exception, remote_message, remote_type_name)
from nova_zmq_fast.runtime import Runtime

# Seconds a ping waits by default: a liveness probe should answer fast.
PING_TIMEOUT = 5.0
# At most this many PINGs in flight at once (one thread each).
PING_THREADS = 16
# How discovery marks a fanout topic in Backend.nodes().
FANOUT_MARK = " (fanout)"


class Exit(enum.IntEnum):
    """Exit codes scripts can rely on (also in --help and the README)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    PARTIAL = 3
    NO_LISTENERS = 4
    TIMEOUT = 5
    VERSION = 6
    REMOTE_ERROR = 7
    DISCOVERY = 8
    INTERRUPTED = 130


EXIT_MEANINGS = {
    Exit.OK: "success",
    Exit.ERROR: "unexpected error (its traceback is on stderr)",
    Exit.USAGE: "usage or configuration error: command line, config file, "
                "environment, option value, JSON argument",
    Exit.PARTIAL: "consumers differ: some answered and others failed, or they "
                  "failed in different ways",
    Exit.NO_LISTENERS: "nobody listening: discovery knows no live consumer, or "
                       "the consumer does not serve the topic",
    Exit.TIMEOUT: "timeout: no answer in time, or no connection could be made",
    Exit.VERSION: "version refused: no consumer accepts the RPC API version asked for",
    Exit.REMOTE_ERROR: "the remote method raised an exception",
    Exit.DISCOVERY: "discovery is unreachable (e.g. Redis is down)",
    Exit.INTERRUPTED: "interrupted (Ctrl-C)",
}


# -- failures ---------------------------------------------------------------------

def _remote_traceback(exc):
    if isinstance(exc, RemoteError):
        return exc.traceback
    return getattr(exc, "remote_traceback", None)


def classify(exc):
    """(exit code, short label) for an exception raised by a command."""
    if isinstance(exc, UnsupportedRpcVersion):
        return Exit.VERSION, "version refused"
    if _remote_traceback(exc) is not None:
        # Before the rest: a service's own failed call is its error, not ours.
        return Exit.REMOTE_ERROR, "remote error"
    if isinstance(exc, DiscoveryUnavailable):
        return Exit.DISCOVERY, "discovery unreachable"
    if isinstance(exc, NoListeners):
        return Exit.NO_LISTENERS, "nobody listening"
    if isinstance(exc, PeerUnreachable):
        return Exit.TIMEOUT, "unreachable"
    if isinstance(exc, Timeout):
        return Exit.TIMEOUT, "timeout"
    if isinstance(exc, (ConfigError, ValueError)):
        # ValueError: the core's checks of what it is given (a topic name,
        # a message, an option value).
        return Exit.USAGE, "error"
    return Exit.ERROR, "unexpected error"


def _message(exc):
    if isinstance(exc, RemoteError):
        return exc.value
    if _remote_traceback(exc) is not None:
        return remote_message(exc)
    if isinstance(exc, DiscoveryUnavailable):
        return exc.info or str(exc)
    if isinstance(exc, NoListeners):
        return f"no live consumer of {exc.topic}" + (f" ({exc.info})" if exc.info else "")
    if isinstance(exc, Timeout):
        return exc.info or f"no answer in time (topic {exc.topic}, method {exc.method})"
    return str(exc)


def error_data(exc):
    """An exception as JSON: type, label, message, exit code, and for a
    remote exception its remote class and traceback."""
    code, label = classify(exc)
    data = {"type": remote_type_name(exc), "label": label, "message": _message(exc),
            "exit": int(code)}
    if code == Exit.REMOTE_ERROR:
        data["remote_type"] = _remote_type(exc)
        data["remote_traceback"] = _remote_traceback(exc)
    return data


def _remote_type(exc):
    return exc.exc_type if isinstance(exc, RemoteError) else remote_type_name(exc)


def rebuild_exception(failure):
    """A FAILURE reply as the exception to raise.  Only the transport's own
    exceptions (UnsupportedRpcVersion, ...) come back as themselves: every
    exception of the service's code is a RemoteError, so the command line
    never mistakes it for one of its own.  An oslo.messaging service's
    failure is a JSON string; its refusal of a version is ours too."""
    if not isinstance(failure, str):
        return deserialize_remote_exception(failure, ("nova_zmq_fast.exceptions",))
    try:
        data = json.loads(failure)
        name, message = str(data["class"]), str(data["message"])
        remote_tb = "".join(data.get("tb") or ())
        module = str(data.get("module", ""))
    except (ValueError, TypeError, KeyError):
        return RemoteError("Unknown", failure, "")
    if name == "UnsupportedVersion" and module.startswith("oslo_messaging."):
        exc = UnsupportedRpcVersion(message)
        exc.remote_traceback = remote_tb
        return exc
    return RemoteError(name, message, remote_tb)


# -- commands ---------------------------------------------------------------------

COMMANDS = []


def command(name, summary, *arguments):
    """Register `func(session, args) -> Report` as command `name`;
    `arguments` are arg(...) for its parser, its docstring its --help."""
    def register(func):
        COMMANDS.append((name, summary, func, arguments))
        return func
    return register


def arg(*names, **kwargs):
    """One argparse argument of a command."""
    return names, kwargs


class Report:
    """What a command answers: `data` for --json, `lines` for people, and
    the exit code."""

    def __init__(self, data, lines, code=Exit.OK):
        self.data = data
        self.lines = lines
        self.code = Exit(code)


class Session:
    """What a command works with: the options and a Runtime, opened on
    first use (a command that neither sends nor asks discovery, such as a
    key generator, opens none)."""

    def __init__(self, options):
        self.options = options
        self._runtime = None

    @property
    def runtime(self):
        if self._runtime is None:
            try:
                self._runtime = Runtime(self.options, rebuild_exception=rebuild_exception)
            except ImportError as exc:
                raise ConfigError(f"the {self.options.rpc_zmq_matchmaker} discovery needs "
                                  f"{exc.name or exc}: pip install "
                                  f"'nova-zmq-fast[{self.options.rpc_zmq_matchmaker}]'") from None
        return self._runtime

    def close(self):
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _api_version(text):
    major, dot, minor = text.partition(".")
    if not (major.isdigit() and (not dot or minor.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not an RPC API version (X.Y)")
    return text


def _count(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _json_object(text, flag):
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} is not valid JSON ({exc}): {text}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, not {text}")
    return value


def _jsonable(value):
    # What msgpack may give that JSON has no type for.
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


def _dumps(value):
    return json.dumps(value, indent=2, ensure_ascii=False, default=_jsonable)


def _duration(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _table(headers, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    return ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in [headers, *rows]]


def _consumers(rt, topic):
    """The endpoints a send to `topic` chooses from; NoListeners if none."""
    endpoints = rt.routes.route(topic)
    if not endpoints:
        raise NoListeners(None, topic)
    return endpoints


def ping_each(rt, targets, timeout, version=None, namespace=None):
    """PING each (endpoint, topic) at once, one thread each: a consumer
    that does not answer costs its timeout once, not once per consumer.
    Answers in order: the server's dict plus "rtt", or host, address and
    "error" (an exception)."""
    def one(target):
        endpoint, topic = target
        try:
            return rt.client.ping(endpoint, topic, timeout, version, namespace)
        except RPCException as exc:
            return {"host": endpoint.host, "address": endpoint.address, "error": exc}

    if not targets:
        return []
    with concurrent.futures.ThreadPoolExecutor(min(PING_THREADS, len(targets))) as pool:
        return list(pool.map(one, targets))


def outcome(answers):
    """The exit code of a set of PING answers: OK when all answered, the
    failure's code when all failed alike, PARTIAL otherwise."""
    codes = {classify(a["error"])[0] for a in answers if "error" in a}
    if not codes:
        return Exit.OK
    if len(codes) == 1 and all("error" in a for a in answers):
        return codes.pop()
    return Exit.PARTIAL


def _answer_data(answer):
    if "error" in answer:
        return dict(answer, error=error_data(answer["error"]))
    return answer


def _answer_text(answer):
    if "error" in answer:
        exc = answer["error"]
        return f"{classify(exc)[1]}: {_message(exc)}"
    return f"pid {answer.get('pid')}, {_duration(answer['rtt'])}"


def timeout_arg(default):
    return arg("--timeout", type=_seconds, metavar="SECONDS",
               help=f"how long to wait for an answer (default: {default}); a consumer "
                    f"not connected within rpc_zmq_connect_timeout (2 s) fails sooner")


@command("topics", "the topics discovery knows, with their consumers",
         arg("prefix", nargs="?", default="", metavar="PREFIX",
             help="only topics whose name starts with PREFIX"))
def topics(session, args):
    """List the topics discovery knows and, for each, its consumers: host,
    address and liveness as the discovery backend reports it.  Fanout
    consumers are listed under "TOPIC (fanout)".  Sends nothing to the
    consumers.  Exit code 4 when no topic matches."""
    rt = session.runtime
    found = {}
    for node in rt.backend.nodes():
        for name in node["topics"]:
            fanout = name.endswith(FANOUT_MARK)
            topic = name[:-len(FANOUT_MARK)] if fanout else name
            if topic.startswith(args.prefix):
                found.setdefault((topic, fanout), []).append(
                    {"host": node["host"], "address": node["address"], "alive": node["alive"]})
    entries = [{"topic": topic, "fanout": fanout, "consumers": consumers}
               for (topic, fanout), consumers in sorted(found.items())]
    data = {"discovery": rt.options.rpc_zmq_matchmaker, "topics": entries}
    if not entries:
        what = f"no topic starting with {args.prefix!r}" if args.prefix else "no topic"
        return Report(data, [f"discovery ({data['discovery']}) knows {what}"], Exit.NO_LISTENERS)
    rows = [(e["topic"] + (FANOUT_MARK if e["fanout"] else ""), len(e["consumers"]),
             ", ".join(f"{c['host']} {c['address']}" + (" (down)" if c["alive"] is False else "")
                       for c in e["consumers"]))
            for e in entries]
    return Report(data, _table(("TOPIC", "CONSUMERS", "HOST ADDRESS"), rows))


@command("status", "every node discovery knows, its topics and liveness; PINGs each",
         arg("--no-ping", dest="ping", action="store_false",
             help="only what discovery says: send nothing"),
         timeout_arg(f"{PING_TIMEOUT:g} s"))
def status(session, args):
    """List every node (server process) discovery knows: its host, address,
    liveness as the backend reports it (ring files list who may serve, so
    their liveness is not known before a ping) and topics.  Then PING each
    node, all at once, on one of its topics, and show its pid and round
    trip or why it did not answer.  Exit code 4 when discovery knows no
    node; with pings, as for `ping`."""
    rt = session.runtime
    nodes = [dict(node) for node in rt.backend.nodes()]
    data = {"discovery": rt.options.rpc_zmq_matchmaker, "nodes": nodes}
    if not nodes:
        return Report(data, [f"discovery ({data['discovery']}) knows no node"],
                      Exit.NO_LISTENERS)
    code = Exit.OK
    answers = {}
    if args.ping:
        targets = [_ping_target(rt, node) for node in nodes]
        pinged = [t for t in targets if t is not None]
        for target, answer in zip(pinged, ping_each(rt, pinged, args.timeout or PING_TIMEOUT)):
            answers[target[0].address] = answer
        code = outcome(list(answers.values())) if answers else Exit.OK
        for node in nodes:
            answer = answers.get(node["address"])
            node["ping"] = None if answer is None else _answer_data(answer)
            if answer is not None and node["alive"] is None:
                # Unknown to discovery (ring): the ping tells.  A process
                # that refused the topic still answered.
                node["alive"] = "error" not in answer or isinstance(answer["error"],
                                                                    NoListeners)
    alive = {True: "yes", False: "no", None: "?"}
    rows = []
    for node in nodes:
        row = [node["host"], node["address"], alive.get(node["alive"], node["alive"])]
        if args.ping:
            answer = answers.get(node["address"])
            row.append("not pinged (fanout only)" if answer is None else _answer_text(answer))
        rows.append(row + [", ".join(node["topics"])])
    headers = ["HOST", "ADDRESS", "ALIVE"] + (["PING"] if args.ping else []) + ["TOPICS"]
    lines = [f"discovery: {data['discovery']}"] + _table(headers, rows)
    if answers:
        failed = sum("error" in a for a in answers.values())
        lines.append(f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: "
                     f"{len(answers) - failed} answered, {failed} failed")
    return Report(data, lines, code)


def _ping_target(rt, node):
    """(endpoint, topic) to PING a node on: one of its direct topics (a
    PING is for direct consumers), with the Endpoint discovery gives for
    it.  None for a node that only consumes fanouts."""
    direct = sorted(t for t in node["topics"] if not t.endswith(FANOUT_MARK))
    if not direct:
        return None
    topic = direct[0]
    for endpoint in rt.routes.route(topic):
        if endpoint.address == node["address"]:
            return endpoint, topic
    return Endpoint(node["host"], node["address"]), topic


@command("ping", "a round trip to each live consumer of a topic",
         arg("topic", metavar="TOPIC[.HOST]",
             help="the topic; TOPIC.HOST: that host's consumers only"),
         arg("--version", metavar="X.Y", type=_api_version,
             help="also ask whether a consumer accepts this RPC API version"),
         arg("--namespace", metavar="NAME", help="the RPC API namespace of --version"),
         timeout_arg(f"{PING_TIMEOUT:g} s"))
def ping(session, args):
    """PING every live consumer discovery lists for the topic, all at once.
    The server's receive loop answers, without the service's code: an
    answer means the process is up and serves the topic, and gives its pid,
    its transport and envelope versions and the round trip (this process's
    first, so it includes connecting).  With --version, a consumer that
    accepts no such API version answers "version refused" (only an
    RpcDispatcher has version rules: other consumers, such as oslo.messaging
    servers, accept any here; `call --version` asks them).  Exit codes: 0
    all answered, 3 some did not, else the code of the failure they all
    share: 4 nobody listening, 5 timeout, 6 version refused."""
    rt = session.runtime
    endpoints = _consumers(rt, args.topic)
    answers = ping_each(rt, [(ep, args.topic) for ep in endpoints],
                        args.timeout or PING_TIMEOUT, args.version, args.namespace)
    failed = sum("error" in a for a in answers)
    data = {"topic": args.topic, "consumers": [_answer_data(a) for a in answers],
            "answered": len(answers) - failed, "failed": failed}
    lines = _table(("HOST", "ADDRESS", "ANSWER"),
                   [(a["host"], a["address"], _answer_text(a)) for a in answers])
    lines.append(f"{len(answers) - failed} of {len(answers)} consumers of {args.topic} answered")
    return Report(data, lines, outcome(answers))


def _message_for(args, method, method_args):
    msg = {"method": method, "args": method_args}
    if args.version is not None:
        msg["version"] = args.version
    if args.namespace is not None:
        msg["namespace"] = args.namespace
    return msg


@command("call", "call a method on one consumer of a topic; print its result as JSON",
         arg("topic", metavar="TOPIC[.HOST]"),
         arg("method", metavar="METHOD"),
         arg("--args", metavar="JSON", default="{}",
             help="the method's keyword arguments, a JSON object (default {})"),
         arg("--context", metavar="JSON", default="{}",
             help="the request context, a JSON object (default {})"),
         arg("--version", metavar="X.Y", type=_api_version,
             help="the RPC API version the call asks for"),
         arg("--namespace", metavar="NAME", help="the RPC API namespace"),
         timeout_arg("rpc_response_timeout"))
def call(session, args):
    """Call METHOD on one consumer of the topic (round-robin, as
    rpc.call does) and print its result as JSON.  An exception raised by
    the method is reported with its remote class, message and traceback
    (exit code 7)."""
    method_args = _json_object(args.args, "--args")
    context = _json_object(args.context, "--context")
    rt = session.runtime
    start = time.monotonic()
    result = rt.client.call(context, args.topic, _message_for(args, args.method, method_args),
                            args.timeout)
    data = {"topic": args.topic, "method": args.method, "result": result,
            "seconds": time.monotonic() - start}
    return Report(data, _dumps(result).splitlines())


@command("keygen", "write a new CURVE key pair: NAME.key (secret) and NAME.pub (public)",
         arg("name", metavar="NAME",
             help="where to write them, without the suffix: e.g. /etc/nova/curve/compute-7"))
def keygen(session, args):
    """Write a new CURVE key pair for one process.  NAME.key is its secret
    key, readable by its owner only: point that process's
    rpc_zmq_secret_key_file at it.  NAME.pub is its public key: copy it into
    the allow-list (rpc_zmq_allowed_keys) of every server it calls.
    Servers publish their own public key through discovery.  Existing files
    are never overwritten."""
    from nova_zmq_fast import _curve
    if not os.path.basename(args.name):
        raise ConfigError(f"NAME {args.name!r} must name a file, such as /etc/nova/curve/compute-7")
    why = _curve.unavailable_reason()
    if why:
        raise ConfigError(f"CURVE cannot be used here: {why}")
    try:
        secret_path, public_path = _curve.write_keypair(args.name)
    except FileExistsError as exc:
        raise ConfigError(f"{exc.filename} exists; keys are never overwritten") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {exc.filename}: {exc.strerror}") from None
    with open(public_path) as f:
        public = f.read().strip()
    return Report({"secret_key_file": secret_path, "public_key_file": public_path,
                   "public_key": public},
                  [f"secret key: {secret_path} (mode 600; rpc_zmq_secret_key_file)",
                   f"public key: {public_path} (for allow-lists: rpc_zmq_allowed_keys)",
                   public])


class Progress:
    """A progress bar on stderr, redrawn at most ten times a second."""

    WIDTH = 30

    def __init__(self, label, total, shown, stream=None):
        self.label = label
        self.total = total
        self.shown = shown
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.next_draw = self.start + 0.1
        self.drawn = None

    def update(self, done):
        now = time.monotonic()
        if not self.shown or done == self.drawn or (now < self.next_draw and done < self.total):
            return
        self.next_draw = now + 0.1
        self.drawn = done
        filled = self.WIDTH * done // self.total
        rate = done / max(now - self.start, 1e-9)
        self.stream.write(f"\r{self.label:<16} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                          f"{done}/{self.total}  {rate:,.0f}/s ")
        self.stream.flush()

    def close(self):
        if self.shown:
            self.update(self.total)
            self.stream.write("\n")
            self.stream.flush()


def _round_trips(label, count, once, shown):
    times = []
    bar = Progress(label, count, shown)
    for i in range(count):
        start = time.perf_counter()
        once(i)
        times.append(time.perf_counter() - start)
        bar.update(i + 1)
    bar.close()
    times.sort()

    def rank(q):                            # nearest-rank percentile
        return times[max(0, math.ceil(count * q) - 1)]
    return {"count": count, "min": times[0], "median": rank(0.5), "p90": rank(0.9),
            "p99": rank(0.99), "max": times[-1], "seconds": sum(times)}


@command("bench", "a quick benchmark against a running service: round trips and casts",
         arg("topic", metavar="TOPIC[.HOST]"),
         arg("-n", "--count", type=_count, default=1000, metavar="N",
             help="round trips of each kind: pings, and calls with --call (default 1000)"),
         arg("--call", metavar="METHOD", help="also time calls of METHOD"),
         arg("--call-args", metavar="JSON", default="{}", help="its arguments (default {})"),
         arg("--cast", metavar="METHOD", help="also time casts of METHOD"),
         arg("--cast-args", metavar="JSON", default="{}", help="its arguments (default {})"),
         arg("--casts", type=_count, default=10000, metavar="N",
             help="how many casts (default 10000)"),
         arg("--context", metavar="JSON", default="{}", help="the request context (default {})"),
         arg("--progress", action=argparse.BooleanOptionalAction, default=None,
             help="a progress bar on stderr (default: when stderr is a terminal)"),
         timeout_arg("rpc_response_timeout"))
def bench(session, args):
    """Time round trips to the topic's consumers, one at a time: N PINGs
    (round-robin over the consumers; the receive loop answers them) and,
    with --call, N calls of a method.  With --cast, send casts of a method
    as fast as they go, then PING each consumer: a PING's answer means
    everything sent before it on that connection has arrived, so the cast
    rate counts until every cast has reached its consumer (not until it is
    handled).  Connections are made before timing starts.  Prints one
    summary line."""
    call_args = _json_object(args.call_args, "--call-args")
    cast_args = _json_object(args.cast_args, "--cast-args")
    context = _json_object(args.context, "--context")
    rt = session.runtime
    topic, timeout = args.topic, args.timeout
    shown = sys.stderr.isatty() if args.progress is None else args.progress
    endpoints = _consumers(rt, topic)
    for endpoint in endpoints:              # connect, and fail early
        rt.client.ping(endpoint, topic, timeout)
    data = {"topic": topic, "consumers": len(endpoints)}
    data["ping"] = _round_trips("ping", args.count, lambda i: rt.client.ping(
        endpoints[i % len(endpoints)], topic, timeout), shown)
    parts = [f"{topic}, {len(endpoints)} consumers: ping {args.count}x median "
             f"{_duration(data['ping']['median'])} p99 {_duration(data['ping']['p99'])}"]
    if args.call:
        msg = {"method": args.call, "args": call_args}
        data["call"] = dict(method=args.call, **_round_trips(
            f"call {args.call}", args.count,
            lambda i: rt.client.call(context, topic, msg, timeout), shown))
        parts.append(f"call {args.call} {args.count}x median "
                     f"{_duration(data['call']['median'])} p99 {_duration(data['call']['p99'])}")
    if args.cast:
        msg = {"method": args.cast, "args": cast_args}
        bar = Progress(f"cast {args.cast}", args.casts, shown)
        start = time.perf_counter()
        for i in range(args.casts):
            rt.client.cast(context, topic, msg)
            if not i & 255:
                bar.update(i)
        arrived = rt.routes.route(topic)
        for endpoint in arrived:            # from this thread: the casts' connections
            rt.client.ping(endpoint, topic, timeout)
        seconds = time.perf_counter() - start
        bar.close()
        data["cast"] = {"method": args.cast, "count": args.casts, "seconds": seconds,
                        "rate": args.casts / seconds, "confirmed_by": len(arrived)}
        parts.append(f"cast {args.cast} {args.casts}x in {_duration(seconds)} = "
                     f"{args.casts / seconds:,.0f}/s (arrival confirmed by "
                     f"{len(arrived)} consumers)")
    return Report(data, ["; ".join(parts)])


# -- the parser -------------------------------------------------------------------

class UsageError(Exception):
    """A command-line mistake found by argparse."""

    def __init__(self, parser, message):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    # Raised instead of printed, so that main() can answer in JSON.
    def error(self, message):
        raise UsageError(self, message)


class _SetOption(argparse.Action):
    """Collects (name, text) in command-line order: named flags such as
    --matchmaker and -o NAME=VALUE share one list, so the last one wins."""

    def __init__(self, option_strings, dest, option=None, **kwargs):
        self.option = option
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if self.option is None:
            name, sep, text = value.partition("=")
            if not sep or not name.strip():
                parser.error(f"{option_string} wants NAME=VALUE, not {value!r}")
            pair = (name.strip(), text)
        else:
            pair = (self.option, value)
        setattr(namespace, self.dest, list(getattr(namespace, self.dest) or []) + [pair])


# Named flags: (flag, option, metavar).
OPTION_FLAGS = (
    ("--matchmaker", "rpc_zmq_matchmaker", "NAME"),
    ("--redis-host", "matchmaker_redis_host", "HOST"),
    ("--redis-port", "matchmaker_redis_port", "PORT"),
    ("--ring-file", "matchmaker_ringfile", "PATH"),
    ("--ipc-dir", "rpc_zmq_ipc_dir", "DIR"),
)


def _add_common(parser, suffix):
    """The options every command takes, before or after its name.  `suffix`
    keeps the two places apart: argparse would let one overwrite the other."""
    group = parser.add_argument_group("configuration and output (before or after the command)")
    group.add_argument("--config-file", metavar="PATH", action="append", default=[],
                       dest="config_files" + suffix,
                       help=f"an INI file, as a service reads it; repeatable, later files "
                            f"win (default: ${ENV_CONFIG_FILE}, if set)")
    group.add_argument("-o", "--option", metavar="NAME=VALUE", action=_SetOption, default=[],
                       dest="options" + suffix, help="set any option (repeatable)")
    for flag, option, metavar in OPTION_FLAGS:
        group.add_argument(flag, metavar=metavar, action=_SetOption, option=option, default=[],
                           dest="options" + suffix, help=f"= -o {option}={metavar}")
    group.add_argument("--json", action="store_true", dest="json" + suffix,
                       help="print JSON on stdout (errors too) for scripts")


CONFIG_HELP = f"""\
configuration, lowest precedence first:
  defaults < config files < environment < command line.
  A config file is read as a service reads it: a Nova-era service's
  rpc_zmq_* and matchmaker_* options in [DEFAULT]; an oslo.messaging
  service's [oslo_messaging_zmqfast], and its [DEFAULT] transport_url =
  zmqfast[+BACKEND]://[:password@]host:port[/db][?option=value...].
  Environment: {ENV_PREFIX}<OPTION NAME IN CAPITALS>, e.g.
  {ENV_PREFIX}RPC_ZMQ_MATCHMAKER=redis, and {ENV_CONFIG_FILE}
  (paths separated by '{os.pathsep}').  Unknown option names are errors.
  The options are listed in the README."""

EXIT_HELP = "exit codes:\n" + "\n".join(
    textwrap.fill(meaning, 78, initial_indent=f"  {int(code):>3}  ", subsequent_indent=" " * 7)
    for code, meaning in EXIT_MEANINGS.items())


def _paragraphs(doc):
    """A docstring refilled to the terminal's usual width."""
    return "\n\n".join(textwrap.fill(" ".join(p.split()), 78)
                       for p in inspect.cleandoc(doc).split("\n\n"))


def build_parser(prog=None):
    parser = _Parser(
        prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Look at and exercise a nova_zmq_fast deployment: what discovery\n"
                    "knows, and round trips, calls and casts to its services.",
        epilog=f"{CONFIG_HELP}\n\n{EXIT_HELP}\n\n"
               f"Run '%(prog)s COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {nova_zmq_fast.__version__}")
    _add_common(parser, "")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary, func, arguments in COMMANDS:
        sub = subparsers.add_parser(
            name, help=summary, description=_paragraphs(func.__doc__),
            allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"{EXIT_HELP}\n\nConfiguration: see '{parser.prog} --help'.")
        for names, kwargs in arguments:
            sub.add_argument(*names, **kwargs)
        _add_common(sub, "_after")
        sub.set_defaults(func=func)
    return parser


# -- running ----------------------------------------------------------------------

def _emit(report, as_json):
    if as_json:
        sys.stdout.write(_dumps(report.data) + "\n")
    else:
        for line in report.lines:
            sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _error_report(prog, exc):
    code, label = classify(exc)
    lines = [f"{prog}: {label}: {_message(exc)}"]
    if code == Exit.REMOTE_ERROR:
        lines = [f"{prog}: the remote method raised {_remote_type(exc)}: {_message(exc)}",
                 "remote traceback:", _remote_traceback(exc).rstrip("\n")]
    elif code == Exit.ERROR:
        lines += traceback.format_exception(type(exc), exc, exc.__traceback__)
    return Report({"error": error_data(exc)}, lines, code)


def main(argv=None, prog=None):
    """Run one command; returns its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    prog = parser.prog
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        if "--json" in argv:
            _emit(Report({"error": {"type": "UsageError", "label": "usage",
                                    "message": str(exc), "exit": int(Exit.USAGE)}}, []), True)
        else:
            exc.parser.print_usage(sys.stderr)
            sys.stderr.write(f"{exc.parser.prog}: error: {exc}\n")
        return int(Exit.USAGE)
    as_json = args.json or args.json_after
    # Errors only: every failure of a command is reported by the command
    # itself, and the library's warnings are written for long-running services.
    logging.basicConfig(stream=sys.stderr, level=logging.ERROR,
                        format=f"{prog}: %(name)s: %(levelname)s: %(message)s")
    session = None
    try:
        options = load_options(args.config_files + args.config_files_after,
                               args.options + args.options_after, os.environ)
        session = Session(options)
        report = args.func(session, args)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return int(Exit.INTERRUPTED)
    except Exception as exc:
        report = _error_report(prog, exc)
        if not as_json:
            sys.stderr.write("".join(line if line.endswith("\n") else line + "\n"
                                     for line in report.lines))
            return int(report.code)
    finally:
        if session is not None:
            session.close()
    _emit(report, as_json)
    return int(report.code)
