"""A peer that accepts connections and never reads: `python -m
tests.helpers.sink <address>`.  It announces `address` as its routing id,
like a nova_zmq_fast server, prints READY and sleeps until killed."""
import sys
import time

import zmq


def main():
    address = sys.argv[1]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTING_ID, address.encode())
    sock.setsockopt(zmq.RCVHWM, 10)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.bind(address)
    print("READY", flush=True)
    time.sleep(120)


if __name__ == "__main__":
    main()
