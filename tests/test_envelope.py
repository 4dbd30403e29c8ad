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
