"""A cluster of "hosts" on one machine, each its own network namespace.

Where it sits: under the multi-host tests and the scaling benchmark.  The
processes that send and receive messages (services, agents, Redis) run
inside the hosts; the test process stays in the root namespace and drives
them over their stdin and stdout.  Every message between hosts crosses a
real kernel network (veth pairs and a bridge), which a test can cut.

    switch namespace  <prefix>sw   bridge br0 (more bridges while partitioned),
                                   one port per host, named after it ("h1");
                                   no addresses
    host namespaces   <prefix>h0   lo up; eth0 = 198.18.0.1/24 and
                      <prefix>h1     fd6e:7a66::1/64 (h1: .2 and ::2, ...);
                      ...            an /etc/hosts where h0, h1, ... resolve,
                                     and each host's name as its hostname

The addresses are in the benchmarking range (RFC 2544) and a unique-local
IPv6 prefix.  They exist only inside the host namespaces: the root
namespace is not on the test network, and nothing is ever sent off the
machine.

Names carry a per-run prefix, "nzft-<pid>-<process start time>-<n>-", so two
runs never collide, and each cluster first sweeps away namespaces whose
creator process is gone (a run killed with SIGKILL).

    with Cluster(hosts=3) as cluster:                 # or: cluster = netns.fixture(hosts=3)
        h0, h1, h2 = cluster.hosts                    # .ip, .ip6, .netns
        ring = cluster.write_ring({"svc": [h1.ip, h2.ip]})
        svc = h1.python("tests.helpers.service", ...) # waits for its READY line
        h0.run(["redis-cli", ...])                    # one command inside h0
        h1.link_down(); h1.link_up()                  # cut and restore h1's cable
        cluster.partition([h0, h1]); cluster.heal()   # h2 (the rest) cut off
        h1.kill_all()                                 # SIGKILL every process in h1
        h1.crash()                                    # link down, then kill_all()
        redis = cluster.start_redis(h0)               # .url, .ip, .port, .ping(host)
        cluster.stop_redis(); cluster.restart_redis() # outage, same address

`netns.fixture(hosts=3)`, assigned in a test module, defines a fixture
named `cluster`; it skips where namespaces cannot be created (no root).
The agent that makes rpc calls from inside a host is tests.helpers.agent.
"""
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NAME_PREFIX = "nzft-"
_NAME_RE = re.compile("^" + re.escape(NAME_PREFIX) + r"(\d+)-(\d+)-\d+-")   # pid, start
SWITCH = "sw"
BRIDGE = "br0"

IPV4 = "198.18.0.{}"
IPV4_PREFIXLEN = 24
IPV6 = "fd6e:7a66::{:x}"
IPV6_PREFIXLEN = 64
MAX_HOSTS = 250

IP_TIMEOUT = 10          # seconds for one `ip` command
READY_TIMEOUT = 60       # seconds for a process to print its READY line
STOP_TIMEOUT = 15        # seconds for a process to exit after SIGTERM
REAP_TIMEOUT = 10        # seconds for killed processes to disappear
REDIS_PORT = 6379
# `ip netns exec NAME` bind-mounts the files of /etc/netns/NAME over /etc:
# each host gets an /etc/hosts naming every host, so host names resolve
# inside the cluster (and only there).
ETC_NETNS = "/etc/netns"

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

_sequence = itertools.count()


class ClusterError(RuntimeError):
    pass


# -- the machine: capabilities, namespaces, stale runs ---------------------------------

def unavailable_reason():
    """Why network namespaces cannot be created here, or None if they can."""
    try:
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return "cannot read this process's capabilities"
    missing = [name for bit, name in ((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
                                      (CAP_NET_ADMIN, "CAP_NET_ADMIN"))
               if not caps >> bit & 1]
    if missing:
        return ("network namespaces need root (" + " and ".join(missing)
                + " missing in this process)")
    return None


def ip(*args, netns=None, timeout=IP_TIMEOUT):
    """Run one iproute2 command (in `netns` if given); its stdout."""
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout


def namespaces():
    """Names of the machine's named network namespaces."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def namespace_pids(name):
    """Pids of the processes inside namespace `name`."""
    try:
        return {int(p) for p in ip("netns", "pids", name).split()}
    except ClusterError:
        return set()                        # already gone


def process_start(pid):
    """The start time of process `pid` (clock ticks since boot), or None if
    there is no such process.  With the pid, it names a process uniquely."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def run_prefix(pid=None, sequence=0):
    """The name prefix of a cluster made by process `pid` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{NAME_PREFIX}{pid}-{process_start(pid) or 0}-{sequence}-"


def _kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_no_pids(name, timeout=REAP_TIMEOUT):
    deadline = time.monotonic() + timeout
    while namespace_pids(name):
        if time.monotonic() >= deadline:
            raise ClusterError(f"processes in {name} survived SIGKILL: "
                               f"{sorted(namespace_pids(name))}")
        time.sleep(0.01)


def delete_namespace(name):
    """Kill everything inside namespace `name` and delete it.  Its veths go
    with it (and their peers in other namespaces), and so do its files
    under /etc/netns."""
    _kill_pids(namespace_pids(name))
    _wait_no_pids(name)
    ip("netns", "delete", name)
    shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)


def sweep():
    """Delete the namespaces left by earlier runs whose creator is gone.
    Returns their names."""
    swept = []
    for name in namespaces():
        match = _NAME_RE.match(name)
        if match is None:
            continue
        pid, start = int(match.group(1)), int(match.group(2))
        if process_start(pid) == start:
            continue                        # its creator still runs
        try:
            delete_namespace(name)
        except ClusterError:
            if name in namespaces():
                raise
        swept.append(name)
    return swept


# -- processes inside a host ------------------------------------------------------------

class NsProcess:
    """A process started inside a host's namespace.  Its stdin and stdout
    are pipes to this process: it prints "READY ..." once it serves, and
    the project's helpers exit when their stdin closes (this process died)."""

    def __init__(self, host, name, argv, env=None, cwd=ROOT):
        self.host = host
        self.name = name
        self.argv = list(argv)
        # A session of its own: a Ctrl-C at the terminal reaches the test
        # process, whose cleanup then stops this one, not both at once.
        self.proc = subprocess.Popen(host.exec_argv(argv), cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0, start_new_session=True)
        self.ready = None                   # the words after READY
        self._buffer = b""
        self._drainer = None

    def __repr__(self):
        return f"<NsProcess {self.name} pid={self.pid} on {self.host.name}>"

    @property
    def pid(self):
        return self.proc.pid                # `ip netns exec` execs: same pid

    @property
    def alive(self):
        return self.proc.poll() is None

    @property
    def returncode(self):
        return self.proc.poll()

    def readline(self, timeout):
        """The next line the process printed (without its newline).  Raises
        TimeoutError after `timeout` seconds, ClusterError at end of output."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no output line in {timeout}s")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait(REAP_TIMEOUT)
                    raise ClusterError(f"{self.name} closed its output "
                                       f"(exit code {self.proc.returncode})")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

    def wait_for(self, predicate, timeout):
        """Read lines until `predicate(line)` holds; that line.  Bounded by
        `timeout` seconds in all."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if predicate(line):
                return line

    def wait_ready(self, timeout=READY_TIMEOUT):
        """Wait for the "READY ..." line; its words after READY.  The first
        line must be it; on anything else the process is killed."""
        try:
            words = self.readline(timeout).split()
            if not words or words[0] != "READY":
                raise ClusterError(f"{self.name} failed to start: {' '.join(words)!r}")
        except (TimeoutError, ClusterError):
            self.kill()
            raise
        self.ready = words[1:]
        return self.ready

    def drain(self):
        """Discard whatever the process prints from now on, so that it can
        never block on a full pipe (for chatty processes such as Redis)."""
        def discard(fd):
            while os.read(fd, 65536):
                pass
        self._drainer = threading.Thread(target=discard, args=(self.proc.stdout.fileno(),),
                                         daemon=True, name=f"drain-{self.name}")
        self._drainer.start()

    def send_line(self, line):
        self.proc.stdin.write(line.encode() + b"\n")

    def wait(self, timeout):
        """Wait for the process to exit; its exit code."""
        return self.proc.wait(timeout)

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM; the process must exit in time.  Its exit code."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.name} did not stop in {timeout}s") from None
        self._close_pipes()
        return self.proc.returncode

    def kill(self):
        """SIGKILL (if still running) and reap."""
        if self.alive:
            self.proc.kill()
        self.proc.wait(REAP_TIMEOUT)
        self._close_pipes()
        return self.proc.returncode

    def _close_pipes(self):
        if self._drainer is not None:
            # It ends at the exited process's end of output; only then may
            # its descriptor be closed (and its number reused).
            self._drainer.join(REAP_TIMEOUT)
            if self._drainer.is_alive():
                raise ClusterError(f"{self.name}: its output stays open after exit")
            self._drainer = None
        for pipe in (self.proc.stdin, self.proc.stdout):
            if not pipe.closed:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


# -- hosts ------------------------------------------------------------------------------

class Host:
    """One machine of the cluster: a namespace with one link to the switch."""

    def __init__(self, cluster, index):
        self.cluster = cluster
        self.index = index
        self.name = f"h{index}"
        self.netns = cluster.prefix + self.name
        self.port = self.name               # its port on the switch (in the switch namespace)
        self.ip = IPV4.format(index + 1)
        self.ip6 = IPV6.format(index + 1) if cluster.ipv6 else None
        self.processes = []

    def __repr__(self):
        return f"<Host {self.name} {self.ip}>"

    def _create(self):
        sw = self.cluster.switch
        ip("netns", "add", self.netns)
        ip("link", "set", "lo", "up", netns=self.netns)
        ip("link", "add", self.port, "type", "veth", "peer", "name", "eth0",
           "netns", self.netns, netns=sw)
        ip("link", "set", self.port, "master", BRIDGE, "up", netns=sw)
        ip("addr", "add", f"{self.ip}/{IPV4_PREFIXLEN}", "dev", "eth0", netns=self.netns)
        if self.ip6:
            # nodad: usable at once instead of after duplicate detection.
            ip("addr", "add", f"{self.ip6}/{IPV6_PREFIXLEN}", "dev", "eth0", "nodad",
               netns=self.netns)
        ip("link", "set", "eth0", "up", netns=self.netns)

    # -- processes ------------------------------------------------------------

    def exec_argv(self, argv):
        # Its own UTS namespace too, so the host's name is also its hostname:
        # a process that does not configure rpc_zmq_host gets "h1", which
        # resolves inside the cluster, as on a real machine.
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name] + list(argv)

    def run(self, argv, timeout=30):
        """Run a command to completion inside this host; CompletedProcess
        with text stdout and stderr (the exit code is not checked)."""
        return subprocess.run(self.exec_argv(argv), capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def spawn(self, argv, name=None, ready=True, timeout=READY_TIMEOUT, env=None):
        """Start a process inside this host, tracked so that kill_all() and
        the cluster's cleanup stop it.  With ready=True, wait (bounded) for
        its READY line."""
        process = NsProcess(self, name or f"{self.name}:{os.path.basename(argv[0])}",
                            argv, env=env)
        self.processes.append(process)
        if ready:
            process.wait_ready(timeout)
        return process

    def python(self, module, *args, **kwargs):
        """spawn() `python -m module args...` with this interpreter, from
        the checkout root."""
        kwargs.setdefault("name", f"{self.name}:{module.rpartition('.')[2]}")
        return self.spawn([sys.executable, "-m", module] + [str(a) for a in args], **kwargs)

    def pids(self):
        """Pids of every process inside this host, tracked or not."""
        return namespace_pids(self.netns)

    def kill_all(self):
        """SIGKILL every process inside this host and wait until they are
        gone.  The host's network stays as it is."""
        # The processes we started first, so that none of them sees a child
        # die and exits on its own before its own SIGKILL.
        tracked = [p.pid for p in self.processes if p.alive]
        _kill_pids(tracked)
        _kill_pids(self.pids() - set(tracked))
        for process in self.processes:
            process.kill()
        _wait_no_pids(self.netns)
        self.processes = []

    # -- the link -------------------------------------------------------------

    def link_down(self):
        """Cut this host's cable at the switch.  Its eth0 loses carrier and
        packets to and from it vanish: an established connection just gets
        no answer (TCP retransmits, with backoff, until link_up()); a new
        one fails after about 3 s with "No route to host", when the
        sender's own ARP (or IPv6 neighbour discovery) gives up."""
        ip("link", "set", self.port, "down", netns=self.cluster.switch)

    def link_up(self):
        ip("link", "set", self.port, "up", netns=self.cluster.switch)

    @property
    def link_is_up(self):
        out = ip("-o", "link", "show", self.port, netns=self.cluster.switch)
        flags = out.partition("<")[2].partition(">")[0].split(",")
        return "UP" in flags

    def crash(self):
        """Lose the machine: cut the link first, so that no FIN or RST from
        the dying processes reaches a peer, then kill everything.  Peers
        see silence, as after a power failure; link_up() brings the empty
        host back."""
        self.link_down()
        self.kill_all()


# -- Redis ------------------------------------------------------------------------------

class RedisServer:
    """redis-server inside one host: no persistence, its own directory.
    Stop and start it again on the same address for outage tests (it comes
    back empty)."""

    def __init__(self, cluster, host, port):
        self.cluster = cluster
        self.host = host
        self.port = port
        self.dir = os.path.join(cluster.tmpdir, f"redis-{host.name}-{port}")
        os.makedirs(self.dir, exist_ok=True)
        self.process = None

    @property
    def ip(self):
        return self.host.ip

    @property
    def url(self):
        return f"redis://{self.host.ip}:{self.port}"

    def __repr__(self):
        return f"<RedisServer {self.url} on {self.host.name}>"

    @property
    def running(self):
        return self.process is not None and self.process.alive

    def start(self, timeout=READY_TIMEOUT):
        """Start it (again) and wait, bounded, until it answers on the
        host's address."""
        if self.running:
            raise ClusterError(f"{self} already runs")
        argv = ["redis-server", "--port", str(self.port), "--bind", "*", "-::*",
                "--protected-mode", "no", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--daemonize", "no", "--logfile", ""]
        self.process = self.host.spawn(argv, name=f"{self.host.name}:redis", ready=False)
        try:
            self.process.wait_for(lambda line: "Ready to accept connections" in line, timeout)
            if not self.ping(self.host):
                raise ClusterError(f"{self} said it was ready but does not answer PING")
        except BaseException:
            self.process.kill()
            raise
        self.process.drain()                # it logs on events (shutdown) from now on
        return self

    def stop(self, kill=False):
        """Stop it: SIGTERM (a clean shutdown) or, with kill=True, SIGKILL (a
        crash).  Its exit code."""
        if self.process is None:
            return None
        code = self.process.kill() if kill else self.process.stop()
        self.process = None
        return code

    def restart(self, kill=False):
        self.stop(kill=kill)
        return self.start()

    def ping(self, from_host, timeout=5):
        """Whether PING from inside `from_host` gets PONG within `timeout`."""
        try:
            out = self.cli(from_host, "ping", timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and out.stdout.strip() == "PONG"

    def cli(self, from_host, *command, timeout=10):
        """redis-cli run inside `from_host` (a Host, or a namespace name)
        against this server; the CompletedProcess.  Raises
        subprocess.TimeoutExpired after `timeout` seconds."""
        argv = ["redis-cli", "-h", self.host.ip, "-p", str(self.port)] + list(command)
        if isinstance(from_host, Host):
            return from_host.run(argv, timeout=timeout)
        return subprocess.run(["ip", "netns", "exec", from_host] + argv, capture_output=True,
                              text=True, timeout=timeout)


# -- the cluster ------------------------------------------------------------------------

class Cluster:
    """N hosts joined by one switch; a context manager.  Everything it made
    (processes, Redis, namespaces with their veths and bridges, its temp
    directory) is removed by close(), which also runs when the body fails
    or is interrupted."""

    def __init__(self, hosts=3, ipv6=True):
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be 1..{MAX_HOSTS}, not {hosts}")
        self.ipv6 = ipv6
        self.prefix = run_prefix(sequence=next(_sequence))
        self.switch = self.prefix + SWITCH
        self.hosts = [Host(self, i) for i in range(hosts)]
        self.tmpdir = None
        self.redis = None                   # the last start_redis()
        self._redis_servers = []
        self._bridges = [BRIDGE]
        self._made = []                     # namespaces created, in order
        self._old_sigterm = None
        self._started = False

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        return iter(self.hosts)

    def __len__(self):
        return len(self.hosts)

    def __getitem__(self, index):
        return self.hosts[index]

    def host(self, name):
        return next(h for h in self.hosts if h.name == name)

    def start(self):
        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
        self._started = True
        self._catch_sigterm()
        try:
            sweep()
            self.tmpdir = tempfile.mkdtemp(prefix=self.prefix)
            self._made.append(self.switch)
            ip("netns", "add", self.switch)
            ip("link", "add", BRIDGE, "type", "bridge", netns=self.switch)
            ip("link", "set", BRIDGE, "up", netns=self.switch)
            for host in self.hosts:
                self._made.append(host.netns)
                host._create()
            names = "".join(f"{h.ip}\t{h.name}\n" + (f"{h.ip6}\t{h.name}\n" if h.ip6 else "")
                            for h in self.hosts)
            for host in self.hosts:
                etc = os.path.join(ETC_NETNS, host.netns)
                os.makedirs(etc, exist_ok=True)
                with open(os.path.join(etc, "hosts"), "w") as f:
                    f.write("127.0.0.1\tlocalhost\n::1\tlocalhost\n" + names)
        except BaseException:
            self.close()
            raise
        return self

    def _catch_sigterm(self):
        # A SIGTERM (a CI job's timeout) would otherwise end the process
        # without running close(): turn it into an exception while we own
        # namespaces.  Only from the main thread, and only over the default.
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            def interrupted(signum, frame):
                raise KeyboardInterrupt(f"signal {signum}")
            self._old_sigterm = signal.signal(signal.SIGTERM, interrupted)

    def namespaces(self):
        """The machine's namespaces that belong to this cluster."""
        return [n for n in namespaces() if n.startswith(self.prefix)]

    # -- files ----------------------------------------------------------------

    def write_ring(self, ring, name="ring.json"):
        """Write a ring file (topic -> [hosts]) into the cluster's directory,
        atomically so a reader never sees half of it; its path.  Namespaces
        share the filesystem, so every host reads the same file."""
        path = os.path.join(self.tmpdir, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(ring, f)
        os.replace(tmp, path)
        return path

    # -- the network ----------------------------------------------------------

    def partition(self, *groups):
        """Split the network: each group of hosts gets a switch of its own,
        and the hosts in no group stay on the main one.  Traffic between
        sides vanishes, as with link_down(), but every link stays up."""
        # Separate bridges need nothing beyond the bridge itself; VLAN
        # filtering and netem are missing from some kernels (this one).
        self.heal()
        for number, group in enumerate(groups, 1):
            bridge = f"br{number}"
            ip("link", "add", bridge, "type", "bridge", netns=self.switch)
            ip("link", "set", bridge, "up", netns=self.switch)
            self._bridges.append(bridge)
            for host in group:
                ip("link", "set", host.port, "master", bridge, netns=self.switch)

    def heal(self):
        """Undo partition(): every host back on the main switch."""
        if len(self._bridges) == 1:
            return
        for host in self.hosts:
            ip("link", "set", host.port, "master", BRIDGE, netns=self.switch)
        for bridge in self._bridges[1:]:
            ip("link", "delete", bridge, netns=self.switch)
        self._bridges = [BRIDGE]

    def restore_network(self):
        """Every link up, no partition."""
        self.heal()
        for host in self.hosts:
            host.link_up()

    # -- Redis ----------------------------------------------------------------

    def start_redis(self, host, port=REDIS_PORT, timeout=READY_TIMEOUT):
        """Run redis-server inside `host` on `port`; once it answers, the
        RedisServer (its .url, .ip, .port)."""
        server = RedisServer(self, host, port)
        server.start(timeout)
        self._redis_servers.append(server)
        self.redis = server
        return server

    def stop_redis(self, kill=False):
        """Stop the last started Redis (SIGKILL with kill=True)."""
        return self.redis.stop(kill=kill)

    def restart_redis(self, kill=False):
        """Start the last started Redis again on the same address (empty)."""
        return self.redis.restart(kill=kill)

    # -- teardown -------------------------------------------------------------

    def close(self):
        """Remove everything; raises ClusterError if something survived."""
        if not self._started:
            return
        self._started = False
        errors = []
        try:
            for host in self.hosts:
                if host.netns in self._made:
                    try:
                        host.kill_all()
                    except ClusterError as exc:
                        errors.append(str(exc))
            # Deleting the switch first removes every veth pair and bridge
            # at once; each host namespace is then empty.
            for name in [self.switch] + [h.netns for h in self.hosts]:
                if name in self._made:
                    try:
                        delete_namespace(name)
                    except ClusterError as exc:
                        errors.append(str(exc))
            if self.tmpdir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                if os.path.exists(self.tmpdir):
                    errors.append(f"{self.tmpdir} survived")
            left = self.namespaces()
            if left:
                errors.append(f"namespaces survived: {left}")
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None
        if errors:
            raise ClusterError("; ".join(errors))


def fixture(hosts=3, scope="module", name="cluster", ipv6=True):
    """A pytest fixture yielding a started Cluster; it skips where network
    namespaces cannot be created.  In a test module:
    `cluster = netns.fixture(hosts=3)`."""
    import pytest

    @pytest.fixture(scope=scope, name=name)
    def _cluster():
        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
        with Cluster(hosts, ipv6=ipv6) as cluster:
            yield cluster

    return _cluster
