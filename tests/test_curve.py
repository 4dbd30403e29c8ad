"""CURVE: encryption and authentication that fail closed.  Service
processes with their own keys, this test process as the client with its
own, real handshakes over loopback; a raw capture of the service's port
shows what crosses the wire."""
import contextlib
import ctypes
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from nova_zmq_fast import _curve, _zmq
from tests.conftest import ROOT, ServiceProcess, free_port, wait_until

CTX = {"user_id": "u"}
MARKER = "plain-text-marker-7f3a91"


def msg(method, **args):
    return {"method": method, "args": args}


@pytest.fixture
def keys(tmp_path):
    """Key pairs for a server, a client and a stranger, and an allow-list
    directory holding the client's public key."""
    made = {name: _curve.write_keypair(str(tmp_path / name))
            for name in ("server", "client", "stranger", "impostor")}
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(made["client"][1], allowed / "client.pub")
    made["allowed"] = str(allowed)
    return made


def secure_service(keys, ipc_dir, host="sec", topic="svc", **extra):
    return ServiceProcess(host, ipc_dir, topic=topic, options=dict(
        rpc_zmq_secret_key_file=keys["server"][0], rpc_zmq_allowed_keys=keys["allowed"],
        **extra))


def as_client(client, ipc_dir, key=None, **extra):
    options = dict(rpc_zmq_ipc_dir=str(ipc_dir), rpc_zmq_host="client",
                   rpc_zmq_connect_timeout=1, **extra)
    if key is not None:
        options["rpc_zmq_secret_key_file"] = key
    client.init(**options)


def port_filter(port):
    """A classic BPF program passing IPv4 TCP segments from or to `port`
    (what tcpdump compiles 'tcp port N' to, less IPv6): the kernel drops
    the rest of the loopback traffic before it can fill our buffer."""
    code = [(0x28, 0, 0, 12), (0x15, 0, 10, 0x0800),     # ethertype IPv4, else drop
            (0x30, 0, 0, 23), (0x15, 0, 8, 6),            # protocol TCP, else drop
            (0x28, 0, 0, 20), (0x45, 6, 0, 0x1FFF),       # a fragment: drop
            (0xB1, 0, 0, 14),                             # x = IP header length
            (0x48, 0, 0, 14), (0x15, 2, 0, port),         # source port
            (0x48, 0, 0, 16), (0x15, 0, 1, port),         # destination port
            (0x06, 0, 0, 0x40000), (0x06, 0, 0, 0)]       # accept / drop
    program = (ctypes.c_ubyte * (8 * len(code)))()
    ctypes.memmove(program, b"".join(struct.pack("=HBBI", *i) for i in code), 8 * len(code))
    return program, struct.pack("HxxxxxxP", len(code), ctypes.addressof(program))


class Capture:
    """Every TCP payload byte to or from `port` on the loopback interface,
    read with a raw socket (needs CAP_NET_RAW)."""

    SO_ATTACH_FILTER = 26

    def __init__(self, port):
        self.port = port
        self.data = bytearray()
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self._program, fprog = port_filter(port)            # kept alive while attached
        self.sock.setsockopt(socket.SOL_SOCKET, self.SO_ATTACH_FILTER, fprog)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self.stopping = False
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                frame = self.sock.recv(65536)
            except socket.timeout:
                continue
            if len(frame) < 34 or frame[12:14] != b"\x08\x00":     # IPv4 only
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 6:                                          # TCP
                continue
            tcp = ip[ihl:]
            sport, dport = struct.unpack("!HH", tcp[:4])
            if self.port in (sport, dport):
                self.data += tcp[(tcp[12] >> 4) * 4:]

    def stop(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()
        return bytes(self.data)


def captured_call(client, address):
    """A call carrying MARKER, captured on the service's port."""
    port = int(address.rsplit(":", 1)[1])
    capture = Capture(port)
    try:
        assert client.call(CTX, "svc", msg("echo", value=MARKER)) == MARKER
    finally:
        data = capture.stop()
    assert data, "the capture saw nothing: it cannot tell clear from encrypted"
    return data


def test_nothing_crosses_the_wire_in_clear_with_curve(keys, tmp_path, client):
    if os.geteuid() != 0:
        pytest.skip("capturing loopback traffic needs root (CAP_NET_RAW)")
    plain = ServiceProcess("plain", tmp_path / "plain", topic="svc")
    try:
        as_client(client, tmp_path / "plain")
        assert MARKER.encode() in captured_call(client, plain.address)   # the check can fail
    finally:
        assert plain.stop() == 0
    secure = secure_service(keys, tmp_path / "secure")
    try:
        as_client(client, tmp_path / "secure", keys["client"][0])
        data = captured_call(client, secure.address)
        assert MARKER.encode() not in data
        assert b"echo" not in data and b"user_id" not in data
    finally:
        assert secure.stop() == 0


def test_only_allowed_keys_are_served_and_the_rest_fail_closed(keys, ipc_dir, client):
    svc = secure_service(keys, ipc_dir)
    try:
        as_client(client, ipc_dir, keys["client"][0])
        assert client.call(CTX, "svc", msg("whoami")) == "sec"

        as_client(client, ipc_dir, keys["stranger"][0])
        with pytest.raises(client.PeerUnreachable, match="refused this process's CURVE key"):
            client.call(CTX, "svc", msg("whoami"), timeout=5)

        as_client(client, ipc_dir)                    # no key at all
        start = time.monotonic()
        with pytest.raises(client.PeerUnreachable, match="requires CURVE"):
            client.call(CTX, "svc", msg("whoami"), timeout=5)
        assert time.monotonic() - start < 1             # known at once: nothing to wait for

        # The server went on serving the allowed client throughout, and
        # counted what it refused.
        as_client(client, ipc_dir, keys["client"][0])
        assert client.call(CTX, "svc", msg("whoami")) == "sec"
        stats = client.call(CTX, "svc", msg("stats"))
        assert stats["curve_refused"] >= 1 and stats["curve_accepted"] >= 2
    finally:
        assert svc.stop() == 0


def test_a_raw_peer_without_curve_gets_nothing(keys, ipc_dir):
    """A plain ZeroMQ peer that knows the port and the envelope (as in
    docs/envelope.md) gets no answer: the handshake never completes."""
    svc = secure_service(keys, ipc_dir)
    try:
        from tests.test_bad_input import body, header, send_raw
        replies = send_raw(svc.address, [[header("CALL", msg_id=1), body("whoami")]],
                           replies=1, timeout=2)
        assert replies == []
    finally:
        assert svc.stop() == 0


CURVE_PEER = """
import sys, msgpack, zmq
from nova_zmq_fast import _envelope_py as env
endpoint, server_key, public, secret = sys.argv[1:]
ctx = zmq.Context()
peer = ctx.socket(zmq.DEALER)
peer.linger = 0
peer.curve_serverkey, peer.curve_publickey, peer.curve_secretkey = (
    server_key.encode(), public.encode(), secret.encode())
peer.connect(endpoint)
peer.send_multipart([env.encode_header(env.KINDS["CALL"], 0, 7, "svc"),
                     msgpack.packb([{}, {"method": "echo", "args": {"v": "in"}}])])
print("answered" if peer.poll(2000) else "nothing")
peer.close()
ctx.term()
"""


@contextlib.contextmanager
def bare_curve_server(keys):
    """A CURVE server on a context of its own, with no ZAP handler: the
    test gives it one.  Yields (context, server)."""
    from nova_zmq_fast import _server, _zmq
    from nova_zmq_fast.exceptions import serialize_remote_exception
    ctx = _zmq.Context()
    server = _server.serve(ctx, "tcp://127.0.0.1:0", "h", "tcp://127.0.0.1:0",
                           max_message_size=4096, serialize_failure=serialize_remote_exception,
                           curve_secret=_curve.load_secret_key(keys["server"][0]))
    try:
        server.add_consumer("svc", False, type("Api", (), {"echo": lambda self, c, v: v})(),
                            False, None)
        server.start()
        yield ctx, server
    finally:
        assert server.stop(2)
        ctx.term()


def peer_call(keys, server, name, wait=False):
    """A call from a pyzmq peer (a process of its own: one libzmq per
    process) with the key pair `name`: ["answered"] or ["nothing"].  With
    `wait`, the running process, not its answer."""
    secret = _curve.load_secret_key(keys["server"][0])
    mine = _curve.load_secret_key(keys[name][0])
    argv = [sys.executable, "-c", CURVE_PEER, server.bound, _curve.public_key(secret).decode(),
            _curve.public_key(mine).decode(), mine.decode()]
    if wait:
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    return out.stdout.split() or [out.stderr[-2000:]]


def zap_threads():
    # Started through unpatched("threading"): once eventlet was imported
    # here, that is a module of its own, whose threads only it lists.
    from nova_zmq_fast._green import unpatched
    return {t for module in (threading, unpatched("threading")) for t in module.enumerate()
            if t.name == "nova_zmq_fast-zap"}


def test_a_curve_server_without_its_zap_handler_refuses_everyone(keys):
    """Should the ZAP handler not run (not started yet, or already stopped
    while the socket is still open), a CURVE server refuses every
    handshake, even one with an allowed key: never "any key will do"."""
    from nova_zmq_fast import _server
    with bare_curve_server(keys) as (ctx, server):
        assert peer_call(keys, server, "client") == ["nothing"]        # an allowed key
        # The same peer, once a handler runs with an allow-list that has
        # its key: answered (so "nothing" above was the refusal).
        zap = _curve.Authenticator(ctx, _curve.AllowList(keys["allowed"]), _server.PEERS_LOG)
        zap.start()
        try:
            assert peer_call(keys, server, "client") == ["answered"]
        finally:
            zap.stop()


def test_a_zap_handler_that_fails_on_a_request_refuses_it_and_answers_the_next(keys):
    """Every CURVE handshake of a context waits for its ZAP handler: a
    request it fails on (here a logging filter raises, once) is refused,
    and the handler goes on to admit the next client."""
    from nova_zmq_fast.logs import RateLimitedLog

    class RaiseOnce(logging.Filter):
        fired = False

        def filter(self, record):
            if not self.fired:
                self.fired = True
                raise RuntimeError("a logging filter that raises")
            return True
    logger = logging.getLogger("tests.zap.fragile")
    fragile = RaiseOnce()
    logger.addFilter(fragile)
    try:
        with bare_curve_server(keys) as (ctx, server):
            zap = _curve.Authenticator(ctx, _curve.AllowList(keys["allowed"]),
                                       RateLimitedLog(logger))
            zap.start()
            try:
                assert peer_call(keys, server, "stranger") == ["nothing"]
                assert fragile.fired
                assert peer_call(keys, server, "client") == ["answered"]
            finally:
                zap.stop()
    finally:
        logger.removeFilter(fragile)


def test_the_zap_handler_ends_when_its_context_is_shut_down(keys):
    """After zmq_ctx_shutdown() (cleanup() ending what other threads wait
    on) no handshake is left to answer: the handler's thread ends, rather
    than spin on ETERM."""
    from nova_zmq_fast import _server, _zmq
    ctx = _zmq.Context()
    before = zap_threads()
    zap = _curve.Authenticator(ctx, _curve.AllowList(keys["allowed"]), _server.PEERS_LOG)
    zap.start()
    thread, = zap_threads() - before
    ctx.shutdown()
    thread.join(10)
    ended = not thread.is_alive()
    zap.stop()
    ctx.term()
    assert ended


def test_a_zap_handler_that_will_not_stop_keeps_its_socket_until_it_ends(keys, monkeypatch):
    """stop() while the handler is stuck (here a log handler that blocks):
    its socket stays open under it (closing it from another thread is a
    use after free in libzmq), and is closed once it has ended."""
    from nova_zmq_fast.logs import RateLimitedLog
    monkeypatch.setattr(_zmq, "STOP_WAIT", 0.5)
    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    blocked, release = threading.Event(), threading.Event()

    class Blocking(logging.Filter):
        def filter(self, record):
            blocked.set()
            release.wait(60)
            return True
    logger = logging.getLogger("tests.zap.blocking")
    blocking = Blocking()
    logger.addFilter(blocking)
    try:
        with bare_curve_server(keys) as (ctx, server):
            before = zap_threads()
            zap = _curve.Authenticator(ctx, _curve.AllowList(keys["allowed"]),
                                       RateLimitedLog(logger))
            zap.start()
            thread, = zap_threads() - before
            peer = peer_call(keys, server, "stranger", wait=True)   # refused: logged
            try:
                assert blocked.wait(30)
                open_sockets = ctx.sockets
                assert zap.stop() is False
                assert ctx.sockets == open_sockets
            finally:
                release.set()
                peer.wait(60)
            thread.join(10)
            assert not thread.is_alive() and errors == []
            del zap                         # its thread ended: it goes, with its socket
            assert ctx.sockets == open_sockets - 1
    finally:
        logger.removeFilter(blocking)


class RingListing:
    """A ring file listing one server for 'svc', on a free port, with a
    public key that publish() rewrites; start() runs a CURVE service
    there with the secret key of one of `keys`."""

    def __init__(self, keys, tmp_path):
        self.keys, self.tmp_path = keys, tmp_path
        self.port = free_port()
        self.ring = tmp_path / "ring.json"
        self.options = {"rpc_zmq_matchmaker": "ring", "matchmaker_ringfile": str(self.ring)}

    def publish(self, key):
        entry = {"host": f"127.0.0.1:{self.port}", "key": key}
        (self.tmp_path / "ring.new").write_text(json.dumps({"svc": [entry]}))
        os.replace(self.tmp_path / "ring.new", self.ring)

    def publish_key_of(self, name):
        with open(self.keys[name][1]) as f:
            self.publish(f.read().strip())

    def start(self, name):
        return ServiceProcess("127.0.0.1", self.tmp_path, options=dict(
            self.options, rpc_zmq_port=self.port, rpc_zmq_bind_address="127.0.0.1",
            rpc_zmq_secret_key_file=self.keys[name][0],
            rpc_zmq_allowed_keys=self.keys["allowed"]))


def test_an_impostor_at_the_address_is_refused(keys, tmp_path, client):
    """Discovery (a ring) names the server's key; a process with another
    key listening at that address fails the client's handshake."""
    listing = RingListing(keys, tmp_path)
    listing.publish_key_of("server")
    impostor = listing.start("impostor")
    try:
        client.init(rpc_zmq_host="client", rpc_zmq_connect_timeout=1,
                    rpc_zmq_secret_key_file=keys["client"][0], **listing.options)
        with pytest.raises(client.PeerUnreachable, match="CURVE handshake failed"):
            client.call(CTX, "svc", msg("whoami"), timeout=5)
    finally:
        assert impostor.stop() == 0


def test_a_key_withdrawn_from_discovery_is_not_trusted_on_open_connections(
        keys, tmp_path, client):
    """The connection a client holds was authenticated with the key
    discovery gave then.  When discovery publishes another key for that
    address (the old one withdrawn), the client hangs up and dials with
    the new one, which the server at that address cannot answer to."""
    listing = RingListing(keys, tmp_path)
    listing.publish_key_of("server")
    svc = listing.start("server")
    try:
        client.init(rpc_zmq_host="client", rpc_zmq_connect_timeout=1,
                    rpc_zmq_secret_key_file=keys["client"][0], **listing.options)
        assert client.call(CTX, "svc", msg("whoami"), timeout=5) == "127.0.0.1"
        listing.publish_key_of("impostor")
        assert wait_until(lambda: _unreachable(client, "CURVE handshake failed"), 15)
        # A key that is not Z85 is refused before anything is dialled.
        listing.publish("~" * 40)
        assert wait_until(lambda: _unreachable(client, "malformed CURVE key"), 15)
    finally:
        assert svc.stop() == 0


def _unreachable(client, why):
    try:
        client.call(CTX, "svc", msg("whoami"), timeout=2)
    except client.PeerUnreachable as exc:
        return why in str(exc)
    except client.Timeout:
        pass
    return False


def test_curve_with_redis_discovery(keys, redis_server, tmp_path, client):
    """The server's public key travels with its address through Redis: a
    CURVE client dials only with the key discovery gave it, so the call
    going through shows the key arrived; a client without CURVE is told
    why it cannot reach it."""
    common = dict(redis_server.options, rpc_zmq_bind_address="127.0.0.1")
    svc = ServiceProcess("sec-redis", tmp_path, options=dict(
        common, rpc_zmq_secret_key_file=keys["server"][0],
        rpc_zmq_allowed_keys=keys["allowed"]))
    try:
        client.init(rpc_zmq_host="client", rpc_zmq_connect_timeout=1,
                    rpc_zmq_secret_key_file=keys["client"][0], **common)
        assert client.call(CTX, "svc", msg("whoami")) == "sec-redis"
        client.init(rpc_zmq_host="client", rpc_zmq_connect_timeout=1, **common)
        # Redis says the server requires CURVE: a keyless client does not
        # even try.
        with pytest.raises(client.PeerUnreachable, match="requires CURVE"):
            client.call(CTX, "svc", msg("whoami"), timeout=3)
    finally:
        assert svc.stop() == 0


def test_keys_added_and_revoked_without_a_restart(keys, ipc_dir, client):
    allowed = keys["allowed"]
    os.unlink(os.path.join(allowed, "client.pub"))          # nobody allowed yet
    # An operator's key stays allowed throughout, to read the server's counters.
    shutil.copy(keys["stranger"][1], os.path.join(allowed, "operator.pub"))
    svc = secure_service(keys, ipc_dir)
    try:
        # What the server drops once the key is revoked is never confirmed:
        # the next init's cleanup() waits out the linger for it, a short one.
        as_client(client, ipc_dir, keys["client"][0], rpc_zmq_linger=0.5)
        with pytest.raises(client.PeerUnreachable):
            client.call(CTX, "svc", msg("whoami"), timeout=3)
        # The same process, refused a moment ago, is served once its key
        # is added: nothing is restarted or re-initialised.
        shutil.copy(keys["client"][1], os.path.join(allowed, "client.pub"))

        revoked = []

        def answers():
            try:
                return client.call(CTX, "svc", msg("whoami"), timeout=2) == "sec"
            except client.KeyRevoked as exc:
                revoked.append(str(exc))
                return False
            except client.Timeout:
                return False
        assert wait_until(answers, 15)                       # added: served, no restart
        before = client.call(CTX, "svc", msg("stats"))["dropped_revoked"]

        os.unlink(os.path.join(allowed, "client.pub"))      # revoked
        # Even the connection already open is cut off: its messages are
        # dropped (and counted) once the server has re-read the list, and
        # a call is told why at once, not at its timeout.
        assert wait_until(lambda: not answers(), 15)
        assert revoked and "CURVE key out of its allow-list" in revoked[-1], revoked
        # Its probes go unanswered: the server is passed over (for any
        # other that still accepts the key).
        assert wait_until(lambda: client.stats()["client"]["peers_down"] == [svc.address], 15)
        # A new process with that key is refused at the handshake.
        as_client(client, ipc_dir, keys["client"][0])
        with pytest.raises(client.PeerUnreachable, match="refused"):
            client.call(CTX, "svc", msg("whoami"), timeout=3)
        # What the open connection sent after the revocation was counted.
        as_client(client, ipc_dir, keys["stranger"][0])
        assert client.call(CTX, "svc", msg("stats"))["dropped_revoked"] > before
    finally:
        assert svc.stop() == 0
    assert before == 0


def test_the_allow_list_fails_closed_however_it_is_edited(keys, tmp_path, caplog):
    """Whatever an operator does to the files, a key stays allowed only
    while a well-formed line of a `.pub` file lists it."""
    pub = {name: open(keys[name][1], "rb").read().strip() for name in ("client", "stranger")}
    allowed = keys["allowed"]
    shutil.copy(keys["stranger"][1], os.path.join(allowed, "operator.pub"))
    allow = _curve.AllowList(allowed)
    assert allow.keys == {pub["client"], pub["stranger"]}

    def reread():
        allow.reload()
        return allow.keys

    # Renamed away from .pub: revoked, and other files are not keys.
    os.rename(os.path.join(allowed, "client.pub"), os.path.join(allowed, "client.pub.revoked"))
    with open(os.path.join(allowed, "README"), "w") as f:
        f.write("the keys of the api nodes\n")
    assert reread() == {pub["stranger"]} and allow.revoked_keys == {pub["client"]}

    # A malformed line is skipped, logged once however often the list is
    # read, and never keeps a removed key alive; a trailing comment is fine.
    with caplog.at_level("ERROR", logger="nova_zmq_fast.curve"):
        with open(os.path.join(allowed, "operator.pub"), "wb") as f:
            f.write(pub["stranger"] + b"  # ops team\nnot a key at all\n")
        for _ in range(3):
            assert reread() == {pub["stranger"]}
    assert [r.getMessage() for r in caplog.records].count(
        f"allow-list: {allowed}/operator.pub:2: b'not a key at all' is not a Z85 CURVE key") == 1

    # Opened to others: ignored, so nobody is allowed through it.
    os.chmod(os.path.join(allowed, "operator.pub"), 0o666)
    assert reread() == set()
    os.chmod(os.path.join(allowed, "operator.pub"), 0o644)
    assert reread() == {pub["stranger"]}
    os.chmod(allowed, 0o777)
    assert reread() == set()
    os.chmod(allowed, 0o755)
    assert reread() == {pub["stranger"]}
    # A FIFO named like a key file is never opened for a blocking read (it
    # would stall the ZAP handler): skipped.
    os.mkfifo(os.path.join(allowed, "pipe.pub"))
    assert reread() == {pub["stranger"]}
    os.unlink(os.path.join(allowed, "pipe.pub"))
    # A revoked key listed again is allowed again.
    os.rename(os.path.join(allowed, "client.pub.revoked"), os.path.join(allowed, "client.pub"))
    assert reread() == {pub["client"], pub["stranger"]} and allow.revoked_keys == set()
    shutil.rmtree(allowed)
    assert reread() == set()

    # At start the same problems are errors the operator sees at once.
    os.mkdir(allowed)
    with open(os.path.join(allowed, "bad.pub"), "w") as f:
        f.write("x" * 41 + "\n")
    with pytest.raises(ValueError, match="bad.pub:1: .* is not a Z85 CURVE key"):
        _curve.AllowList(allowed)
    os.unlink(os.path.join(allowed, "bad.pub"))
    os.chmod(allowed, 0o777)
    with pytest.raises(ValueError, match="writable by others"):
        _curve.AllowList(allowed)
    with pytest.raises(ValueError, match="No such file"):
        _curve.AllowList(str(tmp_path / "nowhere"))


def test_secret_keys_others_can_read_are_refused(keys, ipc_dir):
    from nova_zmq_fast import rpc
    os.chmod(keys["client"][0], 0o644)
    with pytest.raises(ValueError, match="readable by others"):
        rpc.init(rpc_zmq_ipc_dir=str(ipc_dir), rpc_zmq_secret_key_file=keys["client"][0])
    for bad in (b"~" * 40, b"x" * 39, b""):          # not Z85, too short, empty
        with pytest.raises(ValueError, match="not a Z85 CURVE key"):
            _curve.public_key(bad)
    with pytest.raises(ValueError):
        rpc.init(rpc_zmq_secret_key_file=str(ipc_dir / "missing.key"))


def test_curve_is_refused_where_libzmq_cannot_do_it_safely(monkeypatch):
    monkeypatch.setattr(_curve, "libzmq_version", lambda: (4, 3, 2))
    assert "older than 4.3.3" in _curve.unavailable_reason()
    monkeypatch.undo()
    assert _curve.unavailable_reason() is None


def test_plaintext_on_a_network_address_is_warned_about_once(tmp_path):
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stdout)\n"
        "from nova_zmq_fast import rpc\n"
        f"rpc.init(rpc_zmq_ipc_dir={str(tmp_path)!r}, rpc_zmq_bind_address='0.0.0.0')\n"
        "for i in range(2):\n"
        "    c = rpc.create_connection(); c.create_consumer('t', lambda x, m: None)\n"
        "    c.consume_in_thread(); c.close()\n"
        "rpc.cleanup()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("without CURVE") == 1, out.stdout


OSLO_OVER_CURVE = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import oslo_messaging as messaging
from oslo_config import cfg
cfg.CONF([], project="nzf-test")
url, key = sys.argv[1], sys.argv[2]
if key:
    url += "&rpc_zmq_secret_key_file=" + key
transport = messaging.get_rpc_transport(cfg.CONF, url=url)
client = messaging.get_rpc_client(transport, messaging.Target(topic="svc"), timeout=5)
try:
    print(client.call({}, "whoami"))
except messaging.MessagingException as exc:
    print(type(exc).__name__)
transport.cleanup()
"""


def test_oslo_messaging_over_curve(keys, tmp_path):
    query = (f"?rpc_zmq_ipc_dir={tmp_path}&rpc_zmq_secret_key_file={keys['server'][0]}"
             f"&rpc_zmq_allowed_keys={keys['allowed']}")
    server = subprocess.Popen([sys.executable, "-m", "tests.helpers.oslo_service", "rpc",
                               "--name", "o1", "--url", f"zmqfast://{query}"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "READY"
        client_url = f"zmqfast://?rpc_zmq_ipc_dir={tmp_path}&rpc_zmq_connect_timeout=1"
        for key, expected in ((keys["client"][0], "o1"), (keys["stranger"][0], "MessagingTimeout"),
                              ("", "MessagingTimeout")):
            out = subprocess.run([sys.executable, "-c", OSLO_OVER_CURVE, client_url, key],
                                 cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert out.stdout.strip() == expected, out.stderr[-2000:]
    finally:
        server.terminate()
        assert server.wait(15) == 0
        server.stdin.close()
        server.stdout.close()
