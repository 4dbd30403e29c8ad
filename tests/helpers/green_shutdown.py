"""Green threads waiting for replies when the transport is ended under
them (what cleanup's interrupt() does: the context is shut down), and
another green thread's send meets the shutdown first, before the hub
looks at the socket:

    python -m tests.helpers.green_shutdown --topic T --ipc-dir D

The waiters call `take` on a service whose queue stays empty (answered
after its 10 s wait at the earliest); each must end at once with
TransportClosed.  Prints one JSON object: how each call ended.
"""
import eventlet
eventlet.monkey_patch()

import argparse  # noqa: E402
import eventlet.event  # noqa: E402
import json  # noqa: E402

from nova_zmq_fast import rpc  # noqa: E402
from nova_zmq_fast.exceptions import TransportClosed  # noqa: E402

WAITERS = 5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--ipc-dir", required=True)
    args = parser.parse_args()
    rpc.init(rpc_zmq_host="green-shutdown", rpc_zmq_ipc_dir=args.ipc_dir, rpc_zmq_linger=0.2)
    topic = args.topic
    rpc.call({}, topic, {"method": "echo", "args": {"value": 0}}, timeout=30)
    ended = []
    waiting = eventlet.event.Event()

    def waiter():
        try:
            rpc.call({}, topic, {"method": "take", "args": {}}, timeout=60)
            ended.append("answered")
        except TransportClosed:
            ended.append("TransportClosed")
        except Exception as exc:                    # noqa: BLE001 (reported)
            ended.append(repr(exc))

    threads = [eventlet.spawn(waiter) for _ in range(WAITERS)]
    eventlet.spawn_n(waiting.send)                  # runs once every waiter is parked
    waiting.wait()
    rpc._runtime().context.shutdown()               # what interrupt() does
    try:                                            # and, before the hub polls, a send
        rpc.cast({}, topic, {"method": "echo", "args": {"value": 1}})
        cast = "sent"
    except TransportClosed:
        cast = "TransportClosed"
    with eventlet.Timeout(5, False):                # they end at once; 10 s if never woken
        for thread in threads:
            thread.wait()
    print(json.dumps({"cast": cast, "waiters": ended}), flush=True)


if __name__ == "__main__":
    main()
