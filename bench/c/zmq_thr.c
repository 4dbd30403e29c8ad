/* Raw libzmq PUSH->PULL throughput over TCP loopback: the reference that the
 * project's cast throughput is measured against.
 *
 *   zmq_thr <endpoint> <message-size> <messages>
 *
 * The PUSH side runs in a forked process; the PULL side times from the first
 * message to the last.  Prints one JSON line:
 * {"messages": N, "size": S, "msgs_per_sec": X}.
 */
#include <zmq.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>

static void die(const char *what)
{
    fprintf(stderr, "zmq_thr: %s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(1);
}

static double now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void produce(const char *endpoint, int size, long count)
{
    void *ctx = zmq_ctx_new();
    void *push = zmq_socket(ctx, ZMQ_PUSH);
    char *buf = calloc(1, size);
    if (zmq_connect(push, endpoint) != 0) die("connect");
    for (long i = 0; i < count; i++)
        if (zmq_send(push, buf, size, 0) != size) die("send");
    free(buf);
    zmq_close(push);            /* default linger: everything is delivered */
    zmq_ctx_term(ctx);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: zmq_thr <endpoint> <message-size> <messages>\n");
        return 2;
    }
    const char *endpoint = argv[1];
    int size = atoi(argv[2]);
    long count = atol(argv[3]);

    void *ctx = zmq_ctx_new();
    void *pull = zmq_socket(ctx, ZMQ_PULL);
    if (zmq_bind(pull, endpoint) != 0) die("bind");

    pid_t child = fork();
    if (child < 0) { perror("fork"); return 1; }
    if (child == 0) { produce(endpoint, size, count); _exit(0); }

    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, pull, 0) != size) die("recv");
    double start = now_sec();
    for (long i = 1; i < count; i++)
        if (zmq_msg_recv(&msg, pull, 0) != size) die("recv");
    double elapsed = now_sec() - start;
    zmq_msg_close(&msg);
    printf("{\"messages\": %ld, \"size\": %d, \"msgs_per_sec\": %.0f}\n",
           count, size, (count - 1) / elapsed);
    zmq_close(pull);
    zmq_ctx_term(ctx);
    int status;
    waitpid(child, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
