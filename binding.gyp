{
  "targets": [
    {
      "target_name": "ofd_lock",
      "sources": ["native/ofd-lock.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
