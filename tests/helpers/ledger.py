"""A server's account: every message it received was handed to a handler,
dropped under one of its `dropped_*` counters, recognised as a duplicate
at-least-once cast or answered as a PING.  One rule for the tests and the
fuzz harness."""


def accounted(stats):
    """How many of the received messages the counters account for."""
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped_"))
    return stats["handled"] + dropped + stats["duplicates"] + stats["pings"]


def balanced(stats):
    return stats["received"] == accounted(stats)
