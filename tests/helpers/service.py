"""A service process for the tests: `python -m tests.helpers.service ...`.

It consumes `--topic` (direct and fanout) with a TestService, prints
"READY <address>" once it serves, and exits cleanly (rpc.cleanup()) on
SIGTERM or when its stdin closes (the test process died).  Everything the tests check is observable over RPC: the service
records casts, fanouts and notifications per key, and reports its own
connection counters.
"""
import argparse
import faulthandler
import json
import os
import signal
import sys
import threading
import time

from nova_zmq_fast import rpc
from tests.helpers.errors import CustomError
from tests.helpers.serving import serve_until_told


class TestService:
    RPC_API_VERSION = "1.3"

    def __init__(self, host):
        self.host = host
        path = os.environ.get("NZF_JOURNAL")
        self.journal_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if path else -1
        self.records = {}
        self.lock = threading.Lock()
        self.conn = None
        self.stopping = threading.Event()       # set once the test says stop

    # -- calls ---------------------------------------------------------------
    def echo(self, ctxt, value):
        return value

    def whoami(self, ctxt):
        return self.host

    def add(self, ctxt, a, b):
        return a + b

    def context(self, ctxt):
        return {"values": ctxt.to_dict(), "user_id": getattr(ctxt, "user_id", None)}

    def sleep(self, ctxt, seconds):
        time.sleep(seconds)
        return self.host

    def stream(self, ctxt, n, delay):
        for i in range(n):
            if i:
                time.sleep(delay)
            yield {"i": i, "host": self.host, "t": time.time()}

    def numbers(self, ctxt, n):
        """0 .. n-1, as fast as they can go: a stream a reader falls behind."""
        yield from range(n)

    def blobs(self, ctxt, sizes):
        """A bytes value of each size: the last one answers a call, each
        one is a value of a multicall's stream."""
        for size in sizes:
            yield b"x" * size

    def fail(self, ctxt, kind, text):
        if kind == "value":
            raise ValueError(text)
        if kind == "key":
            raise KeyError(text)
        if kind == "custom":
            raise CustomError(text)
        raise RuntimeError(text)

    def raise_base(self, ctxt, kind):
        """Raise a BaseException that is not an Exception."""
        raise {"SystemExit": SystemExit(3), "KeyboardInterrupt": KeyboardInterrupt(),
               "GeneratorExit": GeneratorExit()}[kind]

    def stream_then_fail(self, ctxt):
        yield 1
        raise ValueError("stream broke")

    def unencodable(self, ctxt):
        return object()

    def stats(self, ctxt):
        return self.conn.stats()

    def pid(self, ctxt):
        return os.getpid()

    def relay(self, ctxt, topic, name, args=None):
        """A call made from inside a handler (a nested call)."""
        return rpc.call(ctxt, topic, {"method": name, "args": args or {}}, timeout=10)

    # -- casts ---------------------------------------------------------------
    def record(self, ctxt, key, value):
        with self.lock:
            self.records.setdefault(key, []).append(value)

    def hold(self, ctxt, key, seconds):
        """Record `key` on arrival, then take `seconds`: a call a test can
        see in flight before it cuts the server off.  Cut short when the
        service is told to stop: its cleanup() would otherwise wait out
        the linger for it."""
        self.record(ctxt, key, True)
        self.stopping.wait(seconds)
        return self.host

    def journal(self, ctxt, value):
        """Append `value` to this process's journal ($NZF_JOURNAL), one
        unbuffered write per line: it survives the process's SIGKILL."""
        os.write(self.journal_fd, f"{value}\n".encode())

    def slow_record(self, ctxt, key, value, seconds):
        time.sleep(seconds)
        self.record(ctxt, key, value)

    def records_for(self, ctxt, key):
        with self.lock:
            return list(self.records.get(key, []))

    def count(self, ctxt, key):
        with self.lock:
            return len(self.records.get(key, []))

    def tally(self, ctxt, key):
        """[pid, count]: tells apart processes that share a host name."""
        return [os.getpid(), self.count(ctxt, key)]


class FanoutService(TestService):
    """Fanout consumers record under 'fanout:<key>'."""

    def __init__(self, base):
        self.base = base

    def record(self, ctxt, key, value):
        self.base.record(ctxt, "fanout:" + key, value)


class V2Api:
    RPC_API_VERSION = "2.0"
    RPC_API_NAMESPACE = "v2"

    def describe(self, ctxt):
        return "v2"


def start_in(host, topic="svc", options=None, name=None):
    """Start this service inside a cluster host (a tests.helpers.netns.Host)
    and wait for it to serve.  `name` (default: the host's name) is what
    whoami answers; `options` go to rpc.init().  The process's .ready[0]
    is the address it serves on."""
    name = name or host.name
    return host.python("tests.helpers.service", "--host", name, "--topic", topic,
                       "--options", json.dumps(options or {}), name=f"{host.name}:service")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--topic", default="svc")
    parser.add_argument("--options", default="{}", help="rpc.init() options, JSON")
    args = parser.parse_args()

    options = json.loads(args.options)
    options.setdefault("rpc_zmq_host", args.host)
    rpc.init(**options)
    service = TestService(args.host)
    conn = rpc.create_connection()
    service.conn = conn
    conn.create_consumer(args.topic, rpc.RpcDispatcher([service, V2Api()]))
    conn.create_consumer(args.topic, FanoutService(service), fanout=True)
    conn.create_consumer(args.topic + "-raw", lambda ctxt, msg: service.record(
        ctxt, "raw", msg))
    conn.consume_in_thread()

    # A test that sees us hang asks for every thread's stack.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    serve_until_told(conn)
    service.stopping.set()
    rpc.cleanup()
    sys.exit(0)


if __name__ == "__main__":
    main()
