"""Bad input from the network is dropped and counted, and the node keeps
serving.  The bad messages come from an independent pyzmq peer process."""
import json
import subprocess
import sys
import random
import uuid

import msgpack
import pytest

from nova_zmq_fast import _envelope_py as env
from tests.conftest import ROOT, ServiceProcess

MAX = 4096
CTX = {"user_id": "u"}
K = env.KINDS


def send_raw(endpoint, messages, replies=0, timeout=5, lockstep=False):
    spec = {"endpoint": endpoint, "replies": replies, "timeout": timeout,
            "lockstep": lockstep,
            "messages": [[f.hex() for f in frames] for frames in messages]}
    out = subprocess.run([sys.executable, "-m", "tests.helpers.raw_peer"],
                         input=json.dumps(spec), cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    return [[bytes.fromhex(f) for f in reply] for reply in json.loads(out.stdout)]


def header(kind="CAST", topic="svc", msg_id=0, flags=0):
    return env.encode_header(K[kind], flags, msg_id, topic)


def body(method="record", **args):
    return msgpack.packb([CTX, {"method": method, "args": args}])


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    service = ServiceProcess("bad1", tmp_path_factory.mktemp("reg"),
                             options={"rpc_zmq_max_message_size": MAX})
    yield service
    assert service.stop() == 0


def ipc_of(service):
    options = service.proc.args[service.proc.args.index("--options") + 1]
    return json.loads(options)["rpc_zmq_ipc_dir"]


def stats_of(client, host="bad1"):
    return client.call(CTX, f"svc.{host}", {"method": "stats"})


@pytest.fixture
def bad_client(target):
    from nova_zmq_fast import rpc
    rpc.init(rpc_zmq_ipc_dir=ipc_of(target), rpc_zmq_host="client")
    yield rpc
    rpc.cleanup()
    rpc.init()


def delta(before, after):
    return {k: after[k] - before[k] for k in before
            if isinstance(before[k], int) and after[k] != before[k]}


def test_each_kind_of_bad_message_is_dropped_and_counted(target, bad_client):
    before = stats_of(bad_client)
    good = [header(), body(key="ok", value=1)]
    bad = [
        ([b"\xde\xad\xbe\xef"], "dropped_frame_count"),                  # one frame
        ([header(), body(), b"extra"], "dropped_frame_count"),           # three frames
        ([b"\x02" + header()[1:], body()], "dropped_version"),           # unknown version
        ([b"\x01\x01", body()], "dropped_bad_header"),                   # truncated header
        ([b"", b""], "dropped_bad_header"),                              # empty frames
        ([header()[:1] + b"\x63" + header()[2:], body()], "dropped_bad_header"),  # kind 99
        ([header() + b"junk", body()], "dropped_bad_header"),            # trailing bytes
        ([env.encode_header(K["RESULT"], 0, 1, None), body()], "dropped_bad_header"),
        ([header(), body()[:-3]], "dropped_bad_body"),                   # truncated msgpack
        ([header(), msgpack.packb(42)], "dropped_bad_body"),             # not [ctx, msg]
        ([header(), msgpack.packb([CTX])], "dropped_bad_body"),
        ([header(), b"\x91" * 5000], "dropped_oversize"),                # over MAX
        ([header(), b"\x91" * 3000], "dropped_bad_body"),                # nested too deep
        ([header(), b"\x92\x81\xa2\xff\xfe\x01\x80"], "dropped_bad_body"),   # invalid UTF-8 key
        ([header(), b"\x92\x81\x91\x01\x01\x80"], "dropped_bad_body"),       # unhashable key
        ([header(topic="not-served"), body()], "dropped_unknown_topic"),
        # Well-formed envelopes whose message cannot be dispatched: the
        # handler error is logged and counted.
        ([header(), msgpack.packb([CTX, {}])], "handler_errors"),        # no method
        ([header(), msgpack.packb([CTX, {"method": "record", "args": 5}])], "handler_errors"),
        ([header(), body(method="no_such_method")], "handler_errors"),
        ([header(), body(unexpected_arg=1)], "handler_errors"),
    ]
    messages = []
    for frames, _ in bad:
        messages += [frames, good]
    send_raw(target.address, messages)
    # The node still serves, and saw every good message in between.
    assert bad_client.call(CTX, "svc.bad1", {"method": "count", "args": {"key": "ok"}}) \
        == len(bad)
    after = stats_of(bad_client)
    expected = {}
    for _, counter in bad:
        expected[counter] = expected.get(counter, 0) + 1
    changes = delta(before, after)
    for counter, n in expected.items():
        assert changes.get(counter) == n, (counter, changes)
    # Every message was received; nothing else was counted as dropped.
    assert changes["received"] >= 2 * len(bad)
    assert {k for k in changes if k.startswith("dropped")} == \
        {k for k in expected if k.startswith("dropped")}


def test_a_call_with_a_bad_body_or_topic_gets_a_failure_at_once(target):
    replies = send_raw(target.address, [
        [header("CALL", msg_id=7), body()[:-2]],
        [header("CALL", topic="not-served", msg_id=8), body()],
        [header("CALL", msg_id=9), b"\x91" * (MAX + 1)],
    ], replies=3)
    assert len(replies) == 3
    found = {}
    for head, payload in replies:
        version, kind, _, msg_id, topic = env.decode_header(head)
        found[msg_id] = (kind, env.unpack_body(payload))
    assert found[7][0] == K["FAILURE"] and found[7][1][1] == "MalformedEnvelope"
    # A topic not served here: REFUSED, so the caller may try another server.
    assert found[8][0] == K["REFUSED"] and "not-served" in found[8][1]
    assert found[9][0] == K["FAILURE"] and found[9][1][1] == "MessageTooLarge"


def test_a_frame_far_over_the_limit_drops_only_that_sender(target, bad_client):
    # Beyond twice the limit libzmq itself refuses the frame and drops the
    # sender's connection; other peers are unaffected.
    send_raw(target.address, [[header(), b"\x00" * (2 * MAX + 70000)]])
    assert bad_client.call(CTX, "svc.bad1", {"method": "echo", "args": {"value": 3}}) == 3


def test_a_reply_over_the_limit_fails_the_call_at_once(target, bad_client):
    """The server sends no reply its own limit forbids: the caller gets
    MessageTooLarge instead, not its timeout; a stream's values stop
    there, and it ends with that failure."""
    before = stats_of(bad_client)
    blobs = {"method": "blobs", "args": {"sizes": [10, MAX + 100, 10]}}
    with pytest.raises(bad_client.MessageTooLarge, match=f"rpc_zmq_max_message_size is {MAX}"):
        bad_client.call(CTX, "svc.bad1", dict(blobs, args={"sizes": [MAX + 100]}), timeout=30)
    got = []
    with pytest.raises(bad_client.MessageTooLarge, match=f"rpc_zmq_max_message_size is {MAX}"):
        for value in bad_client.multicall(CTX, "svc.bad1", blobs, timeout=30):
            got.append(value)
    assert got == [b"x" * 10]
    changed = delta(before, stats_of(bad_client))
    assert changed["replies_too_large"] == 2 and changed["streams_truncated"] == 1, changed
    # Sent: the call's failure, the first value, the stream's failure, and
    # the two stats() answers (each counted once it has left).
    assert changed["replies"] == 4, changed
    assert bad_client.call(CTX, "svc.bad1", {"method": "echo", "args": {"value": 3}}) == 3


def test_a_reply_over_the_callers_own_limit_is_refused_by_name(target, bad_client):
    """A caller whose limit is lower than the server's refuses a reply over
    it as MessageTooLarge (not a malformed reply)."""
    bad_client.init(rpc_zmq_ipc_dir=ipc_of(target), rpc_zmq_host="client",
                    rpc_zmq_max_message_size=MAX // 2)
    call = {"method": "blobs", "args": {"sizes": [MAX // 2 + 100]}}
    with pytest.raises(bad_client.MessageTooLarge,
                       match=f"the reply is .* rpc_zmq_max_message_size is {MAX // 2}$"):
        bad_client.call(CTX, "svc.bad1", call, timeout=30)
    assert bad_client.call(CTX, "svc.bad1", {"method": "echo", "args": {"value": 3}}) == 3


def test_an_at_least_once_cast_runs_once_however_it_arrives(target, bad_client):
    """A server runs an at-least-once cast once however often it is sent,
    on the same connection or another (a reconnect: what was queued on the
    old one arrives under another routing id), and acknowledges each copy:
    its id alone is the key."""
    key = uuid.uuid4().hex
    msg_id = random.getrandbits(63)         # the module's server outlives this test
    cast = [header("CAST", msg_id=msg_id, flags=env.FLAG_ACK_CAST),
            body("record", key=key, value=1)]
    before = stats_of(bad_client)
    acks = send_raw(target.address, [cast, cast], lockstep=True)
    acks += send_raw(target.address, [cast], lockstep=True)
    assert [env.decode_header(a[0])[1:4] for a in acks] == [(K["ACK"], 0, msg_id)] * 3
    assert bad_client.call(CTX, "svc.bad1", {"method": "records_for",
                                              "args": {"key": key}}) == [1]
    changed = delta(before, stats_of(bad_client))
    assert changed["duplicates"] == 2 and changed["acks"] == 1, changed
