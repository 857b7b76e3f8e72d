/*
 * Raw-deflate decompression of one qcow2 cluster on the libuv threadpool,
 * with zlib as Node links it (its symbols are exported for addons). Node's
 * own asynchronous zlib builds a stream object per call, which costs more
 * than inflating a 64 KiB cluster; this is one inflate() per cluster, and
 * the clusters of one large read inflate in parallel.
 *
 *   inflateCluster(src, dst, cb)  cb(ok: boolean, message: string)
 *
 * The rule is QEMU's (qcow2_zlib_decompress): the stream must fill `dst`
 * exactly; `src` may hold trailing bytes, since compressed sizes are only
 * known to the sector.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include "qcowfs-native.h"

typedef struct {
  napi_async_work work;
  napi_ref src_ref, dst_ref, cb_ref;
  unsigned char *src, *dst;
  size_t src_len, dst_len;
  int ok;
  char message[128];
} inflate_job_t;

static void run_inflate(napi_env env, void *data) {
  (void)env;
  inflate_job_t *j = data;
  z_stream s;
  memset(&s, 0, sizeof s);
  /* -15: raw deflate with the largest window; QEMU writes 4 KiB windows (-12). */
  if (inflateInit2(&s, -15) != Z_OK) {
    snprintf(j->message, sizeof j->message, "inflateInit2 failed");
    return;
  }
  s.next_in = j->src;
  s.avail_in = (uInt)j->src_len;
  s.next_out = j->dst;
  s.avail_out = (uInt)j->dst_len;
  int r = inflate(&s, Z_FINISH);
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR) && s.avail_out == 0) {
    j->ok = 1;
  } else if (r == Z_STREAM_END || r == Z_BUF_ERROR) {
    snprintf(j->message, sizeof j->message, "deflate stream gave %lu bytes, expected %lu",
             (unsigned long)(j->dst_len - s.avail_out), (unsigned long)j->dst_len);
  } else {
    snprintf(j->message, sizeof j->message, "deflate stream invalid: %s", s.msg ? s.msg : "error");
  }
  inflateEnd(&s);
}

static void done_inflate(napi_env env, napi_status status, void *data) {
  inflate_job_t *j = data;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value argv[2];
  napi_get_boolean(env, status == napi_ok && j->ok, &argv[0]);
  napi_create_string_utf8(env, status == napi_ok ? j->message : "cancelled", NAPI_AUTO_LENGTH, &argv[1]);
  napi_ref cb_ref = j->cb_ref;
  napi_delete_reference(env, j->src_ref);
  napi_delete_reference(env, j->dst_ref);
  napi_delete_async_work(env, j->work);
  free(j);
  native_call_once(env, cb_ref, 2, argv);
  napi_close_handle_scope(env, scope);
}

static napi_value InflateCluster(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  size_t argc = 3;
  void *src, *dst;
  size_t src_len, dst_len;
  napi_valuetype t;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
      napi_get_buffer_info(env, argv[0], &src, &src_len) != napi_ok ||
      napi_get_buffer_info(env, argv[1], &dst, &dst_len) != napi_ok || napi_typeof(env, argv[2], &t) != napi_ok ||
      t != napi_function || src_len > 0xffffffffu || dst_len > 0xffffffffu) {
    napi_throw_type_error(env, NULL, "inflateCluster(src, dst, callback)");
    return NULL;
  }
  inflate_job_t *j = calloc(1, sizeof *j);
  if (j == NULL) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  j->src = src;
  j->dst = dst;
  j->src_len = src_len;
  j->dst_len = dst_len;
  napi_create_reference(env, argv[0], 1, &j->src_ref);
  napi_create_reference(env, argv[1], 1, &j->dst_ref);
  napi_create_reference(env, argv[2], 1, &j->cb_ref);
  native_queue_work(env, "qcowfs.inflate", run_inflate, done_inflate, j, &j->work);
  return NULL;
}

void register_inflate(napi_env env, napi_value exports) {
  native_export(env, exports, "inflateCluster", InflateCluster);
}
