/* Differences between libzmq versions, kept out of the Cython sources.
 *
 * The project needs libzmq >= 4.2.  libzmq 4.3 renamed ZMQ_IDENTITY to
 * ZMQ_ROUTING_ID; older headers only have the old name. */
#ifndef NZF_ZMQ_COMPAT_H
#define NZF_ZMQ_COMPAT_H

#include <zmq.h>

#if ZMQ_VERSION < ZMQ_MAKE_VERSION(4, 2, 0)
#error "nova_zmq_fast needs libzmq 4.2 or newer"
#endif

#ifndef ZMQ_ROUTING_ID
#define ZMQ_ROUTING_ID ZMQ_IDENTITY
#endif

#endif
