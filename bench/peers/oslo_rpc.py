"""Benchmark peer: oslo.messaging RPCClient and RPC server over any
transport URL (rabbit://guest:guest@127.0.0.1:5672/ or zmqfast://).

    oslo_rpc.py serve --url URL
    oslo_rpc.py client --url URL
"""
import argparse
import os
import sys
import threading
import time
import warnings

warnings.filterwarnings("ignore")

import oslo_messaging as messaging  # noqa: E402
from oslo_config import cfg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peers.common import ARGS, CONTEXT, command_loop, time_calls, costs, cpu_seconds, ready, wait_until  # noqa: E402,E501

TOPIC = "nzf_bench"


class BenchEndpoint:
    target = messaging.Target(version="1.0")

    def __init__(self):
        self.handled = 0
        self.lock = threading.Lock()

    def ping(self, ctxt, n):
        return n

    def count(self, ctxt, n):
        with self.lock:
            self.handled += 1

    def handled_count(self, ctxt):
        return self.handled

    def cost(self, ctxt):
        return costs()


def transport_for(url):
    # The global CONF, as services use it (oslo.messaging registers some of
    # its options, such as tracing, only there).
    cfg.CONF([], project="nzf_bench")
    return messaging.get_rpc_transport(cfg.CONF, url=url)


def serve(url):
    transport = transport_for(url)
    target = messaging.Target(topic=TOPIC, server="bench-server")
    server = messaging.get_rpc_server(transport, target, [BenchEndpoint()],
                                      executor="threading")
    server.start()
    ready(pid=os.getpid())
    command_loop({"costs": lambda: costs()})
    server.stop()
    server.wait()
    transport.cleanup()


def client(url):
    transport = transport_for(url)
    rpc = messaging.get_rpc_client(transport, messaging.Target(topic=TOPIC), timeout=30)

    def call(n):
        return time_calls(lambda: rpc.call(CONTEXT, "ping", **ARGS), n)

    def cast(n):
        base = rpc.call(CONTEXT, "handled_count")
        server_cpu = rpc.call(CONTEXT, "cost")["cpu"]
        my_cpu = cpu_seconds()
        start = time.perf_counter()
        for _ in range(n):
            rpc.cast(CONTEXT, "count", **ARGS)
        sent = time.perf_counter()
        if not wait_until(lambda: rpc.call(CONTEXT, "handled_count") >= base + n, 600, 0.005):
            return {"error": "casts not all handled"}
        elapsed = time.perf_counter() - start
        return {"rate": n / elapsed, "send_rate": n / (sent - start),
                "client_cpu_100k": (cpu_seconds() - my_cpu) / n * 1e5,
                "server_cpu_100k": (rpc.call(CONTEXT, "cost")["cpu"] - server_cpu) / n * 1e5}

    ready(pid=os.getpid())
    command_loop({"call": call, "cast": cast, "costs": lambda: costs(),
                  "server_costs": lambda: rpc.call(CONTEXT, "cost")})
    transport.cleanup()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "client"])
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    (serve if args.mode == "serve" else client)(args.url)


if __name__ == "__main__":
    main()
