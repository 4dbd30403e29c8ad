"""Micro-benchmarks of the message path's pieces, each next to a pure-Python
equivalent in the same pytest-benchmark group.

    python -m pytest bench/test_micro.py --benchmark-json=bench/out/micro.json
"""
import msgpack
import pytest

from nova_zmq_fast import _envelope as c_env
from nova_zmq_fast import _envelope_py as py_env
from nova_zmq_fast._dispatch import consumer as make_consumer

CONTEXT = {"user_id": "u-6a3c1fd2", "project_id": "p-91d2e07b",
           "request_id": "req-3f1a9c2e-77b4-4d0e-9c1a-0b5e2f6d8a41"}
MESSAGE = {"method": "count", "args": {"n": 1}}
BODY = msgpack.packb([CONTEXT, MESSAGE])
CAST = py_env.KINDS["CAST"]
HEADER = py_env.encode_header(CAST, 0, 0, "compute.host-17")
IMPLS = [pytest.param(c_env, id="cython"), pytest.param(py_env, id="python")]


@pytest.mark.benchmark(group="header encode")
@pytest.mark.parametrize("env", IMPLS)
def test_header_encode(benchmark, env):
    assert benchmark(env.encode_header, CAST, 0, 7, "compute.host-17") == \
        py_env.encode_header(CAST, 0, 7, "compute.host-17")


@pytest.mark.benchmark(group="header decode")
@pytest.mark.parametrize("env", IMPLS)
def test_header_decode(benchmark, env):
    assert benchmark(env.decode_header, HEADER)[4] == "compute.host-17"


@pytest.mark.benchmark(group="body decode")
@pytest.mark.parametrize("env", IMPLS)
def test_body_decode(benchmark, env):
    assert benchmark(env.unpack_body, BODY) == [CONTEXT, MESSAGE]


class Api:
    def __init__(self):
        self.n = 0

    def count(self, ctxt, n):
        self.n += n


class PyContext:
    def __init__(self, values):
        self.__dict__["_values"] = values

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None


class PyConsumer:
    """What Consumer.invoke does, written in Python."""

    def __init__(self, proxy):
        self.proxy = proxy

    def handle(self, context, message):
        method = message.get("method")
        if not isinstance(method, str) or not method:
            raise ValueError("no method")
        args = message.get("args") or {}
        if not isinstance(args, dict):
            raise ValueError("bad args")
        target = getattr(self.proxy, method, None) if method[0] != "_" else None
        if target is None or not callable(target):
            raise AttributeError(method)
        return target(PyContext(context), **args)


@pytest.mark.benchmark(group="dispatch")
@pytest.mark.parametrize("make", [pytest.param(lambda p: make_consumer("t", False, p), id="cython"),
                                  pytest.param(PyConsumer, id="python")])
def test_dispatch(benchmark, make):
    api = Api()
    consumer = make(api)
    benchmark(consumer.handle, CONTEXT, MESSAGE)
    assert api.n > 0
