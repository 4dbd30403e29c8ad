/* Differences between libzmq versions, kept out of the Cython sources.
 *
 * The project needs libzmq >= 4.3.3: older releases have CURVE and ZMTP
 * security holes.  This refuses old headers at build time; _zmq.pyx
 * refuses an old library at import, since the one loaded can differ. */
#ifndef NZF_ZMQ_COMPAT_H
#define NZF_ZMQ_COMPAT_H

#include <zmq.h>

#if ZMQ_VERSION < ZMQ_MAKE_VERSION(4, 3, 3)
#error "nova_zmq_fast needs libzmq 4.3.3 or newer"
#endif

/* A draft option in libzmq's headers, though every 4.3 release honours it:
 * with it, a CURVE server whose context has no ZAP handler refuses every
 * handshake instead of accepting any key. */
#ifndef ZMQ_ZAP_ENFORCE_DOMAIN
#define ZMQ_ZAP_ENFORCE_DOMAIN 93
#endif

#endif
