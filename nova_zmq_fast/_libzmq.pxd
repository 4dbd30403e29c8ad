# The part of the libzmq C API that nova_zmq_fast uses, and nothing else.
# Version differences live in csrc/zmq_compat.h.

cdef extern from "zmq_compat.h" nogil:
    int ZMQ_VERSION_MAJOR, ZMQ_VERSION_MINOR, ZMQ_VERSION_PATCH

    int ZMQ_ROUTER, ZMQ_DEALER, ZMQ_REP, ZMQ_PAIR

    int ZMQ_LINGER, ZMQ_SNDHWM, ZMQ_RCVHWM, ZMQ_SNDTIMEO, ZMQ_RCVTIMEO, ZMQ_SNDBUF, ZMQ_RCVBUF
    int ZMQ_ROUTER_MANDATORY, ZMQ_ROUTING_ID
    int ZMQ_LAST_ENDPOINT, ZMQ_IPV6, ZMQ_MAXMSGSIZE
    int ZMQ_IMMEDIATE, ZMQ_ROUTER_HANDOVER, ZMQ_FD, ZMQ_EVENTS
    int ZMQ_IO_THREADS

    int ZMQ_CURVE_SERVER, ZMQ_CURVE_PUBLICKEY, ZMQ_CURVE_SECRETKEY, ZMQ_CURVE_SERVERKEY
    int ZMQ_ZAP_DOMAIN, ZMQ_ZAP_ENFORCE_DOMAIN
    int ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL, ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL
    int ZMQ_EVENT_HANDSHAKE_FAILED_AUTH, ZMQ_EVENT_DISCONNECTED

    int ZMQ_DONTWAIT, ZMQ_SNDMORE
    short ZMQ_POLLIN

    ctypedef struct zmq_pollitem_t:
        void *socket
        int fd
        short events
        short revents
    int zmq_poll(zmq_pollitem_t *items, int nitems, long timeout)

    int EAGAIN, EINTR, ETERM, EHOSTUNREACH

    ctypedef struct zmq_msg_t:
        pass

    void zmq_version(int *major, int *minor, int *patch)
    int zmq_has(const char *capability)
    int zmq_curve_keypair(char *z85_public_key, char *z85_secret_key)
    int zmq_curve_public(char *z85_public_key, const char *z85_secret_key)
    int zmq_socket_monitor(void *s, const char *addr, int events)
    char *zmq_z85_encode(char *dest, const unsigned char *data, size_t size)
    unsigned char *zmq_z85_decode(unsigned char *dest, const char *string)
    int zmq_errno()
    const char *zmq_strerror(int errnum)

    void *zmq_ctx_new()
    int zmq_ctx_set(void *context, int option, int optval)
    int zmq_ctx_term(void *context)
    int zmq_ctx_shutdown(void *context)

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
    const char *zmq_msg_gets(const zmq_msg_t *msg, const char *property)

