"""A process that calls rpc.cleanup() while other threads (or green
threads) wait in calls to a service, then exits: it must neither crash nor
hang.  Prints one JSON line: each caller's outcome (the result, or the
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
print(json.dumps({"outcomes": sorted(map(str, outcomes)), "lost": lost, "took": took}),
      flush=True)
