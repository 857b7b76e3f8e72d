{
  "targets": [
    {
      "target_name": "qcowfs_native",
      "sources": ["native/module.c", "native/ofd-lock.c", "native/fast-io.c", "native/inflate.c", "native/uring.c", "native/splice.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
