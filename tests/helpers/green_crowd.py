"""A crowd of green threads calling at once, in a monkey-patched process
with few file descriptors, as a busy eventlet API service is:

    python -m tests.helpers.green_crowd --topic T --ipc-dir D --callers N --fds F

calls a tests.helpers.model_service consuming T from N green threads at
once, with RLIMIT_NOFILE lowered to F: calls that succeed, calls that
time out, multicall streams, and calls whose green threads are killed
while they wait (once the service reports their handlers running).
Prints one JSON object: what each kind got, and the client's outboxes.
"""
import eventlet
eventlet.monkey_patch()
import eventlet.greenpool  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import uuid  # noqa: E402

from nova_zmq_fast import rpc  # noqa: E402
from nova_zmq_fast.exceptions import Timeout  # noqa: E402

VICTIMS = 20            # each holds a service worker until it is killed


def m(method, **args):
    return {"method": method, "args": args}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--ipc-dir", required=True)
    parser.add_argument("--callers", type=int, required=True)
    parser.add_argument("--fds", type=int, required=True)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (args.fds, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    rpc.init(rpc_zmq_host="green-crowd", rpc_zmq_ipc_dir=args.ipc_dir, rpc_zmq_linger=2)
    topic = args.topic
    got = {"echo": 0, "timeout": 0, "stream": 0, "killed": 0, "wrong": [], "errors": []}

    def guarded(fn):
        def run(i):
            try:
                fn(i)
            except Exception as exc:                    # noqa: BLE001 (reported)
                got["errors"].append(f"{fn.__name__}: {exc!r}"[:300])
        return run

    @guarded
    def echo(i):
        value = rpc.call({}, topic, m("echo", value=i), timeout=60)
        if value == i:
            got["echo"] += 1
        else:
            got["wrong"].append([i, value])

    @guarded
    def times_out(i):
        try:
            # Answered after a second at the earliest: never within 0.2 s.
            rpc.call({}, topic, m("pause", seconds=1.0), timeout=0.2)
        except Timeout:
            got["timeout"] += 1

    @guarded
    def stream(i):
        n = i % 17 + 1
        values = list(rpc.multicall({}, topic, m("stream", n=n), timeout=60))
        if values == list(range(n)):
            got["stream"] += 1
        else:
            got["wrong"].append([i, values])

    key = uuid.uuid4().hex

    @guarded
    def victim(i):
        rpc.call({}, topic, m("busy", key=key, seconds=2), timeout=60)

    pool = eventlet.greenpool.GreenPool(args.callers + VICTIMS)
    victims = [pool.spawn(victim, i) for i in range(VICTIMS)]
    kinds = (echo, echo, echo, echo, echo, echo, times_out, stream, stream, stream)
    for i in range(args.callers):
        pool.spawn(kinds[i % len(kinds)], i)
    # Once every victim's handler runs, its green thread waits for the reply.
    started = rpc.call({}, topic, m("wait_for", key=key, n=VICTIMS), timeout=60)
    for thread in victims:
        thread.kill()
        got["killed"] += 1
    pool.waitall()
    echo(-1)                            # the replies of killed calls do not confuse later ones
    got["victims_started"] = started
    got["outboxes"] = rpc._runtime().client.stats()["outboxes"]
    rpc.cleanup()
    print(json.dumps(got), flush=True)


if __name__ == "__main__":
    main()
