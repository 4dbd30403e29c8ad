"""An oslo.messaging service process for the tests:

    python -m tests.helpers.oslo_service rpc --name s1 --url URL [--executor eventlet]
    python -m tests.helpers.oslo_service notify --name n1 --url URL --pool p [--batch 5]

`rpc` runs an RPC server on topic --topic (exchange --exchange, server
--name) with TestEndpoint and a namespaced endpoint, and with
--notify-topic also a notification listener on that topic in --pool, in
the same process (as a service with both).  `notify` runs a notification
listener on --topic in --pool; what it receives can be read back through a
control RPC server ('ctl', server --name).  Prints READY and exits cleanly
on SIGTERM or when stdin closes.

A line "stop" on stdin stops every server (oslo's stop()), prints STOPPED,
then waits for them (wait(): what is still running finishes), cleans up,
prints "RECORDS <json>" (everything it received) and exits: a test can act
in the window between a server's stop() and the end of its wait().
"""
import argparse
import datetime
import decimal
import json
import os
import signal
import sys
import threading
import time
import uuid


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["rpc", "notify"])
    parser.add_argument("--name", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--topic", default="svc")
    parser.add_argument("--exchange", default=None)
    parser.add_argument("--executor", default="threading")
    parser.add_argument("--pool", default=None)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--notify-topic", default=None)
    args = parser.parse_args()

    if args.executor == "eventlet":
        import eventlet
        eventlet.monkey_patch()
    import warnings
    warnings.filterwarnings("ignore")

    import oslo_messaging as messaging
    from oslo_config import cfg

    from tests.helpers.errors import CustomError

    cfg.CONF([], project="nzf-test")
    lock = threading.Lock()
    received = []

    class TestEndpoint:
        target = messaging.Target(version="1.3")

        def whoami(self, ctxt):
            return args.name

        def echo(self, ctxt, value):
            return value

        def context(self, ctxt):
            return ctxt

        def sleep(self, ctxt, seconds):
            time.sleep(seconds)
            return args.name

        def fail(self, ctxt, kind, text):
            if kind == "custom":
                raise CustomError(text)
            if kind == "opaque":                # no JSON form for its arguments
                raise ValueError(text, object())
            raise ValueError(text)

        def give(self, ctxt, kind):
            """A value of `kind` made here, as the result."""
            return {"uuid": lambda: uuid.UUID(int=7), "date": lambda: datetime.date(2024, 5, 6),
                    "decimal": lambda: decimal.Decimal("2.5"),
                    "mixed": lambda: {"uuid": uuid.UUID(int=7), "bytes": b"\xff",
                                      "datetime": datetime.datetime(2024, 5, 6, 7, 8, 9),
                                      "set": {3}},
                    "opaque": object, "bigint": lambda: 2 ** 70,
                    "100kB": lambda: "x" * 100000}[kind]()

        def expected(self, ctxt):
            raise messaging.ExpectedException()

        def record(self, ctxt, value):
            with lock:
                received.append(value)

        def hold(self, ctxt, value, on):
            """Record `value`; on server `on`, then stay busy (bounded)."""
            self.record(ctxt, value)
            if args.name == on:
                time.sleep(10)

        def block(self, ctxt, marker, release):
            """Record `marker`, then run until the file `release` exists
            (bounded): a long call that the test ends when it chooses."""
            self.record(ctxt, marker)
            deadline = time.monotonic() + 60
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.02)
            return args.name

        def records(self, ctxt):
            with lock:
                return list(received)

        def pid(self, ctxt):
            return os.getpid()

        def executor_is_green(self, ctxt):
            from oslo_utils import eventletutils
            return eventletutils.is_monkey_patched("thread")

    class AdminEndpoint:
        target = messaging.Target(namespace="admin", version="2.0")

        def describe(self, ctxt):
            return "admin"

    class NotificationEndpoint:
        def _got(self, priority, payload):
            with lock:
                received.append({"priority": priority, "payload": payload,
                                 "t": time.monotonic()})

    for priority in ("audit", "debug", "info", "warn", "error", "critical", "sample"):
        def handler(self, ctxt, publisher_id, event_type, payload, metadata,
                    priority=priority):
            self._got(priority, payload)
        setattr(NotificationEndpoint, priority, handler)

    class BatchEndpoint:
        def info(self, messages):
            with lock:
                received.append({"batch": [m["payload"] for m in messages]})

    transport = messaging.get_rpc_transport(cfg.CONF, url=args.url)
    ntransport = None
    servers = []
    if args.mode == "rpc":
        target = messaging.Target(topic=args.topic, server=args.name, exchange=args.exchange)
        servers.append(messaging.get_rpc_server(transport, target,
                                                [TestEndpoint(), AdminEndpoint()],
                                                executor=args.executor))
        if args.notify_topic:
            ntransport = messaging.get_notification_transport(cfg.CONF, url=args.url)
            servers.append(messaging.get_notification_listener(
                ntransport, [messaging.Target(topic=args.notify_topic, exchange=args.exchange)],
                [NotificationEndpoint()], executor=args.executor, pool=args.pool))
    else:
        ntransport = messaging.get_notification_transport(cfg.CONF, url=args.url)
        targets = [messaging.Target(topic=args.topic, exchange=args.exchange)]
        if args.batch:
            servers.append(messaging.get_batch_notification_listener(
                ntransport, targets, [BatchEndpoint()], executor=args.executor,
                pool=args.pool, batch_size=args.batch, batch_timeout=0.5))
        else:
            servers.append(messaging.get_notification_listener(
                ntransport, targets, [NotificationEndpoint()], executor=args.executor,
                pool=args.pool))
        servers.append(messaging.get_rpc_server(
            transport, messaging.Target(topic="ctl", server=args.name), [TestEndpoint()],
            executor=args.executor))
    for server in servers:
        server.start()

    # Stop on SIGTERM, or when the test process dies and our stdin closes.
    # The stdin watcher must be a native thread: a blocking read in a green
    # one would stall the eventlet hub.
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("signal"))
    native = threading
    if args.executor == "eventlet":
        import eventlet.patcher
        native = eventlet.patcher.original("threading")

    def watch_stdin():
        for line in sys.stdin:
            if line.strip() == "stop":
                stop.append("command")
        stop.append("eof")
    native.Thread(target=watch_stdin, daemon=True).start()
    print("READY", flush=True)
    while not stop:
        time.sleep(0.1)
    for server in servers:
        server.stop()
    if stop[0] == "command":
        print("STOPPED", flush=True)
    for server in servers:
        server.wait()
    transport.cleanup()
    if ntransport is not None:
        ntransport.cleanup()
    if stop[0] == "command":
        with lock:
            print("RECORDS", json.dumps(received), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
