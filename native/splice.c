/*
 * READ replies without copying through user space: the reply header is
 * written into a pipe, the data is spliced into it from the image file's
 * page cache (the pipe only takes references to the cached pages), and the
 * pipe is spliced into /dev/fuse, where the kernel copies the data once,
 * straight into the reader's pages. This is libfuse's splice write.
 *
 * It runs on the libuv threadpool: a splice from a file waits for the disk
 * when the pages are not cached, and the one copy left then happens off the
 * event loop, so large reads use both cores.
 *
 *   spliceReply(fuseFd, unique, slices, cb)  cb(stage, result)
 *   pipeCapacity(bytes)                      the pipe size we may have, up to bytes
 *
 * `slices` is a Float64Array of (fd, position, length) triples; fd -1 is a
 * run of zeroes. A file that ends early reads as zeroes past its end, as
 * readFull does. `stage` is 0 when the reply could not be put together
 * (nothing reached the kernel: the caller may answer another way) and 1 when
 * the kernel refused it; `result` is the reply's size or -errno.
 *
 * Every pool thread keeps one pipe, sized for the largest reply it has sent.
 * The kernel takes a reply only whole (fuse_dev_splice_write wants all of it
 * in the pipe), so the pipe must hold the header and every page of data: a
 * pipe slot holds at most a page, and without CAP_SYS_RESOURCE a pipe holds
 * at most pipe-max-size (1 MiB by default), so a 1 MiB reply never fits one.
 * The transport sizes its reads from pipeCapacity(); a reply that does not
 * fit after all answers -EMSGSIZE at stage 0 (or -EAGAIN, should the pipe
 * fill before its budget of slots: it is never waited on, for nothing reads
 * it before the reply is whole).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include "qcowfs-native.h"

#define PAGE 4096
#define ZERO_BYTES (64 * 1024)
/* The largest pipe a thread asks for (8 MiB: 2048 page slots). */
#define PIPE_MAX_BYTES (8 * 1024 * 1024)

typedef struct {
  int64_t fd, position, length;
} slice_t;

typedef struct {
  napi_async_work work;
  napi_ref cb_ref;
  int fuse_fd;
  uint64_t unique;
  size_t count;
  slice_t *slices;
  int stage;
  int64_t result;
} splice_job_t;

/* Never written: vmspliced by reference for runs of zeroes. */
static const char zeroes[ZERO_BYTES] __attribute__((aligned(PAGE)));

static __thread int pipe_fds[2] = {-1, -1};
static __thread int pipe_slots;

static void pipe_drop(void) {
  if (pipe_fds[0] >= 0) {
    close(pipe_fds[0]);
    close(pipe_fds[1]);
  }
  pipe_fds[0] = pipe_fds[1] = -1;
  pipe_slots = 0;
}

/* This thread's pipe with room for `slots` buffers, or -errno. */
static int pipe_ready(int64_t slots) {
  if (pipe_fds[0] < 0) {
    if (pipe2(pipe_fds, O_CLOEXEC) < 0) {
      pipe_fds[0] = pipe_fds[1] = -1;
      return -errno;
    }
    /* Filling the pipe never waits: a reply that does not fit after all fails with EAGAIN
     * (and is answered another way) instead of leaving this thread blocked for good, since
     * nothing reads the pipe until the reply is whole. */
    int flags = fcntl(pipe_fds[1], F_GETFL);
    if (flags < 0 || fcntl(pipe_fds[1], F_SETFL, flags | O_NONBLOCK) < 0) {
      int err = errno;
      pipe_drop();
      return -err;
    }
    pipe_slots = fcntl(pipe_fds[0], F_GETPIPE_SZ) / PAGE;
  }
  if (slots > pipe_slots) {
    int64_t bytes = PAGE;
    while (bytes < slots * PAGE) bytes *= 2;
    if (bytes > PIPE_MAX_BYTES) return -EMSGSIZE;
    int got = fcntl(pipe_fds[0], F_SETPIPE_SZ, (int)bytes);
    /* EPERM: past pipe-max-size without CAP_SYS_RESOURCE; this reply does not fit, smaller ones may. */
    if (got < 0) return errno == EPERM ? -EMSGSIZE : -errno;
    pipe_slots = got / PAGE;
  }
  return 0;
}

static int put_zeroes(int64_t length) {
  struct iovec iov[16];
  while (length > 0) {
    int n = 0;
    int64_t batch = 0;
    while (n < 16 && batch < length) {
      int64_t len = length - batch < ZERO_BYTES ? length - batch : ZERO_BYTES;
      iov[n].iov_base = (void *)zeroes;
      iov[n].iov_len = (size_t)len;
      batch += len;
      n++;
    }
    ssize_t r = vmsplice(pipe_fds[1], iov, n, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    length -= r; /* a short vmsplice leaves the rest for the next round */
  }
  return 0;
}

static int put_file(int fd, int64_t position, int64_t length) {
  loff_t pos = position;
  while (length > 0) {
    ssize_t r = splice(fd, &pos, pipe_fds[1], NULL, (size_t)length, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) return put_zeroes(length); /* past the end of the file */
    length -= r;
  }
  return 0;
}

static void run_splice(napi_env env, void *data) {
  (void)env;
  splice_job_t *j = data;
  int64_t total = 16;
  int64_t slots = 1;
  for (size_t i = 0; i < j->count; i++) {
    total += j->slices[i].length;
    /* A slice takes a slot per page it touches: one more than its length in pages when it
     * starts inside a page, and one more again when the file ends inside it and the rest
     * comes from the zero page. */
    slots += (j->slices[i].length + PAGE - 1) / PAGE + 2;
  }
  j->stage = 0;
  if (total > UINT32_MAX) {
    j->result = -EMSGSIZE;
    return;
  }
  int r = pipe_ready(slots);
  if (r < 0) {
    j->result = r;
    return;
  }
  /* struct fuse_out_header: len, error, unique. */
  unsigned char header[16];
  uint32_t len32 = (uint32_t)total;
  int32_t error = 0;
  memcpy(header, &len32, 4);
  memcpy(header + 4, &error, 4);
  memcpy(header + 8, &j->unique, 8);
  if (write(pipe_fds[1], header, sizeof header) != (ssize_t)sizeof header) {
    j->result = -EIO;
    pipe_drop();
    return;
  }
  for (size_t i = 0; i < j->count && r == 0; i++) {
    const slice_t *s = &j->slices[i];
    r = s->fd < 0 ? put_zeroes(s->length) : put_file((int)s->fd, s->position, s->length);
  }
  if (r < 0) {
    j->result = r;
    pipe_drop(); /* it holds part of a reply */
    return;
  }
  j->stage = 1;
  for (;;) {
    ssize_t n = splice(pipe_fds[0], NULL, j->fuse_fd, NULL, (size_t)total, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      j->result = -errno;
      pipe_drop();
    } else if (n != total) {
      j->result = -EIO;
      pipe_drop();
    } else {
      j->result = n;
    }
    return;
  }
}

/* pipeCapacity(bytes): the size a pipe of ours can be given, up to `bytes` (F_SETPIPE_SZ), or -errno. */
static napi_value PipeCapacity(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  int64_t want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_int64(env, argv[0], &want) != napi_ok || want <= 0 || want > PIPE_MAX_BYTES) {
    napi_throw_type_error(env, NULL, "pipeCapacity(bytes)");
    return NULL;
  }
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) < 0) return native_number(env, -errno);
  int got = fcntl(fds[0], F_SETPIPE_SZ, (int)want);
  if (got < 0) got = fcntl(fds[0], F_GETPIPE_SZ);
  if (got < 0) {
    int err = errno;
    close(fds[0]);
    close(fds[1]);
    return native_number(env, -err);
  }
  /* Without CAP_SYS_RESOURCE the limit is pipe-max-size: ask for that. */
  if (got < want) {
    int fd = open("/proc/sys/fs/pipe-max-size", O_RDONLY | O_CLOEXEC);
    char text[32] = {0};
    if (fd >= 0) {
      ssize_t n = read(fd, text, sizeof text - 1);
      close(fd);
      long max = n > 0 ? strtol(text, NULL, 10) : 0;
      if (max > got) {
        int again = fcntl(fds[0], F_SETPIPE_SZ, (int)(max < want ? max : want));
        if (again > got) got = again;
      }
    }
  }
  close(fds[0]);
  close(fds[1]);
  return native_number(env, got);
}

static void done_splice(napi_env env, napi_status status, void *data) {
  splice_job_t *j = data;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value argv[2];
  argv[0] = native_number(env, status == napi_ok ? j->stage : 0);
  argv[1] = native_number(env, status == napi_ok ? j->result : -ECANCELED);
  napi_ref cb_ref = j->cb_ref;
  napi_delete_async_work(env, j->work);
  free(j->slices);
  free(j);
  native_call_once(env, cb_ref, 2, argv);
  napi_close_handle_scope(env, scope);
}

static napi_value SpliceReply(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  size_t argc = 4;
  int64_t fuse_fd;
  double unique;
  napi_typedarray_type type;
  size_t length;
  void *values;
  napi_valuetype t;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4 ||
      napi_get_value_int64(env, argv[0], &fuse_fd) != napi_ok || napi_get_value_double(env, argv[1], &unique) != napi_ok ||
      napi_get_typedarray_info(env, argv[2], &type, &length, &values, NULL, NULL) != napi_ok ||
      type != napi_float64_array || length % 3 != 0 || napi_typeof(env, argv[3], &t) != napi_ok || t != napi_function ||
      unique < 0) {
    napi_throw_type_error(env, NULL, "spliceReply(fuseFd, unique, slices: Float64Array, callback)");
    return NULL;
  }
  splice_job_t *j = calloc(1, sizeof *j);
  slice_t *slices = calloc(length / 3 + 1, sizeof *slices);
  if (j == NULL || slices == NULL) {
    free(j);
    free(slices);
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  const double *v = values;
  for (size_t i = 0; i < length / 3; i++) {
    slices[i].fd = (int64_t)v[3 * i];
    slices[i].position = (int64_t)v[3 * i + 1];
    slices[i].length = (int64_t)v[3 * i + 2];
    if (slices[i].length < 0 || slices[i].position < 0) {
      free(j);
      free(slices);
      napi_throw_range_error(env, NULL, "spliceReply: negative position or length");
      return NULL;
    }
  }
  j->fuse_fd = (int)fuse_fd;
  j->unique = (uint64_t)unique;
  j->count = length / 3;
  j->slices = slices;
  napi_create_reference(env, argv[3], 1, &j->cb_ref);
  native_queue_work(env, "qcowfs.splice", run_splice, done_splice, j, &j->work);
  return NULL;
}

void register_splice(napi_env env, napi_value exports) {
  native_export(env, exports, "spliceReply", SpliceReply);
  native_export(env, exports, "pipeCapacity", PipeCapacity);
}
