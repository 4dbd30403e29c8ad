# The part of the libzmq C API that nova_zmq_fast uses, and nothing else.
# Version differences live in csrc/zmq_compat.h.

cdef extern from "zmq_compat.h" nogil:
    int ZMQ_VERSION_MAJOR, ZMQ_VERSION_MINOR, ZMQ_VERSION_PATCH

    int ZMQ_ROUTER, ZMQ_DEALER

    int ZMQ_LINGER, ZMQ_SNDHWM, ZMQ_RCVHWM, ZMQ_SNDTIMEO, ZMQ_RCVTIMEO
    int ZMQ_ROUTER_MANDATORY, ZMQ_ROUTING_ID
    int ZMQ_LAST_ENDPOINT, ZMQ_IPV6, ZMQ_MAXMSGSIZE
    int ZMQ_IMMEDIATE, ZMQ_ROUTER_HANDOVER, ZMQ_FD, ZMQ_EVENTS
    int ZMQ_IO_THREADS

    int ZMQ_DONTWAIT, ZMQ_SNDMORE
    short ZMQ_POLLIN

    int EAGAIN, EINTR, ETERM, EHOSTUNREACH

    ctypedef struct zmq_msg_t:
        pass

    void zmq_version(int *major, int *minor, int *patch)
    int zmq_errno()
    const char *zmq_strerror(int errnum)

    void *zmq_ctx_new()
    int zmq_ctx_set(void *context, int option, int optval)
    int zmq_ctx_term(void *context)

    void *zmq_socket(void *context, int type)
    int zmq_close(void *s)
    int zmq_setsockopt(void *s, int option, const void *optval, size_t optvallen)
    int zmq_getsockopt(void *s, int option, void *optval, size_t *optvallen)
    int zmq_bind(void *s, const char *addr)
    int zmq_connect(void *s, const char *addr)
    int zmq_disconnect(void *s, const char *addr)

    int zmq_send(void *s, const void *buf, size_t len, int flags)

    int zmq_msg_init(zmq_msg_t *msg)
    int zmq_msg_send(zmq_msg_t *msg, void *s, int flags)
    int zmq_msg_recv(zmq_msg_t *msg, void *s, int flags)
    int zmq_msg_close(zmq_msg_t *msg)
    void *zmq_msg_data(zmq_msg_t *msg)
    size_t zmq_msg_size(const zmq_msg_t *msg)
    int zmq_msg_more(const zmq_msg_t *msg)

