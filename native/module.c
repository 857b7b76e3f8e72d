/*
 * qcowfs's native module: what Node's fs module cannot do.
 *   ofd-lock.c  QEMU-compatible image locks (fcntl F_OFD_SETLK / F_OFD_GETLK)
 *   fast-io.c   non-blocking I/O: polling /dev/fuse on the event loop, and
 *               page-cache reads and writes that never wait for the disk
 *   inflate.c   compressed clusters inflated on the threadpool
 *   uring.c     image reads that miss the page cache, through io_uring
 *   splice.c    READ replies spliced from the image file to /dev/fuse
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

void native_callback_init(napi_env env, native_callback_t *cb, napi_value fn, const char *name) {
  napi_value resource_name, resource;
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name);
  napi_create_object(env, &resource);
  napi_create_reference(env, fn, 1, &cb->fn);
  napi_async_init(env, resource, resource_name, &cb->context);
}

void native_callback_call(napi_env env, native_callback_t *cb, size_t argc, napi_value *argv) {
  napi_value fn, recv, result;
  napi_get_reference_value(env, cb->fn, &fn);
  napi_get_global(env, &recv);
  if (napi_make_callback(env, cb->context, recv, fn, argc, argv, &result) == napi_pending_exception) {
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
}

void native_callback_free(napi_env env, native_callback_t *cb) {
  napi_delete_reference(env, cb->fn);
  napi_async_destroy(env, cb->context);
}

void native_queue_work(napi_env env, const char *name, napi_async_execute_callback execute,
                       napi_async_complete_callback complete, void *data, napi_async_work *work) {
  napi_value resource_name;
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name);
  napi_create_async_work(env, NULL, resource_name, execute, complete, data, work);
  napi_queue_async_work(env, *work);
}

void native_call_once(napi_env env, napi_ref fn_ref, size_t argc, napi_value *argv) {
  napi_value fn, global, result;
  napi_get_reference_value(env, fn_ref, &fn);
  napi_delete_reference(env, fn_ref);
  napi_get_global(env, &global);
  if (napi_call_function(env, global, fn, argc, argv, &result) == napi_pending_exception) {
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
}

NAPI_MODULE_INIT() {
  register_ofd_lock(env, exports);
  register_fast_io(env, exports);
  register_inflate(env, exports);
  register_uring(env, exports);
  register_splice(env, exports);
  return exports;
}
