"""Benchmark peer: the native API under one concurrency model.

    models.py serve MODEL --host H --ipc-dir D
    models.py client MODEL --ipc-dir D

MODEL is `threads` (plain rpc), `eventlet` (rpc in a monkey-patched
process) or `asyncio` (nova_zmq_fast.aio).  A server consumes 'cbench'
with BenchApi.  The client takes JSON-lines commands on stdin:
{"op": "call", "n": N, "host": H} times N calls to 'cbench.H' one by
one; {"op": "cast", "n": N, "host": H} sends N casts and waits until H
has handled them (its handled_count).
"""
import sys

MODEL = sys.argv[2] if len(sys.argv) > 2 else "threads"
if MODEL == "eventlet":
    import eventlet
    eventlet.monkey_patch()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nova_zmq_fast import rpc  # noqa: E402
from peers.common import ARGS, CONTEXT, BenchApi, ready  # noqa: E402

PING = {"method": "ping", "args": ARGS}
COUNT = {"method": "count", "args": ARGS}


def lines():
    """stdin's lines, read without blocking eventlet's hub."""
    while True:
        if MODEL == "eventlet":
            from eventlet.hubs import trampoline
            trampoline(sys.stdin.fileno(), read=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield json.loads(line)


def timed(samples):
    samples.sort()
    return {"usec": samples[len(samples) // 2] * 1e6}


def sync_client():
    clock = time.perf_counter
    for cmd in lines():
        op, n, topic = cmd["op"], cmd.get("n", 0), f"cbench.{cmd.get('host')}"
        if op == "quit":
            break
        if op == "call":
            for _ in range(min(200, n)):
                rpc.call(CONTEXT, topic, PING)
            samples = []
            for _ in range(n):
                start = clock()
                rpc.call(CONTEXT, topic, PING)
                samples.append(clock() - start)
            out = timed(samples)
        else:
            base = rpc.call(CONTEXT, topic, {"method": "handled_count"})
            start = clock()
            for _ in range(n):
                rpc.cast(CONTEXT, topic, COUNT)
            while rpc.call(CONTEXT, topic, {"method": "handled_count"}) < base + n:
                pass
            out = {"rate": n / (clock() - start)}
        print(json.dumps(out), flush=True)


async def async_client():
    from nova_zmq_fast import aio
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    ready(pid=os.getpid())
    clock = time.perf_counter
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        op, n, topic = cmd["op"], cmd.get("n", 0), f"cbench.{cmd.get('host')}"
        if op == "quit":
            break
        if op == "call":
            for _ in range(min(200, n)):
                await aio.call(CONTEXT, topic, PING)
            samples = []
            for _ in range(n):
                start = clock()
                await aio.call(CONTEXT, topic, PING)
                samples.append(clock() - start)
            out = timed(samples)
        else:
            base = await aio.call(CONTEXT, topic, {"method": "handled_count"})
            start = clock()
            for _ in range(n):
                await aio.cast(CONTEXT, topic, COUNT)
            while await aio.call(CONTEXT, topic, {"method": "handled_count"}) < base + n:
                pass
            out = {"rate": n / (clock() - start)}
        print(json.dumps(out), flush=True)
    await aio.cleanup()


async def async_serve():
    from nova_zmq_fast import aio
    loop = asyncio.get_running_loop()
    conn = aio.create_connection()
    conn.create_consumer("cbench", BenchApi())
    conn.consume_in_thread()
    ready(pid=os.getpid())
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    await aio.cleanup()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "client"])
    parser.add_argument("model", choices=["threads", "eventlet", "asyncio"])
    parser.add_argument("--host", default="bench-client")
    parser.add_argument("--ipc-dir", required=True)
    args = parser.parse_args()
    rpc.init(rpc_zmq_host=args.host, rpc_zmq_ipc_dir=args.ipc_dir)
    if args.model == "asyncio":
        asyncio.run(async_serve() if args.mode == "serve" else async_client())
        return
    if args.mode == "client":
        ready(pid=os.getpid())
        sync_client()
    else:
        conn = rpc.create_connection()
        conn.create_consumer("cbench", BenchApi())
        conn.consume_in_thread()
        ready(pid=os.getpid())
        for _ in lines():
            pass
    rpc.cleanup()


if __name__ == "__main__":
    main()
