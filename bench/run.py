"""The side-by-side benchmark: raw libzmq, hand-written pyzmq+msgpack,
nova_zmq_fast's native API (with the embedded discovery and with Redis),
and oslo.messaging over RabbitMQ and over the project's own driver, in one
run on one machine; then the same workload spread over 1, 2 and 4 server
hosts, each its own network namespace (tests.helpers.netns), found through
Redis, next to as many servers on loopback found through the embedded
discovery.

    python bench/run.py --quick      # under a minute: a smoke run
    python bench/run.py              # the full run behind the README table

Measurements that are compared with each other form a group (latency,
throughput, fanout, registered servers, oslo.messaging).  Each round runs
every group's measurements back to back, in an order rotated from round to
round, with all peers kept running between rounds.  Round trips are
timed one by one and each batch reports its median, for the C reference
and the Python peers alike.  The table gives the median of each figure
and, for each target, the median of the per-round ratios: figures of one round were taken a second or two apart, so their
ratio holds even when the machine's speed drifts.  Progress goes to stderr; the figures go
to bench/out/results.json and the scaling curves to bench/out/scaling.png.
Nothing here is a pass/fail test: targets are reported, not asserted.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import selectors
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
RABBIT_URL = "rabbit://guest:guest@127.0.0.1:5672/"

SIZES = {
    # --smoke: every measurement once, tiny; for the test that the harness works.
    "smoke": dict(rounds=1, raw_rtt=200, raw_msgs=100_000, calls=200, casts=2000,
                  fanout=2000, groups=[1, 2], registered=[1, 4], oslo_calls=10,
                  oslo_casts=30, zmqfast_casts=200, micro_time="0.01",
                  hosts=[1, 2], spread_casts=2000, spread_calls=200, host_fanout=200),
    "quick": dict(rounds=3, raw_rtt=1000, raw_msgs=1_000_000, calls=1000, casts=30000,
                  fanout=30000, groups=[1, 4, 8], registered=[1, 64], oslo_calls=100,
                  oslo_casts=300, zmqfast_casts=5000, micro_time="0.05",
                  hosts=[1, 2, 4], spread_casts=20000, spread_calls=2000, host_fanout=4000),
    "full": dict(rounds=7, raw_rtt=1500, raw_msgs=5_000_000, calls=1500, casts=200000,
                 fanout=200000, groups=[1, 2, 4, 8, 16, 32], registered=[1, 4, 16, 64],
                 oslo_calls=1000, oslo_casts=3000, zmqfast_casts=50000, micro_time="0.5",
                 hosts=[1, 2, 4], spread_casts=100000, spread_calls=6000, host_fanout=20000),
}
CALL_THREADS = 8                # callers at once in the aggregate call figures


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(directory):
    """A redis-server of the benchmark's own on loopback: (process, port)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", directory],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


# -- peers ---------------------------------------------------------------------------

class Peer:
    """A benchmark peer process speaking JSON lines on stdin/stdout."""

    def __init__(self, name, argv, timeout=60, env=None):
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=HERE,
                                     env=env)
        self.info = self._read(timeout)
        if not self.info.get("ready"):
            raise RuntimeError(f"{name} did not start: {self.info}")

    def _read(self, timeout):
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                raise TimeoutError(f"{self.name}: no answer in {timeout}s")
        finally:
            sel.close()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.proc.poll()})")
        return json.loads(line)

    def ask(self, op, timeout=600, **args):
        self.proc.stdin.write(json.dumps(dict(args, op=op)) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if "error" in answer:
            raise RuntimeError(f"{self.name} {op}: {answer['error']}")
        return answer

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def rabbit_available():
    try:
        import oslo_messaging  # noqa: F401
    except ImportError:
        return "oslo.messaging is not installed (pip install -e .[bench])"
    try:
        socket.create_connection(("127.0.0.1", 5672), 2).close()
    except OSError as exc:
        return f"no RabbitMQ at 127.0.0.1:5672 ({exc.strerror or exc})"
    return None


def zmqfast_driver_available():
    try:
        import oslo_messaging  # noqa: F401
    except ImportError:
        return "oslo.messaging is not installed (pip install -e .[bench])"
    try:
        drivers = importlib.metadata.entry_points(group="oslo.messaging.drivers")
    except TypeError:                          # Python < 3.10
        drivers = importlib.metadata.entry_points().get("oslo.messaging.drivers", [])
    if not any(ep.name == "zmqfast" for ep in drivers):
        return "the zmqfast oslo.messaging driver is not installed"
    return None


# -- the benchmark ---------------------------------------------------------------------

class Benchmark:
    def __init__(self, mode, out):
        self.mode = mode
        self.size = SIZES[mode]
        self.out = out
        self.peers = []
        self.skipped = {}
        self.values = {}                # key -> [one figure per round]
        self.extras = {}                # key -> [dict per round] (cost figures)
        self.tmp = tempfile.mkdtemp(prefix="nzf-bench-")
        self.redis_proc = None
        self.variants = {}              # name -> a client of a server set up that way
        self.cluster = None
        self.host_client = None

    # setup --------------------------------------------------------------------------

    def build_raw(self):
        cflags = subprocess.check_output(["pkg-config", "--cflags", "--libs", "libzmq"],
                                         text=True)
        bindir = os.path.join(self.out, "bin")
        os.makedirs(bindir, exist_ok=True)
        for name in ("zmq_lat", "zmq_thr"):
            subprocess.check_call(["gcc", "-O2", "-o", os.path.join(bindir, name),
                                   os.path.join(HERE, "c", f"{name}.c"), *shlex.split(cflags)])
        self.bin = bindir

    def start(self):
        s = self.size
        ipc = os.path.join(self.tmp, "registry")
        native = os.path.join(HERE, "peers", "native.py")
        sizes = sorted(set(s["groups"]) | set(s["hosts"]))
        groups = ",".join(map(str, sizes))
        log(f"starting {max(sizes)} native servers, clients and reference peers")
        self.servers = [self.spawn(f"native server s{i}", [
            PY, native, "serve", "--host", f"s{i}", "--index", str(i), "--groups", groups,
            "--ipc-dir", ipc]) for i in range(max(sizes))]
        self.native = self.spawn("native client", [PY, native, "client", "--ipc-dir", ipc])
        self.registrar = self.spawn("registrar", [PY, native, "registrar", "--ipc-dir", ipc])
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        pyzmq = os.path.join(HERE, "peers", "pyzmq_rpc.py")
        self.pyzmq_server = self.spawn("pyzmq server", [PY, pyzmq, "serve", "--endpoint",
                                                        endpoint])
        self.pyzmq = self.spawn("pyzmq client", [PY, pyzmq, "client", "--endpoint", endpoint])
        oslo = os.path.join(HERE, "peers", "oslo_rpc.py")
        self.oslo = {}
        urls = {"rabbit": RABBIT_URL,
                "zmqfast": f"zmqfast://?rpc_zmq_ipc_dir={os.path.join(self.tmp, 'oslo')}"}
        for name, why_not in (("rabbit", rabbit_available()),
                              ("zmqfast", zmqfast_driver_available())):
            if why_not:
                self.skipped[f"oslo_{name}"] = why_not
                log(f"skipping oslo.messaging over {name}: {why_not}")
                continue
            try:
                server = self.spawn(f"oslo {name} server", [PY, oslo, "serve", "--url",
                                                             urls[name]])
                self.oslo[name] = (server, self.spawn(f"oslo {name} client", [
                    PY, oslo, "client", "--url", urls[name]]))
            except (RuntimeError, TimeoutError) as exc:
                self.skipped[f"oslo_{name}"] = str(exc)
                log(f"skipping oslo.messaging over {name}: {exc}")
        self.start_variants(native, ipc)
        self.start_cluster(native)
        time.sleep(1.0)                         # let discovery see everyone
        self.fds_by_peers = self.native.ask("fds_by_peers", groups=s["groups"])
        self.server_fds = self.servers[0].ask("costs")["fds"]
        self.idle_rss = {"native server": self.servers[0].ask("costs")["rss_mb"],
                         "pyzmq server": self.pyzmq.ask("server_costs")["rss_mb"]}
        for name, (server, _) in self.oslo.items():
            self.idle_rss[f"oslo {name} server"] = server.ask("costs")["rss_mb"]

    def start_variants(self, native, ipc):
        """Pairs like s0 and the native client, each set up one way, whose
        call and cast are measured next to the plain ones: the price of
        Redis discovery, of CURVE, and of at-least-once casts."""
        if shutil.which("redis-server") is None:
            self.skipped["redis"] = "redis-server is not installed"
        else:
            self.redis_proc, port = start_redis(self.tmp)
            opts = {"rpc_zmq_matchmaker": "redis", "matchmaker_redis_port": port,
                    "rpc_zmq_bind_address": "127.0.0.1"}
            self.start_variant(native, "redis", ipc, opts, opts)
        keys = os.path.join(self.tmp, "keys")
        allowed = os.path.join(keys, "allowed")
        os.makedirs(allowed)
        for name in ("server", "client"):
            subprocess.check_call([PY, "-m", "nova_zmq_fast", "keygen",
                                   os.path.join(keys, name)], stdout=subprocess.DEVNULL)
        shutil.copy(os.path.join(keys, "client.pub"), allowed)
        self.start_variant(
            native, "curve", os.path.join(self.tmp, "registry-curve"),
            {"rpc_zmq_secret_key_file": os.path.join(keys, "server.key"),
             "rpc_zmq_allowed_keys": allowed},
            {"rpc_zmq_secret_key_file": os.path.join(keys, "client.key")})
        # The plain s0, from a client whose casts are at-least-once.
        self.variants["alo"] = self.spawn("at-least-once client", [
            PY, native, "client", "--ipc-dir", ipc,
            "--options", json.dumps({"rpc_zmq_at_least_once": True})])

    def start_variant(self, native, name, ipc, server_opts, client_opts):
        self.spawn(f"{name} server s0", [PY, native, "serve", "--host", "s0", "--index", "0",
                                         "--ipc-dir", ipc, "--options", json.dumps(server_opts)])
        self.variants[name] = self.spawn(f"{name} client", [
            PY, native, "client", "--ipc-dir", ipc, "--options", json.dumps(client_opts)])

    def start_cluster(self, native):
        """Servers on hosts h1..hN, each its own network namespace, found
        through Redis in h0, where the client runs."""
        sys.path.insert(0, ROOT)
        from tests.helpers import netns
        why = netns.unavailable_reason()
        if why:
            self.skipped["hosts"] = why
            log(f"skipping the multi-host figures: {why}")
            return
        sizes = self.size["hosts"]
        self.cluster = netns.Cluster(hosts=1 + max(sizes)).start()
        self.cluster.start_redis(self.cluster[0])
        opts = json.dumps({"rpc_zmq_matchmaker": "redis", "matchmaker_redis_host": "h0"})
        ipc = os.path.join(self.tmp, "hosts")
        for i, host in enumerate(self.cluster.hosts[1:]):
            self.spawn(f"server {host.name}", host.exec_argv([
                PY, native, "serve", "--host", host.name, "--index", str(i),
                "--groups", ",".join(map(str, sizes)), "--ipc-dir", ipc, "--options", opts]))
        self.host_client = self.spawn("client h0", self.cluster[0].exec_argv([
            PY, native, "client", "--ipc-dir", ipc, "--options", opts]))

    def spawn(self, name, argv):
        peer = Peer(name, argv)
        self.peers.append(peer)
        return peer

    def stop(self):
        for peer in reversed(self.peers):
            peer.close()
        if self.redis_proc is not None:
            self.redis_proc.kill()
            self.redis_proc.wait(10)
        if self.cluster is not None:
            self.cluster.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # measurements ---------------------------------------------------------------

    def raw(self, program, *args):
        out = subprocess.check_output([os.path.join(self.bin, program),
                                       f"tcp://127.0.0.1:{free_port()}", "64", *map(str, args)],
                                      text=True, timeout=300)
        return json.loads(out)

    def groups(self):
        """Lists of (key, measure) whose figures are compared with each
        other, so they run next to each other."""
        s = self.size
        latency = [
            ("raw.call", lambda: self.raw("zmq_lat", s["raw_rtt"])["usec_median"]),
            ("pyzmq.call", lambda: self.pyzmq.ask("call", n=s["calls"])["usec"]),
            ("native.call", lambda: self.native.ask("call", n=s["calls"])["usec"]),
        ]
        throughput = [
            ("raw.cast", lambda: self.raw("zmq_thr", s["raw_msgs"])["msgs_per_sec"]),
            ("pyzmq.cast", lambda: self.cast(self.pyzmq, "pyzmq.cast", s["casts"] // 4)),
            ("native.cast", lambda: self.cast(self.native, "native.cast", s["casts"])),
        ]
        for name, client in self.variants.items():
            if name != "alo":           # at-least-once changes casts only
                latency.append((f"{name}.call",
                                lambda c=client: c.ask("call", n=s["calls"])["usec"]))
            throughput.append((f"{name}.cast", lambda c=client, k=f"{name}.cast":
                               self.cast(c, k, s["casts"])))
        fanout = [("native.fanout.ref",
                   lambda: self.cast(self.native, "native.fanout.ref", s["casts"]))]
        fanout += [(f"native.fanout.{n}", lambda n=n: self.fanout(n)) for n in s["groups"]]
        registered = [(f"native.registered.{k}", lambda k=k: self.registered(k))
                      for k in s["registered"]]
        oslo = []
        for name, (_, client) in self.oslo.items():
            casts = s["oslo_casts"] if name == "rabbit" else s["zmqfast_casts"]
            oslo.append((f"oslo_{name}.call",
                         lambda c=client: c.ask("call", n=s["oslo_calls"])["usec"]))
            oslo.append((f"oslo_{name}.cast",
                         lambda c=client, k=f"oslo_{name}.cast", n=casts: self.cast(c, k, n)))
        hosts = []
        # N servers on loopback (s0..), then N hosts in namespaces (h1..).
        places = [("local", self.native, "s{}", 0), ("hosts", self.host_client, "h{}", 1)]
        for n in s["hosts"]:
            for where, client, name, first in places:
                if client is None:
                    continue
                names = [name.format(first + i) for i in range(n)]
                hosts.append((f"{where}.spread_cast.{n}", lambda c=client, n=n, h=names:
                              self.spread(c, "spread_casts", n=s["spread_casts"], group=n,
                                          hosts=h)))
                hosts.append((f"{where}.spread_call.{n}", lambda c=client, n=n: self.spread(
                    c, "spread_calls", n=s["spread_calls"], group=n, threads=CALL_THREADS)))
            if self.host_client is not None:
                hosts.append((f"hosts.fanout.{n}", lambda n=n: self.host_client.ask(
                    "fanout", n=s["host_fanout"] // n, group=n,
                    hosts=[f"h{i + 1}" for i in range(n)])["usec_per_recipient"]))
        # Latency drifts fastest on a shared machine: short batches, three
        # times per round, so that each ratio pairs figures a second apart.
        return [g for g in (latency, throughput, latency, fanout, registered, latency, oslo,
                            hosts) if g]

    @staticmethod
    def spread(client, op, **args):
        return client.ask(op, **args)["rate"]

    def cast(self, client, key, n):
        answer = client.ask("cast", n=n)
        self.extras.setdefault(key, []).append(answer)
        return answer["rate"]

    def fanout(self, n):
        # The same number of deliveries for every N: fanout / N messages.
        answer = self.native.ask("fanout", n=self.size["fanout"] // n, group=n)
        self.extras.setdefault(f"native.fanout.{n}", []).append(answer)
        return answer["usec_per_recipient"]

    def registered(self, k):
        self.registrar.ask("set", k=k)
        time.sleep(0.2)
        return self.native.ask("cast", n=self.size["casts"])["rate"]

    def run(self):
        groups = self.groups()
        rounds = self.size["rounds"]
        total = sum(len(g) for g in groups)
        # A group listed several times measures several times per round.
        for r in range(rounds):
            done = 0
            for group in groups[r % len(groups):] + groups[:r % len(groups)]:
                for key, measure in group[r % len(group):] + group[:r % len(group)]:
                    done += 1
                    log(f"round {r + 1}/{rounds}  {done:2d}/{total}  {key}")
                    self.values.setdefault(key, []).append(measure())
        self.registrar.ask("set", k=0)

    def micro(self):
        path = os.path.join(self.out, "micro.json")
        log("micro-benchmarks (pytest-benchmark)")
        result = subprocess.run(
            [PY, "-m", "pytest", os.path.join(HERE, "test_micro.py"), "-q", "-p",
             "no:cacheprovider", f"--benchmark-json={path}",
             f"--benchmark-min-time={self.size['micro_time']}", "--benchmark-disable-gc"],
            cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            log(result.stdout[-2000:], result.stderr[-2000:])
            return {}
        with open(path) as f:
            data = json.load(f)
        return {b["name"]: {"group": b["group"], "median_ns": b["stats"]["median"] * 1e9}
                for b in data["benchmarks"]}


# -- reporting ------------------------------------------------------------------------------

def median(xs):
    return statistics.median(xs) if xs else None


def paired(values, a, b, fn):
    """Median over rounds of fn(a_r, b_r)."""
    pairs = list(zip(values.get(a, []), values.get(b, [])))
    return median([fn(x, y) for x, y in pairs]) if pairs else None


def summarize(bench, micro):
    v = bench.values
    med = {k: median(xs) for k, xs in v.items()}
    s = bench.size
    targets = []

    def target(name, value, goal, ok):
        targets.append({"target": name, "value": value, "goal": goal,
                        "met": None if value is None or ok is None else ok(value)})

    ratio = lambda a, b: a / b  # noqa: E731
    at_least = lambda goal: lambda x: x >= goal  # noqa: E731
    at_most = lambda goal: lambda x: x <= goal  # noqa: E731
    for name, a, b, goal, ok in [
            ("native cast rate / raw PUSH/PULL rate", "native.cast", "raw.cast",
             ">= 0.25", at_least(0.25)),
            ("native cast rate / hand-written pyzmq cast rate", "native.cast", "pyzmq.cast",
             ">= 10", at_least(10)),
            ("native call round trip / raw REQ/REP round trip", "native.call", "raw.call",
             "<= 1.3", at_most(1.3)),
            ("oslo.messaging call: RabbitMQ latency / zmqfast latency", "oslo_rabbit.call",
             "oslo_zmqfast.call", ">= 10", at_least(10)),
            ("oslo.messaging cast: zmqfast rate / RabbitMQ rate", "oslo_zmqfast.cast",
             "oslo_rabbit.cast", ">= 10", at_least(10))]:
        target(name, paired(v, a, b, ratio), goal, ok)
    target("cast rate with Redis discovery / with the embedded one (one host)",
           paired(v, "redis.cast", "native.cast", ratio), ">= 0.95", at_least(0.95))
    target("call round trip with CURVE / without", paired(v, "curve.call", "native.call", ratio),
           "<= 1.5", at_most(1.5))
    # Reported, with no goal set.
    target("cast rate with CURVE / without", paired(v, "curve.cast", "native.cast", ratio),
           "-", None)
    target("cast rate at least once / at most once",
           paired(v, "alo.cast", "native.cast", ratio), "-", None)
    worst = None
    for n in s["groups"]:
        cost = paired(v, f"native.fanout.{n}", "native.fanout.ref", lambda a, b: a / (1e6 / b))
        if cost is not None:
            worst = cost if worst is None else max(worst, cost)
    target("fanout cost per recipient / cost of one cast (worst N)", worst, "<= 1.2",
           at_most(1.2))
    k0, k1 = min(s["registered"]), max(s["registered"])
    target(f"cast rate with {k1} servers registered / with {k0}",
           paired(v, f"native.registered.{k1}", f"native.registered.{k0}",
                  ratio), ">= 0.9", at_least(0.9))

    costs = {}
    for key, answers in bench.extras.items():
        if key.endswith(".cast"):
            costs[key] = {"client_cpu_s_per_100k": median([a["client_cpu_100k"] for a in answers]),
                          "server_cpu_s_per_100k": median([a["server_cpu_100k"] for a in answers])}
    return {"medians": med, "rounds": v, "targets": targets, "cpu": costs,
            "idle_rss_mb": bench.idle_rss, "client_fds_by_peers": bench.fds_by_peers,
            "server_fds_idle": bench.server_fds,
            "skipped": bench.skipped, "micro": micro}


LABELS = {
    "raw.call": ("raw libzmq REQ/REP round trip (C)", "us"),
    "raw.cast": ("raw libzmq PUSH/PULL, 64 B (C)", "msg/s"),
    "pyzmq.call": ("hand-written pyzmq+msgpack call", "us"),
    "pyzmq.cast": ("hand-written pyzmq+msgpack cast", "msg/s"),
    "native.call": ("nova_zmq_fast call", "us"),
    "native.cast": ("nova_zmq_fast cast", "msg/s"),
    "native.fanout.ref": ("nova_zmq_fast cast (next to the fanout runs)", "msg/s"),
    "oslo_rabbit.call": ("oslo.messaging + RabbitMQ call", "us"),
    "oslo_rabbit.cast": ("oslo.messaging + RabbitMQ cast", "msg/s"),
    "oslo_zmqfast.call": ("oslo.messaging + zmqfast call", "us"),
    "oslo_zmqfast.cast": ("oslo.messaging + zmqfast cast", "msg/s"),
    "redis.call": ("nova_zmq_fast call, Redis discovery", "us"),
    "redis.cast": ("nova_zmq_fast cast, Redis discovery", "msg/s"),
    "curve.call": ("nova_zmq_fast call, CURVE", "us"),
    "curve.cast": ("nova_zmq_fast cast, CURVE", "msg/s"),
    "alo.cast": ("nova_zmq_fast cast, at least once", "msg/s"),
}


def label(key):
    if key in LABELS:
        return LABELS[key]
    if key.startswith("native.fanout."):
        return (f"nova_zmq_fast fanout to N={key.rsplit('.', 1)[1]}", "us/recipient")
    if key.startswith("native.registered."):
        return (f"nova_zmq_fast cast, {key.rsplit('.', 1)[1]} servers on other topics", "msg/s")
    where, _, rest = key.partition(".")
    what, _, n = rest.rpartition(".")
    place = {"hosts": f"{n} server host(s), Redis", "local": f"{n} server(s) on loopback"}.get(where)
    if place and what == "spread_cast":
        return (f"aggregate casts, {place}", "msg/s")
    if place and what == "spread_call":
        return (f"aggregate calls ({CALL_THREADS} callers), {place}", "msg/s")
    if place and what == "fanout":
        return (f"fanout to {n} host(s), wall time per recipient", "us/recipient")
    return (key, "")


def fmt(x, unit=""):
    if x is None:
        return "-"
    if unit == "msg/s" or x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x < 10 else f"{x:.1f}"


def print_report(summary, machine):
    print(f"\nnova_zmq_fast benchmark ({machine['mode']} mode, {machine['rounds']} rounds, "
          f"{machine['date']})")
    print(f"machine: {machine['cpus']} CPUs, {machine['cpu_model']}, Python "
          f"{machine['python']}, libzmq {machine['libzmq']}\n")
    print(f"| {'figure':56} | {'median':>12} | unit |")
    print(f"|{'-' * 58}|{'-' * 14}|------|")
    for key, value in summary["medians"].items():
        name, unit = label(key)
        print(f"| {name:56} | {fmt(value, unit):>12} | {unit} |")
    for key, why in summary["skipped"].items():
        print(f"| {key:56} | {'n/a':>12} | {why} |")
    print(f"\n| {'target (median of per-round ratios)':62} | {'value':>7} | goal    | met |")
    print(f"|{'-' * 64}|{'-' * 9}|---------|-----|")
    for t in summary["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        print(f"| {t['target']:62} | {fmt(t['value']):>7} | {t['goal']:7} | {met:3} |")
    print("\nCPU seconds per 100k casts (client side / server side):")
    for key, c in summary["cpu"].items():
        print(f"  {label(key)[0]:45} {c['client_cpu_s_per_100k']:.2f} / "
              f"{c['server_cpu_s_per_100k']:.2f}")
    print("idle resident memory: " + ", ".join(
        f"{k} {v:.0f} MB" for k, v in summary["idle_rss_mb"].items()))
    print("open fds of a client talking to N servers: " + ", ".join(
        f"N={n}: {v}" for n, v in summary["client_fds_by_peers"].items())
        + f"; of an idle server: {summary['server_fds_idle']}")
    if summary["micro"]:
        print("\nmicro-benchmarks (median ns per operation):")
        for name, b in sorted(summary["micro"].items(), key=lambda kv: (kv[1]["group"], kv[0])):
            print(f"  {b['group']:22} {name:45} {b['median_ns']:10.0f}")


def plot(summary, path, size):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is missing: no PNG")
        return
    med = summary["medians"]
    fig, (left, right, hosts) = plt.subplots(1, 3, figsize=(16, 4.2))
    groups = [n for n in size["groups"] if med.get(f"native.fanout.{n}")]
    left.plot(groups, [med[f"native.fanout.{n}"] for n in groups], "o-",
              label="fanout: wall time per recipient")
    if med.get("native.fanout.ref"):
        one = 1e6 / med["native.fanout.ref"]
        left.axhline(one, color="gray", ls="--", label="one cast")
        left.axhline(1.2 * one, color="red", ls=":", label="target: 1.2 x one cast")
    left.set_xscale("log", base=2)
    left.set_xlabel("fanout recipients N")
    left.set_ylabel("microseconds")
    left.set_title("fanout cost per recipient")
    left.legend(fontsize=8)
    ks = [k for k in size["registered"] if med.get(f"native.registered.{k}")]
    right.plot(ks, [med[f"native.registered.{k}"] for k in ks], "o-",
               label="cast throughput")
    if ks:
        right.axhline(0.9 * med[f"native.registered.{ks[0]}"], color="red", ls=":",
                      label="target: 90% of K=1")
    right.set_xscale("log", base=2)
    right.set_ylim(bottom=0)
    right.set_xlabel("servers registered on other topics K")
    right.set_ylabel("casts / s")
    right.set_title("cast throughput vs registered servers")
    right.legend(fontsize=8)
    ns = size["hosts"]
    for key, style, name in (("hosts.spread_cast", "o-", "casts, N hosts (Redis)"),
                             ("local.spread_cast", "o--", "casts, N on loopback (local)"),
                             ("hosts.spread_call", "s-", "calls, N hosts (Redis)"),
                             ("local.spread_call", "s--", "calls, N on loopback (local)")):
        points = [(n, med[f"{key}.{n}"]) for n in ns if med.get(f"{key}.{n}")]
        if points:
            hosts.plot(*zip(*points), style, label=name)
    hosts.set_xticks(ns)
    hosts.set_yscale("log")
    hosts.set_xlabel("servers N (one per host, or all on loopback)")
    hosts.set_ylabel("messages / s, all servers together")
    hosts.set_title("aggregate throughput vs servers")
    hosts.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def machine_info(mode, rounds):
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    libzmq = subprocess.run(["pkg-config", "--modversion", "libzmq"], capture_output=True,
                            text=True).stdout.strip()
    return {"mode": mode, "rounds": rounds, "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "libzmq": libzmq,
            "kernel": platform.release(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="under a minute")
    parser.add_argument("--smoke", action="store_true",
                        help="every measurement once, tiny: checks that it all runs")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--no-micro", action="store_true", help="skip pytest-benchmark")
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    os.makedirs(args.out, exist_ok=True)
    bench = Benchmark(mode, args.out)
    started = time.monotonic()
    try:
        bench.build_raw()
        bench.start()
        bench.run()
    finally:
        bench.stop()
    micro = {} if args.no_micro else bench.micro()
    summary = summarize(bench, micro)
    summary["machine"] = machine_info(mode, bench.size["rounds"])
    summary["seconds"] = round(time.monotonic() - started, 1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_report(summary, summary["machine"])
    plot(summary, os.path.join(args.out, "scaling.png"), bench.size)
    log(f"done in {summary['seconds']}s; figures in {args.out}/results.json")


if __name__ == "__main__":
    main()
