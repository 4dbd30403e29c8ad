"""Call round trip and cast rate under each concurrency model, side by
side: threads (plain rpc), eventlet (rpc in monkey-patched processes) and
asyncio (nova_zmq_fast.aio), each client calling a service of its own
model, plus the mixed pairs.  Every round measures every pair back to
back in an order rotated from round to round; the report gives each
figure's median over rounds and the median of the per-round ratios to
the threaded figure.

    python bench/concurrency.py [--rounds 5] [--calls 2000] [--casts 20000]
        [--models threads,eventlet,asyncio] [--json OUT]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "peers", "models.py")


class Peer:
    def __init__(self, *argv):
        self.proc = subprocess.Popen([sys.executable, PEER, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE))
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"{argv} did not start")

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--casts", type=int, default=20000)
    parser.add_argument("--models", default="threads,eventlet,asyncio")
    parser.add_argument("--mixed", action="store_true",
                        help="also each client model against each server model")
    parser.add_argument("--json")
    args = parser.parse_args()
    models = args.models.split(",")
    pairs = [(m, m) for m in models]
    if args.mixed:
        pairs += [(c, s) for c in models for s in models if c != s]
    ipc = tempfile.mkdtemp(prefix="nzf-cbench-")
    servers = {m: Peer("serve", m, "--host", f"srv-{m}", "--ipc-dir", ipc) for m in models}
    clients = {m: Peer("client", m, "--host", f"cli-{m}", "--ipc-dir", ipc) for m in models}
    figures = {}
    try:
        for r in range(args.rounds):
            order = pairs[r % len(pairs):] + pairs[:r % len(pairs)]
            for client, server in order:
                key = f"{client}->{server}"
                c = clients[client]
                call = c.ask(op="call", n=args.calls, host=f"srv-{server}")
                cast = c.ask(op="cast", n=args.casts, host=f"srv-{server}")
                figures.setdefault(key, []).append((call["usec"], cast["rate"]))
                print(f"round {r + 1} {key}: call {call['usec']:.0f} µs, "
                      f"cast {cast['rate']:,.0f}/s", file=sys.stderr, flush=True)
    finally:
        for p in list(clients.values()) + list(servers.values()):
            p.close()
    base = "threads->threads"
    report = {}
    for key, rounds in figures.items():
        entry = {"call_usec": statistics.median(c for c, _ in rounds),
                 "cast_rate": statistics.median(r for _, r in rounds)}
        if key != base and base in figures:
            entry["call_ratio"] = statistics.median(
                c / b[0] for (c, _), b in zip(rounds, figures[base]))
            entry["cast_ratio"] = statistics.median(
                r / b[1] for (_, r), b in zip(rounds, figures[base]))
        report[key] = entry
    for key, e in report.items():
        extra = (f"  (x{e['call_ratio']:.2f} call, x{e['cast_ratio']:.2f} cast of threads)"
                 if "call_ratio" in e else "")
        print(f"{key:22} call {e['call_usec']:7.0f} µs   cast {e['cast_rate']:>10,.0f}/s{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "calls": args.calls, "casts": args.casts,
                       "figures": report}, f, indent=1)


if __name__ == "__main__":
    main()
