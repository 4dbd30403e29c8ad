"""Benchmark peer: oslo.messaging RPCClient and RPC server over any
transport URL (rabbit://guest:guest@127.0.0.1:5672/ or zmqfast://).

    oslo_rpc.py serve --url URL
    oslo_rpc.py client --url URL
"""
import argparse
import os
import sys
import threading
import warnings

warnings.filterwarnings("ignore")

import oslo_messaging as messaging  # noqa: E402
from oslo_config import cfg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peers.common import (  # noqa: E402
    ARGS, CONTEXT, BenchApi, command_loop, costs, measure_casts, ready, time_calls)

# The run's own topic (server and client are both children of bench/run.py):
# several runs may share one RabbitMQ, whose queues would mix their messages.
TOPIC = f"nzf_bench_{os.getppid()}"


class BenchEndpoint(BenchApi):
    """BenchApi for an oslo.messaging server, whose executor runs casts in
    many threads at once: counting takes a lock."""
    target = messaging.Target(version="1.0")

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def count(self, ctxt, n):
        with self.lock:
            self.handled += 1


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

    def send_casts(n):
        for _ in range(n):
            rpc.cast(CONTEXT, "count", **ARGS)

    def cast(n):
        return measure_casts(send_casts, lambda: rpc.call(CONTEXT, "handled_count"),
                             lambda: rpc.call(CONTEXT, "cost")["cpu"], n, pause=0.005)

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
