"""Fuzz harness: the body decoder and its limits.

The first two bytes choose the node's maximum message size (up to 64 KiB,
so the limits are reached); the rest is the body.  The Cython codec and
the pure-Python twin must agree: the same value, or both refuse with the
same reason.  A value that decodes must survive a round trip through the
packer.  Run by tests/fuzz/run.py.
"""
import math
import sys

import atheris

with atheris.instrument_imports():
    from nova_zmq_fast import _envelope as c_env
    from nova_zmq_fast import _envelope_py as py_env
    from nova_zmq_fast.exceptions import MalformedEnvelope


def outcome(fn, data, limit):
    try:
        return ("ok", fn(data, limit))
    except MalformedEnvelope as exc:
        return ("malformed", str(exc))


def same(a, b):
    """Equality that treats NaN as equal to itself."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(k in b and same(v, b[k]) for k, v in a.items())
    return a == b


def test_one_input(data):
    limit = int.from_bytes(data[:2], "little") + 1 if len(data) >= 2 else 1
    body = data[2:]
    got = outcome(c_env.unpack_body, body, limit)
    want = outcome(py_env.unpack_body, body, limit)
    if got[0] != want[0] or (got[0] == "ok" and not same(got[1], want[1])) or \
            (got[0] == "malformed" and got[1] != want[1]):
        raise AssertionError(f"codecs disagree on {body!r} (limit {limit}): "
                             f"cython {got}, python {want}")
    if got[0] == "ok":
        again = c_env.unpack_body(c_env.pack_body(got[1]), 1 << 24)
        if not same(again, got[1]):
            raise AssertionError(f"{body!r} decodes to {got[1]!r} but round-trips to {again!r}")


if __name__ == "__main__":
    assert "build/fuzz" in c_env.__file__, f"not the instrumented build: {c_env.__file__}"
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
