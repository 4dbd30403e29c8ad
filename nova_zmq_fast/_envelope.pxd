# Envelope codec: the binary header frame and the msgpack body.
# Layout and rules are documented in docs/envelope.md.
from libc.stdint cimport uint64_t

cdef enum:
    VERSION = 1
    HEADER_FIXED = 13           # bytes before the topic
    MAX_TOPIC = 255
    MAX_HEADER = 268            # HEADER_FIXED + MAX_TOPIC

cdef enum Kind:
    KIND_CAST = 1
    KIND_CALL = 2
    KIND_FANOUT = 3
    KIND_NOTIFY = 4
    KIND_PING = 5               # answered by the server itself: is the topic served here?
    LAST_REQUEST = 5
    KIND_RESULT = 16            # the final value of a call
    KIND_CHUNK = 17             # one streamed value; more follow
    KIND_END = 18               # end of a stream, no value
    KIND_FAILURE = 19           # the remote method raised; final
    KIND_HEARTBEAT = 20         # the call is still running (call monitor)
    KIND_REFUSED = 21           # not run here (topic not served): safe to send elsewhere
    KIND_ACK = 22               # an at-least-once cast was handled (FLAG_ACK)
    LAST_REPLY = 22

cdef enum Flag:
    FLAG_MULTI = 1              # on CALL: stream every yielded value
    FLAG_ACK = 2                # on CAST: acknowledge once handled (at-least-once)

cdef enum BodyLimits:
    MAX_MESSAGE_DEFAULT = 16777216  # rpc_zmq_max_message_size's default
    MAX_DEPTH = 128                 # nested arrays and maps
    DECODED_PER_BYTE = 16           # decoding budget per byte of the limit ...
    BUDGET_FLOOR = 1048576          # ... and of at least this many bytes

cdef enum BodyStatus:
    BODY_OK = 0
    BODY_SHORT = 1              # a length or count runs past the end
    BODY_FORMAT = 2             # the reserved byte 0xc1, or an extension type
    BODY_DEPTH = 3              # nested deeper than MAX_DEPTH
    BODY_COST = 4               # would build more than the budget

cdef enum HeaderStatus:
    HDR_OK = 0
    HDR_SHORT = 1               # shorter than its own lengths say
    HDR_VERSION = 2             # a version this node does not speak
    HDR_KIND = 3                # unknown kind
    HDR_TOPIC = 4               # a request without topic, or trailing bytes

cdef struct Header:
    int version
    int kind
    int flags
    uint64_t msg_id
    const char *topic
    size_t topic_len

cdef int parse_header(const char *buf, size_t n, Header *h) noexcept nogil
cdef size_t write_header(char *buf, int kind, int flags, uint64_t msg_id,
                         const char *topic, size_t topic_len) noexcept nogil
cdef bint is_request(int kind) noexcept nogil
cdef bint is_reply(int kind) noexcept nogil

cdef int topic_utf8(object topic, const char **data, Py_ssize_t *size) except -1
cdef object new_packer()
cdef int scan_body(const char *buf, size_t n, size_t budget) noexcept nogil
cdef size_t check_body(const char *buf, size_t n, Py_ssize_t limit) except 0
cdef object unpack(const char *buf, size_t n, Py_ssize_t limit=*)
