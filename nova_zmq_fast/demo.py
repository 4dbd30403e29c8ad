"""A tour of nova_zmq_fast across real processes: `python -m nova_zmq_fast.demo`.

It starts two services ("demo-1" and "demo-2") as separate processes on the
embedded discovery (a private registry directory, no daemon), then acts as
their client: call, spread, topic.host, multicall streaming, remote errors,
version refusal, timeouts, cast and fanout delivery, a quick speed figure,
and what happens when a service is killed.  Every step is checked; the exit
status is 0 only if all of them held.
"""
import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from nova_zmq_fast import rpc
from nova_zmq_fast.exceptions import remote_message

TOPIC = "demo"
CTX = {"user_id": "demo-user", "project_id": "demo-project", "request_id": "req-demo"}


# -- the service ---------------------------------------------------------------

class DemoApi:
    RPC_API_VERSION = "1.1"

    def __init__(self, host):
        self.host = host
        self.seen = {}
        self.lock = threading.Lock()

    def hello(self, ctxt, name):
        return f"hello {name} from {self.host} (user {ctxt.user_id})"

    def whoami(self, ctxt):
        return self.host

    def ticker(self, ctxt, n, delay):
        for i in range(n):
            time.sleep(delay)
            yield f"tick {i} from {self.host}"

    def divide(self, ctxt, a, b):
        return a / b

    def slow(self, ctxt, seconds):
        time.sleep(seconds)
        return self.host

    def ping(self, ctxt, n):
        return n

    def mark(self, ctxt, key, value):
        with self.lock:
            self.seen.setdefault(key, []).append(value)

    def marks(self, ctxt, key):
        with self.lock:
            return list(self.seen.get(key, []))

    def tally(self, ctxt, key):
        with self.lock:
            return len(self.seen.get(key, []))


class FanoutApi:
    def __init__(self, api):
        self.api = api

    def mark(self, ctxt, key, value):
        self.api.mark(ctxt, "fanout:" + key, value)


def serve(host, ipc_dir):
    rpc.init(rpc_zmq_host=host, rpc_zmq_ipc_dir=ipc_dir)
    api = DemoApi(host)
    conn = rpc.create_connection()
    conn.create_consumer(TOPIC, rpc.RpcDispatcher([api]))
    conn.create_consumer(TOPIC, FanoutApi(api), fanout=True)
    conn.consume_in_thread()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print("READY", flush=True)
    # Never done.wait() here: a signal handler's done.set() would then run
    # on this thread while it holds the event's lock, and wait for itself.
    while not done.is_set():
        time.sleep(0.2)
    rpc.cleanup()


# -- the client ------------------------------------------------------------------

class Tour:
    def __init__(self):
        self.failures = 0

    def check(self, ok, what, detail=""):
        mark = "ok  " if ok else "FAIL"
        self.failures += not ok
        print(f"  [{mark}] {what}{': ' + detail if detail else ''}", flush=True)
        return ok


def start(host, ipc_dir):
    proc = subprocess.Popen([sys.executable, "-m", "nova_zmq_fast.demo", "--serve", host,
                             "--ipc-dir", ipc_dir], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "READY":
        proc.kill()
        raise SystemExit(f"service {host} did not start")
    return proc


def call(method, topic=TOPIC, timeout=10, **args):
    return rpc.call(CTX, topic, {"method": method, "args": args}, timeout=timeout)


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def tour(ipc_dir, quick):
    t = Tour()
    print(f"registry: {ipc_dir}")
    services = {h: start(h, ipc_dir) for h in ("demo-1", "demo-2")}
    print(f"services: demo-1 (pid {services['demo-1'].pid}), "
          f"demo-2 (pid {services['demo-2'].pid})\n")
    rpc.init(rpc_zmq_host="demo-client", rpc_zmq_ipc_dir=ipc_dir,
             allowed_rpc_exception_modules=["builtins"])
    try:
        print("call")
        answer = call("hello", name="world")
        t.check(answer.startswith("hello world from demo-"), "call returns the result", answer)
        hosts = [call("whoami") for _ in range(20)]
        t.check(set(hosts) == {"demo-1", "demo-2"}, "20 calls spread over both services",
                f"demo-1 x{hosts.count('demo-1')}, demo-2 x{hosts.count('demo-2')}")
        topic = rpc.queue_get_for(CTX, TOPIC, "demo-2")
        only = {call("whoami", topic=topic) for _ in range(10)}
        t.check(only == {"demo-2"}, f"'{topic}' reaches demo-2 only")

        print("\nmulticall (values stream as they are produced)")
        start_at = time.monotonic()
        arrivals = []
        for value in rpc.multicall(CTX, TOPIC + ".demo-1",
                                   {"method": "ticker", "args": {"n": 4, "delay": 0.25}}):
            arrivals.append(time.monotonic() - start_at)
            print(f"         {arrivals[-1]:5.2f}s  {value}")
        t.check(len(arrivals) == 4 and arrivals[0] < 0.5 and arrivals[-1] > 0.9,
                "each value arrived when it was yielded, then an explicit end")

        print("\nerrors and timeouts")
        try:
            call("divide", a=1, b=0)
            t.check(False, "remote ZeroDivisionError")
        except ZeroDivisionError as exc:
            t.check(True, "remote exception re-raised as its own type", repr(exc))
        try:
            rpc.call(CTX, TOPIC, {"method": "hello", "args": {"name": "x"}, "version": "2.0"})
            t.check(False, "version 2.0 refused")
        except rpc.UnsupportedRpcVersion as exc:
            # str(exc) is the message, then the remote traceback (2012 style).
            t.check(True, "version 2.0 refused by a 1.1 API", remote_message(exc))
        began = time.monotonic()
        try:
            call("slow", seconds=3, timeout=0.5)
            t.check(False, "timeout")
        except rpc.Timeout:
            t.check(True, "call to a slow method times out",
                    f"after {time.monotonic() - began:.2f}s (timeout 0.5s)")
        began = time.monotonic()
        try:
            call("hello", topic="nobody-home", name="x", timeout=30)
            t.check(False, "no listener")
        except rpc.NoListeners:
            t.check(True, "call with no live consumer fails at once",
                    f"{(time.monotonic() - began) * 1000:.1f} ms, not 30 s")

        print("\ncast and fanout")
        n = 2000
        for i in range(n):
            rpc.cast(CTX, TOPIC, {"method": "mark", "args": {"key": "once", "value": i}})
        both = lambda: call("tally", TOPIC + ".demo-1", key="once") + \
            call("tally", TOPIC + ".demo-2", key="once")
        wait_for(lambda: both() >= n, 20)
        got = call("marks", TOPIC + ".demo-1", key="once") + \
            call("marks", TOPIC + ".demo-2", key="once")
        t.check(sorted(got) == list(range(n)), f"{n} casts each handled exactly once",
                f"{len(got)} handled")
        rpc.fanout_cast(CTX, TOPIC, {"method": "mark", "args": {"key": "f", "value": "hi"}})
        fan = lambda h: call("marks", f"{TOPIC}.{h}", key="fanout:f")
        wait_for(lambda: fan("demo-1") and fan("demo-2"), 10)
        t.check(fan("demo-1") == ["hi"] and fan("demo-2") == ["hi"],
                "one fanout_cast reached each service once")

        print("\nspeed (one client, one service, this machine, this run)")
        target = TOPIC + ".demo-1"
        msg = {"method": "ping", "args": {"n": 1}}
        for _ in range(300):
            rpc.call(CTX, target, msg)
        rounds = []
        for _ in range(3 if quick else 7):
            k = 1000
            began = time.perf_counter()
            for _ in range(k):
                rpc.call(CTX, target, msg)
            rounds.append((time.perf_counter() - began) / k * 1e6)
        print(f"         call round trip: median {statistics.median(rounds):.0f} us "
              f"over {len(rounds)} rounds of 1000")
        n = 50000 if quick else 200000
        base = call("tally", target, key="speed")
        began = time.perf_counter()
        for i in range(n):
            rpc.cast(CTX, target, {"method": "mark", "args": {"key": "speed", "value": 0}})
        wait_for(lambda: call("tally", target, key="speed") >= base + n, 120)
        rate = n / (time.perf_counter() - began)
        t.check(call("tally", target, key="speed") == base + n,
                f"{n} casts handled", f"{rate:,.0f} casts/s end to end")

        print("\nfailover")
        services["demo-2"].send_signal(signal.SIGKILL)
        killed = time.monotonic()

        def only_demo_1():
            seen = set()
            for _ in range(4):
                try:
                    seen.add(call("whoami", timeout=0.5))
                except rpc.Timeout:
                    seen.add("lost")
            return seen == {"demo-1"}
        ok = wait_for(only_demo_1, 10)
        t.check(ok, "demo-2 killed (SIGKILL): calls go to demo-1 only",
                f"after {time.monotonic() - killed:.2f}s")
    finally:
        rpc.cleanup()
        for proc in services.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.stdout.close()
    print(f"\n{'all checks passed' if not t.failures else f'{t.failures} check(s) FAILED'}")
    return 1 if t.failures else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="HOST", help=argparse.SUPPRESS)
    parser.add_argument("--ipc-dir", help="registry directory (default: a fresh temporary one)")
    parser.add_argument("--quick", action="store_true", help="shorter speed figures")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.ipc_dir)
        return 0
    if args.ipc_dir:
        return tour(args.ipc_dir, args.quick)
    with tempfile.TemporaryDirectory(prefix="nzf-demo-") as ipc_dir:
        return tour(ipc_dir, args.quick)


if __name__ == "__main__":
    sys.exit(main())
