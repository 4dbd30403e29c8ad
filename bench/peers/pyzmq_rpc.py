"""Benchmark peer: the RPC a Python developer would write by hand with
pyzmq and msgpack.  DEALER client, ROUTER server; the client sends
{'method', 'args', 'context', 'reply'} dicts, the server calls the Python
method and answers calls.

    pyzmq_rpc.py serve --endpoint tcp://127.0.0.1:P
    pyzmq_rpc.py client --endpoint tcp://127.0.0.1:P

This process never imports nova_zmq_fast: pyzmq brings its own libzmq.
"""
import argparse
import os
import sys
import time

import msgpack
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peers.common import ARGS, CONTEXT, command_loop, time_calls, costs, cpu_seconds, ready, wait_until  # noqa: E402,E501


class BenchApi:
    def __init__(self):
        self.handled = 0

    def ping(self, ctxt, n):
        return n

    def count(self, ctxt, n):
        self.handled += 1

    def handled_count(self, ctxt):
        return self.handled

    def cost(self, ctxt):
        return costs()


def serve(endpoint):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    api = BenchApi()
    ready(pid=os.getpid())
    while True:
        ident, body = sock.recv_multipart()
        msg = msgpack.unpackb(body)
        if msg["method"] == "quit":
            break
        result = getattr(api, msg["method"])(msg["context"], **msg["args"])
        if msg["reply"]:
            sock.send_multipart([ident, msgpack.packb(result)])
    sock.close()
    ctx.term()


def client(endpoint):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)

    def rpc_call(method, **args):
        sock.send(msgpack.packb({"method": method, "args": args, "context": CONTEXT,
                                 "reply": True}))
        return msgpack.unpackb(sock.recv())

    def rpc_cast(method, **args):
        sock.send(msgpack.packb({"method": method, "args": args, "context": CONTEXT,
                                 "reply": False}))

    def call(n):
        return time_calls(lambda: rpc_call("ping", **ARGS), n)

    def cast(n):
        base = rpc_call("handled_count")
        server_cpu = rpc_call("cost")["cpu"]
        my_cpu = cpu_seconds()
        start = time.perf_counter()
        for _ in range(n):
            rpc_cast("count", **ARGS)
        sent = time.perf_counter()
        if not wait_until(lambda: rpc_call("handled_count") >= base + n, 300):
            return {"error": "casts not all handled"}
        elapsed = time.perf_counter() - start
        return {"rate": n / elapsed, "send_rate": n / (sent - start),
                "client_cpu_100k": (cpu_seconds() - my_cpu) / n * 1e5,
                "server_cpu_100k": (rpc_call("cost")["cpu"] - server_cpu) / n * 1e5}

    ready(pid=os.getpid())
    command_loop({"call": call, "cast": cast, "costs": lambda: costs(),
                  "server_costs": lambda: rpc_call("cost")})
    rpc_cast("quit")
    sock.close(linger=1000)
    ctx.term()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "client"])
    parser.add_argument("--endpoint", required=True)
    args = parser.parse_args()
    (serve if args.mode == "serve" else client)(args.endpoint)


if __name__ == "__main__":
    main()
