"""Scenarios for an event loop that leads its process's server (an
eventlet hub: _handoff.GreenHandoff; an asyncio loop: aio._LoopHandoff),
run in a process of their own (monkey-patched for eventlet):

    python -m tests.helpers.leaders eventlet|asyncio linger0 IPC_DIR
    python -m tests.helpers.leaders eventlet parked-owner IPC_DIR TRIALS

Prints one JSON line of results.
"""
import sys

MODEL = sys.argv[1]
if MODEL == "eventlet":
    import eventlet
    eventlet.monkey_patch()
    from eventlet.hubs import trampoline

import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from nova_zmq_fast import rpc  # noqa: E402

CTX = {"user_id": "u"}
ROUNDS = 10


def msg(method, **args):
    return {"method": method, "args": args}


class Echo:
    def echo(self, ctxt, v):
        return v


def linger0(ipc_dir):
    """Connections closed with no linger left, so that stop() closes the
    sockets without a leader reading its STOP: each round's server must
    be led by the loop again, and answer."""
    rpc.init(rpc_zmq_ipc_dir=ipc_dir, rpc_zmq_host="g", rpc_zmq_linger=0,
             rpc_thread_pool_size=4)
    if MODEL == "asyncio":
        return asyncio.run(linger0_async())
    answers = []
    for i in range(ROUNDS):
        conn = rpc.create_connection()
        conn.create_consumer("linger0", Echo())
        conn.consume_in_thread()
        answers.append(outcome(lambda: rpc.call(CTX, "linger0", msg("echo", v=i), timeout=3)))
        conn.close()
    rpc.cleanup()
    return {"answers": answers}


async def linger0_async():
    from nova_zmq_fast import aio
    answers = []
    for i in range(ROUNDS):
        conn = aio.create_connection()
        conn.create_consumer("linger0", Echo())
        conn.consume_in_thread()
        try:
            answers.append(await aio.call(CTX, "linger0", msg("echo", v=i), timeout=3))
        except Exception as exc:
            answers.append(f"{type(exc).__name__}: {exc}")
        await conn.close()
    await aio.cleanup()
    return {"answers": answers}


def outcome(call):
    try:
        return call()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def parked_owner(ipc_dir, trials):
    """The leader owning the socket's fd parks in a handler (a nested call
    into this process) while, in the same hub turn, another leader wakes
    and runs a handler that returns: the socket must still be read, so the
    nested call is answered and a later cast is handled at once."""
    rpc.init(rpc_zmq_ipc_dir=ipc_dir, rpc_zmq_host="g", rpc_thread_pool_size=4,
             rpc_zmq_linger=1)
    raw_os = eventlet.patcher.original("os")
    raw_time = eventlet.patcher.original("time")
    pipe = raw_os.pipe()
    seen = {}
    nested = []

    class Service(Echo):
        def wait_pipe(self, ctxt):
            trampoline(pipe[0], read=True)
            raw_os.read(pipe[0], 1)

        def nest(self, ctxt, timeout):
            try:
                rpc.call(CTX, "parked", msg("echo", v=1), timeout=timeout)
                nested.append("ok")
            except Exception as exc:
                nested.append(type(exc).__name__)

        def mark(self, ctxt, key):
            seen[key] = time.monotonic()

    conn = rpc.create_connection()
    conn.create_consumer("parked", Service())
    conn.consume_in_thread()
    late = []
    for i in range(trials):
        rpc.call(CTX, "parked", msg("echo", v=0))
        rpc.cast(CTX, "parked", msg("wait_pipe"))
        eventlet.sleep(0.05)            # a leader parks on the pipe; another owns the fd
        raw_os.write(pipe[1], b"x")     # the parked one wakes ...
        rpc.cast(CTX, "parked", msg("nest", timeout=2.0))
        rpc.cast(CTX, "parked", msg("mark", key=f"a{i}"))
        raw_time.sleep(0.05)            # ... in the hub turn that sees the casts too
        eventlet.sleep(0.1)
        sent = time.monotonic()
        rpc.cast(CTX, "parked", msg("mark", key=f"b{i}"))
        while f"b{i}" not in seen and time.monotonic() - sent < 3:
            eventlet.sleep(0.005)
        late.append(round(seen.get(f"b{i}", float("inf")) - sent, 3))
        while len(nested) <= i and time.monotonic() - sent < 4:
            eventlet.sleep(0.01)
    conn.close()
    rpc.cleanup()
    return {"nested": nested, "cast_latency": late}


if __name__ == "__main__":
    scenario, ipc_dir = sys.argv[2], sys.argv[3]
    if scenario == "linger0":
        result = linger0(ipc_dir)
    else:
        result = parked_owner(ipc_dir, int(sys.argv[4]))
    print(json.dumps(result), flush=True)
