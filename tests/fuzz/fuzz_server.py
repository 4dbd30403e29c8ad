"""Fuzz harness: a live server's handling of whole messages.

The harness process runs a server through the public API (consumers for a
direct topic, `topic.host`, a fanout and a raw proxy) and feeds it fuzzed
multipart messages from a pyzmq DEALER, so it loads two libzmq copies and
must never run inside the test process.  An input is a sequence of frames,
each a little-endian u16 length and its bytes (at most 4 frames).

After each input the harness waits, bounded in time, until the server has
accounted for every message it received (tests/helpers/ledger.py).
Replies that come back must be well-formed envelopes answering a message
that was sent (a CALL, a PING, an at-least-once CAST).  Every 200 inputs a normal call must still get its
answer.  Any breach raises, which atheris reports with the input.
Run by tests/fuzz/run.py.
"""
import os
import shutil
import sys
import time

import atheris

with atheris.instrument_imports():
    from nova_zmq_fast import _envelope_py as env
    from nova_zmq_fast import rpc
    from nova_zmq_fast.exceptions import MalformedEnvelope

import zmq

from tests.helpers.ledger import accounted

MAX_MESSAGE = 4096
CTX = {"user_id": "fuzz"}
HERE = os.path.dirname(os.path.abspath(__file__))
STATE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "build", "fuzz", "server-registry")


class Service:
    RPC_API_VERSION = "1.1"

    def __init__(self):
        self.seen = 0

    def echo(self, ctxt, value):
        return value

    def record(self, ctxt, key=None, value=None):
        self.seen += 1

    def stream(self, ctxt, n):
        yield from range(min(int(n), 5))

    def fail(self, ctxt, text=""):
        raise ValueError(str(text)[:100])


def frames_of(data):
    frames, pos = [], 0
    while pos + 2 <= len(data) and len(frames) < 4:
        size = int.from_bytes(data[pos:pos + 2], "little")
        frames.append(data[pos + 2:pos + 2 + size])
        pos += 2 + size
    return frames or [data]


def answered(header):
    """Whether the server may reply to a request with this header: a CALL,
    a PING, an at-least-once CAST."""
    kind, flags = header[1], int.from_bytes(header[2:4], "little")
    return kind in (env.KINDS["CALL"], env.KINDS["PING"]) or (
        kind == env.KINDS["CAST"] and flags & env.FLAG_ACK_CAST)


class Harness:
    def __init__(self):
        shutil.rmtree(STATE, ignore_errors=True)
        os.makedirs(STATE)
        rpc.init(rpc_zmq_ipc_dir=STATE, rpc_zmq_host="fuzzhost",
                 rpc_zmq_max_message_size=MAX_MESSAGE, rpc_response_timeout=10,
                 rpc_zmq_linger=1)
        self.service = Service()
        self.conn = rpc.create_connection()
        self.conn.create_consumer("fuzz", rpc.RpcDispatcher([self.service]))
        self.conn.create_consumer("fuzz", rpc.RpcDispatcher([self.service]), fanout=True)
        self.conn.create_consumer("fuzz-raw", lambda ctxt, msg: self.service.record(ctxt))
        self.conn.consume_in_thread()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.conn.address)
        self.inputs = 0
        self.recent_calls = []          # msg_ids of the requests sent lately that may be answered
        self.check_alive()

    def counters(self):
        stats = self.conn.stats()
        return stats.get("server", stats)

    def accounted(self):
        c = self.counters()
        return c["received"], accounted(c)

    def settle(self, expected, timeout=10.0):
        """Wait until the server has received `expected` messages and
        accounted for each; bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            received, done = self.accounted()
            if received >= expected and done == received:
                return received
            if time.monotonic() > deadline:
                raise AssertionError(f"server stuck: received {received} of {expected}, "
                                     f"accounted for {done}: {self.counters()}")
            time.sleep(0.0005)

    def drain_replies(self, calls):
        while True:
            try:
                reply = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(reply) != 2:
                raise AssertionError(f"reply of {len(reply)} frames: {reply!r}")
            try:
                _, kind, _, msg_id, _ = env.decode_header(reply[0])
                if kind in (env.KINDS["END"], env.KINDS["HEARTBEAT"], env.KINDS["ACK"]):
                    if reply[1]:
                        raise MalformedEnvelope("END, HEARTBEAT or ACK with a body")
                else:
                    env.unpack_body(reply[1], 1 << 24)
            except MalformedEnvelope as exc:
                raise AssertionError(f"malformed reply {reply!r}: {exc}") from None
            if msg_id not in calls:
                raise AssertionError(f"reply to msg_id {msg_id}, which was never sent")

    def check_alive(self):
        value = self.inputs
        got = rpc.call(CTX, "fuzz", {"method": "echo", "args": {"value": value}}, timeout=10)
        if got != value:
            raise AssertionError(f"echo({value}) returned {got!r}")

    def one(self, data):
        frames = frames_of(data)
        received, _ = self.accounted()
        if len(frames[0]) >= 12 and answered(frames[0]):
            # Any such request may be answered, whatever the rest of the
            # header: the server does not check the topic's UTF-8 before
            # looking it up.
            self.recent_calls.append(int.from_bytes(frames[0][4:12], "little"))
        calls = set(self.recent_calls)
        self.sock.send_multipart(frames)
        self.settle(received + 1)
        self.drain_replies(calls)
        self.inputs += 1
        if self.inputs % 200 == 0:
            self.check_alive()
            del self.recent_calls[:-100]
        if self.inputs % 20000 == 0:
            counters = {k: v for k, v in self.counters().items() if isinstance(v, int) and v}
            print(f"server counters after {self.inputs} inputs: {counters}", flush=True)


harness = None


def test_one_input(data):
    harness.one(data)


if __name__ == "__main__":
    from nova_zmq_fast import _server
    assert "build/fuzz" in _server.__file__, f"not the instrumented build: {_server.__file__}"
    harness = Harness()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
