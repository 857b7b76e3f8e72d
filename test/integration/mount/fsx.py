#!/usr/bin/env python3
"""An fsx-style exerciser: a seeded random mix of reads, writes, truncates,
hole punches, zero ranges and mmap reads/writes on one file, each checked
against an in-memory model of a plain file. Exits non-zero on the first
difference, printing the operation log tail.

usage: fsx.py FILE SEED OPS MAXSIZE
"""
import ctypes
import ctypes.util
import mmap
import os
import random
import sys

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def fallocate(fd, mode, off, length):
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def main():
    path, seed, ops, maxsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rnd = random.Random(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 0)
    model = bytearray()
    log = []

    def fail(msg):
        print("\n".join(log[-20:]))
        print("FAIL:", msg)
        sys.exit(1)

    def check_read(off, length):
        got = os.pread(fd, length, off)
        want = bytes(model[off:off + length])
        if got != want:
            first = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
            fail("read %d+%d differs at +%d (got %d bytes, want %d)" % (off, length, first, len(got), len(want)))

    for n in range(ops):
        op = rnd.choice(["read", "read", "write", "write", "truncate", "punch", "zero", "mapread", "mapwrite"])
        size = len(model)
        off = rnd.randrange(0, maxsize)
        length = rnd.randrange(1, 256 * 1024)
        if op == "read":
            off = rnd.randrange(0, size + 1) if size else 0
            log.append("%d read %d %d" % (n, off, length))
            check_read(off, length)
        elif op == "write":
            data = bytes([rnd.randrange(1, 256)]) * length
            log.append("%d write %d %d" % (n, off, length))
            os.pwrite(fd, data, off)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + length] = data
        elif op == "truncate":
            newsize = rnd.randrange(0, maxsize)
            log.append("%d truncate %d" % (n, newsize))
            os.ftruncate(fd, newsize)
            if newsize < len(model):
                del model[newsize:]
            else:
                model.extend(bytes(newsize - len(model)))
        elif op in ("punch", "zero"):
            if size == 0:
                continue
            off = rnd.randrange(0, size)
            length = min(length, size - off)
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if op == "punch" else FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            log.append("%d %s %d %d" % (n, op, off, length))
            fallocate(fd, mode, off, length)
            model[off:off + length] = bytes(length)
        else:
            if size < 4096:
                continue
            off = rnd.randrange(0, size - 1)
            length = min(length, size - off)
            page = off - off % mmap.PAGESIZE
            mlen = off + length - page
            m = mmap.mmap(fd, mlen, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=page)
            try:
                if op == "mapread":
                    log.append("%d mapread %d %d" % (n, off, length))
                    if m[off - page:off - page + length] != bytes(model[off:off + length]):
                        fail("mapread %d+%d differs" % (off, length))
                else:
                    data = bytes([rnd.randrange(1, 256)]) * length
                    log.append("%d mapwrite %d %d" % (n, off, length))
                    m[off - page:off - page + length] = data
                    m.flush()
                    model[off:off + length] = data
            finally:
                m.close()
        if os.fstat(fd).st_size != len(model):
            fail("size %d, want %d" % (os.fstat(fd).st_size, len(model)))
    check_read(0, len(model) + 1)
    os.fsync(fd)
    os.close(fd)
    print("ok %d ops" % ops)


main()
