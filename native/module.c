/*
 * qcowfs's native module: what Node's fs module cannot do.
 *   ofd-lock.c  QEMU-compatible image locks (fcntl F_OFD_SETLK / F_OFD_GETLK)
 *   fast-io.c   non-blocking I/O: polling /dev/fuse on the event loop, and
 *               page-cache reads and writes that never wait for the disk
 *   inflate.c   compressed clusters inflated on the threadpool
 *   uring.c     image reads that miss the page cache, through io_uring
 */
#include "qcowfs-native.h"

napi_value native_number(napi_env env, int64_t v) {
  napi_value r;
  napi_create_int64(env, v, &r);
  return r;
}

void native_export(napi_env env, napi_value exports, const char *name, napi_callback fn) {
  napi_value f;
  napi_create_function(env, name, NAPI_AUTO_LENGTH, fn, NULL, &f);
  napi_set_named_property(env, exports, name, f);
}

NAPI_MODULE_INIT() {
  register_ofd_lock(env, exports);
  register_fast_io(env, exports);
  register_inflate(env, exports);
  register_uring(env, exports);
  return exports;
}
