/*
 * Open file description byte-range locks (fcntl F_OFD_SETLK / F_OFD_GETLK),
 * the locks QEMU takes on image files. Node's fs module has no fcntl.
 *
 *   setLock(fd, start, length, type) -> 0 or an errno   type: 0 unlock, 1 read, 2 write
 *   testLock(fd, start, length, exclusive) -> 0 if the lock could be taken, else 1 (or -errno)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include "qcowfs-native.h"

static int get_args(napi_env env, napi_callback_info info, int64_t *out, size_t n) {
  napi_value argv[4];
  size_t argc = 4;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < n) return -1;
  for (size_t i = 0; i < n; i++) {
    if (napi_get_value_int64(env, argv[i], &out[i]) != napi_ok) return -1;
  }
  return 0;
}

/* The one-range lock description both calls use. */
static void describe(struct flock *fl, int64_t start, int64_t length, short type) {
  memset(fl, 0, sizeof *fl);
  fl->l_whence = SEEK_SET;
  fl->l_start = start;
  fl->l_len = length;
  fl->l_type = type;
}

static napi_value SetLock(napi_env env, napi_callback_info info) {
  int64_t a[4];
  if (get_args(env, info, a, 4) != 0) {
    napi_throw_type_error(env, NULL, "setLock(fd, start, length, type)");
    return NULL;
  }
  struct flock fl;
  describe(&fl, a[1], a[2], a[3] == 0 ? F_UNLCK : a[3] == 1 ? F_RDLCK : F_WRLCK);
  int r = fcntl((int)a[0], F_OFD_SETLK, &fl);
  return native_number(env, r == 0 ? 0 : errno);
}

static napi_value TestLock(napi_env env, napi_callback_info info) {
  int64_t a[4];
  if (get_args(env, info, a, 4) != 0) {
    napi_throw_type_error(env, NULL, "testLock(fd, start, length, exclusive)");
    return NULL;
  }
  struct flock fl;
  describe(&fl, a[1], a[2], a[3] ? F_WRLCK : F_RDLCK);
  if (fcntl((int)a[0], F_OFD_GETLK, &fl) != 0) return native_number(env, -errno);
  return native_number(env, fl.l_type == F_UNLCK ? 0 : 1);
}

void register_ofd_lock(napi_env env, napi_value exports) {
  native_export(env, exports, "setLock", SetLock);
  native_export(env, exports, "testLock", TestLock);
}
