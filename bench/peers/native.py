"""Benchmark peer: the project's native API (nova_zmq_fast.rpc).

    native.py serve --host s0 --index 0 --groups 1,4,8 --ipc-dir D [--options JSON]
    native.py client --ipc-dir D [--options JSON]
    native.py registrar --ipc-dir D

Server s0 consumes 'bench'; every server consumes 'ctl' (reached as
'ctl.<host>'), and for each group N it belongs to (server i is in every
group N > i) the topic 'grp<N>' (calls and casts spread over the group)
and the fanout topic 'fan<N>'.  The registrar holds K idle servers on
other topics.  --options go to rpc.init() (e.g. Redis discovery).
Commands arrive as JSON lines on stdin (see common.py).
"""
import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nova_zmq_fast import rpc  # noqa: E402
from peers.common import (  # noqa: E402
    ARGS, CONTEXT, BenchApi, command_loop, costs, fds, measure_casts, ready, time_calls,
    wait_until)

PING = {"method": "ping", "args": ARGS}
COUNT = {"method": "count", "args": ARGS}


class NativeBenchApi(BenchApi):
    def __init__(self):
        super().__init__()
        self.fanned = {}
        self.grouped = {}

    def fanned_count(self, ctxt, group):
        return self.fanned[str(group)].handled

    def grouped_count(self, ctxt, group):
        return self.grouped[str(group)].handled


class GroupApi:
    """Counts what one group topic brought; as cheap per message as
    BenchApi.count, and answers calls like BenchApi.ping."""

    def __init__(self, table, group):
        self.handled = 0
        table[str(group)] = self

    def count(self, ctxt, n):
        self.handled += 1

    def ping(self, ctxt, n):
        return n


def init(args, host):
    rpc.init(rpc_zmq_host=host, rpc_zmq_ipc_dir=args.ipc_dir, **json.loads(args.options))


def serve(args):
    init(args, args.host)
    api = NativeBenchApi()
    conn = rpc.create_connection()
    if args.index == 0:
        conn.create_consumer("bench", api)
    conn.create_consumer("ctl", api)
    for group in (int(g) for g in args.groups.split(",") if g):
        if args.index < group:
            conn.create_consumer(f"grp{group}", GroupApi(api.grouped, group))
            conn.create_consumer(f"fan{group}", GroupApi(api.fanned, group), fanout=True)
    conn.consume_in_thread()
    ready(pid=os.getpid())
    command_loop({"costs": lambda: costs()})
    rpc.cleanup()


def client(args):
    init(args, "bench-client")
    ctl = lambda host, method, **kw: rpc.call(CONTEXT, f"ctl.{host}",  # noqa: E731
                                              {"method": method, "args": kw})

    def call(n):
        return time_calls(lambda: rpc.call(CONTEXT, "bench", PING), n)

    def send_casts(n):
        for _ in range(n):
            rpc.cast(CONTEXT, "bench", COUNT)

    def cast(n):
        return measure_casts(send_casts, lambda: ctl("s0", "handled_count"),
                             lambda: ctl("s0", "cost")["cpu"], n)

    def counted(hosts, what, group):
        return sum(ctl(h, what, group=group) for h in hosts)

    def spread_casts(n, group, hosts):
        """Casts to grp<N>, round-robin over its N servers: the rate until
        all of them have handled everything."""
        base = counted(hosts, "grouped_count", group)
        start = time.perf_counter()
        for _ in range(n):
            rpc.cast(CONTEXT, f"grp{group}", COUNT)
        if not wait_until(lambda: counted(hosts, "grouped_count", group) >= base + n, 300,
                          0.005):
            return {"error": f"casts to grp{group} not all handled"}
        return {"rate": n / (time.perf_counter() - start)}

    def spread_calls(n, group, threads):
        """Calls to grp<N> from `threads` threads at once: the aggregate rate."""
        share = n // threads
        errors = []

        def work():
            try:
                for _ in range(share):
                    rpc.call(CONTEXT, f"grp{group}", PING)
            except Exception as exc:        # reported below
                errors.append(repr(exc))
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for _ in range(min(200, share)):
            rpc.call(CONTEXT, f"grp{group}", PING)
        start = time.perf_counter()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if errors:
            return {"error": errors[0]}
        return {"rate": share * threads / (time.perf_counter() - start)}

    def fanout(n, group, hosts=None):
        hosts = hosts or [f"s{i}" for i in range(group)]
        bases = [ctl(h, "fanned_count", group=group) for h in hosts]
        start = time.perf_counter()
        for _ in range(n):
            rpc.fanout_cast(CONTEXT, f"fan{group}", COUNT)
        for host, base in zip(hosts, bases):
            if not wait_until(lambda: ctl(host, "fanned_count", group=group) >= base + n, 300):
                return {"error": f"fanouts not all handled by {host}"}
        elapsed = time.perf_counter() - start
        return {"usec_per_recipient": elapsed / (n * group) * 1e6}

    def fds_by_peers(groups):
        """Descriptors of this client as it talks to more and more servers."""
        out = {}
        for group in groups:
            for i in range(group):
                ctl(f"s{i}", "handled_count")
            out[str(group)] = fds()
        return out

    ready(pid=os.getpid())
    command_loop({"call": call, "cast": cast, "fanout": fanout, "fds_by_peers": fds_by_peers,
                  "spread_casts": spread_casts, "spread_calls": spread_calls,
                  "costs": lambda: costs()})
    rpc.cleanup()


def registrar(args):
    """Holds K idle servers registered on other topics."""
    rpc.init(rpc_zmq_host="bench-registrar", rpc_zmq_ipc_dir=args.ipc_dir)
    conns = []

    class Idle:
        def noop(self, ctxt):
            pass

    def set_servers(k):
        while len(conns) < k:
            conn = rpc.create_connection()
            conn.create_consumer(f"other-{len(conns)}", Idle())
            conn.consume_in_thread()
            conns.append(conn)
        while len(conns) > k:
            conns.pop().close()
        return {"registered": len(conns)}

    ready(pid=os.getpid())
    command_loop({"set": set_servers})
    rpc.cleanup()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "client", "registrar"])
    parser.add_argument("--host", default="s0")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--groups", default="")
    parser.add_argument("--ipc-dir", required=True)
    parser.add_argument("--options", default="{}", help="rpc.init() options, JSON")
    args = parser.parse_args()
    {"serve": serve, "client": client, "registrar": registrar}[args.mode](args)


if __name__ == "__main__":
    main()
