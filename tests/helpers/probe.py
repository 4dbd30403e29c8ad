"""Try to break a compiled module from Python: `python -m tests.helpers.probe
_server`.  Builds every class it exports in every way Python allows
(calling it, and __new__ without __init__, with a few kinds of argument,
alone and after a real libzmq context and allow-list), takes the live ones
a running runtime holds, calls every method of all these and every
function of the module with the same arguments, and prints how many calls
it made.  Exceptions are
expected; the process must not die of a signal (tests/test_hardening.py).
Run it in a scratch directory: some functions write files."""
import importlib
import sys

LONG = "x" * 300                    # longer than a topic may be
MSG = {"method": "m"}
ARGS = [(), (None,), (0,), (1,), (-1,), ("x",), (b"x",), (None, None), (1, 1), ([],), ({},),
        ("x", 1), ("x", None), ((),), (b"x" * 40,), ("tcp://127.0.0.1:1",), ([None],),
        ([None], 0.1), (LONG,), (LONG, "m", b"x"), (LONG, b"x"), ({}, LONG, MSG),
        ({}, "t", MSG, [None]), ({}, "t", MSG, float("inf")), ({}, "t", MSG, float("nan")),
        (None, "tcp://127.0.0.1:0", "h", "tcp://127.0.0.1:0", 1, 1, 1, 0, 0.1, 0.1, None,
         None, None, None)]
SKIP = {"__init_subclass__", "__subclasshook__", "__class__", "__delattr__", "__setattr__",
        "__getattribute__", "__reduce_ex__", "__dir__", "__format__", "__sizeof__",
        "__new__", "__init__", "__getstate__"}


def calls(function):
    made = 0
    for args in ARGS:
        try:
            result = function(*args)
            if hasattr(result, "__next__"):
                next(result, None)
        except BaseException:       # exceptions are fine; signals are not
            pass
        made += 1
    return made


def with_real_objects():
    """ARGS again, after the live objects constructors want first: a real
    context (its sockets are real), and an allow-list."""
    from nova_zmq_fast import _curve, _zmq
    ctx = _zmq.Context()
    allow = _curve.AllowList(None)
    return ([(ctx,) + args for args in ARGS]
            + [(ctx, allow, None), (ctx, allow, None, None), (ctx, 0, 1, False, (None, None)),
               (ctx, 0, 1, False, (b"x", b"y")), (ctx, 0, 1, False, (b"x" * 40, b"y" * 40))])


def live_objects(module):
    """The objects a running runtime holds (client, courier, route table,
    outbox, server...) that `module` defines: what no constructor call
    above can build, tried with the same arguments."""
    from nova_zmq_fast.options import Options
    from nova_zmq_fast.runtime import Runtime
    rt = Runtime(Options.from_conf(
        rpc_zmq_ipc_dir="registry", rpc_zmq_host="probe", rpc_zmq_linger=0.1,
        rpc_response_timeout=0.2, rpc_cast_timeout=0.2, rpc_zmq_connect_timeout=0.1))
    rt.serve()
    found = [rt.client, rt.courier, rt.routes, rt.client.new_outbox(), rt.server, rt.node]
    return [obj for obj in found if type(obj).__module__ == module.__name__]


def main():
    module = importlib.import_module("nova_zmq_fast." + sys.argv[1])
    made = 0
    live = live_objects(module)
    ARGS.extend(with_real_objects())
    for name, value in sorted(vars(module).items()):
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if not isinstance(value, type):
            if callable(value):
                made += calls(value)
            continue
        objects = [obj for obj in live if type(obj) is value]
        for args in ARGS:
            for make in (value, lambda *a: value.__new__(value, *a)):
                try:
                    objects.append(make(*args))
                except BaseException:
                    pass
        for obj in objects:
            for attr in dir(obj):
                if attr in SKIP:
                    continue
                try:
                    method = getattr(obj, attr)
                except BaseException:
                    continue
                if callable(method):
                    made += calls(method)
    print("calls", made, flush=True)


if __name__ == "__main__":
    main()
