"""Fuzz harness: the envelope header decoder.

The Cython decoder and the pure-Python twin must agree on every input:
the same tuple, or both MalformedEnvelope with the same reason.  A header
that decodes must encode back to the same bytes.  Run by tests/fuzz/run.py.
"""
import sys

import atheris

with atheris.instrument_imports():
    from nova_zmq_fast import _envelope as c_env
    from nova_zmq_fast import _envelope_py as py_env
    from nova_zmq_fast.exceptions import MalformedEnvelope


def outcome(fn, data):
    try:
        return ("ok", fn(data))
    except MalformedEnvelope as exc:
        return ("malformed", str(exc))


def test_one_input(data):
    got = outcome(c_env.decode_header, data)
    want = outcome(py_env.decode_header, data)
    if got != want:
        raise AssertionError(f"codecs disagree on {data!r}: cython {got}, python {want}")
    if got[0] == "ok":
        _, kind, flags, msg_id, topic = got[1]
        try:
            again = c_env.encode_header(kind, flags, msg_id, topic or None)
        except ValueError:
            return                  # a topic the encoder refuses (e.g. "/")
        if again != data:
            raise AssertionError(f"{data!r} decodes to {got[1]} but encodes to {again!r}")


if __name__ == "__main__":
    assert "build/fuzz" in c_env.__file__, f"not the instrumented build: {c_env.__file__}"
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
