"""An RPC client that runs inside a cluster host, driven by the test.

Where it sits: the sending end of a multi-host test.  The test process
stays in the root namespace, which is not on the test network; it starts
`python -m tests.helpers.agent` inside a host (tests.helpers.netns) and
drives it with one JSON command per line on its stdin.  The agent makes
the rpc calls from inside the host and answers one JSON line per command.

    {"id": 3, "op": "call", "topic": "svc", "method": "whoami", "timeout": 5}
    {"id": 3, "outcome": {"ok": true, "value": "h1", "elapsed": 0.0012}}

Commands: init (options for rpc.init), call, multicall, cast, fanout_cast,
batch (one of those N times, over T threads, summarised), stats, cleanup,
exit.  A call that raises is an outcome too: the exception's class name,
the names of its classes (so "Timeout" matches PeerUnreachable) and its
message.  A command the agent cannot run answers {"fault": "..."}.
The agent prints "READY <pid>" first, and exits (after rpc.cleanup()) on
"exit" or when its stdin closes.

The test side is `Agent`: `Agent.start(host, options)`, then
`agent.call("svc", "whoami").result()`, each wait bounded.
"""
import json
import os
import queue
import statistics
import sys
import threading
import time

from nova_zmq_fast import rpc

REPLY_MARGIN = 30           # seconds an answer may take beyond the rpc's own bound


# -- the agent, inside a host -------------------------------------------------------------

def _message(req):
    msg = {"method": req["method"], "args": req.get("args") or {}}
    for key in ("version", "namespace"):
        if req.get(key) is not None:
            msg[key] = req[key]
    return msg


def _operation(req):
    """A function doing the request's rpc operation once; its result."""
    kind = req.get("kind", req["op"])
    ctxt = req.get("context") or {}
    topic = req["topic"]
    msg = _message(req)
    timeout = req.get("timeout")
    if kind == "call":
        return lambda: rpc.call(ctxt, topic, msg, timeout)
    if kind == "multicall":
        return lambda: list(rpc.multicall(ctxt, topic, msg, timeout))
    if kind == "cast":
        return lambda: rpc.cast(ctxt, topic, msg)
    if kind == "fanout_cast":
        return lambda: rpc.fanout_cast(ctxt, topic, msg)
    raise ValueError(f"unknown operation {kind!r}")


def _outcome(operation):
    start = time.monotonic()
    try:
        value = operation()
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__,
                "kinds": [cls.__name__ for cls in type(exc).__mro__],
                "message": str(exc), "elapsed": time.monotonic() - start}
    return {"ok": True, "value": value, "elapsed": time.monotonic() - start}


def _key(value):
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=repr)


def _work(inbox):
    while True:
        job = inbox.get()
        if job is None:
            return
        operation, n, done = job
        done.put([_outcome(operation) for _ in range(n)])


class _Workers:
    """The threads of multi-threaded batches.  They stay for the next
    batch: a thread's rpc socket lives as long as the thread, so later
    batches reuse its connections instead of opening new ones."""

    def __init__(self):
        self._inboxes = []
        self._threads = []

    def run(self, operation, shares):
        while len(self._threads) < len(shares):
            inbox = queue.SimpleQueue()
            thread = threading.Thread(target=_work, args=(inbox,), daemon=True,
                                      name=f"batch-{len(self._threads)}")
            thread.start()
            self._inboxes.append(inbox)
            self._threads.append(thread)
        done = queue.SimpleQueue()
        for inbox, n in zip(self._inboxes, shares):
            inbox.put((operation, n, done))
        outcomes = []
        for _ in shares:
            outcomes.extend(done.get())     # each operation is bounded by its rpc timeout
        return outcomes

    def stop(self):
        for inbox in self._inboxes:
            inbox.put(None)
        for thread in self._threads:
            thread.join()
        self._inboxes, self._threads = [], []


_workers = _Workers()


def _batch(req):
    """The operation `count` times over `threads` threads: how many times
    each result and each error came back, and the latencies.  One thread
    means the agent's own, as for call(); more are kept for later batches."""
    operation = _operation(req)
    count, threads = int(req["count"]), int(req.get("threads", 1))
    if count < 1 or threads < 1:
        raise ValueError("count and threads must be positive")
    shares = [count // threads + (i < count % threads) for i in range(min(threads, count))]
    start = time.monotonic()
    if len(shares) == 1:
        outcomes = [_outcome(operation) for _ in range(count)]
    else:
        outcomes = _workers.run(operation, shares)
    elapsed = time.monotonic() - start
    results, errors, messages = {}, {}, {}
    for o in outcomes:
        if o["ok"]:
            key = _key(o["value"])
            results[key] = results.get(key, 0) + 1
        else:
            errors[o["error"]] = errors.get(o["error"], 0) + 1
            messages.setdefault(o["error"], o["message"])
    times = sorted(o["elapsed"] for o in outcomes)
    return {"count": len(outcomes), "ok": sum(results.values()), "results": results,
            "errors": errors, "messages": messages, "elapsed": elapsed,
            "rate": len(outcomes) / elapsed if elapsed > 0 else None,
            "latency": {"min": times[0], "median": statistics.median(times),
                        "p90": times[int(0.9 * (len(times) - 1))],
                        "p99": times[int(0.99 * (len(times) - 1))], "max": times[-1]}}


def _handle(req):
    op = req["op"]
    if op == "init":
        rpc.init(**(req.get("options") or {}))
        return {}
    if op in ("call", "multicall", "cast", "fanout_cast"):
        return {"outcome": _outcome(_operation(req))}
    if op == "batch":
        return {"batch": _batch(req)}
    if op == "stats":
        return {"stats": rpc.stats()}
    if op in ("cleanup", "exit"):
        _workers.stop()
        rpc.cleanup()
        return {}
    raise ValueError(f"unknown op {op!r}")


def main():
    print("READY", os.getpid(), flush=True)
    for line in sys.stdin:
        req = {}
        try:
            req = json.loads(line)
            reply = _handle(req)
        except Exception as exc:
            reply = {"fault": f"{type(exc).__name__}: {exc}"}
        reply["id"] = req.get("id")
        print(json.dumps(reply, default=repr), flush=True)
        if req.get("op") == "exit":
            return
    _workers.stop()                         # the test process went away
    rpc.cleanup()


# -- the test side --------------------------------------------------------------------------

class AgentError(RuntimeError):
    """The agent could not run a command, or did not answer in time."""


class CallFailed(AssertionError):
    """result() of an operation that raised in the agent."""


class Outcome:
    """What one rpc operation did in the agent."""

    def __init__(self, ok, elapsed, value=None, error=None, kinds=(), message=""):
        self.ok = ok
        self.elapsed = elapsed
        self.value = value
        self.error = error                  # the exception's class name
        self.kinds = list(kinds)            # the names of all its classes
        self.message = message

    def __repr__(self):
        if self.ok:
            return f"<Outcome ok {self.value!r} in {self.elapsed:.3f}s>"
        return f"<Outcome {self.error}: {self.message!r} after {self.elapsed:.3f}s>"

    def raised(self, name):
        """Whether the operation raised an exception of class `name` (or a
        subclass of it)."""
        return not self.ok and name in self.kinds

    def result(self):
        """The value; CallFailed if the operation raised."""
        if not self.ok:
            raise CallFailed(f"{self.error}: {self.message}")
        return self.value


class Agent:
    """The test's handle on an agent process inside a cluster host."""

    def __init__(self, process):
        self.process = process
        self.options = {}
        self._ids = 0

    @classmethod
    def start(cls, host, options=None, name=None):
        """Start an agent in `host` (a netns.Host) and rpc.init() it with
        `options`."""
        process = host.python("tests.helpers.agent", name=name or f"{host.name}:agent")
        agent = cls(process)
        if options is not None:
            agent.init(**options)
        return agent

    @property
    def host(self):
        return self.process.host

    def request(self, op, wait=REPLY_MARGIN, **fields):
        """Send one command and wait up to `wait` seconds for its answer.
        If none comes, the agent is killed: its later answers would be out
        of step."""
        self._ids += 1
        fields.update(id=self._ids, op=op)
        try:
            self.process.send_line(json.dumps(fields))
            reply = json.loads(self.process.readline(wait))
        except (OSError, TimeoutError, RuntimeError, ValueError) as exc:
            self.process.kill()
            raise AgentError(f"{self.process.name}: {op} got no answer: {exc}") from None
        except BaseException:               # interrupted while waiting
            self.process.kill()
            raise
        if reply.get("id") != self._ids:
            self.process.kill()
            raise AgentError(f"{self.process.name}: answer out of step: {reply}")
        if "fault" in reply:
            raise AgentError(f"{self.process.name}: {op}: {reply['fault']}")
        return reply

    def init(self, **options):
        self.request("init", options=options)
        self.options = options

    def _bound(self, op, timeout):
        """Seconds the rpc operation itself may take in the agent."""
        if op in ("call", "multicall"):
            return timeout if timeout is not None else \
                self.options.get("rpc_response_timeout", 60)
        return self.options.get("rpc_cast_timeout", 30)

    def _operation(self, op, topic, method, args, timeout, extra):
        reply = self.request(op, wait=self._bound(op, timeout) + REPLY_MARGIN, topic=topic,
                             method=method, args=args or {}, timeout=timeout, **extra)
        return Outcome(**reply["outcome"])

    def call(self, topic, method, args=None, timeout=10, **extra):
        """rpc.call(); an Outcome (.result(), .raised("Timeout"), .elapsed).
        `extra`: version, namespace, context."""
        return self._operation("call", topic, method, args, timeout, extra)

    def multicall(self, topic, method, args=None, timeout=10, **extra):
        """rpc.multicall(), every value collected; an Outcome whose value is
        the list."""
        return self._operation("multicall", topic, method, args, timeout, extra)

    def cast(self, topic, method, args=None, **extra):
        return self._operation("cast", topic, method, args, None, extra)

    def fanout_cast(self, topic, method, args=None, **extra):
        return self._operation("fanout_cast", topic, method, args, None, extra)

    def batch(self, topic, method, args=None, count=10, kind="call", threads=1,
              timeout=10, wait=None, **extra):
        """`kind` (call, cast, fanout_cast, multicall) `count` times over
        `threads` threads.  A dict: count, ok, results {value: times},
        errors {class name: times}, messages {class name: first message},
        elapsed, rate, latency {min, median, p90, p99, max} in seconds."""
        if wait is None:
            wait = REPLY_MARGIN + self._bound(kind, timeout) * -(-count // threads)
        reply = self.request("batch", wait=wait, kind=kind, topic=topic, method=method,
                             args=args or {}, count=count, threads=threads,
                             timeout=timeout, **extra)
        return reply["batch"]

    def stats(self):
        return self.request("stats")["stats"]

    def cleanup(self):
        self.request("cleanup")

    def close(self, timeout=REPLY_MARGIN):
        """Clean up and exit; the exit code (0 when all went well)."""
        if self.process.alive:
            try:
                self.request("exit", wait=timeout)
                self.process.wait(timeout)
            except Exception:
                self.process.kill()
                raise
        return self.process.stop()


if __name__ == "__main__":
    main()
