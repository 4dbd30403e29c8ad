/* Differences between libzmq versions, kept out of the Cython sources.
 *
 * The project needs libzmq >= 4.2 (ZMQ_CONNECT_RID).  libzmq 4.3 renamed a
 * few options; older headers only have the old names. */
#ifndef NZF_ZMQ_COMPAT_H
#define NZF_ZMQ_COMPAT_H

#include <zmq.h>

#if ZMQ_VERSION < ZMQ_MAKE_VERSION(4, 2, 0)
#error "nova_zmq_fast needs libzmq 4.2 or newer"
#endif

#ifndef ZMQ_ROUTING_ID
#define ZMQ_ROUTING_ID ZMQ_IDENTITY
#endif

#ifndef ZMQ_CONNECT_ROUTING_ID
#define ZMQ_CONNECT_ROUTING_ID ZMQ_CONNECT_RID
#endif

#endif
