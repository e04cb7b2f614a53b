// min-nbd-server: the smallest NBD server that reads a file with O_DIRECT, for one
// measurement in docs/performance.md ("The smallest server as the bound"): how close
// a server with next to no work per request gets to the raw disk through fio's nbd
// engine, with its one thread sleeping in epoll_wait or spinning.
//
// With --writes, it also takes writes, through the page cache (pwrite on a second,
// buffered descriptor), in one of four shapes, each a bound for a shape thinbd could take:
// - `inline`: made by the loop thread itself (which a thinbd loop may not do: it would wait);
// - `thread`: handed to one writer thread that signals the loop through an eventfd when
//   done (the shape of thinbd's page-cache thread);
// - `thread-replies`: handed to one writer thread that sends the replies itself, the
//   socket's sends under a lock the loop takes too, and hands the slots back;
// - `workers N`: nbdkit's shape, no loop at all: N threads take turns reading a request
//   (blocking, under a lock), write it, and send its reply under another lock. Writes
//   and FLUSH only in this shape.
//
// Not part of thinbd and not built by the package. One client at a time; no TLS, no
// structured replies, no block status, no trim or zeroing. Requests it does not serve
// get an error reply; anything malformed ends the connection.
//
//   cc -O2 -pthread -o /tmp/min-nbd-server tools/min-nbd-server.c -laio
//   /tmp/min-nbd-server FILE SOCKET [--spin | --poll MICROSECONDS]
//                       [--writes inline|thread|thread-replies|workers N]
//
// --poll polls (epoll_wait without a timeout, then sched_yield) for up to that long
// before it sleeps, as thinbd's loop does with --idle-poll (but without adapting).
//   fio --ioengine=nbd --uri="nbd+unix:///?socket=SOCKET" --rw=randread ...
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <libaio.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

enum { depth = 256, maxRead = 1 << 20, maxOption = 4096 };

static int file, bufferedFile = -1, sock;
static uint64_t fileSize;
static int spin;
static long pollNanoseconds;
static enum { readOnly, writesInline, writesOnThread, writesOnThreadReplying, writesOnWorkers } writeMode = readOnly;
static int workerCount;
// --writes thread-replies: the writer sends its replies itself, the socket's sends
// under this lock (the loop takes it too), and gives the slots back through `returned`,
// which the loop takes on its next socket read (depth is far above any client's queue).
static pthread_mutex_t sendLock = PTHREAD_MUTEX_INITIALIZER;

// Blocking transfers for the handshake; false when the peer went away.
static int readAll(void *p, size_t n) {
  while (n) {
    ssize_t r = read(sock, p, n);
    if (r <= 0) return 0;
    p = (char *)p + r, n -= r;
  }
  return 1;
}
static int writeAll(const void *p, size_t n) {
  while (n) {
    ssize_t r = write(sock, p, n);
    if (r < 0 && errno == EAGAIN) continue;
    if (r <= 0) return 0;
    p = (const char *)p + r, n -= r;
  }
  return 1;
}
static void put16(unsigned char *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static void put32(unsigned char *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static uint16_t get16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

static int optionReply(uint32_t option, uint32_t type, const void *data, uint32_t length) {
  unsigned char h[20];
  put64(h, 0x3e889045565a9ULL), put32(h + 8, option), put32(h + 12, type), put32(h + 16, length);
  return writeAll(h, 20) && (length == 0 || writeAll(data, length));
}

// Fixed newstyle: EXPORT_NAME, INFO and GO are served (any name), ABORT ends, the rest
// is unsupported. Returns 1 when transmission starts.
static int handshake(void) {
  const uint16_t transmissionFlags = writeMode == readOnly ? 1 | 2 | 4 : 1 | 4;  // has flags, (read-only,) flush
  unsigned char greeting[18];
  memcpy(greeting, "NBDMAGICIHAVEOPT", 16), put16(greeting + 16, 1 | 2);  // fixed newstyle, no zeroes
  uint32_t clientFlags;
  if (!writeAll(greeting, 18) || !readAll(&clientFlags, 4)) return 0;
  int noZeroes = be32toh(clientFlags) & 2;
  for (;;) {
    unsigned char h[16], data[maxOption];
    if (!readAll(h, 16) || memcmp(h, "IHAVEOPT", 8) != 0) return 0;
    uint32_t option = get32(h + 8), length = get32(h + 12);
    if (length > maxOption || !readAll(data, length)) return 0;
    if (option == 1) {  // EXPORT_NAME
      unsigned char reply[10 + 124] = {0};
      put64(reply, fileSize), put16(reply + 8, transmissionFlags);
      return writeAll(reply, noZeroes ? 10 : sizeof reply);
    }
    if (option == 6 || option == 7) {  // INFO, GO
      unsigned char info[12];
      put16(info, 0), put64(info + 2, fileSize), put16(info + 10, transmissionFlags);
      if (!optionReply(option, 3, info, 12) || !optionReply(option, 1, NULL, 0)) return 0;
      if (option == 7) return 1;
      continue;
    }
    if (option == 2) return optionReply(option, 1, NULL, 0), 0;  // ABORT
    if (!optionReply(option, 0x80000001u, NULL, 0)) return 0;
  }
}

struct request {
  struct iocb control;
  uint64_t cookie;
  uint32_t length;
  uint64_t offset;
  void *data;
  int failed;
  struct request *next;  // in the writer's inbox or outbox
  unsigned char header[16];
};

// The writer thread's two lists, under one lock: what to write, and what is written.
static pthread_mutex_t writerLock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t writerWake = PTHREAD_COND_INITIALIZER;
static struct request *inbox, *outbox, *returned;
static int writerSleeping, writesDoneFD = -1;

static void simpleReply(unsigned char *h, const unsigned char *cookie, uint32_t error);
// Writes every byte of the iovecs (spinning on a full socket). False: the peer is gone.
static int writeVectors(struct iovec *v, int count) {
  int i = 0;
  while (i < count) {
    ssize_t r = writev(sock, v + i, count - i);
    if (r < 0 && errno == EAGAIN) continue;
    if (r < 0) return 0;
    while (r > 0) {
      if ((size_t)r >= v[i].iov_len) r -= v[i].iov_len, i++;
      else v[i].iov_base = (char *)v[i].iov_base + r, v[i].iov_len -= r, r = 0;
    }
  }
  return 1;
}

static void *writer(void *unused) {
  (void)unused;
  for (;;) {
    pthread_mutex_lock(&writerLock);
    while (!inbox) writerSleeping = 1, pthread_cond_wait(&writerWake, &writerLock);
    writerSleeping = 0;
    struct request *batch = inbox;
    inbox = NULL;
    pthread_mutex_unlock(&writerLock);
    struct request *last = NULL;
    for (struct request *q = batch; q; last = q, q = q->next)
      q->failed = pwrite(bufferedFile, q->data, q->length, (off_t)q->offset) != (ssize_t)q->length;
    if (writeMode == writesOnThreadReplying) {
      struct iovec replies[1024];
      int count = 0;
      for (struct request *q = batch; q; q = q->next) {
        simpleReply(q->header, (const unsigned char *)&q->cookie, q->failed ? 5 : 0);
        replies[count++] = (struct iovec){q->header, 16};
        if (count == 1024 || !q->next) {
          pthread_mutex_lock(&sendLock);
          (void)writeVectors(replies, count);  // a peer that is gone: the loop sees it close
          pthread_mutex_unlock(&sendLock);
          count = 0;
        }
      }
      pthread_mutex_lock(&writerLock);
      last->next = returned, returned = batch;
      pthread_mutex_unlock(&writerLock);
      continue;
    }
    pthread_mutex_lock(&writerLock);
    int wasEmpty = outbox == NULL;
    last->next = outbox, outbox = batch;  // order does not matter to the client
    pthread_mutex_unlock(&writerLock);
    uint64_t one = 1;
    if (wasEmpty && write(writesDoneFD, &one, 8) != 8) abort();
  }
  return NULL;
}
static struct request requests[depth];
static int idle[depth], idleCount;
static unsigned char input[4 << 20];  // room for a whole request of maxRead and more
static size_t inputLength;
static struct iovec output[2 * depth + 64];
static int outputCount;
static struct request *sent[depth];
static int sentCount;
static unsigned char errorHeaders[64][16];
static int errorCount;

static void simpleReply(unsigned char *h, const unsigned char *cookie, uint32_t error) {
  put32(h, 0x67446698), put32(h + 4, error), memcpy(h + 8, cookie, 8);
}

// Writes every queued reply (the socket is non-blocking: spins on a full socket).
static int flushReplies(void) {
  if (writeMode == writesOnThreadReplying) pthread_mutex_lock(&sendLock);
  int ok = 1;
  for (int i = 0; i < outputCount && ok; i += 1024)
    ok = writeVectors(output + i, outputCount - i > 1024 ? 1024 : outputCount - i);
  if (writeMode == writesOnThreadReplying) pthread_mutex_unlock(&sendLock);
  if (!ok) return 0;
  outputCount = 0, errorCount = 0;
  for (int k = 0; k < sentCount; k++) idle[idleCount++] = (int)(sent[k] - requests);
  sentCount = 0;
  return 1;
}

// Parses what arrived and submits its reads in one io_submit. False: close.
static int takeRequests(io_context_t aio, int completionsFD) {
  ssize_t r = read(sock, input + inputLength, sizeof input - inputLength);
  if (r == 0) return 0;
  if (r < 0) return errno == EAGAIN || errno == EINTR;
  inputLength += r;
  if (writeMode == writesOnThreadReplying) {
    pthread_mutex_lock(&writerLock);
    struct request *back = returned;
    returned = NULL;
    pthread_mutex_unlock(&writerLock);
    for (; back; back = back->next) idle[idleCount++] = (int)(back - requests);
  }
  size_t at = 0;
  struct iocb *batch[depth];
  int batchCount = 0;
  while (inputLength - at >= 28 && idleCount > 0 && errorCount < 64) {
    const unsigned char *h = input + at;
    if (get32(h) != 0x25609513) return 0;
    uint16_t type = get16(h + 6);
    uint64_t offset = get64(h + 16);
    uint32_t length = get32(h + 24);
    if (type == 1 && writeMode == readOnly) return 0;  // not worth reading past
    if (type == 1 && length > maxRead) return 0;
    if (type == 1 && inputLength - at < 28 + (size_t)length) break;  // its data is still coming
    at += 28;
    if (type == 2) return 0;  // DISC
    if (type == 1) {
      const unsigned char *data = input + at;
      at += length;
      if (offset > fileSize || length > fileSize - offset) return 0;
      struct request *q = &requests[idle[--idleCount]];
      memcpy(&q->cookie, h + 8, 8), q->length = length, q->offset = offset;
      if (writeMode == writesInline) {
        q->failed = pwrite(bufferedFile, data, length, (off_t)offset) != (ssize_t)length;
        simpleReply(q->header, h + 8, q->failed ? 5 : 0);
        output[outputCount++] = (struct iovec){q->header, 16};
        sent[sentCount++] = q;
      } else {
        memcpy(q->data, data, length);
        pthread_mutex_lock(&writerLock);
        q->next = inbox, inbox = q;
        int wake = writerSleeping;
        pthread_mutex_unlock(&writerLock);
        if (wake) pthread_cond_signal(&writerWake);
      }
      continue;
    }
    if (type == 0 && length > 0 && length <= maxRead && length % 512 == 0 && offset % 512 == 0 &&
        offset <= fileSize && length <= fileSize - offset) {
      struct request *q = &requests[idle[--idleCount]];
      memcpy(&q->cookie, h + 8, 8), q->length = length;
      io_prep_pread(&q->control, file, q->data, length, (long long)offset);
      q->control.data = q;
      io_set_eventfd(&q->control, completionsFD);
      batch[batchCount++] = &q->control;
    } else {
      // FLUSH syncs the buffered writes (inline: a bound, not a server), else EINVAL.
      uint32_t error = type != 3 ? 22 : bufferedFile >= 0 && fdatasync(bufferedFile) != 0 ? 5 : 0;
      simpleReply(errorHeaders[errorCount], h + 8, error);
      output[outputCount++] = (struct iovec){errorHeaders[errorCount++], 16};
    }
  }
  memmove(input, input + at, inputLength - at), inputLength -= at;
  if (batchCount && io_submit(aio, batchCount, batch) != batchCount) return 0;
  return outputCount == 0 || flushReplies();
}

// Replies to every finished read in one writev. False: close.
static int answerCompletions(io_context_t aio, int completionsFD) {
  uint64_t count;
  if (!spin && read(completionsFD, &count, 8) < 0 && errno != EAGAIN) return 0;
  struct io_event events[depth];
  struct timespec now = {0, 0};
  int got = io_getevents(aio, 0, depth, events, &now);
  for (int i = 0; i < got; i++) {
    struct request *q = events[i].data;
    int ok = (long)events[i].res == (long)q->length;
    simpleReply(q->header, (const unsigned char *)&q->cookie, ok ? 0 : 5);
    output[outputCount++] = (struct iovec){q->header, 16};
    if (ok) output[outputCount++] = (struct iovec){q->data, q->length};
    sent[sentCount++] = q;
  }
  return outputCount == 0 || flushReplies();
}

// Replies to the writer thread's finished writes. False: close.
static int answerWrites(void) {
  uint64_t count;
  if (!spin && read(writesDoneFD, &count, 8) < 0 && errno != EAGAIN) return 0;
  pthread_mutex_lock(&writerLock);
  struct request *done = outbox;
  outbox = NULL;
  pthread_mutex_unlock(&writerLock);
  for (struct request *q = done; q; q = q->next) {
    simpleReply(q->header, (const unsigned char *)&q->cookie, q->failed ? 5 : 0);
    output[outputCount++] = (struct iovec){q->header, 16};
    sent[sentCount++] = q;
  }
  return outputCount == 0 || flushReplies();
}

// --writes workers N: nbdkit's shape with no loop at all. N threads take turns reading
// one request (under `receiveLock`, blocking), write it to the page cache, and send
// the reply under `sendLock`. Writes and FLUSH only; anything else ends the connection.
static pthread_mutex_t receiveLock = PTHREAD_MUTEX_INITIALIZER;
static int connectionOpen;

static void *worker(void *unused) {
  (void)unused;
  void *data;
  if (posix_memalign(&data, 4096, maxRead) != 0) abort();
  for (;;) {
    unsigned char h[28], reply[16];
    pthread_mutex_lock(&receiveLock);
    int ok = connectionOpen && readAll(h, 28) && get32(h) == 0x25609513;
    uint16_t type = ok ? get16(h + 6) : 0;
    uint64_t offset = get64(h + 16);
    uint32_t length = get32(h + 24);
    if (ok && type == 1) ok = length <= maxRead && offset <= fileSize && length <= fileSize - offset && readAll(data, length);
    else if (ok && type != 3) ok = 0;
    if (!ok) connectionOpen = 0;
    pthread_mutex_unlock(&receiveLock);
    if (!ok) break;
    uint32_t error = type == 1 ? (pwrite(bufferedFile, data, length, (off_t)offset) != (ssize_t)length ? 5 : 0)
                               : (fdatasync(bufferedFile) != 0 ? 5 : 0);
    simpleReply(reply, h + 8, error);
    pthread_mutex_lock(&sendLock);
    ok = writeAll(reply, 16);
    pthread_mutex_unlock(&sendLock);
    if (!ok) break;
  }
  free(data);
  return NULL;
}

static void serveWithWorkers(void) {
  pthread_t threads[64];
  connectionOpen = 1;
  for (int i = 0; i < workerCount; i++)
    if (pthread_create(&threads[i], NULL, worker, NULL) != 0) abort();
  for (int i = 0; i < workerCount; i++) pthread_join(threads[i], NULL);
}

static void serve(void) {
  io_context_t aio = 0;
  if (io_setup(depth, &aio) != 0) return;
  int completionsFD = eventfd(0, EFD_NONBLOCK), poller = epoll_create1(0);
  fcntl(sock, F_SETFL, O_NONBLOCK);
  struct epoll_event watch = {.events = EPOLLIN, .data.u32 = 0};
  epoll_ctl(poller, EPOLL_CTL_ADD, sock, &watch);
  watch.data.u32 = 1;
  epoll_ctl(poller, EPOLL_CTL_ADD, completionsFD, &watch);
  if (writeMode == writesOnThread) {
    watch.data.u32 = 2;
    epoll_ctl(poller, EPOLL_CTL_ADD, writesDoneFD, &watch);
  }
  idleCount = 0, inputLength = 0, outputCount = 0, sentCount = 0, errorCount = 0;
  for (int i = 0; i < depth; i++) idle[idleCount++] = i;
  for (int open = 1; open;) {
    struct epoll_event events[3];
    int n = 0;
    if (!spin && pollNanoseconds > 0) {
      struct timespec start, now;
      clock_gettime(CLOCK_MONOTONIC, &start);
      for (;;) {
        if ((n = epoll_wait(poller, events, 3, 0)) != 0) break;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) >= pollNanoseconds) break;
        sched_yield();
      }
    }
    if (n == 0) n = spin ? 3 : epoll_wait(poller, events, 3, -1);
    if (spin) events[0].data.u32 = 0, events[1].data.u32 = 1, events[2].data.u32 = 2;  // try all, never sleep
    for (int e = 0; e < n && open; e++) {
      switch (events[e].data.u32) {
      case 0: open = takeRequests(aio, completionsFD); break;
      case 1: open = answerCompletions(aio, completionsFD); break;
      default: open = writeMode != writesOnThread || answerWrites(); break;
      }
    }
  }
  io_destroy(aio);  // waits for reads in flight
  close(completionsFD), close(poller);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: min-nbd-server FILE SOCKET [--spin | --poll MICROSECONDS] [--writes inline|thread|thread-replies|workers N]\n");
    return 2;
  }
  for (int i = 3; i < argc; i++) {
    if (strcmp(argv[i], "--spin") == 0) spin = 1;
    else if (strcmp(argv[i], "--poll") == 0 && i + 1 < argc) pollNanoseconds = atol(argv[++i]) * 1000L;
    else if (strcmp(argv[i], "--writes") == 0 && i + 1 < argc && strcmp(argv[i + 1], "inline") == 0) writeMode = writesInline, i++;
    else if (strcmp(argv[i], "--writes") == 0 && i + 1 < argc && strcmp(argv[i + 1], "thread") == 0) writeMode = writesOnThread, i++;
    else if (strcmp(argv[i], "--writes") == 0 && i + 1 < argc && strcmp(argv[i + 1], "thread-replies") == 0) writeMode = writesOnThreadReplying, i++;
    else if (strcmp(argv[i], "--writes") == 0 && i + 2 < argc && strcmp(argv[i + 1], "workers") == 0) {
      writeMode = writesOnWorkers, workerCount = atoi(argv[i + 2]), i += 2;
      if (workerCount < 1 || workerCount > 64) return fprintf(stderr, "workers: 1 to 64\n"), 2;
    }
    else return fprintf(stderr, "unknown argument %s\n", argv[i]), 2;
  }
  signal(SIGPIPE, SIG_IGN);
  file = open(argv[1], O_RDONLY | O_DIRECT);
  if (writeMode != readOnly && (bufferedFile = open(argv[1], O_RDWR)) < 0) return perror(argv[1]), 1;
  if (writeMode == writesOnThread || writeMode == writesOnThreadReplying) {
    pthread_t thread;
    writesDoneFD = eventfd(0, EFD_NONBLOCK);
    if (writesDoneFD < 0 || pthread_create(&thread, NULL, writer, NULL) != 0) return 1;
  }
  struct stat st;
  if (file < 0 || fstat(file, &st) != 0) return perror(argv[1]), 1;
  fileSize = (uint64_t)st.st_size;
  for (int i = 0; i < depth; i++)
    if (posix_memalign(&requests[i].data, 4096, maxRead) != 0) return 1;
  int listener = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un address = {.sun_family = AF_UNIX};
  if (strlen(argv[2]) >= sizeof address.sun_path) return fprintf(stderr, "socket path too long\n"), 2;
  strcpy(address.sun_path, argv[2]);
  unlink(argv[2]);
  if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 4) != 0)
    return perror(argv[2]), 1;
  for (;;) {
    sock = accept(listener, NULL, NULL);
    if (sock < 0) continue;
    if (handshake()) writeMode == writesOnWorkers ? serveWithWorkers() : serve();
    close(sock);
  }
}
