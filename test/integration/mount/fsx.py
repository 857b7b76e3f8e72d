#!/usr/bin/env python3
"""An fsx-style exerciser: a seeded random mix of reads, writes, truncates,
hole punches, zero ranges, mmap reads and writes, fsyncs, reopens and page
cache drops on one file, each checked against an in-memory model of a plain
file. The operations depend only on the seed and the model, so two files
that both behave as plain files see the same run and end with the same bytes.

usage: fsx.py FILE SEED OPS MAXSIZE [--plain] [--dump PATH]

--plain    FILE is on a file system without FALLOC_FL_ZERO_RANGE (tmpfs):
           a zero range that fails with EOPNOTSUPP is done as a punched hole,
           which leaves the same bytes.
--dump P   write the final model to P.

Prints "ok OPS size=N sha256=HEX" and exits 0, or prints the last operations
and "FAIL: ..." and exits 1.
"""
import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import random
import sys

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]

# Offsets near these boundaries are where cluster, subcluster and page logic splits.
GRAINS = [512, 2048, 4096, 65536, 2 * 1024 * 1024]


def fallocate(fd, mode, off, length):
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Failure(Exception):
    pass


def main():
    args = sys.argv[1:]
    plain = "--plain" in args
    dump = None
    if "--dump" in args:
        dump = args[args.index("--dump") + 1]
        del args[args.index("--dump"):args.index("--dump") + 2]
    args = [a for a in args if a != "--plain"]
    path, seed, ops, maxsize = args[0], int(args[1]), int(args[2]), int(args[3])
    rnd = random.Random(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 0)
    model = bytearray()
    log = []

    def fail(msg):
        raise Failure(msg)

    def check_read(off, length):
        got = os.pread(fd, length, off)
        want = bytes(model[off:off + length])
        if got != want:
            n = min(len(got), len(want))
            first = next((i for i in range(n) if got[i] != want[i]), n)
            fail("read %d+%d differs at +%d (got %d bytes, want %d; byte there %r, want %r)" % (
                off, length, first, len(got), len(want), got[first:first + 1], want[first:first + 1]))

    def pick_offset(limit):
        """Anywhere below limit, often right at or next to a cluster boundary or the end."""
        if limit <= 0:
            return 0
        r = rnd.random()
        if r < 0.3:
            g = rnd.choice(GRAINS)
            base = rnd.randrange(0, limit // g + 1) * g
            return max(0, min(limit - 1, base + rnd.choice([-1, 0, 0, 1])))
        if r < 0.4 and model:
            return max(0, min(limit - 1, len(model) + rnd.randrange(-4096, 4096)))
        return rnd.randrange(0, limit)

    def pick_length():
        r = rnd.random()
        if r < 0.2:
            return rnd.randrange(1, 16)
        if r < 0.3:
            return rnd.choice(GRAINS) + rnd.choice([-1, 0, 1])
        return rnd.randrange(1, 256 * 1024)

    kinds = ["read"] * 4 + ["write"] * 4 + ["truncate", "punch", "punch", "zero", "zero", "mapread", "mapwrite", "mapwrite",
                                             "fsync", "reopen", "dropcache"]
    try:
        for n in range(ops):
            op = rnd.choice(kinds)
            size = len(model)
            if op == "read":
                off = pick_offset(size + 1)
                length = pick_length()
                log.append("%d read %d %d" % (n, off, length))
                check_read(off, length)
            elif op == "write":
                off = pick_offset(maxsize)
                length = pick_length()
                data = rnd.randbytes(length)
                log.append("%d write %d %d" % (n, off, length))
                if os.pwrite(fd, data, off) != length:
                    fail("short write")
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + length] = data
            elif op == "truncate":
                newsize = pick_offset(maxsize)
                log.append("%d truncate %d (from %d)" % (n, newsize, size))
                os.ftruncate(fd, newsize)
                if newsize < len(model):
                    del model[newsize:]
                else:
                    model.extend(bytes(newsize - len(model)))
            elif op in ("punch", "zero"):
                if size == 0:
                    continue
                off = pick_offset(size)
                length = pick_length()
                # Sometimes past the end: with KEEP_SIZE the size stays.
                mode = (FALLOC_FL_PUNCH_HOLE if op == "punch" else FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE
                log.append("%d %s %d %d" % (n, op, off, length))
                try:
                    fallocate(fd, mode, off, length)
                except OSError as e:
                    if not (plain and op == "zero" and e.errno == errno.EOPNOTSUPP):
                        raise
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
                end = min(off + length, size)
                model[off:end] = bytes(end - off)
            elif op in ("mapread", "mapwrite"):
                if size < 1:
                    continue
                off = pick_offset(size)
                length = min(pick_length(), size - off)
                page = off - off % mmap.PAGESIZE
                mlen = off + length - page
                m = mmap.mmap(fd, mlen, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=page)
                try:
                    if op == "mapread":
                        log.append("%d mapread %d %d" % (n, off, length))
                        if m[off - page:off - page + length] != bytes(model[off:off + length]):
                            fail("mapread %d+%d differs" % (off, length))
                    else:
                        data = rnd.randbytes(length)
                        log.append("%d mapwrite %d %d" % (n, off, length))
                        m[off - page:off - page + length] = data
                        if rnd.random() < 0.5:
                            m.flush()
                        model[off:off + length] = data
                finally:
                    m.close()
            elif op == "fsync":
                log.append("%d fsync" % n)
                os.fsync(fd)
            elif op == "reopen":
                log.append("%d reopen" % n)
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
            else:
                # Write back and drop the cached pages: the next reads come from the file system.
                log.append("%d dropcache" % n)
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            st = os.fstat(fd).st_size
            if st != len(model):
                fail("size %d, want %d" % (st, len(model)))
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        check_read(0, len(model) + 1)
    except (Failure, OSError) as e:
        print("\n".join(log[-25:]))
        print("FAIL: %s" % e)
        sys.exit(1)
    os.close(fd)
    if dump:
        with open(dump, "wb") as f:
            f.write(model)
    print("ok %d size=%d sha256=%s" % (ops, len(model), hashlib.sha256(model).hexdigest()))


main()
