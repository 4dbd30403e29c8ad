"""Pure-Python twin of the Cython envelope codec (`_envelope.pyx`).

It is not used on the message path (but for `to_primitive`, which both
share).  The property and fuzz tests run both
implementations on the same inputs and require identical results, which
keeps the C parser honest about every byte of the format.
"""
import datetime
import struct

import msgpack

from nova_zmq_fast.exceptions import MalformedEnvelope

ENVELOPE_VERSION = 1
KINDS = {"CAST": 1, "CALL": 2, "FANOUT": 3, "NOTIFY": 4, "PING": 5,
         "RESULT": 16, "CHUNK": 17, "END": 18, "FAILURE": 19, "HEARTBEAT": 20,
         "REFUSED": 21, "ACK": 22}
FLAG_MULTI_CALL = 1
FLAG_ACK_CAST = 2
_REQUESTS = {1, 2, 3, 4, 5}
_REPLIES = {16, 17, 18, 19, 20, 21, 22}
_FIXED = struct.Struct("<BBHQB")            # version, kind, flags, msg_id, topic_len
MAX_TOPIC = 255


def _check_topic(topic):
    if not isinstance(topic, str):
        raise TypeError(f"topic must be a str, not {type(topic).__name__}")
    raw = topic.encode("utf-8")
    if not raw:
        raise ValueError("topic must not be empty")
    if len(raw) > MAX_TOPIC:
        raise ValueError(f"topic is {len(raw)} bytes long; the limit is {MAX_TOPIC}")
    if any(c in b"/\\" or c <= 32 or c == 127 for c in raw):
        raise ValueError(f"topic {topic!r} contains a path separator, "
                         f"whitespace or a control character")
    if topic in (".", ".."):
        raise ValueError(f"topic {topic!r} is not a valid name")
    return raw


def encode_header(kind, flags, msg_id, topic):
    raw = _check_topic(topic) if topic else b""
    if kind not in _REQUESTS and kind not in _REPLIES:
        raise ValueError(f"unknown kind {kind}")
    if kind in _REQUESTS and not raw:
        raise ValueError("a request needs a topic")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError("flags must fit in 16 bits")
    return _FIXED.pack(ENVELOPE_VERSION, kind, flags, msg_id, len(raw)) + raw


def decode_header(data):
    data = bytes(data)
    if len(data) < 1:
        raise MalformedEnvelope("truncated header")
    if data[0] != ENVELOPE_VERSION:
        raise MalformedEnvelope("unsupported envelope version")
    if len(data) < _FIXED.size:
        raise MalformedEnvelope("truncated header")
    version, kind, flags, msg_id, tlen = _FIXED.unpack_from(data)
    if kind not in _REQUESTS and kind not in _REPLIES:
        raise MalformedEnvelope("unknown message kind")
    if len(data) < _FIXED.size + tlen:
        raise MalformedEnvelope("truncated header")
    if len(data) != _FIXED.size + tlen or (kind in _REQUESTS and tlen == 0):
        raise MalformedEnvelope("bad topic field")
    try:
        topic = data[_FIXED.size:].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEnvelope("topic is not UTF-8") from None
    return (version, kind, flags, msg_id, topic)


def to_primitive(value):
    """What msgpack cannot encode itself, as openstack.common.rpc's JSON
    encoder turned it into something it could (both codecs pack with this
    as `default`, so it is on the message path): a datetime becomes its
    text in timeutils.strtime's format (without its offset, as then), a
    set a list.  Anything else is refused, not guessed at."""
    if isinstance(value, datetime.datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%S.%f")
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"can not serialize {type(value).__name__!r} object")


def pack_body(obj):
    return msgpack.packb(obj, use_bin_type=True, default=to_primitive)


# Limits on a body and the cost model: the same numbers as _envelope.pxd
# and _envelope.pyx (the tests compare them).
MAX_MESSAGE_DEFAULT = 16 * 1024 * 1024
MAX_DEPTH = 128
DECODED_PER_BYTE = 16
BUDGET_FLOOR = 1024 * 1024
_COSTS = {"slot": 8, "number": 32, "string": 64, "list": 72, "dict": 72,
          "dict_table": 160, "dict_table_entries": 5, "dict_entry": 72}
BODY_LIMITS = {"max_message_default": MAX_MESSAGE_DEFAULT, "max_depth": MAX_DEPTH,
               "decoded_per_byte": DECODED_PER_BYTE, "budget_floor": BUDGET_FLOOR,
               "costs": _COSTS}
_SHORT = "bad msgpack body: a length runs past the end"


class _Refused(Exception):
    pass


def _length(data, pos, width):
    if width > len(data) - pos:
        raise _Refused(_SHORT)
    return int.from_bytes(data[pos:pos + width], "big"), pos + width


def _scan(data, budget):
    """Walk a msgpack body without building it, as _envelope.scan_body;
    return its estimated cost."""
    c = _COSTS
    n = len(data)
    left = [1]                          # items still to read, per open container
    pos = cost = 0
    while True:
        while left[-1] == 0:
            if len(left) == 1:
                return cost
            left.pop()
        left[-1] -= 1
        if pos >= n:
            raise _Refused(_SHORT)
        b = data[pos]
        pos += 1
        cost += c["slot"]
        container = None
        count = size = 0
        if b <= 0x7F or b in (0xC0, 0xC2, 0xC3):
            pass
        elif b >= 0xE0:
            cost += c["number"]
        elif b <= 0x8F:
            container, count = "dict", b & 0x0F
        elif b <= 0x9F:
            container, count = "list", b & 0x0F
        elif b <= 0xBF:
            size = b & 0x1F
            cost += c["string"] + 4 * size
        elif b == 0xC1 or 0xC7 <= b <= 0xC9 or 0xD4 <= b <= 0xD8:
            raise _Refused("bad msgpack body: reserved byte or extension type")
        elif b <= 0xC6:
            size, pos = _length(data, pos, 1 << (b - 0xC4))
            cost += c["string"] + size
        elif b <= 0xCB:
            size = 4 << (b - 0xCA)
            cost += c["number"]
        elif b <= 0xD3:
            size = 1 << ((b - 0xCC) & 3)
            cost += c["number"]
        elif b <= 0xDB:
            size, pos = _length(data, pos, 1 << (b - 0xD9))
            cost += c["string"] + 4 * size
        elif b <= 0xDD:
            container = "list"
            count, pos = _length(data, pos, 2 << (b - 0xDC))
        else:
            container = "dict"
            count, pos = _length(data, pos, 2 << (b - 0xDE))
        if size > n - pos:
            raise _Refused(_SHORT)
        pos += size
        if container:
            if len(left) - 1 == MAX_DEPTH:
                raise _Refused(f"body nests deeper than {MAX_DEPTH} levels")
            if container == "dict":
                cost += c["dict"]
                if count:
                    cost += c["dict_table"]
                if count > c["dict_table_entries"]:
                    cost += c["dict_entry"] * (count - c["dict_table_entries"])
                count *= 2
            else:
                cost += c["list"]
            if count > n - pos:
                raise _Refused(_SHORT)
            if count:
                left.append(count)
        if cost > budget:
            raise _Refused(f"body would decode to more than {budget} bytes")


def check_body_limits(data, limit=MAX_MESSAGE_DEFAULT):
    data = bytes(data)
    if limit <= 0:
        limit = MAX_MESSAGE_DEFAULT
    if len(data) > limit:
        raise MalformedEnvelope(f"body of {len(data)} bytes exceeds the limit of {limit}")
    budget = max(limit, BUDGET_FLOOR) * DECODED_PER_BYTE
    try:
        _scan(data, budget)
    except _Refused as exc:
        raise MalformedEnvelope(str(exc)) from None
    return budget


def unpack_body(data, limit=MAX_MESSAGE_DEFAULT):
    data = bytes(data)
    check_body_limits(data, limit)
    n = len(data)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False,
                               max_str_len=n, max_bin_len=n, max_ext_len=0,
                               max_array_len=n, max_map_len=n // 2)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise MalformedEnvelope(f"bad msgpack body: {exc}") from None
