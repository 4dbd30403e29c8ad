"""A service process under one concurrency model, for the behaviour suite
(tests/helpers/suite.py):

    python -m tests.helpers.model_service MODEL --host H --topic T --ipc-dir D

MODEL: threads (rpc), eventlet (rpc, monkey-patched) or asyncio (aio).
Prints "READY <address>"; exits cleanly when stdin closes or on SIGTERM.
"""
import sys

MODEL = sys.argv[1]
if MODEL == "eventlet":
    import eventlet
    eventlet.monkey_patch()
    import eventlet.queue

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from nova_zmq_fast import rpc  # noqa: E402

WAIT = 10           # every wait inside a handler is bounded


class CountHandlerErrors(logging.Handler):
    """Counts the log records of handler errors this process writes."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("error handling"):
            self.count += 1


LOGGED = CountHandlerErrors()


class Base:
    """What every model answers alike."""

    def __init__(self, topic, host):
        self.topic = topic
        self.host = host
        self.records = {}

    def echo(self, ctxt, value):
        return value

    def model(self, ctxt):
        return MODEL

    def pid(self, ctxt):
        return os.getpid()

    def fail(self, ctxt, text):
        raise ValueError(text)

    def record(self, ctxt, key):
        self.records[key] = self.records.get(key, 0) + 1

    def handler_errors(self, ctxt):
        """How many handler errors the server counted, and how many it logged."""
        return {"counted": self.conn.stats()["handler_errors"], "logged": LOGGED.count}


class Threads(Base):
    def __init__(self, topic, host):
        super().__init__(topic, host)
        self.q = queue.Queue()
        self.changed = threading.Condition()

    def record(self, ctxt, key):
        with self.changed:
            super().record(ctxt, key)
            self.changed.notify_all()

    def wait_for(self, ctxt, key, n):
        with self.changed:
            self.changed.wait_for(lambda: self.records.get(key, 0) >= n, WAIT)
            return self.records.get(key, 0)

    def put(self, ctxt, value):
        self.q.put(value)

    def take(self, ctxt):
        return self.q.get(timeout=WAIT)

    def spawn_record(self, ctxt, key):
        threading.Thread(target=self.record, args=(ctxt, key)).start()

    def pause(self, ctxt, seconds):
        time.sleep(seconds)
        return seconds

    def hold(self, ctxt, key, on):
        """Record `key`; on host `on`, then stay busy (bounded)."""
        self.record(ctxt, key)
        if self.host == on:
            self.pause(ctxt, WAIT)

    def busy(self, ctxt, key, seconds):
        """Record `key`, then take `seconds`."""
        self.record(ctxt, key)
        return self.pause(ctxt, seconds)

    def relay(self, ctxt, topic, value):
        return rpc.call(ctxt, topic, {"method": "echo", "args": {"value": value}}, timeout=WAIT)

    def cast_back(self, ctxt, topic, value):
        rpc.cast(ctxt, topic, {"method": "got", "args": {"value": value}})

    def stream(self, ctxt, n):
        for i in range(n):
            yield i


class Green(Threads):
    """Under eventlet: eventlet's own queue, events and spawn."""

    def __init__(self, topic, host):
        super().__init__(topic, host)
        self.q = eventlet.queue.Queue()
        self.changed = None
        self.events = {}

    def record(self, ctxt, key):
        Base.record(self, ctxt, key)
        for event in self.events.pop(key, []):
            event.send(True)

    def wait_for(self, ctxt, key, n):
        import eventlet.event
        with eventlet.Timeout(WAIT, False):
            while self.records.get(key, 0) < n:
                event = eventlet.event.Event()
                self.events.setdefault(key, []).append(event)
                event.wait()
        return self.records.get(key, 0)

    def spawn_record(self, ctxt, key):
        eventlet.spawn_n(self.record, ctxt, key)

    def pause(self, ctxt, seconds):
        eventlet.sleep(seconds)
        return seconds

    def stream(self, ctxt, n):
        for i in range(n):
            eventlet.sleep(0)
            yield i

    def green_socket(self, ctxt):
        """A green socket pair inside a handler."""
        import socket
        a, b = socket.socketpair()
        try:
            eventlet.spawn_n(b.sendall, b"ping")
            return a.recv(4).decode()
        finally:
            a.close()
            b.close()


class Async(Base):
    """Under asyncio: coroutines, tasks, asyncio queues."""

    def __init__(self, topic, host):
        super().__init__(topic, host)
        self.q = asyncio.Queue()
        self.changed = asyncio.Condition()

    async def record(self, ctxt, key):
        async with self.changed:
            Base.record(self, ctxt, key)
            self.changed.notify_all()

    async def wait_for(self, ctxt, key, n):
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.records.get(key, 0) >= n), WAIT)
            except asyncio.TimeoutError:
                pass
            return self.records.get(key, 0)

    def put(self, ctxt, value):
        self.q.put_nowait(value)

    async def take(self, ctxt):
        return await asyncio.wait_for(self.q.get(), WAIT)

    def spawn_record(self, ctxt, key):
        task = asyncio.get_running_loop().create_task(self.record(ctxt, key))
        self.tasks = getattr(self, "tasks", set())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def pause(self, ctxt, seconds):
        await asyncio.sleep(seconds)
        return seconds

    async def hold(self, ctxt, key, on):
        await self.record(ctxt, key)
        if self.host == on:
            await self.pause(ctxt, WAIT)

    async def busy(self, ctxt, key, seconds):
        await self.record(ctxt, key)
        return await self.pause(ctxt, seconds)

    async def relay(self, ctxt, topic, value):
        from nova_zmq_fast import aio
        return await aio.call(ctxt, topic, {"method": "echo", "args": {"value": value}},
                              timeout=WAIT)

    async def cast_back(self, ctxt, topic, value):
        from nova_zmq_fast import aio
        await aio.cast(ctxt, topic, {"method": "got", "args": {"value": value}})

    async def stream(self, ctxt, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async def stream_and_record(self, ctxt, n, key):
        """0 .. n-1, then record `key`: every value has been sent by then
        (each leaves as it is yielded, ahead of any reply sent after)."""
        for i in range(n):
            await asyncio.sleep(0)
            yield i
        await self.record(ctxt, key)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["threads", "eventlet", "asyncio"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--ipc-dir", required=True)
    args = parser.parse_args()
    rpc.init(rpc_zmq_host=args.host, rpc_zmq_ipc_dir=args.ipc_dir, rpc_zmq_linger=2)
    logging.getLogger("nova_zmq_fast").addHandler(LOGGED)
    if args.model == "asyncio":
        asyncio.run(serve_async(args))
    else:
        serve_sync(args)
    sys.exit(0)


def serve_sync(args):
    conn = rpc.create_connection()
    service = (Green if MODEL == "eventlet" else Threads)(args.topic, args.host)
    service.conn = conn
    conn.create_consumer(args.topic, service)
    conn.create_consumer(args.topic, service, fanout=True)
    conn.consume_in_thread()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    if MODEL == "eventlet":
        from eventlet.hubs import trampoline

        def watch_stdin():
            trampoline(sys.stdin.fileno(), read=True)
            sys.stdin.read()
            done.set()
        eventlet.spawn_n(watch_stdin)
    else:
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print("READY", conn.address, flush=True)
    # Never done.wait() here: a signal handler's done.set() would then run
    # on this thread while it holds the event's lock, and wait for itself.
    while not done.is_set():
        time.sleep(0.2)
    conn.close()                        # from a green thread, under eventlet
    rpc.cleanup()


async def serve_async(args):
    from nova_zmq_fast import aio
    loop = asyncio.get_running_loop()
    conn = aio.create_connection()
    service = Async(args.topic, args.host)
    service.conn = conn
    conn.create_consumer(args.topic, service)
    conn.create_consumer(args.topic, service, fanout=True)
    conn.consume_in_thread()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_reader(sys.stdin.fileno(), lambda: os.read(sys.stdin.fileno(), 4096) or done.set())
    print("READY", conn.address, flush=True)
    await done.wait()
    loop.remove_reader(sys.stdin.fileno())
    await conn.close()
    await aio.cleanup()


if __name__ == "__main__":
    main()
