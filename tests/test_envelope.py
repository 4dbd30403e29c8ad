"""The envelope codec: the Cython implementation and its pure-Python twin
must agree on every input, valid or not."""
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from nova_zmq_fast import _envelope as c_env
from nova_zmq_fast import _envelope_py as py_env
from nova_zmq_fast.exceptions import MalformedEnvelope

IMPLS = [pytest.param(c_env, id="cython"), pytest.param(py_env, id="python")]
KINDS = sorted(py_env.KINDS.values())
REQUESTS = [py_env.KINDS[k] for k in ("CAST", "CALL", "FANOUT", "NOTIFY")]
topics = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc"),
                               blacklist_characters="/\\"), min_size=1, max_size=60) \
    .filter(lambda t: t not in (".", "..") and len(t.encode()) <= 255)


def outcome(fn, *args):
    """What a call gave: ("ok", value), ("malformed", message) or an error
    type; the same inputs must give the same outcome in both codecs."""
    try:
        return ("ok", fn(*args))
    except MalformedEnvelope as exc:
        return ("malformed", str(exc))
    except (TypeError, ValueError) as exc:
        return (type(exc).__name__, None)


def test_same_constants():
    assert c_env.KINDS == py_env.KINDS
    assert c_env.ENVELOPE_VERSION == py_env.ENVELOPE_VERSION == 1
    assert c_env.FLAG_MULTI_CALL == py_env.FLAG_MULTI_CALL
    assert c_env.BODY_LIMITS == py_env.BODY_LIMITS


def test_the_default_limit_is_the_options_default():
    from nova_zmq_fast.options import Options
    assert c_env.BODY_LIMITS["max_message_default"] == Options.from_conf().rpc_zmq_max_message_size


@pytest.mark.parametrize("env", IMPLS)
def test_known_header_bytes(env):
    raw = env.encode_header(py_env.KINDS["CALL"], 1, 0x0102030405060708, "compute")
    assert raw == bytes([1, 2, 1, 0, 8, 7, 6, 5, 4, 3, 2, 1, 7]) + b"compute"
    assert env.decode_header(raw) == (1, 2, 1, 0x0102030405060708, "compute")
    assert env.decode_header(env.encode_header(16, 0, 5, None)) == (1, 16, 0, 5, "")


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(KINDS), flags=st.integers(0, 0xFFFF),
       msg_id=st.integers(0, 2**64 - 1), topic=topics)
def test_headers_round_trip_identically(kind, flags, msg_id, topic):
    raw = c_env.encode_header(kind, flags, msg_id, topic)
    assert raw == py_env.encode_header(kind, flags, msg_id, topic)
    assert c_env.decode_header(raw) == py_env.decode_header(raw) == \
        (1, kind, flags, msg_id, topic)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_the_same_way(data):
    assert outcome(c_env.decode_header, data) == outcome(py_env.decode_header, data)


@settings(max_examples=500, deadline=None)
@given(kind=st.sampled_from(KINDS), topic=topics, cut=st.integers(0, 300),
       flip=st.integers(0, 300), byte=st.integers(0, 255))
def test_mutated_headers_decode_the_same_way(kind, topic, cut, flip, byte):
    raw = bytearray(py_env.encode_header(kind, 0, 1, topic))
    if flip < len(raw):
        raw[flip] = byte
    raw = bytes(raw[:cut])
    assert outcome(c_env.decode_header, raw) == outcome(py_env.decode_header, raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_unpack_the_same_way(data):
    assert outcome(c_env.unpack_body, data) == outcome(py_env.unpack_body, data)


# Bodies built from msgpack's own building blocks, so that most of them
# are well-formed up to a point and the limits, not the first byte, decide.
_pieces = st.sampled_from([
    b"\xc0", b"\x01", b"\xe0", b"\xcd\x01\x01", b"\xca\0\0\0\0", b"\xa2ab", b"\xc4\x01x",
    b"\xd4\x01\x00", b"\x80", b"\x90", b"\x81", b"\x91", b"\x92", b"\x8f", b"\x9f",
    b"\xdc\x00\x03", b"\xde\x00\x02", b"\xdd\x00\x00\x01\x00", b"\xd9\x05hello",
    b"\xc1", b"\xa3\xe2\x82\xac", b"\xdb\xff\xff\xff\xff", b"\xc7\x01\x05x",
    b"\xd6\xff\0\0\0\0"])


@settings(max_examples=1000, deadline=None)
@given(st.lists(_pieces, max_size=300).map(b"".join), st.integers(1, 4096))
def test_structured_bodies_meet_the_limits_the_same_way(data, limit):
    assert outcome(c_env.unpack_body, data, limit) == outcome(py_env.unpack_body, data, limit)
    assert outcome(c_env.check_body_limits, data, limit) == \
        outcome(py_env.check_body_limits, data, limit)


@pytest.mark.parametrize("env", IMPLS)
def test_nesting_is_bounded(env):
    depth = env.BODY_LIMITS["max_depth"]
    assert env.unpack_body(b"\x91" * (depth - 1) + b"\x90") == \
        eval("[" * depth + "]" * depth)
    for too_deep in (b"\x91" * depth + b"\x90", b"\x91" * 3000 + b"\xc0"):
        with pytest.raises(MalformedEnvelope, match=f"deeper than {depth}"):
            env.unpack_body(too_deep)


@pytest.mark.parametrize("env", IMPLS)
@pytest.mark.parametrize("body", [
    b"\xdd\x7f\xff\xff\xff" + b"\xc0" * 10,        # an array longer than the body
    b"\xdf\x00\x00\x00\x06" + b"\xc0" * 11,        # a map of 6 needs 12 items
    b"\xdb\x00\x00\x01\x00" + b"x" * 255,           # a string one byte short
    b"\x92\xc0", b"\xcd\x01", b"\xc5\x01",
])
def test_a_length_past_the_end_is_refused_before_decoding(env, body):
    with pytest.raises(MalformedEnvelope, match="runs past the end"):
        env.check_body_limits(body)
    with pytest.raises(MalformedEnvelope):
        env.unpack_body(body)


@pytest.mark.parametrize("env", IMPLS)
@pytest.mark.parametrize("body", [b"\xd4\x01\x00", b"\xd6\xff\0\0\0\0", b"\xc7\x01\x05x",
                                  b"\x91\xd8\x01" + bytes(16), b"\xc1"])
def test_extension_types_are_refused(env, body):
    # The packer never writes them; refusing them keeps ExtType and
    # Timestamp objects (slow to build) out of reach of a peer.
    with pytest.raises(MalformedEnvelope, match="extension type"):
        env.unpack_body(body)


@pytest.mark.parametrize("env", IMPLS)
def test_a_body_over_the_limit_is_refused(env):
    with pytest.raises(MalformedEnvelope, match="exceeds the limit of 10"):
        env.unpack_body(msgpack.packb("x" * 20), 10)
    assert env.unpack_body(msgpack.packb("x" * 20), 22) == "x" * 20


@pytest.mark.parametrize("env", IMPLS)
def test_a_body_that_would_balloon_is_refused(env):
    limits = env.BODY_LIMITS
    limit = 2 * limits["budget_floor"]
    budget = limit * limits["decoded_per_byte"]
    n = limit - 5
    for item in (b"\x80", b"\x90", b"\x81\xc0\xc0"):
        count = n // len(item)
        with pytest.raises(MalformedEnvelope, match=f"more than {budget} bytes"):
            env.check_body_limits(b"\xdd" + count.to_bytes(4, "big") + item * count, limit)
    # The densest structure there is, a flat array of nil, still passes.
    assert env.check_body_limits(b"\xdd" + n.to_bytes(4, "big") + b"\xc0" * n, limit) == budget


@pytest.mark.parametrize("name", ["instances", "host stats by node", "console log",
                                  "image bytes", "instance ids"])
def test_realistic_payloads_up_to_the_default_size_pass(name):
    from tests.helpers.nova_payloads import payloads
    limit = c_env.BODY_LIMITS["max_message_default"]
    body = payloads(limit, [name])[name]
    assert limit - 512 * 1024 < len(body) <= limit
    c_env.check_body_limits(body)
    py_env.check_body_limits(body)


@pytest.mark.parametrize("name", ["array of empty maps", "array of {nil: nil}",
                                  "map of uint32 -> nil", "array of 2-byte str"])
def test_the_worst_bodies_stay_within_the_budget(name):
    """Peak RSS of a process decoding the costliest body the limits let
    through stays within the decoding budget plus the body's own copy."""
    from tests.fuzz.amplification import measure
    limit = 2 << 20
    r = measure(name, limit)
    assert r["outcome"] == "decoded", r
    budget = limit * c_env.BODY_LIMITS["decoded_per_byte"]
    assert r["growth"] <= budget + r["size"] + (4 << 20), r


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_like)
def test_bodies_round_trip(value):
    packed = c_env.pack_body(value)
    assert packed == py_env.pack_body(value)
    assert c_env.unpack_body(packed) == value


@pytest.mark.parametrize("env", IMPLS)
@pytest.mark.parametrize("topic,error", [("", ValueError), ("a/b", ValueError),
                                         ("x" * 256, ValueError), (b"t", TypeError)])
def test_bad_topics(env, topic, error):
    with pytest.raises(error):
        env.encode_header(1, 0, 0, topic)


@pytest.mark.parametrize("env", IMPLS)
def test_requests_need_a_topic_and_replies_have_none(env):
    no_topic = bytes([1, 1, 0, 0]) + bytes(8) + b"\0"
    with pytest.raises(MalformedEnvelope, match="topic"):
        env.decode_header(no_topic)
    with pytest.raises(MalformedEnvelope, match="version"):
        env.decode_header(b"\x02" + no_topic[1:])


def test_the_package_never_imports_pickle():
    """The wire format is msgpack; no module of the package imports pickle
    (or marshal/shelve), so nothing received can ever be unpickled."""
    import ast
    import pathlib
    import re

    banned = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill"}
    pkg = pathlib.Path(c_env.__file__).parent
    for source in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & banned, (source, names)
    for source in pkg.rglob("*.pyx"):
        for line in source.read_text().splitlines():
            match = re.match(r"\s*(?:c?import|from)\s+(\w+)", line)
            assert not (match and match.group(1) in banned), (source, line)
    assert msgpack.packb([1]) == c_env.pack_body([1])
