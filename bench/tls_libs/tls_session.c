/* What one server-side TLS 1.3 session costs in a TLS library, in C, with no
 * socket: --conns server sessions each complete a handshake with a client
 * session over in-memory pipes and exchange one 512-byte record each way; the
 * client sessions are freed, the server sessions kept.  Prints one JSON line:
 * the heap the kept server sessions hold (glibc mallinfo2, per session) and the
 * server's CPU per handshake (the thread's CPU clock around the server's calls
 * only).  Built twice by bench/tls_libs.py: against OpenSSL (memory BIOs,
 * SSL_MODE_RELEASE_BUFFERS) and, with -DUSE_WOLFSSL, against wolfSSL (I/O
 * callbacks), and against BoringSSL when given one (the OpenSSL code, its
 * headers and static library).  Usage: tls_session N cert.pem key.pem */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RECORD 512

static double thread_cpu(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static size_t heap(void) {
    struct mallinfo2 m = mallinfo2();
    return m.uordblks + m.hblkhd;
}

#ifdef USE_WOLFSSL
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#define LIB "wolfssl"

typedef struct { unsigned char buf[65536]; int len; } pipe_t;
typedef struct { pipe_t *in, *out; } io_t;
static pipe_t c2s, s2c, empty;
static io_t server_io = {&c2s, &s2c}, client_io = {&s2c, &c2s}, idle_io = {&empty, &empty};

static int io_recv(WOLFSSL *ssl, char *buf, int sz, void *ctx) {
    pipe_t *p = ((io_t *)ctx)->in;
    (void)ssl;
    if (p->len == 0) return WOLFSSL_CBIO_ERR_WANT_READ;
    int n = sz < p->len ? sz : p->len;
    memcpy(buf, p->buf, n);
    memmove(p->buf, p->buf + n, p->len - n);
    p->len -= n;
    return n;
}

static int io_send(WOLFSSL *ssl, char *buf, int sz, void *ctx) {
    pipe_t *p = ((io_t *)ctx)->out;
    (void)ssl;
    if (p->len + sz > (int)sizeof p->buf) return WOLFSSL_CBIO_ERR_WANT_WRITE;
    memcpy(p->buf + p->len, buf, sz);
    p->len += sz;
    return sz;
}

static WOLFSSL_CTX *sctx, *cctx;

static void setup(const char *cert, const char *key) {
    wolfSSL_Init();
    sctx = wolfSSL_CTX_new(wolfTLSv1_3_server_method());
    cctx = wolfSSL_CTX_new(wolfTLSv1_3_client_method());
    if (wolfSSL_CTX_use_certificate_chain_file(sctx, cert) != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_use_PrivateKey_file(sctx, key, WOLFSSL_FILETYPE_PEM) != WOLFSSL_SUCCESS) {
        fprintf(stderr, "cannot load the certificate\n");
        exit(1);
    }
    wolfSSL_CTX_set_verify(cctx, WOLFSSL_VERIFY_NONE, NULL);
    wolfSSL_SetIORecv(sctx, io_recv); wolfSSL_SetIOSend(sctx, io_send);
    wolfSSL_SetIORecv(cctx, io_recv); wolfSSL_SetIOSend(cctx, io_send);
}

static void *one(double *spent) {
    unsigned char rec[RECORD], got[RECORD * 2];
    double t0 = thread_cpu();
    WOLFSSL *sv = wolfSSL_new(sctx);
    wolfSSL_SetIOReadCtx(sv, &server_io); wolfSSL_SetIOWriteCtx(sv, &server_io);
    *spent += thread_cpu() - t0;
    WOLFSSL *cl = wolfSSL_new(cctx);
    wolfSSL_SetIOReadCtx(cl, &client_io); wolfSSL_SetIOWriteCtx(cl, &client_io);
    int sdone = 0, cdone = 0;
    for (int i = 0; i < 10 && !(sdone && cdone); i++) {
        if (!cdone) cdone = wolfSSL_connect(cl) == WOLFSSL_SUCCESS;
        t0 = thread_cpu();
        if (!sdone) sdone = wolfSSL_accept(sv) == WOLFSSL_SUCCESS;
        *spent += thread_cpu() - t0;
    }
    if (!(sdone && cdone)) { fprintf(stderr, "the handshake did not finish\n"); exit(1); }
    memset(rec, 'x', RECORD);
    if (wolfSSL_write(cl, rec, RECORD) != RECORD || wolfSSL_read(sv, got, sizeof got) != RECORD ||
        wolfSSL_write(sv, rec, RECORD) != RECORD || wolfSSL_read(cl, got, sizeof got) != RECORD) {
        fprintf(stderr, "the records did not cross\n");
        exit(1);
    }
    wolfSSL_free(cl);
    c2s.len = s2c.len = 0;
    wolfSSL_SetIOReadCtx(sv, &idle_io); wolfSSL_SetIOWriteCtx(sv, &idle_io);
    return sv;
}

static const char *version(void) { return LIBWOLFSSL_VERSION_STRING; }

#else
#include <openssl/err.h>
#include <openssl/ssl.h>
#ifdef OPENSSL_IS_BORINGSSL
#define LIB "boringssl"
#else
#define LIB "openssl"
#endif

static SSL_CTX *sctx, *cctx;
static unsigned char buf[65536];

static void setup(const char *cert, const char *key) {
    sctx = SSL_CTX_new(TLS_server_method());
    cctx = SSL_CTX_new(TLS_client_method());
    if (SSL_CTX_use_certificate_chain_file(sctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(sctx, key, SSL_FILETYPE_PEM) != 1) {
        fprintf(stderr, "cannot load the certificate\n");
        exit(1);
    }
    SSL_CTX_set_min_proto_version(sctx, TLS1_3_VERSION);
    SSL_CTX_set_mode(sctx, SSL_MODE_RELEASE_BUFFERS);
}

static void pump(BIO *from, BIO *to) {
    int n;
    while ((n = BIO_read(from, buf, sizeof buf)) > 0) BIO_write(to, buf, n);
}

static void *one(double *spent) {
    unsigned char rec[RECORD], got[RECORD * 2];
    double t0 = thread_cpu();
    SSL *sv = SSL_new(sctx);
    BIO *sr = BIO_new(BIO_s_mem()), *sw = BIO_new(BIO_s_mem());
    SSL_set_bio(sv, sr, sw);
    SSL_set_accept_state(sv);
    *spent += thread_cpu() - t0;
    SSL *cl = SSL_new(cctx);
    BIO *cr = BIO_new(BIO_s_mem()), *cw = BIO_new(BIO_s_mem());
    SSL_set_bio(cl, cr, cw);
    SSL_set_connect_state(cl);
    for (int i = 0; i < 10 && !(SSL_is_init_finished(sv) && SSL_is_init_finished(cl)); i++) {
        SSL_do_handshake(cl);
        t0 = thread_cpu();
        pump(cw, sr);
        SSL_do_handshake(sv);
        *spent += thread_cpu() - t0;
        pump(sw, cr);
    }
    if (!(SSL_is_init_finished(sv) && SSL_is_init_finished(cl))) {
        fprintf(stderr, "the handshake did not finish\n");
        exit(1);
    }
    memset(rec, 'x', RECORD);
    SSL_write(cl, rec, RECORD); pump(cw, sr);
    if (SSL_read(sv, got, sizeof got) != RECORD) { fprintf(stderr, "no record\n"); exit(1); }
    SSL_write(sv, rec, RECORD); pump(sw, cr);
    if (SSL_read(cl, got, sizeof got) != RECORD) { fprintf(stderr, "no record\n"); exit(1); }
    SSL_free(cl);
    SSL_set_bio(sv, BIO_new(BIO_s_mem()), BIO_new(BIO_s_mem()));   /* fresh, empty */
    return sv;
}

static const char *version(void) { return OpenSSL_version(OPENSSL_VERSION); }
#endif

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: tls_session N cert.pem key.pem\n"); return 2; }
    int n = atoi(argv[1]) + 1;
    setup(argv[2], argv[3]);
    void **keep = calloc(n, sizeof *keep);
    double spent = 0;
    double warm = 0;
    keep[0] = one(&warm);   /* the first handshake loads tables: neither its time nor its heap counted */
    size_t before = heap();
    for (int i = 1; i < n; i++) keep[i] = one(&spent);
    size_t after = heap();
    printf("{\"lib\": \"%s\", \"version\": \"%s\", \"sessions\": %d, \"bytes_per_session\": %.0f, "
           "\"server_handshake_us\": %.1f}\n", LIB, version(), n, (double)(after - before) / (n - 1), spent / (n - 1) * 1e6);
    return 0;
}
