"""nova_zmq_fast: a broker-less ZeroMQ RPC transport."""

# The one place the version is written: pyproject.toml reads it at build
# time, CHANGELOG.md names it when it is released.
__version__ = "0.2.0.dev0"
