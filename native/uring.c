/*
 * Image reads through io_uring, completed on the event loop.
 *
 * A read that misses the page cache otherwise goes to the libuv threadpool:
 * the disk interrupt wakes a pool thread, which wakes the event loop, and on
 * virtual machines each of those wake-ups costs tens of microseconds. With
 * io_uring the kernel completes a buffered read itself and signals an
 * eventfd that the event loop polls: one wake-up per read, no thread.
 *
 *   uringCreate(entries, cb)         -> handle, or -errno (no io_uring here)
 *   uringRead(h, fd, buf, off, len, pos, id) -> 0, or -errno (-EBUSY: ring full)
 *   uringClose(h)                    -> 0, or -EBUSY while reads are in flight
 *   cb(id, result) for each completion: bytes read, or -errno.
 *
 * Buffers must stay referenced by the caller until their completion.
 * Only the raw system calls are used (no liburing).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <uv.h>
#include "qcowfs-native.h"

typedef struct {
  int ring_fd, event_fd;
  unsigned entries;
  /* submission ring */
  void *sq_ptr;
  size_t sq_size;
  unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
  struct io_uring_sqe *sqes;
  size_t sqes_size;
  /* completion ring */
  void *cq_ptr;
  size_t cq_size;
  unsigned *cq_head, *cq_tail, *cq_mask;
  struct io_uring_cqe *cqes;
  unsigned in_flight;
  uv_poll_t poll;
  napi_env env;
  native_callback_t callback;
  int closing;
  /* Holders of the struct: its poll handle until closed, and the JavaScript
   * handle until collected (a call on a closed ring still reads `closing`).
   * The last to let go frees it. */
  int refs;
} ring_t;

static int sys_setup(unsigned entries, struct io_uring_params *p) {
  return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

static int sys_register(int fd, unsigned op, void *arg, unsigned n) {
  return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
}

static void ring_unmap(ring_t *r) {
  if (r->sqes != NULL && r->sqes != MAP_FAILED) munmap(r->sqes, r->sqes_size);
  if (r->cq_ptr != NULL && r->cq_ptr != MAP_FAILED && r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_size);
  if (r->sq_ptr != NULL && r->sq_ptr != MAP_FAILED) munmap(r->sq_ptr, r->sq_size);
  if (r->ring_fd >= 0) close(r->ring_fd);
  if (r->event_fd >= 0) close(r->event_fd);
}

/* Map the rings; 0 or -errno. */
static int ring_init(ring_t *r, unsigned entries) {
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  r->ring_fd = r->event_fd = -1;
  int fd = sys_setup(entries, &p);
  if (fd < 0) return -errno;
  r->ring_fd = fd;
  if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_NODROP)) return -ENOSYS;
  r->entries = p.sq_entries;
  r->sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  r->cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  if (r->cq_size > r->sq_size) r->sq_size = r->cq_size;
  r->sq_ptr = mmap(NULL, r->sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
  if (r->sq_ptr == MAP_FAILED) return -errno;
  r->cq_ptr = r->sq_ptr;
  r->sqes_size = p.sq_entries * sizeof(struct io_uring_sqe);
  r->sqes = mmap(NULL, r->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
  if (r->sqes == MAP_FAILED) return -errno;
  char *sq = r->sq_ptr, *cq = r->cq_ptr;
  r->sq_head = (unsigned *)(sq + p.sq_off.head);
  r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
  r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
  r->sq_array = (unsigned *)(sq + p.sq_off.array);
  r->cq_head = (unsigned *)(cq + p.cq_off.head);
  r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
  r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
  r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
  r->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (r->event_fd < 0) return -errno;
  if (sys_register(fd, IORING_REGISTER_EVENTFD, &r->event_fd, 1) < 0) return -errno;
  return 0;
}

/* Hand every completion to JavaScript. */
static void reap(ring_t *r) {
  napi_env env = r->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value argv[2];
  for (;;) {
    unsigned head = *r->cq_head;
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    if (head == tail) break;
    while (head != tail) {
      struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
      double id = (double)cqe->user_data;
      int res = cqe->res;
      head++;
      __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
      if (--r->in_flight == 0) uv_unref((uv_handle_t *)&r->poll);
      napi_create_double(env, id, &argv[0]);
      napi_create_int32(env, res, &argv[1]);
      native_callback_call(env, &r->callback, 2, argv);
      if (r->closing) break;
    }
    if (r->closing) break;
  }
  napi_close_handle_scope(env, scope);
}

static void on_event(uv_poll_t *handle, int status, int events) {
  (void)status;
  (void)events;
  ring_t *r = handle->data;
  uint64_t v;
  while (read(r->event_fd, &v, sizeof v) > 0) {
  }
  if (!r->closing) reap(r);
}

static void release_ring(ring_t *r) {
  if (--r->refs == 0) free(r);
}

static void on_closed(uv_handle_t *handle) {
  ring_t *r = handle->data;
  ring_unmap(r);
  release_ring(r);
}

static void on_collected(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  release_ring(data);
}

static ring_t *get_ring(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || p == NULL) return NULL;
  ring_t *r = p;
  return r->closing ? NULL : r;
}

static napi_value UringCreate(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  size_t argc = 2;
  uint32_t entries;
  napi_valuetype t;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_value_uint32(env, argv[0], &entries) != napi_ok || napi_typeof(env, argv[1], &t) != napi_ok ||
      t != napi_function || entries == 0 || entries > 4096) {
    napi_throw_type_error(env, NULL, "uringCreate(entries, callback)");
    return NULL;
  }
  ring_t *r = calloc(1, sizeof *r);
  if (r == NULL) return native_number(env, -ENOMEM);
  int err = ring_init(r, entries);
  if (err != 0) {
    ring_unmap(r);
    free(r);
    return native_number(env, err);
  }
  uv_loop_t *loop;
  napi_get_uv_event_loop(env, &loop);
  if (uv_poll_init(loop, &r->poll, r->event_fd) != 0) {
    ring_unmap(r);
    free(r);
    return native_number(env, -EINVAL);
  }
  r->poll.data = r;
  r->refs = 2;
  r->env = env;
  native_callback_init(env, &r->callback, argv[1], "qcowfs.uring");
  uv_poll_start(&r->poll, UV_READABLE, on_event);
  /* Reads in flight keep the loop alive; an idle ring does not. */
  uv_unref((uv_handle_t *)&r->poll);
  napi_value ext;
  napi_create_external(env, r, on_collected, NULL, &ext);
  return ext;
}

static napi_value UringRead(napi_env env, napi_callback_info info) {
  napi_value argv[7];
  size_t argc = 7;
  int64_t fd, off, len, pos;
  double id;
  void *data;
  size_t size;
  ring_t *r;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 7 ||
      (r = get_ring(env, argv[0])) == NULL || napi_get_value_int64(env, argv[1], &fd) != napi_ok ||
      napi_get_buffer_info(env, argv[2], &data, &size) != napi_ok ||
      napi_get_value_int64(env, argv[3], &off) != napi_ok || napi_get_value_int64(env, argv[4], &len) != napi_ok ||
      napi_get_value_int64(env, argv[5], &pos) != napi_ok || napi_get_value_double(env, argv[6], &id) != napi_ok ||
      off < 0 || len < 0 || len > 0x7ffff000 || (uint64_t)off + (uint64_t)len > size || pos < 0) {
    napi_throw_type_error(env, NULL, "uringRead(ring, fd, buffer, offset, length, position, id)");
    return NULL;
  }
  unsigned tail = *r->sq_tail;
  unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
  if (tail - head >= r->entries || r->in_flight >= r->entries) return native_number(env, -EBUSY);
  unsigned index = tail & *r->sq_mask;
  struct io_uring_sqe *sqe = &r->sqes[index];
  memset(sqe, 0, sizeof *sqe);
  sqe->opcode = IORING_OP_READ;
  sqe->fd = (int)fd;
  sqe->addr = (uint64_t)(uintptr_t)((char *)data + off);
  sqe->len = (uint32_t)len;
  sqe->off = (uint64_t)pos;
  sqe->user_data = (uint64_t)id;
  r->sq_array[index] = index;
  __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
  int n = sys_enter(r->ring_fd, 1, 0, 0);
  if (n < 0 && __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) == head) {
    /* Not taken: withdraw the entry so the ring stays consistent. */
    int e = errno;
    __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
    return native_number(env, -e);
  }
  if (r->in_flight++ == 0) uv_ref((uv_handle_t *)&r->poll);
  return native_number(env, 0);
}

static napi_value UringClose(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  ring_t *r;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || (r = get_ring(env, argv[0])) == NULL) {
    return native_number(env, 0);
  }
  /* The kernel may still write into the buffers of reads in flight after the ring is gone,
   * and their completions could no longer be reported: those must finish first. */
  if (r->in_flight > 0) return native_number(env, -EBUSY);
  r->closing = 1;
  uv_poll_stop(&r->poll);
  native_callback_free(env, &r->callback);
  uv_close((uv_handle_t *)&r->poll, on_closed);
  return native_number(env, 0);
}

void register_uring(napi_env env, napi_value exports) {
  native_export(env, exports, "uringCreate", UringCreate);
  native_export(env, exports, "uringRead", UringRead);
  native_export(env, exports, "uringClose", UringClose);
}
