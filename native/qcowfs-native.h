/* The parts of the native module; each registers its functions on `exports`. */
#ifndef QCOWFS_NATIVE_H
#define QCOWFS_NATIVE_H
#include <node_api.h>

void register_ofd_lock(napi_env env, napi_value exports);
void register_fast_io(napi_env env, napi_value exports);
void register_inflate(napi_env env, napi_value exports);
void register_uring(napi_env env, napi_value exports);

/* Shared helpers. */
napi_value native_number(napi_env env, int64_t v);
void native_export(napi_env env, napi_value exports, const char *name, napi_callback fn);

#endif
