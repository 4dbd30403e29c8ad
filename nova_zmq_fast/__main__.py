"""`python -m nova_zmq_fast`: the operator's command line (cli.py)."""
import sys

from nova_zmq_fast.cli import main

sys.exit(main(prog="python -m nova_zmq_fast"))
