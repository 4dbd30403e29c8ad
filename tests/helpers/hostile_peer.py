"""A hostile ZeroMQ peer, written with pyzmq, run as its own process:

    python -m tests.helpers.hostile_peer ENDPOINT SEED ROUNDS

Each round sends one of every kind of bad message below from a DEALER;
then two DEALERs that present the same routing id flood the service.  Everything
is generated from SEED, so a failure can be replayed.  Prints a JSON
summary: how many messages of each kind it sent, whether the service read
them all (the fence), and how many the twins' sockets accepted.
"""
import json
import random
import struct
import sys
import time

import msgpack
import zmq

from nova_zmq_fast import _envelope_py as env

K = env.KINDS
CTX = {"user_id": "intruder"}


def header(kind="CAST", topic="svc", msg_id=0, flags=0, version=1):
    raw = env.encode_header(K[kind], flags, msg_id, topic if kind in ("CAST", "CALL", "FANOUT",
                                                                      "NOTIFY", "PING") else None)
    return bytes([version]) + raw[1:]


def kinds(rng):
    """(name, frames) of each kind of hostile message, fresh randomness."""
    body = msgpack.packb([CTX, {"method": "record", "args": {"key": "x", "value": 1}}])
    yield "random_frames", [rng.randbytes(rng.randrange(0, 64))
                            for _ in range(rng.randrange(1, 6))]
    yield "truncated_header", [header()[:rng.randrange(0, 13)], body]
    yield "truncated_body", [header("CALL", msg_id=rng.getrandbits(64)),
                             body[:rng.randrange(0, len(body))]]
    yield "deep_nesting", [header(), b"\x91" * rng.randrange(200, 4000) + b"\xc0"]
    yield "huge_array", [header(), b"\x92\x80\xdd" + struct.pack(">I", 0xFFFFFFF0)]
    yield "huge_map", [header(), b"\x92\x80\xdf" + struct.pack(">I", 0xFFFFFFF0)]
    yield "huge_string", [header(), b"\x92\x80\xdb" + struct.pack(">I", 0x7FFFFFFF) + b"x"]
    yield "empty_map_bomb", [header(), b"\x92\x80\xdc\xff\xff" + b"\x80" * 65535]
    yield "wrong_version", [header(version=rng.choice([0, 2, 255])), body]
    yield "reply_kind", [header(rng.choice(["RESULT", "CHUNK", "END", "FAILURE", "HEARTBEAT",
                                             "REFUSED", "ACK"]), msg_id=1), body]
    yield "bad_utf8_topic", [header()[:12] + bytes([3]) + b"\xff\xfe\xfd", body]
    yield "unknown_topic", [header(topic=f"no-{rng.getrandbits(32)}"), body]
    yield "not_context_message", [header(), msgpack.packb(rng.choice([1, "x", [], [1, 2, 3]]))]


FENCE_ID = 0xFE7CE


def fence(sock, seconds=30):
    """PING the service on this connection and wait for its answer: TCP
    keeps order, so once it comes every message before it was read.  Replies
    to the hostile messages are read and thrown away on the way, so closing
    the socket does not reset the connection under unread data."""
    sock.send_multipart([header("PING", topic="svc.target", msg_id=FENCE_ID),
                         msgpack.packb([CTX, {}])])
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if poller.poll(100):
            frames = sock.recv_multipart()
            if env.decode_header(frames[0])[3] == FENCE_ID:
                return True
    return False


def main():
    endpoint, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    ctx = zmq.Context()
    sent = {}
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    for _ in range(rounds):
        for name, frames in kinds(rng):
            sock.send_multipart(frames)
            sent[name] = sent.get(name, 0) + 1
    fenced = fence(sock)
    # Two DEALERs presenting one routing id take the connection from each
    # other (the server hands an id over to its newest connection); what was
    # in flight on the losing connection is lost, so this part only counts
    # what the sockets accepted, for a bounded time.
    twins = []
    for _ in range(2):
        twin = ctx.socket(zmq.DEALER)
        twin.setsockopt(zmq.LINGER, 0)
        twin.setsockopt(zmq.ROUTING_ID, b"\x00kdMg")       # the same id, twice
        twin.connect(endpoint)
        twins.append(twin)
    flood = [header(), b"\x92\x80\x81\xa1x" + b"\xc4\xff" + b"\x00" * 0xFF]
    twin_sent = 0
    deadline = time.monotonic() + 3
    for _ in range(rounds * 100):
        if time.monotonic() > deadline:
            break
        for twin in twins:
            try:
                twin.send_multipart(flood, zmq.NOBLOCK)
                twin_sent += 1
            except zmq.Again:
                pass
    for s in [sock] + twins:
        s.close()
    ctx.term()
    print(json.dumps({"sent": sent, "fenced": fenced, "twin_sent": twin_sent}))


if __name__ == "__main__":
    main()
