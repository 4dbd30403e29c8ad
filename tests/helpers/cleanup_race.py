"""A process that calls rpc.cleanup() while other threads (or green
threads) wait in calls to a service, then exits: it must neither crash nor
hang; with MODEL asyncio, tasks call and `await aio.cleanup()` runs.
Prints one JSON line: each caller's outcome (the result, or the
exception's class name), what cleanup() returned and how long it took.

    python -m tests.helpers.cleanup_race MODEL IPC_DIR SECONDS LINGER
"""
import json
import sys
import time

MODEL, IPC_DIR, SECONDS, LINGER = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
if MODEL == "eventlet":
    import eventlet
    eventlet.monkey_patch()

import threading  # noqa: E402  (after monkey_patch)

from nova_zmq_fast import rpc  # noqa: E402

rpc.init(rpc_zmq_ipc_dir=IPC_DIR, rpc_zmq_host="racer", rpc_zmq_linger=LINGER)
rpc.call({}, "svc", {"method": "echo", "args": {"value": 0}})
outcomes = []
started = threading.Semaphore(0)


KEY = f"race-{time.time_ns()}"


def caller():
    started.release()
    try:
        outcomes.append(rpc.call({}, "svc", {"method": "hold",
                                             "args": {"key": KEY, "seconds": SECONDS}},
                                 timeout=SECONDS + 30))
    except Exception as exc:
        outcomes.append(type(exc).__name__)


def arrived():
    return sum(rpc.call({}, f"svc.{host}", {"method": "count", "args": {"key": KEY}})
               for host in ("h1", "h2"))


def report(lost, took):
    print(json.dumps({"outcomes": sorted(map(str, outcomes)), "lost": lost, "took": took}),
          flush=True)


async def on_a_loop():
    """The same with tasks of an event loop, and `await aio.cleanup()`."""
    import asyncio
    from nova_zmq_fast import aio

    async def task():
        try:
            outcomes.append(await aio.call({}, "svc", {"method": "hold", "args": {
                "key": KEY, "seconds": SECONDS}}, timeout=SECONDS + 30))
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    tasks = [asyncio.ensure_future(task()) for _ in range(3)]
    deadline = time.monotonic() + 10
    while await asyncio.to_thread(arrived) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    start = time.monotonic()
    lost = await aio.cleanup()
    took = time.monotonic() - start
    await asyncio.wait(tasks, timeout=SECONDS + 30)
    report(lost, took)


if MODEL == "asyncio":
    import asyncio
    asyncio.run(on_a_loop())
    sys.exit(0)
workers = [threading.Thread(target=caller) for _ in range(3)]
for w in workers:
    w.start()
for _ in workers:
    started.acquire()
# Every caller waits in its call once the services report its arrival.
deadline = time.monotonic() + 10
while arrived() < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
start = time.monotonic()
lost = rpc.cleanup()
took = time.monotonic() - start
for w in workers:
    w.join(SECONDS + 30)
report(lost, took)
