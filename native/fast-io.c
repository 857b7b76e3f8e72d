/*
 * Non-blocking I/O for the event loop thread.
 *
 * Node cannot poll a character device, so without this module /dev/fuse is
 * read by blocking reads parked on the libuv threadpool, and every request
 * pays a hop to a pool thread and back. Here the device is watched with a
 * uv_poll handle on the loop itself and read with non-blocking read(2).
 *
 * Image reads are first tried with preadv2 and RWF_NOWAIT: when the data is
 * in the page cache it is copied on the spot; otherwise the call answers
 * -EAGAIN at once and the caller goes on asynchronously. (Buffered writes
 * with RWF_NOWAIT are refused by ext4 and tmpfs, so writes do without.)
 * The blocking reads, the image writes and the reply writes of the hot path
 * are plain system calls here too: Node's fs.readSync, fs.writeSync and
 * fs.writevSync add tracing checks, a request wrapper and a property lookup
 * per buffer to each.
 *
 *   setNonblock(fd)                          -> 0 or errno
 *   readInto(fd, buf)                        -> bytes read, or -errno
 *   preadNowait(fd, buf, off, len, pos)      -> bytes read, or -errno
 *   preadFull(fd, buf, off, len, pos)        -> pread(2) until done or end of file: bytes read, or -errno
 *   pwriteFull(fd, buf, off, len, pos)       -> pwrite(2) until done: bytes written, or -errno
 *   writeTwo(fd, a, b)                       -> writev(2) of a then b in one call: bytes written, or -errno
 *   seekData(fd, pos, hole)                  -> lseek(SEEK_DATA, or SEEK_HOLE if hole), or -errno
 *   dropCached(fd, pos, len)                 -> posix_fadvise(POSIX_FADV_DONTNEED) of the range: 0 or an errno
 *   startWriteback(fd, pos, len)             -> sync_file_range(SYNC_FILE_RANGE_WRITE) of the range: 0 or -errno
 *   readAhead(fd, pos, len)                  -> readahead(2) of the range (starts reading what is not
 *                                               cached into the page cache, without waiting): 0 or -errno
 *   cacheStat(fd, pos, len, out)             -> 0 or -errno; out[0] = bytes of the range in the page
 *                                               cache, out[1] = bytes dirty or under writeback (cachestat)
 *   pollCreate(fd, cb)                       -> handle; cb(status) when readable
 *   pollStart(h) / pollStop(h) / pollClose(h)
 *   pollSpin(h, us)                          -> keep the event loop turning without sleeping (its
 *                                               poll phase then checks the device with a zero timeout)
 *                                               for the next `us` microseconds; 0 stops at once
 *
 * None of these throw for an I/O error: errors are returned as -errno so the
 * hot path needs no exception handling. They throw only for bad arguments.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <uv.h>
#include "qcowfs-native.h"

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define MAX_ARGS 5

typedef struct {
  napi_value argv[MAX_ARGS];
  size_t argc;
} args_t;

static int get_args(napi_env env, napi_callback_info info, args_t *a, size_t need) {
  a->argc = MAX_ARGS;
  if (napi_get_cb_info(env, info, &a->argc, a->argv, NULL, NULL) != napi_ok || a->argc < need) return -1;
  return 0;
}

static int get_int(napi_env env, napi_value v, int64_t *out) {
  return napi_get_value_int64(env, v, out) == napi_ok ? 0 : -1;
}

static int get_buffer(napi_env env, napi_value v, char **data, size_t *len) {
  void *p;
  if (napi_get_buffer_info(env, v, &p, len) != napi_ok) return -1;
  *data = p;
  return 0;
}

static napi_value SetNonblock(napi_env env, napi_callback_info info) {
  args_t a;
  int64_t fd;
  if (get_args(env, info, &a, 1) || get_int(env, a.argv[0], &fd)) {
    napi_throw_type_error(env, NULL, "setNonblock(fd)");
    return NULL;
  }
  int flags = fcntl((int)fd, F_GETFL);
  if (flags < 0 || fcntl((int)fd, F_SETFL, flags | O_NONBLOCK) < 0) return native_number(env, errno);
  return native_number(env, 0);
}

static napi_value ReadInto(napi_env env, napi_callback_info info) {
  args_t a;
  int64_t fd;
  char *data;
  size_t len;
  if (get_args(env, info, &a, 2) || get_int(env, a.argv[0], &fd) || get_buffer(env, a.argv[1], &data, &len)) {
    napi_throw_type_error(env, NULL, "readInto(fd, buffer)");
    return NULL;
  }
  ssize_t n = read((int)fd, data, len);
  return native_number(env, n < 0 ? -errno : n);
}

/*
 * Arguments (fd, buffer, offset, length, position) of a positioned read:
 * 0, or -1 with a TypeError naming `usage` thrown.
 */
static int positioned_args(napi_env env, napi_callback_info info, const char *usage, int64_t *fd, struct iovec *iov,
                           int64_t *pos) {
  args_t a;
  int64_t off, len;
  char *data;
  size_t size;
  if (get_args(env, info, &a, 5) || get_int(env, a.argv[0], fd) || get_buffer(env, a.argv[1], &data, &size) ||
      get_int(env, a.argv[2], &off) || get_int(env, a.argv[3], &len) || get_int(env, a.argv[4], pos) ||
      off < 0 || len < 0 || (uint64_t)off + (uint64_t)len > size || *pos < 0) {
    napi_throw_type_error(env, NULL, usage);
    return -1;
  }
  iov->iov_base = data + off;
  iov->iov_len = (size_t)len;
  return 0;
}

static napi_value PreadNowait(napi_env env, napi_callback_info info) {
  int64_t fd, pos;
  struct iovec iov;
  if (positioned_args(env, info, "preadNowait(fd, buffer, offset, length, position)", &fd, &iov, &pos)) return NULL;
  ssize_t n = preadv2((int)fd, &iov, 1, pos, RWF_NOWAIT);
  return native_number(env, n < 0 ? -errno : n);
}

/*
 * pread(2) or pwrite(2) until the range is done (or, reading, the file ends):
 * the bytes done, or -errno.
 */
static napi_value positioned_full(napi_env env, napi_callback_info info, const char *usage, bool writing) {
  int64_t fd, pos;
  struct iovec iov;
  if (positioned_args(env, info, usage, &fd, &iov, &pos)) return NULL;
  size_t done = 0;
  while (done < iov.iov_len) {
    char *at = (char *)iov.iov_base + done;
    size_t left = iov.iov_len - done;
    off_t where = pos + (off_t)done;
    ssize_t n = writing ? pwrite((int)fd, at, left, where) : pread((int)fd, at, left, where);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return native_number(env, -errno);
    if (n == 0) break;
    done += (size_t)n;
  }
  return native_number(env, (int64_t)done);
}

static napi_value PreadFull(napi_env env, napi_callback_info info) {
  return positioned_full(env, info, "preadFull(fd, buffer, offset, length, position)", false);
}

static napi_value PwriteFull(napi_env env, napi_callback_info info) {
  return positioned_full(env, info, "pwriteFull(fd, buffer, offset, length, position)", true);
}

/* writev(2) of two whole buffers in one call (a reply's header and body): bytes written, or -errno. */
static napi_value WriteTwo(napi_env env, napi_callback_info info) {
  args_t a;
  int64_t fd;
  struct iovec iov[2];
  size_t len0, len1;
  char *d0, *d1;
  if (get_args(env, info, &a, 3) || get_int(env, a.argv[0], &fd) || get_buffer(env, a.argv[1], &d0, &len0) ||
      get_buffer(env, a.argv[2], &d1, &len1)) {
    napi_throw_type_error(env, NULL, "writeTwo(fd, first, second)");
    return NULL;
  }
  iov[0].iov_base = d0;
  iov[0].iov_len = len0;
  iov[1].iov_base = d1;
  iov[1].iov_len = len1;
  ssize_t n;
  do {
    n = writev((int)fd, iov, 2);
  } while (n < 0 && errno == EINTR);
  return native_number(env, n < 0 ? -errno : n);
}

static napi_value SeekData(napi_env env, napi_callback_info info) {
  args_t a;
  int64_t fd, pos;
  bool hole;
  if (get_args(env, info, &a, 3) || get_int(env, a.argv[0], &fd) || get_int(env, a.argv[1], &pos) ||
      napi_get_value_bool(env, a.argv[2], &hole) != napi_ok || pos < 0) {
    napi_throw_type_error(env, NULL, "seekData(fd, position, hole)");
    return NULL;
  }
  off_t r = lseek((int)fd, (off_t)pos, hole ? SEEK_HOLE : SEEK_DATA);
  return native_number(env, r < 0 ? -errno : (int64_t)r);
}

/* --- polling ------------------------------------------------------------- */

typedef struct {
  uv_poll_t handle;
  /* Active while spinning: an active idle handle makes the loop poll with a
   * zero timeout, and its callback runs in C, so spinning runs no JavaScript
   * and allocates nothing (setImmediate allocates on every turn). */
  uv_idle_t spin;
  uint64_t spin_until; /* uv_hrtime() deadline, ns */
  napi_env env;
  native_callback_t callback;
  int active;
  int spinning;
  int closing;
  /* Holders of the struct: its two libuv handles until closed, and the
   * JavaScript handle until collected (a call on a closed handle still reads
   * `closing`). The last to let go frees it. */
  int refs;
} poller_t;

static void on_poll(uv_poll_t *handle, int status, int events) {
  (void)events;
  poller_t *p = handle->data;
  napi_env env = p->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value arg;
  napi_create_int32(env, status, &arg);
  native_callback_call(env, &p->callback, 1, &arg);
  napi_close_handle_scope(env, scope);
}

static void release_poller(poller_t *p) {
  if (--p->refs == 0) free(p);
}

static void on_closed(uv_handle_t *handle) {
  release_poller(handle->data);
}

static void on_collected(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  release_poller(data);
}

static void stop_spinning(poller_t *p) {
  if (p->spinning) uv_idle_stop(&p->spin);
  p->spinning = 0;
}

static void on_spin(uv_idle_t *handle) {
  poller_t *p = handle->data;
  if (uv_hrtime() >= p->spin_until) stop_spinning(p);
}

/* The open poller a handle value holds; NULL with an exception thrown when it is none. */
static poller_t *poller_of(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, NULL, "expected a poll handle");
    return NULL;
  }
  poller_t *poller = p;
  if (poller->closing) {
    napi_throw_error(env, NULL, "the poll handle is closed");
    return NULL;
  }
  return poller;
}

/* The poller of a call's first argument (see poller_of). */
static poller_t *get_poller(napi_env env, napi_callback_info info) {
  args_t a;
  if (get_args(env, info, &a, 1)) {
    napi_throw_type_error(env, NULL, "expected a poll handle");
    return NULL;
  }
  return poller_of(env, a.argv[0]);
}

static napi_value PollCreate(napi_env env, napi_callback_info info) {
  args_t a;
  int64_t fd;
  napi_valuetype type;
  if (get_args(env, info, &a, 2) || get_int(env, a.argv[0], &fd) || napi_typeof(env, a.argv[1], &type) != napi_ok ||
      type != napi_function) {
    napi_throw_type_error(env, NULL, "pollCreate(fd, callback)");
    return NULL;
  }
  uv_loop_t *loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) {
    napi_throw_error(env, NULL, "no event loop");
    return NULL;
  }
  poller_t *p = calloc(1, sizeof *p);
  if (p == NULL) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  int r = uv_poll_init(loop, &p->handle, (int)fd);
  if (r != 0) {
    free(p);
    napi_throw_error(env, uv_err_name(r), uv_strerror(r));
    return NULL;
  }
  uv_idle_init(loop, &p->spin);
  p->handle.data = p;
  p->spin.data = p;
  p->refs = 3;
  p->env = env;
  native_callback_init(env, &p->callback, a.argv[1], "qcowfs.poll");
  napi_value ext;
  napi_create_external(env, p, on_collected, NULL, &ext);
  return ext;
}

static napi_value PollStart(napi_env env, napi_callback_info info) {
  poller_t *p = get_poller(env, info);
  if (p == NULL) return NULL;
  if (!p->active) {
    int r = uv_poll_start(&p->handle, UV_READABLE, on_poll);
    if (r != 0) return native_number(env, r);
    p->active = 1;
  }
  return native_number(env, 0);
}

static napi_value PollStop(napi_env env, napi_callback_info info) {
  poller_t *p = get_poller(env, info);
  if (p == NULL) return NULL;
  if (p->active) {
    uv_poll_stop(&p->handle);
    p->active = 0;
  }
  return native_number(env, 0);
}

static napi_value PollClose(napi_env env, napi_callback_info info) {
  args_t a;
  void *ptr = NULL;
  if (get_args(env, info, &a, 1) || napi_get_value_external(env, a.argv[0], &ptr) != napi_ok || ptr == NULL) {
    napi_throw_type_error(env, NULL, "pollClose(handle)");
    return NULL;
  }
  poller_t *p = ptr;
  if (p->closing) return native_number(env, 0);
  p->closing = 1;
  p->active = 0;
  p->spinning = 0;
  native_callback_free(env, &p->callback);
  uv_close((uv_handle_t *)&p->handle, on_closed);
  uv_close((uv_handle_t *)&p->spin, on_closed);
  return native_number(env, 0);
}

static napi_value PollSpin(napi_env env, napi_callback_info info) {
  args_t a;
  int64_t us;
  if (get_args(env, info, &a, 2) || get_int(env, a.argv[1], &us)) {
    napi_throw_type_error(env, NULL, "pollSpin(handle, microseconds)");
    return NULL;
  }
  poller_t *p = poller_of(env, a.argv[0]);
  if (p == NULL) return NULL;
  if (us <= 0) {
    stop_spinning(p);
    return native_number(env, 0);
  }
  p->spin_until = uv_hrtime() + (uint64_t)us * 1000;
  if (!p->spinning) {
    int r = uv_idle_start(&p->spin, on_spin);
    if (r != 0) return native_number(env, r);
    p->spinning = 1;
  }
  return native_number(env, 0);
}


#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif

/* cachestat(2), Linux 6.5: what of a file range the page cache holds, without reading it. */
struct qcowfs_cachestat_range {
  uint64_t off;
  uint64_t len;
};
struct qcowfs_cachestat {
  uint64_t nr_cache;
  uint64_t nr_dirty;
  uint64_t nr_writeback;
  uint64_t nr_evicted;
  uint64_t nr_recently_evicted;
};

static napi_value CacheStat(napi_env env, napi_callback_info info) {
  args_t a;
  int64_t fd, pos, len;
  napi_typedarray_type type;
  size_t count;
  void *values;
  if (get_args(env, info, &a, 4) || get_int(env, a.argv[0], &fd) || get_int(env, a.argv[1], &pos) ||
      get_int(env, a.argv[2], &len) || pos < 0 || len <= 0 ||
      napi_get_typedarray_info(env, a.argv[3], &type, &count, &values, NULL, NULL) != napi_ok ||
      type != napi_float64_array || count < 2) {
    napi_throw_type_error(env, NULL, "cacheStat(fd, position, length, out: Float64Array(2))");
    return NULL;
  }
  struct qcowfs_cachestat_range range = {(uint64_t)pos, (uint64_t)len};
  struct qcowfs_cachestat cs = {0};
  if (syscall(__NR_cachestat, (int)fd, &range, &cs, 0) < 0) return native_number(env, -errno);
  double page = (double)sysconf(_SC_PAGESIZE);
  ((double *)values)[0] = (double)cs.nr_cache * page;
  ((double *)values)[1] = (double)(cs.nr_dirty + cs.nr_writeback) * page;
  return native_number(env, 0);
}

/* (fd, position, length) with position and length >= 0; throws a TypeError naming `usage` otherwise. */
static bool get_fd_range(napi_env env, napi_callback_info info, const char *usage, int64_t *fd, int64_t *pos, int64_t *len) {
  args_t a;
  if (get_args(env, info, &a, 3) || get_int(env, a.argv[0], fd) || get_int(env, a.argv[1], pos) ||
      get_int(env, a.argv[2], len) || *pos < 0 || *len < 0) {
    napi_throw_type_error(env, NULL, usage);
    return false;
  }
  return true;
}

static napi_value DropCached(napi_env env, napi_callback_info info) {
  int64_t fd, pos, len;
  if (!get_fd_range(env, info, "dropCached(fd, position, length)", &fd, &pos, &len)) return NULL;
  return native_number(env, posix_fadvise((int)fd, (off_t)pos, (off_t)len, POSIX_FADV_DONTNEED));
}

static napi_value StartWriteback(napi_env env, napi_callback_info info) {
  int64_t fd, pos, len;
  if (!get_fd_range(env, info, "startWriteback(fd, position, length)", &fd, &pos, &len)) return NULL;
  if (sync_file_range((int)fd, (off_t)pos, (off_t)len, SYNC_FILE_RANGE_WRITE) < 0) return native_number(env, -errno);
  return native_number(env, 0);
}

static napi_value ReadAhead(napi_env env, napi_callback_info info) {
  int64_t fd, pos, len;
  if (!get_fd_range(env, info, "readAhead(fd, position, length)", &fd, &pos, &len)) return NULL;
  if (readahead((int)fd, (off64_t)pos, (size_t)len) < 0) return native_number(env, -errno);
  return native_number(env, 0);
}

void register_fast_io(napi_env env, napi_value exports) {
  native_export(env, exports, "setNonblock", SetNonblock);
  native_export(env, exports, "readInto", ReadInto);
  native_export(env, exports, "preadNowait", PreadNowait);
  native_export(env, exports, "preadFull", PreadFull);
  native_export(env, exports, "pwriteFull", PwriteFull);
  native_export(env, exports, "writeTwo", WriteTwo);
  native_export(env, exports, "seekData", SeekData);
  native_export(env, exports, "cacheStat", CacheStat);
  native_export(env, exports, "dropCached", DropCached);
  native_export(env, exports, "startWriteback", StartWriteback);
  native_export(env, exports, "readAhead", ReadAhead);
  native_export(env, exports, "pollCreate", PollCreate);
  native_export(env, exports, "pollStart", PollStart);
  native_export(env, exports, "pollStop", PollStop);
  native_export(env, exports, "pollClose", PollClose);
  native_export(env, exports, "pollSpin", PollSpin);
}
