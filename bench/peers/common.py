"""Shared by the benchmark peers: the workload, a JSON-lines command loop
on stdin/stdout, and readings of a process's own costs."""
import json
import os
import sys
import time

# Realistic but small: a context of a few keys and args of one int.
CONTEXT = {"user_id": "u-6a3c1fd2", "project_id": "p-91d2e07b",
           "request_id": "req-3f1a9c2e-77b4-4d0e-9c1a-0b5e2f6d8a41"}
ARGS = {"n": 1}


def cpu_seconds():
    """User + system CPU of the whole process (all threads), from the
    process CPU clock (nanoseconds, not 10 ms ticks)."""
    return time.process_time()


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds():
    return len(os.listdir("/proc/self/fd"))


def costs():
    return {"cpu": cpu_seconds(), "rss_mb": rss_mb(), "fds": fds()}


def ready(**info):
    print(json.dumps(dict(info, ready=True)), flush=True)


def command_loop(handlers):
    """Run {"op": name, ...} commands from stdin until EOF or "quit"."""
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            break
        try:
            result = handlers[op](**command)
        except Exception as exc:           # reported to the runner
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)


def time_calls(call, n):
    """Run call() n times (after a short warm-up), timing each one: the
    median and mean in microseconds.  The median ignores the rare call a
    shared machine stalls for milliseconds."""
    for _ in range(min(200, n)):
        call()
    clock = time.perf_counter
    samples = []
    for _ in range(n):
        start = clock()
        call()
        samples.append(clock() - start)
    samples.sort()
    return {"usec": samples[n // 2] * 1e6, "usec_mean": sum(samples) / n * 1e6}


class BenchApi:
    """The server side of the workload: `ping` answers calls, `count`
    counts casts; the rest is for the benchmark's own bookkeeping."""

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


def measure_casts(send, handled, server_cpu, n, pause=0.0005):
    """send(n) sends n casts; time them until handled() shows the server
    has handled the last one.  Rates, and CPU seconds per 100k casts on
    each side."""
    base = handled()
    server_before = server_cpu()
    mine_before = cpu_seconds()
    start = time.perf_counter()
    send(n)
    sent = time.perf_counter()
    if not wait_until(lambda: handled() >= base + n, 600, pause):
        return {"error": "casts not all handled"}
    elapsed = time.perf_counter() - start
    return {"rate": n / elapsed, "send_rate": n / (sent - start),
            "client_cpu_100k": (cpu_seconds() - mine_before) / n * 1e5,
            "server_cpu_100k": (server_cpu() - server_before) / n * 1e5}


def wait_until(predicate, timeout, pause=0.0005):
    """Poll until predicate() is true; False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
    return True
