"""The operator's command line (nova_zmq_fast/cli.py), run as an operator
runs it: a subprocess, against real service processes, on each discovery
backend, checking output, --json and exit codes."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import nova_zmq_fast
from nova_zmq_fast.cli import EXIT_MEANINGS, Exit
from tests.conftest import ROOT, ChildProcess, ServiceProcess, free_port, stop_all, wait_until

SCRIPT = os.path.join(os.path.dirname(sys.executable), "nova-zmq-fast")


class Run:
    """One finished command: exit code, stdout, stderr, and stdout as JSON."""

    def __init__(self, proc, seconds):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr
        self.seconds = seconds

    @property
    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return f"<exit {self.code}\nstdout: {self.out}\nstderr: {self.err}>"


def cli(*args, env=None, argv0=(sys.executable, "-m", "nova_zmq_fast")):
    """Run the command line with only the environment variables given in
    `env` among its own (NOVA_ZMQ_FAST_*)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NOVA_ZMQ_FAST_")}
    environ.update(env or {})
    start = time.monotonic()
    proc = subprocess.run([*argv0, *map(str, args)], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)
    return Run(proc, time.monotonic() - start)


def write(path, text):
    path.write_text(text)
    return path


# -- help and entry points ---------------------------------------------------------

def test_help_entry_points_and_version():
    for argv0 in ((SCRIPT,), (sys.executable, "-m", "nova_zmq_fast")):
        run = cli("--help", argv0=argv0)
        assert run.code == 0, run
        for name in ("topics", "status", "ping", "call", "bench", "--config-file",
                     "NOVA_ZMQ_FAST_RPC_ZMQ_MATCHMAKER", "exit codes"):
            assert name in run.out
        for code in Exit:
            assert f"  {int(code):>3}  " in run.out
    run = cli("--version", argv0=(SCRIPT,))
    assert (run.code, run.out.strip()) == (0, f"nova-zmq-fast {nova_zmq_fast.__version__}")
    run = cli("ping", "--help")
    assert run.code == 0 and "--version X.Y" in run.out and "exit codes" in run.out


def test_the_readme_lists_the_exit_codes():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for code, meaning in EXIT_MEANINGS.items():
        assert f"| {int(code)} | {meaning}" in readme


# -- against two services on the embedded discovery ---------------------------------

@pytest.fixture(scope="module")
def local(services, ipc_dir):
    """`--ipc-dir` for the services h1 and h2 (tests/conftest.py)."""
    return ("--ipc-dir", ipc_dir)


def test_topics(services, local):
    run = cli("topics", *local)
    assert run.code == 0, run
    lines = run.out.splitlines()
    assert lines[0].split() == ["TOPIC", "CONSUMERS", "HOST", "ADDRESS"]
    for s in services.values():
        assert f"{s.host} {s.address}" in run.out
    data = cli(*local, "topics", "--json").json         # options before the command too
    assert data["discovery"] == "local"
    by_name = {(t["topic"], t["fanout"]): t["consumers"] for t in data["topics"]}
    assert set(by_name) == {("svc", False), ("svc", True), ("svc-raw", False)}
    assert sorted((c["host"], c["address"], c["alive"]) for c in by_name[("svc", False)]) == \
        sorted((s.host, s.address, True) for s in services.values())
    assert [t["topic"] for t in cli("topics", "svc-", *local, "--json").json["topics"]] == \
        ["svc-raw"]
    run = cli("topics", "nothing-like-this", *local)
    assert run.code == Exit.NO_LISTENERS and "no topic starting with" in run.out, run
    assert cli("topics", "nothing-like-this", *local, "--json").json["topics"] == []


def test_status_pings_every_node(services, local):
    run = cli("status", *local)
    assert run.code == 0, run
    for s in services.values():
        assert f"pid {s.proc.pid}," in run.out
    assert "2 nodes: 2 answered, 0 failed" in run.out
    data = cli("status", *local, "--json").json
    nodes = {n["host"]: n for n in data["nodes"]}
    assert set(nodes) == {"h1", "h2"}
    for host, s in services.items():
        node = nodes[host]
        assert (node["address"], node["alive"]) == (s.address, True)
        assert sorted(node["topics"]) == ["svc", "svc (fanout)", "svc-raw"]
        assert node["ping"]["pid"] == s.proc.pid and node["ping"]["rtt"] > 0
    quiet = cli("status", "--no-ping", *local, "--json")
    assert quiet.code == 0 and all("ping" not in n for n in quiet.json["nodes"]), quiet


def test_ping(services, local):
    run = cli("ping", "svc", *local)
    assert run.code == 0 and "2 of 2 consumers of svc answered" in run.out, run
    data = cli("ping", "svc", *local, "--json").json
    assert (data["answered"], data["failed"]) == (2, 0)
    assert {(c["host"], c["address"], c["pid"]) for c in data["consumers"]} == \
        {(s.host, s.address, s.proc.pid) for s in services.values()}
    assert {c["transport"] for c in data["consumers"]} == {nova_zmq_fast.__version__}
    one = cli("ping", "svc.h2", *local, "--json").json
    assert [c["host"] for c in one["consumers"]] == ["h2"]
    # The services' RpcDispatcher serves 1.3, and 2.0 in namespace v2.
    assert cli("ping", "svc", "--version", "1.2", *local).code == 0
    refused = cli("ping", "svc", "--version", "2.0", *local, "--json")
    assert refused.code == Exit.VERSION, refused
    assert {c["error"]["type"] for c in refused.json["consumers"]} == {"UnsupportedRpcVersion"}
    assert cli("ping", "svc", "--version", "2.0", "--namespace", "v2", *local).code == 0
    nobody = cli("ping", "nobody-here", *local)
    assert nobody.code == Exit.NO_LISTENERS and "no live consumer of nobody-here" in nobody.err
    assert cli("ping", "nobody-here", *local, "--json").json["error"]["exit"] == 4


def test_call(services, local):
    run = cli("call", "svc", "add", "--args", '{"a": 1, "b": 2}', *local)
    assert (run.code, run.out) == (0, "3\n"), run
    data = cli("call", "svc.h2", "context", "--context", '{"user_id": "u9"}', *local,
               "--json").json
    assert data["result"] == {"values": {"user_id": "u9"}, "user_id": "u9"}
    assert data["method"] == "context" and data["seconds"] > 0
    assert cli("call", "svc.h1", "whoami", *local).out == '"h1"\n'
    assert cli("call", "svc", "echo", "--args", '{"value": 1}', "--version", "1.3",
               *local).code == 0


def test_call_errors(services, local):
    failing = ("call", "svc", "fail", "--args", '{"kind": "value", "text": "boom"}', *local)
    run = cli(*failing)
    assert run.code == Exit.REMOTE_ERROR and run.out == "", run
    assert "the remote method raised ValueError: boom" in run.err
    assert "remote traceback:" in run.err and 'raise ValueError(text)' in run.err
    error = cli(*failing, "--json").json["error"]
    assert (error["remote_type"], error["message"], error["exit"]) == ("ValueError", "boom", 7)
    assert "raise ValueError(text)" in error["remote_traceback"]

    version = cli("call", "svc", "echo", "--args", '{"value": 1}', "--version", "9.0", *local)
    assert version.code == Exit.VERSION and "version refused" in version.err, version
    nobody = cli("call", "nobody-here", "echo", *local)
    assert nobody.code == Exit.NO_LISTENERS, nobody
    slow = cli("call", "svc.h1", "sleep", "--args", '{"seconds": 2}', "--timeout", "0.3",
               *local, "--json")
    assert slow.code == Exit.TIMEOUT and slow.json["error"]["label"] == "timeout", slow
    for bad in ('{"a": 1', "[1, 2]", ""):
        run = cli("call", "svc", "add", "--args", bad, *local)
        assert run.code == Exit.USAGE and "--args" in run.err, run
    run = cli("call", "svc", "add", "--context", "nope", *local, "--json")
    assert run.code == Exit.USAGE and "--context" in run.json["error"]["message"], run


def test_bench(services, local, client):
    key = f"bench-{uuid.uuid4().hex}"
    run = cli("bench", "svc", "-n", 40, "--call", "echo", "--call-args", '{"value": 1}',
              "--cast", "record", "--cast-args", json.dumps({"key": key, "value": 1}),
              "--casts", 600, "--progress", *local, "--json")
    assert run.code == 0, run
    data = run.json
    assert data["consumers"] == 2
    for kind in ("ping", "call"):
        figures = data[kind]
        assert figures["count"] == 40
        assert 0 < figures["min"] <= figures["median"] <= figures["p99"] <= figures["max"]
    assert data["call"]["method"] == "echo"
    assert (data["cast"]["count"], data["cast"]["confirmed_by"]) == (600, 2)
    assert data["cast"]["rate"] > 0
    # Progress bars on stderr, each finished.
    for label in ("ping", "call echo", "cast record"):
        assert label in run.err
    assert "40/40" in run.err and "600/600" in run.err and "[" + "#" * 30 + "]" in run.err
    # Every cast arrived (the bench's closing PINGs said so); each is
    # recorded once handled.
    assert wait_until(lambda: sum(client.call({}, f"svc.{h}", {"method": "count",
                                                                "args": {"key": key}})
                                  for h in ("h1", "h2")) == 600, 10)
    plain = cli("bench", "svc.h1", "-n", 10, *local)
    assert plain.code == 0 and plain.err == "", plain             # no terminal: no bar
    assert len(plain.out.splitlines()) == 1 and "ping 10x median" in plain.out
    assert cli("bench", "nobody-here", *local).code == Exit.NO_LISTENERS


# -- a frozen service, a ring entry nobody listens on -----------------------------------

def test_a_frozen_service_times_out(tmp_path):
    up, frozen = ServiceProcess("up", tmp_path), ServiceProcess("frozen", tmp_path)
    where = ("--ipc-dir", tmp_path)
    try:
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        run = cli("ping", "svc", "--timeout", 2, *where, "--json")
        assert run.code == Exit.PARTIAL, run
        answers = {c["host"]: c for c in run.json["consumers"]}
        assert answers["up"]["pid"] == up.proc.pid
        assert answers["frozen"]["error"]["exit"] == Exit.TIMEOUT
        assert run.seconds < 20
        run = cli("ping", "svc.frozen", "--timeout", 2, *where)
        assert run.code == Exit.TIMEOUT and "0 of 1 consumers" in run.out, run
        run = cli("status", "--timeout", 2, *where)
        assert run.code == Exit.PARTIAL and "1 answered, 1 failed" in run.out, run
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
        codes = stop_all([up, frozen])
    assert codes == [0, 0]


def test_ring(tmp_path):
    live, dead = free_port("127.0.0.2"), free_port("127.0.0.3")
    ring = write(tmp_path / "ring.json", json.dumps({
        "svc": [f"127.0.0.2:{live}", f"127.0.0.3:{dead}"],
        "lonely": [f"127.0.0.3:{dead}"],
        "unserved": [f"127.0.0.2:{live}"]}))
    server = ServiceProcess("127.0.0.2", tmp_path, options={
        "rpc_zmq_matchmaker": "ring", "matchmaker_ringfile": str(ring),
        "rpc_zmq_bind_address": "127.0.0.2", "rpc_zmq_port": live})
    where = ("--matchmaker", "ring", "--ring-file", ring, "-o", "rpc_zmq_connect_timeout=1")
    try:
        topics = cli("topics", *where, "--json")
        assert topics.code == 0, topics
        assert {t["topic"]: len(t["consumers"]) for t in topics.json["topics"]} == \
            {"svc": 2, "lonely": 1, "unserved": 1}
        run = cli("ping", "svc", *where, "--json")
        assert run.code == Exit.PARTIAL, run
        answers = {c["address"]: c for c in run.json["consumers"]}
        assert answers[f"tcp://127.0.0.2:{live}"]["pid"] == server.proc.pid
        assert answers[f"tcp://127.0.0.3:{dead}"]["error"]["type"] == "PeerUnreachable"
        lonely = cli("ping", "lonely", *where)
        assert lonely.code == Exit.TIMEOUT and "unreachable" in lonely.out, lonely
        # Listed, up, but not serving the topic: it refuses the PING.
        unserved = cli("ping", "unserved", *where)
        assert unserved.code == Exit.NO_LISTENERS and "not served" in unserved.out, unserved
        status = cli("status", *where)
        assert status.code == Exit.PARTIAL and "1 answered, 1 failed" in status.out, status
        # A ring lists who may serve, not who is up: unknown until pinged.
        addresses = {f"tcp://127.0.0.2:{live}": True, f"tcp://127.0.0.3:{dead}": False}
        listed = cli("status", "--no-ping", *where, "--json")
        assert {n["address"]: n["alive"] for n in listed.json["nodes"]} == \
            dict.fromkeys(addresses), listed
        pinged = cli("status", *where, "--json")
        assert {n["address"]: n["alive"] for n in pinged.json["nodes"]} == addresses, pinged
        call = cli("call", "svc.127.0.0.2", "whoami", *where)
        assert (call.code, call.out) == (0, '"127.0.0.2"\n'), call
    finally:
        assert server.stop() == 0


# -- Redis --------------------------------------------------------------------------

def test_redis(redis_server, tmp_path):
    options = dict(redis_server.options, rpc_zmq_bind_address="127.0.0.1",
                   matchmaker_heartbeat_freq=0.25, matchmaker_heartbeat_ttl=1.5)
    started = [ServiceProcess(h, tmp_path, options=options) for h in ("r1", "r2")]
    flags = ("--matchmaker", "redis", "--redis-host", "127.0.0.1",
             "--redis-port", redis_server.port)
    try:
        data = cli("topics", "svc", *flags, "--json").json
        assert data["discovery"] == "redis"
        direct = [t for t in data["topics"] if t["topic"] == "svc" and not t["fanout"]][0]
        assert sorted(c["host"] for c in direct["consumers"]) == ["r1", "r2"]
        status = cli("status", *flags, "--json")
        assert status.code == 0, status
        assert {n["host"]: n["ping"]["pid"] for n in status.json["nodes"]} == \
            {s.host: s.proc.pid for s in started}
        # The URL an oslo.messaging service would have.
        conf = write(tmp_path / "oslo.conf", "[DEFAULT]\ntransport_url = "
                     f"zmqfast+redis://127.0.0.1:{redis_server.port}/0\n")
        run = cli("ping", "svc.r1", "--config-file", conf)
        assert run.code == 0 and "1 of 1 consumers" in run.out, run
    finally:
        codes = stop_all(started)
    assert codes == [0, 0]
    gone = cli("topics", *flags)
    assert gone.code == Exit.NO_LISTENERS, gone            # withdrawn at close
    redis_server.stop()
    down = cli("topics", *flags, "--json")
    assert down.code == Exit.DISCOVERY and down.json["error"]["exit"] == 8, down


# -- where options come from --------------------------------------------------------

def test_option_precedence(services, ipc_dir, tmp_path):
    """The registry directory tells which source won: the services are in
    `ipc_dir`, nothing is in `empty`."""
    empty = tmp_path / "empty"
    empty.mkdir()

    def found(*args, env=None):
        run = cli("topics", "svc", *args, env=env)
        assert run.code in (0, Exit.NO_LISTENERS), run
        return run.code == 0

    nova = write(tmp_path / "nova.conf", f"[DEFAULT]\nmy_ip = 10.0.0.1\ndebug = True\n"
                                         f"rpc_zmq_ipc_dir = {ipc_dir}\n")
    assert found("--config-file", nova)
    oslo = write(tmp_path / "oslo.conf", f"[DEFAULT]\nrpc_zmq_ipc_dir = {empty}\n"
                                         f"[oslo_messaging_zmqfast]\nrpc_zmq_ipc_dir = {ipc_dir}\n")
    assert found("--config-file", oslo)                         # the group over [DEFAULT]
    url = write(tmp_path / "url.conf", f"[DEFAULT]\ntransport_url = zmqfast://?rpc_zmq_ipc_dir"
                                       f"={ipc_dir}\n[oslo_messaging_zmqfast]\n"
                                       f"rpc_zmq_ipc_dir = {empty}\n")
    assert found("--config-file", url)                          # the URL over the group
    other = write(tmp_path / "empty.conf", f"[DEFAULT]\nrpc_zmq_ipc_dir = {empty}\n")
    assert not found("--config-file", nova, "--config-file", other)     # later file wins
    assert found(env={"NOVA_ZMQ_FAST_CONFIG_FILE": str(nova)})
    assert not found("--config-file", other, env={"NOVA_ZMQ_FAST_CONFIG_FILE": str(nova)})
    env_empty = {"NOVA_ZMQ_FAST_RPC_ZMQ_IPC_DIR": str(empty)}
    assert not found("--config-file", nova, env=env_empty)     # environment over file
    assert found("--ipc-dir", ipc_dir, env=env_empty)           # command line over both
    assert not found("--ipc-dir", ipc_dir, "-o", f"rpc_zmq_ipc_dir={empty}")    # last wins
    assert found("-o", f"rpc_zmq_ipc_dir={ipc_dir}")


def test_reading_an_unused_registry_makes_no_directory(tmp_path):
    """`topics` and `status` only read: on a registry location nobody has
    used they say that nothing is registered and leave no directory
    behind, neither there nor in the per-user fallback taken when the
    location cannot be made.  A server registering there makes it."""
    unused = tmp_path / "unused" / "ipc"
    blocked = tmp_path / "file"                 # under a file: the fallback's turn
    blocked.write_text("not a directory")
    runtime = tmp_path / "runtime"              # where the fallback would be made
    runtime.mkdir()
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    for where in (unused, blocked / "ipc"):
        for command, says, key in (("topics", "knows no topic", "topics"),
                                   ("status", "knows no node", "nodes")):
            run = cli(command, "--ipc-dir", where, env=env)
            assert run.code == Exit.NO_LISTENERS, run
            assert f"discovery (local) {says}" in run.out, run
            data = cli(command, "--ipc-dir", where, "--json", env=env).json
            assert data == {"discovery": "local", key: []}, data
    assert not (tmp_path / "unused").exists()
    assert os.listdir(runtime) == []
    service = ServiceProcess("maker", unused, topic="made")
    try:
        assert os.path.isdir(unused / "nova_zmq_fast-registry" / "nodes")
        run = cli("topics", "made", "--ipc-dir", unused, env=env)
        assert run.code == 0 and f"maker {service.address}" in run.out, run
    finally:
        assert service.stop() == 0


def test_bad_configuration(tmp_path):
    def usage(*args, env=None, says):
        run = cli(*args, env=env)
        assert run.code == Exit.USAGE and says in run.err, run
        return run

    usage("topics", "-o", "no_such_option=1", says="unknown option 'no_such_option'")
    usage("topics", "-o", "rpc_zmq_ipc_dri=/tmp", says="did you mean rpc_zmq_ipc_dir")
    usage("topics", env={"NOVA_ZMQ_FAST_NO_SUCH": "1"},
          says="environment variable NOVA_ZMQ_FAST_NO_SUCH: unknown option")
    usage("topics", "-o", "rpc_zmq_port=abc",
          says="command line: rpc_zmq_port must be a number, not 'abc'")
    usage("topics", "-o", "rpc_thread_pool_size=0", says="rpc_thread_pool_size must be a positive")
    usage("topics", "--matchmaker", "zookeeper",
          says="command line: rpc_zmq_matchmaker 'zookeeper' does not exist")
    usage("topics", "-o", "no-equals-sign", says="wants NAME=VALUE")
    usage("topics", "--config-file", tmp_path / "missing.conf", says="cannot read config file")
    usage("topics", "--matchmaker", "ring", "--ring-file", tmp_path / "none.json",
          says="does not exist")
    usage("ping", "svc", "--timeout", "-1", says="not a positive number")
    usage("ping", "svc", "--version", "abc", says="'abc' is not an RPC API version")
    usage("call", "svc", "echo", "--version", "1.x", says="'1.x' is not an RPC API version")
    usage("topics", "-o", "rpc_zmq_max_message_size=2147483647", says="at most 1073741824")
    usage("no-such-command", says="invalid choice")
    group = write(tmp_path / "group.conf", "[oslo_messaging_zmqfast]\nrpc_zmq_hots = h\n")
    usage("topics", "--config-file", group, says="[oslo_messaging_zmqfast]: unknown option")
    rabbit = write(tmp_path / "rabbit.conf",
                   "[DEFAULT]\ntransport_url = rabbit://guest:s3cret@rabbit:5672/\n")
    run = usage("topics", "--config-file", rabbit, says="does not use nova_zmq_fast")
    assert "s3cret" not in run.err
    query = write(tmp_path / "query.conf", "[DEFAULT]\ntransport_url = zmqfast://?bogus=1\n")
    usage("topics", "--config-file", query, says="unknown option 'bogus'")
    hosts = write(tmp_path / "hosts.conf", "[DEFAULT]\ntransport_url = zmqfast://somehost:1/\n")
    usage("topics", "--config-file", hosts, says="takes no hosts")
    garbage = write(tmp_path / "garbage.conf", "no section header\n")
    usage("topics", "--config-file", garbage, says="garbage.conf")
    # --json: the error as JSON on stdout, for every kind of mistake.
    for args in (("topics", "-o", "nope=1", "--json"), ("topics", "--json", "--bogus-flag")):
        run = cli(*args)
        assert run.code == Exit.USAGE and run.json["error"]["exit"] == 2, run


# -- an oslo.messaging service, configured by its own file ---------------------------

def test_oslo_messaging_service(tmp_path):
    url = f"zmqfast://?rpc_zmq_ipc_dir={tmp_path}"
    service = ChildProcess("oslo", [sys.executable, "-m", "tests.helpers.oslo_service", "rpc",
                                    "--name", "s1", "--url", url])
    conf = write(tmp_path / "service.conf", f"[DEFAULT]\ntransport_url = {url}\n")
    where = ("--config-file", conf)
    try:
        names = {t["topic"] for t in cli("topics", *where, "--json").json["topics"]}
        assert {"openstack:svc", "openstack:svc@s1"} <= names
        run = cli("ping", "openstack:svc@s1", *where, "--json")
        assert run.code == 0 and run.json["consumers"][0]["pid"] == service.proc.pid, run
        run = cli("call", "openstack:svc", "echo", "--args", '{"value": [1, "x"]}', *where,
                  "--json")
        assert run.json["result"] == [1, "x"], run
        # oslo.messaging's own serialization of the failure, decoded.
        run = cli("call", "openstack:svc", "fail", "--args", '{"kind": "value", "text": "boom"}',
                  *where, "--json")
        assert run.code == Exit.REMOTE_ERROR, run
        error = run.json["error"]
        assert (error["remote_type"], error["message"]) == ("ValueError", "boom")
        assert "raise ValueError(text)" in error["remote_traceback"]
        run = cli("call", "openstack:svc", "describe", "--version", "3.0", "--namespace",
                  "admin", *where)
        assert run.code == Exit.VERSION, run
        assert cli("call", "openstack:svc", "describe", "--version", "2.0", "--namespace",
                   "admin", *where).out == '"admin"\n'
    finally:
        assert service.stop() == 0


def test_keygen_and_from_zero_to_an_encrypted_service(tmp_path):
    """keygen for a server and a client, the client's public key in the
    server's allow-list, a CURVE service, then the client's call goes
    through and a keyless or stranger's call is refused."""
    keys = tmp_path / "keys"
    keys.mkdir()
    made = {}
    for name in ("server", "client", "stranger"):
        run = cli("keygen", str(keys / name), "--json")
        assert run.code == 0, run
        made[name] = run.json
        assert os.stat(made[name]["secret_key_file"]).st_mode & 0o777 == 0o600
        assert os.stat(made[name]["public_key_file"]).st_mode & 0o777 == 0o644
        assert len(made[name]["public_key"]) == 40
    again = cli("keygen", str(keys / "server"))
    assert again.code == Exit.USAGE and "never overwritten" in again.err
    for nameless in ("", f"{keys}/"):
        run = cli("keygen", nameless)
        assert run.code == Exit.USAGE and "must name a file" in run.err
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.pub").write_text(open(made["client"]["public_key_file"]).read())
    svc = ServiceProcess("sec", tmp_path, options={
        "rpc_zmq_secret_key_file": made["server"]["secret_key_file"],
        "rpc_zmq_allowed_keys": str(allowed)})
    common = ("--ipc-dir", str(tmp_path), "-o", "rpc_zmq_connect_timeout=1")
    try:
        ok = cli("call", "svc", "whoami", *common,
                 "-o", f"rpc_zmq_secret_key_file={made['client']['secret_key_file']}", "--json")
        assert ok.code == 0 and ok.json["result"] == "sec", ok
        for key in (None, made["stranger"]["secret_key_file"]):
            extra = () if key is None else ("-o", f"rpc_zmq_secret_key_file={key}")
            refused = cli("call", "svc", "whoami", *common, *extra, "--timeout", "3")
            assert refused.code == Exit.TIMEOUT, refused
            assert "CURVE" in refused.err
    finally:
        assert svc.stop() == 0
