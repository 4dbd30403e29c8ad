"""Write the committed seed inputs: `python -m tests.fuzz.seeds`.

Each seed is a well-formed (or nearly) input of its harness, so the fuzzer
starts from the shapes real traffic has instead of from nothing.
"""
import os

import msgpack

from nova_zmq_fast import _envelope_py as env

HERE = os.path.dirname(os.path.abspath(__file__))
K = env.KINDS
CTX = {"user_id": "u1", "project_id": "p1", "request_id": "req-42"}


def request(method, **args):
    return msgpack.packb([CTX, {"method": method, "args": args, "version": "1.0"}])


def server_input(*frames):
    return b"".join(len(f).to_bytes(2, "little") + f for f in frames)


def seeds():
    headers = [env.encode_header(K["CALL"], 0, 7, "compute"),
               env.encode_header(K["CAST"], 0, 0, "compute.host-1"),
               env.encode_header(K["CALL"], 1, 2**64 - 1, "fuzz"),
               env.encode_header(K["RESULT"], 0, 3, None),
               env.encode_header(K["NOTIFY"], 0, 0, "notifications.info")]
    bodies = [request("resize", instance_id=7, flavor="m1"), msgpack.packb(None),
              msgpack.packb({"a": [1, 2.5, b"\x00", "é", True, None, -1, 2**63]}),
              msgpack.packb([[[[{}]]]]), msgpack.packb("x" * 40),
              msgpack.packb({i: i for i in range(20)})]
    limit = (4096 - 1).to_bytes(2, "little")
    server = [
        server_input(env.encode_header(K["CALL"], 0, 1, "fuzz"), request("echo", value=1)),
        server_input(env.encode_header(K["CALL"], 1, 2, "fuzz"), request("stream", n=3)),
        server_input(env.encode_header(K["CALL"], 0, 3, "fuzz.fuzzhost"),
                     request("fail", text="no")),
        server_input(env.encode_header(K["CAST"], 0, 0, "fuzz"), request("record", key="k")),
        server_input(env.encode_header(K["FANOUT"], 0, 0, "fuzz"), request("record", key="f")),
        server_input(env.encode_header(K["NOTIFY"], 0, 0, "fuzz-raw"),
                     msgpack.packb([CTX, {"event_type": "x", "payload": {}}])),
        server_input(env.encode_header(K["CALL"], 0, 4, "elsewhere"), request("echo", value=2)),
        server_input(env.encode_header(K["CALL"], 0, 5, "fuzz"), b"\x92\x80"),
        server_input(b"\x02" + env.encode_header(K["CAST"], 0, 0, "fuzz")[1:], request("echo")),
        server_input(env.encode_header(K["CALL"], 0, 6, "fuzz")),
    ]
    return {"header": headers, "body": [limit + b for b in bodies], "server": server}


def main():
    for harness, inputs in seeds().items():
        folder = os.path.join(HERE, "corpus", harness, "seeds")
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        for i, data in enumerate(inputs):
            with open(os.path.join(folder, f"seed-{i:02d}"), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
