"""Shared fixtures: service processes over real sockets, and a client whose
sockets, threads and descriptors must all be released by rpc.cleanup()."""
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from nova_zmq_fast import rpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def open_fds():
    """This process's open descriptors.  (Listing them opens one, closed
    again by the time it is looked at: only those still open count.)"""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        fds.append(int(name))
    return sorted(fds)


def os_threads():
    """Ids of this process's OS threads."""
    return set(os.listdir("/proc/self/task"))


def no_new_threads(before):
    """True once every OS thread started since `before` has ended.  (A
    thread that existed before and ended since is not a leak: join() returns
    a moment before the kernel forgets a thread.)"""
    return not (os_threads() - before)


def free_port(host="127.0.0.1"):
    """A TCP port nobody listens on at `host` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, interval=0.02):
    """Poll `predicate` until it is truthy or `timeout` passes; return its
    last value.  Bounded in time, as every loop in the tests."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class ChildProcess:
    """A helper process that prints "READY ..." once it serves and stops on
    SIGTERM (or when its stdin, held by this process, closes)."""

    def __init__(self, name, argv, wait=True, env=None):
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env=None if env is None else dict(os.environ, **env))
        self.ready_line = None
        self.terminated = False
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout=60):
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                self.kill()
                raise RuntimeError(f"{self.name} did not start in {timeout}s")
            line = self.proc.stdout.readline().split()
        finally:
            sel.close()
        if not line or line[0] != "READY":
            self.kill()
            raise RuntimeError(f"{self.name} failed to start: {line}")
        self.ready_line = line[1:]
        return self

    def terminate(self):
        """SIGTERM, once, without waiting: stop() waits."""
        if self.proc.poll() is None and not self.terminated:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout=15):
        """SIGTERM: the process cleans up and must exit 0 in time."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Where it is stuck: every thread's stack, on its stderr
                # (the test's captured output), before it is killed.
                self.proc.send_signal(signal.SIGUSR1)
                try:
                    self.proc.wait(2)
                except subprocess.TimeoutExpired:
                    pass
                self.kill()
                raise AssertionError(f"{self.name} did not stop in {timeout}s")
        self._close_pipes()
        return self.proc.returncode

    def _close_pipes(self):
        for pipe in (self.proc.stdin, self.proc.stdout):
            if not pipe.closed:
                pipe.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipes()


def stop_all(children, timeout=15):
    """stop() each child, their exit codes in order, but told to stop all
    at once: their cleanups (each up to its rpc_zmq_linger) overlap."""
    for child in children:
        child.terminate()
    codes, stuck = [], None
    for child in children:
        try:
            codes.append(child.stop(timeout))
        except AssertionError as exc:       # killed, after its stacks were dumped
            stuck = stuck or exc
    if stuck is not None:
        raise stuck                         # once every child has been stopped or killed
    return codes


class ServiceProcess(ChildProcess):
    """A tests.helpers.service process (the native API)."""

    def __init__(self, host, ipc_dir, topic="svc", options=None, env=None):
        self.host = host
        opts = {"rpc_zmq_ipc_dir": str(ipc_dir)}
        opts.update(options or {})
        super().__init__(host, [sys.executable, "-m", "tests.helpers.service", "--host", host,
                                "--topic", topic, "--options", json.dumps(opts)], env=env)
        self.address = self.ready_line[0]


@pytest.fixture(scope="module")
def ipc_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def services(ipc_dir):
    """Two services with different rpc_zmq_host values, on the embedded
    default discovery, consuming 'svc'."""
    started = []
    try:
        for host in ("h1", "h2"):
            started.append(ServiceProcess(host, ipc_dir))
        yield {s.host: s for s in started}
    finally:
        codes = stop_all(started)
    assert codes == [0] * len(started), f"services exited with {codes}"


@pytest.fixture
def client(ipc_dir):
    """rpc, initialised for this test; cleanup() must release everything."""
    fds = open_fds()
    threads = os_threads()
    rpc.init(rpc_zmq_ipc_dir=str(ipc_dir), rpc_zmq_host="client",
             rpc_response_timeout=10, rpc_cast_timeout=10, rpc_zmq_linger=2,
             allowed_rpc_exception_modules=["builtins", "tests.helpers.errors"])
    try:
        yield rpc
    finally:
        rpc.cleanup()
        rpc.init()                  # back to defaults for the next test
    assert wait_until(lambda: no_new_threads(threads), 5), \
        f"threads leaked: {sorted(os_threads() - threads)}"
    assert open_fds() == fds, f"descriptors leaked: {open_fds()} != {fds}"


def count_on(rpc_mod, service_topic, key):
    return rpc_mod.call({}, service_topic, {"method": "count", "args": {"key": key}})


def make_certificates(directory):
    """A CA, a certificate for 127.0.0.1 and a client certificate signed by
    it, and a second CA that signed nothing here (openssl; EC keys)."""
    d = str(directory)

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-days", "2", "-subj", f"/CN={ca}")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                *(["-extfile", "san.ext"] if name == "server" else []))
    return {name: os.path.join(d, name) for name in (
        "ca.crt", "other-ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


class RedisServer:
    """A redis-server of the test's own on a free loopback port, without
    persistence, that can be stopped and started again on the same port
    (a Redis outage).  With `certificates` (make_certificates()), it
    speaks only TLS and requires a client certificate."""

    def __init__(self, directory, certificates=None):
        self.dir = str(directory)
        self.port = free_port()
        self.proc = None
        self.certs = certificates

    @property
    def options(self):
        """rpc.init() options for discovery through this server."""
        options = {"rpc_zmq_matchmaker": "redis", "matchmaker_redis_host": "127.0.0.1",
                   "matchmaker_redis_port": self.port}
        if self.certs:
            options.update(matchmaker_redis_ssl=True,
                           matchmaker_redis_ssl_ca_certs=self.certs["ca.crt"],
                           matchmaker_redis_ssl_certfile=self.certs["client.crt"],
                           matchmaker_redis_ssl_keyfile=self.certs["client.key"])
        return options

    @property
    def tls(self):
        """redis-py's keyword arguments to talk to this server (and its
        Sentinels) as a client."""
        return {} if not self.certs else {
            "ssl": True, "ssl_ca_certs": self.certs["ca.crt"],
            "ssl_certfile": self.certs["client.crt"], "ssl_keyfile": self.certs["client.key"]}

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, **self.tls)

    def start(self):
        ports = ["--port", str(self.port)]
        if self.certs:
            ports = ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", self.certs["server.crt"],
                     "--tls-key-file", self.certs["server.key"],
                     "--tls-ca-cert-file", self.certs["ca.crt"], "--tls-auth-clients", "yes"]
        self.proc = subprocess.Popen(
            ["redis-server", *ports, "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with self.client() as r:
            if not wait_until(lambda: _pings(r), 10, 0.05):
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def _pings(r):
    import redis
    try:
        return r.ping()
    except (redis.RedisError, OSError):
        return False


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh installs it)")
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
