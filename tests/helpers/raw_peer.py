"""An independent ZeroMQ peer written with pyzmq, run as its own process
(so no test process ever loads two libzmq copies).

    python -m tests.helpers.raw_peer < spec.json

The JSON (on stdin) gives an endpoint, a list of messages (each a list of hex frames)
to send from one DEALER, and how many replies to wait for; with "lockstep",
a reply to each message before the next is sent.  It prints the replies it
got as JSON (lists of hex frames).
"""
import json
import sys

import zmq


def main():
    spec = json.load(sys.stdin)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(spec["endpoint"])
    sock.setsockopt(zmq.RCVTIMEO, int(spec.get("timeout", 5) * 1000))
    replies = []

    def receive(n):
        for _ in range(n):
            try:
                replies.append([f.hex() for f in sock.recv_multipart()])
            except zmq.Again:
                return

    for frames in spec["messages"]:
        sock.send_multipart([bytes.fromhex(f) for f in frames])
        if spec.get("lockstep"):
            receive(1)
    receive(spec.get("replies", 0))
    sock.close()
    ctx.term()
    print(json.dumps(replies))


if __name__ == "__main__":
    main()
