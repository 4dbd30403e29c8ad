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

import msgpack
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peers.common import (  # noqa: E402
    ARGS, CONTEXT, BenchApi, command_loop, costs, measure_casts, ready, time_calls)


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

    def send_casts(n):
        for _ in range(n):
            rpc_cast("count", **ARGS)

    def cast(n):
        return measure_casts(send_casts, lambda: rpc_call("handled_count"),
                             lambda: rpc_call("cost")["cpu"], n)

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
