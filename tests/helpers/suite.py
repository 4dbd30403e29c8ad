"""The behaviour suite, as a client process under one concurrency model:

    python -m tests.helpers.suite MODEL --topic T --ipc-dir D

calls a tests.helpers.model_service (of any model) consuming T, runs
every check, and prints one JSON object: {check: "ok" or what failed}.
MODEL: threads (rpc), eventlet (rpc, monkey-patched) or asyncio (aio).
No check sleeps to synchronise: each waits for what the service reports.
"""
import sys

MODEL = sys.argv[1]
if MODEL == "eventlet":
    import eventlet
    eventlet.monkey_patch()
    import eventlet.event
    import eventlet.queue

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402

from nova_zmq_fast import rpc  # noqa: E402
from tests.helpers.ticking import ticking  # noqa: E402

CTX = {"user_id": "u1", "request_id": "req-1"}


def m(method, **args):
    return {"method": method, "args": args}


def expect(got, want):
    if got != want:
        raise AssertionError(f"got {got!r}, want {want!r}")


# -- the checks, once for the waiting API and once for asyncio -----------------

def sync_checks(topic):
    call = rpc.call
    yield "call", lambda: expect(call(CTX, topic, m("echo", value=[1, "x"])), [1, "x"])

    def nested():
        # The service calls itself, from inside a handler.
        expect(call(CTX, topic, m("relay", topic=topic, value=7)), 7)
    yield "nested call into its own process", nested

    def stream():
        expect(list(rpc.multicall(CTX, topic, m("stream", n=5))), [0, 1, 2, 3, 4])
    yield "multicall streams", stream

    def remote_error():
        try:
            call(CTX, topic, m("fail", text="bad"))
        except ValueError as exc:
            text = str(exc)
            assert text.startswith("bad\n") and "Traceback" in text, text
            return
        raise AssertionError("no exception")
    yield "remote exception with its traceback", remote_error

    def casts():
        key = uuid.uuid4().hex
        for _ in range(20):
            rpc.cast(CTX, topic, m("record", key=key))
        expect(call(CTX, topic, m("wait_for", key=key, n=20)), 20)
    yield "casts each handled once", casts

    def spawned():
        key = uuid.uuid4().hex
        rpc.cast(CTX, topic, m("spawn_record", key=key))
        expect(call(CTX, topic, m("wait_for", key=key, n=1)), 1)
    yield "threads spawned by a handler run", spawned

    def queue_between_handlers():
        rpc.cast(CTX, topic, m("put", value=41))
        expect(call(CTX, topic, m("take")), 41)
    yield "a queue shared by handlers", queue_between_handlers

    def fanout():
        key = uuid.uuid4().hex
        rpc.fanout_cast(CTX, topic, m("record", key=key))
        expect(call(CTX, topic, m("wait_for", key=key, n=1)), 1)
    yield "fanout", fanout

    if MODEL == "eventlet":
        yield "the issue's reproduction, in this process", reproduction

        def cooperative():
            ticks = []
            stop = eventlet.event.Event()

            def ticker():
                while not stop.ready():
                    ticks.append(1)
                    eventlet.sleep(0.01)
            eventlet.spawn_n(ticker)
            expect(call(CTX, topic, m("pause", seconds=0.3)), 0.3)
            stop.send(True)
            assert ticks, "other green threads did not run during the call"
        yield "a call lets other green threads run", cooperative

        def many_green_callers():
            pool = eventlet.GreenPool(20)
            got = sorted(pool.imap(lambda i: call(CTX, topic, m("echo", value=i)), range(40)))
            expect(got, list(range(40)))
        yield "green threads calling at once", many_green_callers


def reproduction():
    q = eventlet.queue.Queue()
    ran = eventlet.event.Event()

    class H:
        def put(self, ctxt, v):
            q.put(v)

        def bg(self, ctxt):
            eventlet.spawn_n(ran.send, "ran")

        def green_socket(self, ctxt):
            import socket
            a, b = socket.socketpair()
            try:
                eventlet.spawn_n(b.sendall, b"ping")
                return a.recv(4).decode()
            finally:
                a.close()
                b.close()

    local = f"repro-{uuid.uuid4().hex[:8]}"
    c = rpc.create_connection()
    c.create_consumer(local, H())
    c.consume_in_thread()
    try:
        rpc.cast({}, local, {"method": "put", "args": {"v": 1}})
        expect(q.get(timeout=10), 1)
        rpc.call({}, local, {"method": "bg"})
        with eventlet.Timeout(10):
            expect(ran.wait(), "ran")
        expect(rpc.call({}, local, {"method": "green_socket"}), "ping")
    finally:
        c.close()


async def async_checks(topic):
    from nova_zmq_fast import aio
    call = aio.call

    async def one():
        expect(await call(CTX, topic, m("echo", value=[1, "x"])), [1, "x"])
    yield "call", one

    async def nested():
        expect(await call(CTX, topic, m("relay", topic=topic, value=7)), 7)
    yield "nested call into its own process", nested

    async def stream():
        expect([v async for v in aio.multicall(CTX, topic, m("stream", n=5))], [0, 1, 2, 3, 4])
    yield "multicall streams", stream

    async def remote_error():
        try:
            await call(CTX, topic, m("fail", text="bad"))
        except ValueError as exc:
            assert str(exc).startswith("bad\n") and "Traceback" in str(exc)
            return
        raise AssertionError("no exception")
    yield "remote exception with its traceback", remote_error

    async def casts():
        key = uuid.uuid4().hex
        for _ in range(20):
            await aio.cast(CTX, topic, m("record", key=key))
        expect(await call(CTX, topic, m("wait_for", key=key, n=20)), 20)
    yield "casts each handled once", casts

    async def spawned():
        key = uuid.uuid4().hex
        await aio.cast(CTX, topic, m("spawn_record", key=key))
        expect(await call(CTX, topic, m("wait_for", key=key, n=1)), 1)
    yield "threads spawned by a handler run", spawned

    async def queue_between_handlers():
        await aio.cast(CTX, topic, m("put", value=41))
        expect(await call(CTX, topic, m("take")), 41)
    yield "a queue shared by handlers", queue_between_handlers

    async def fanout():
        key = uuid.uuid4().hex
        expect(await aio.fanout_cast(CTX, topic, m("record", key=key)), 1)
        expect(await call(CTX, topic, m("wait_for", key=key, n=1)), 1)
    yield "fanout", fanout

    async def cooperative():
        async with ticking() as ticks:
            expect(await call(CTX, topic, m("pause", seconds=0.3)), 0.3)
        assert ticks, "the event loop was blocked during the call"
    yield "a call lets other tasks run", cooperative

    async def many():
        got = await asyncio.gather(*(call(CTX, topic, m("echo", value=i)) for i in range(40)))
        expect(list(got), list(range(40)))
    yield "tasks calling at once", many

    async def cancelled():
        task = asyncio.ensure_future(call(CTX, topic, m("pause", seconds=0.5)))
        await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("not cancelled")
        # The abandoned call's late reply is dropped; the next call is fine.
        expect(await call(CTX, topic, m("echo", value="after")), "after")
    yield "a cancelled call is abandoned cleanly", cancelled

    async def timeout():
        try:
            await call(CTX, topic, m("pause", seconds=2), timeout=0.2)
        except rpc.Timeout:
            return
        raise AssertionError("no Timeout")
    yield "a call times out", timeout

    async def timeouts_each_on_its_own():
        # A short timeout started after a long one expires first: each
        # call's deadline holds, whatever the others'.
        done = []

        async def one(name, seconds, timeout):
            try:
                await call(CTX, topic, m("pause", seconds=seconds), timeout=timeout)
                done.append(name)
            except rpc.Timeout:
                done.append(f"{name} timed out")
        await asyncio.gather(one("long", 1.5, 20), one("short", 3, 0.3))
        expect(done, ["short timed out", "long"])
    yield "concurrent calls time out each on its own", timeouts_each_on_its_own

    async def bad_arguments():
        for bad in ({"args": {}}, "not a dict"):
            try:
                await call(CTX, topic, bad)
            except rpc.InvalidMessage:
                continue
            raise AssertionError(f"{bad!r} was accepted")
    yield "bad arguments raise before sending", bad_arguments

    async def aserve():
        # An asyncio consumer in this process, called from here.
        class Local:
            async def double(self, ctxt, v):
                await asyncio.sleep(0)
                return 2 * v
        local = f"aio-local-{uuid.uuid4().hex[:8]}"
        conn = aio.create_connection()
        conn.create_consumer(local, Local())
        conn.consume_in_thread()
        try:
            expect(await call(CTX, local, m("double", v=21)), 42)
        finally:
            await conn.close()
    yield "an asyncio consumer in the calling process", aserve

    async def plain_beside_the_loop():
        # The loop leads this process's server (aio was first to serve);
        # a consumer of plain, blocking code added later runs in threads,
        # and the loop keeps answering meanwhile.
        import threading
        started = threading.Event()

        class Slow:
            def wait(self, ctxt, seconds):
                started.set()
                threading.Event().wait(seconds)
                return "slow"

        class Fast:
            async def ping(self, ctxt):
                return "fast"
        fast, slow = (f"aio-{k}-{uuid.uuid4().hex[:8]}" for k in ("fast", "slow"))
        aconn = aio.create_connection()
        aconn.create_consumer(fast, Fast())
        aconn.consume_in_thread()
        pconn = rpc.create_connection()
        try:
            expect(rpc._runtime().server.loop_led, True)
            pconn.create_consumer(slow, Slow())
            pconn.consume_in_thread()
            waiting = asyncio.ensure_future(call(CTX, slow, m("wait", seconds=2.0)))
            loop = asyncio.get_running_loop()
            expect(await loop.run_in_executor(None, started.wait, 30), True)
            expect(await call(CTX, fast, m("ping")), "fast")
            expect(waiting.done(), False)           # answered while the slow one runs
            expect(await waiting, "slow")
        finally:
            pconn.close()
            await aconn.close()
    yield "plain code beside a loop-led server runs off the loop", plain_beside_the_loop


def run_sync(topic):
    results = {}
    for name, check in sync_checks(topic):
        try:
            check()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    return results


async def run_async(topic):
    from nova_zmq_fast import aio
    results = {}
    async for name, check in _agen(async_checks(topic)):
        try:
            await check()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    await aio.cleanup()
    return results


async def _agen(gen):
    async for item in gen:
        yield item


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["threads", "eventlet", "asyncio"])
    parser.add_argument("--topic", required=True)
    parser.add_argument("--ipc-dir", required=True)
    args = parser.parse_args()
    rpc.init(rpc_zmq_host=f"suite-{MODEL}", rpc_zmq_ipc_dir=args.ipc_dir,
             rpc_response_timeout=20, rpc_zmq_linger=2)
    if MODEL == "asyncio":
        results = asyncio.run(run_async(args.topic))
    else:
        results = run_sync(args.topic)
        rpc.cleanup()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    tempfile.gettempdir()
    main()
