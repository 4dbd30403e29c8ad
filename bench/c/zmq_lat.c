/* Raw libzmq REQ/REP round-trip latency over TCP loopback: the reference
 * that the project's call latency is measured against.
 *
 *   zmq_lat <endpoint> <message-size> <round-trips>
 *
 * Runs the REP side in a second process (fork), so that both ends have their
 * own libzmq context and I/O thread, as two services would.  Every round
 * trip is timed; prints one JSON line with their median and mean:
 * {"round_trips": N, "size": S, "usec_median": M, "usec_per_rtt": X}.
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
    fprintf(stderr, "zmq_lat: %s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(1);
}

static double now_usec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void serve(const char *endpoint, int size, long count)
{
    void *ctx = zmq_ctx_new();
    void *rep = zmq_socket(ctx, ZMQ_REP);
    char *buf = malloc(size + 1);
    if (zmq_bind(rep, endpoint) != 0) die("bind");
    for (long i = 0; i < count; i++) {
        int n = zmq_recv(rep, buf, size + 1, 0);
        if (n != size) die("recv");
        if (zmq_send(rep, buf, n, 0) != n) die("send");
    }
    free(buf);
    zmq_close(rep);
    zmq_ctx_term(ctx);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: zmq_lat <endpoint> <message-size> <round-trips>\n");
        return 2;
    }
    const char *endpoint = argv[1];
    int size = atoi(argv[2]);
    long count = atol(argv[3]);
    long warmup = count / 10 + 1;

    pid_t child = fork();
    if (child < 0) { perror("fork"); return 1; }
    if (child == 0) { serve(endpoint, size, count + warmup); _exit(0); }

    void *ctx = zmq_ctx_new();
    void *req = zmq_socket(ctx, ZMQ_REQ);
    char *buf = calloc(1, size + 1);
    double *rtt = malloc(sizeof(double) * count);
    if (zmq_connect(req, endpoint) != 0) die("connect");
    double start = 0, t0;
    for (long i = 0; i < count + warmup; i++) {
        if (i == warmup) start = now_usec();
        t0 = now_usec();
        if (zmq_send(req, buf, size, 0) != size) die("send");
        if (zmq_recv(req, buf, size + 1, 0) != size) die("recv");
        if (i >= warmup) rtt[i - warmup] = now_usec() - t0;
    }
    double elapsed = now_usec() - start;
    qsort(rtt, count, sizeof(double), by_value);
    printf("{\"round_trips\": %ld, \"size\": %d, \"usec_median\": %.3f, "
           "\"usec_per_rtt\": %.3f}\n", count, size, rtt[count / 2], elapsed / count);
    free(rtt);
    free(buf);
    zmq_close(req);
    zmq_ctx_term(ctx);
    int status;
    waitpid(child, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
