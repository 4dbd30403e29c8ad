"""nova_zmq_fast: a broker-less ZeroMQ RPC transport."""
