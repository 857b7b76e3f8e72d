/* The parts of the native module; each registers its functions on `exports`. */
#ifndef QCOWFS_NATIVE_H
#define QCOWFS_NATIVE_H
#include <node_api.h>

void register_ofd_lock(napi_env env, napi_value exports);
void register_fast_io(napi_env env, napi_value exports);
void register_inflate(napi_env env, napi_value exports);
void register_uring(napi_env env, napi_value exports);
void register_splice(napi_env env, napi_value exports);

/* Shared helpers. */
napi_value native_number(napi_env env, int64_t v);
void native_export(napi_env env, napi_value exports, const char *name, napi_callback fn);

/* A JavaScript function kept for calls from the event loop, with its async context. */
typedef struct {
  napi_ref fn;
  napi_async_context context;
} native_callback_t;

void native_callback_init(napi_env env, native_callback_t *cb, napi_value fn, const char *name);
/* Call it from a libuv callback (inside a handle scope); an exception it throws is fatal, as Node's own. */
void native_callback_call(napi_env env, native_callback_t *cb, size_t argc, napi_value *argv);
void native_callback_free(napi_env env, native_callback_t *cb);

/* Run `execute` on the threadpool, then `complete` on the event loop (which deletes `*work`). */
void native_queue_work(napi_env env, const char *name, napi_async_execute_callback execute,
                       napi_async_complete_callback complete, void *data, napi_async_work *work);

/*
 * Call the function `fn_ref` holds once, from an async work's completion
 * (inside a handle scope), and drop the reference; an exception it throws
 * is fatal, as Node's own.
 */
void native_call_once(napi_env env, napi_ref fn_ref, size_t argc, napi_value *argv);

#endif
