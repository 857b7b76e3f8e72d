import * as fs from 'fs';
import { constants as osConstants } from 'os';
import { BlockDevice, FileBacked, HoleMap } from './block-device';
import { lockImage, READ_ONLY_LOCK, READ_WRITE_LOCK } from './image-lock';
import { loadNative, type NativeModule } from './native';
import { uringReader, type UringReader } from './uring';

const E = osConstants.errno;

/** After this many page-cache misses in a row, RWF_NOWAIT reads become occasional probes. */
const NOWAIT_MISS_LIMIT = 8;
/** Once they are, one read in this many still tries the page cache first. */
const NOWAIT_PROBE_EVERY = 16;

/**
 * Writes up to this size are issued synchronously: they only copy into the
 * page cache, and the thread-pool round trip (two wake-ups) cost more than the
 * copy. That holds up to the largest FUSE WRITE (1 MiB): the sync phase of
 * the ext4-on-loop benchmark, 190 writes of 4-570 KiB that wait on each
 * other, took 0.085-0.114 s against 0.109-0.136 s with the limit at 64 KiB.
 * The price: a write the kernel throttles (too much dirty data for the disk)
 * holds up the event loop, not a pool thread, while it waits.
 */
const SYNC_WRITE_MAX = 1024 * 1024;

/**
 * Reads at least this large of a range the page cache does not hold whole
 * go past the cache (O_DIRECT), in pieces of DIRECT_READ_PIECE read at once.
 * The data lands in the caller's buffer without filling fresh page-cache
 * pages that nothing would read again: the transport above keeps its own
 * cache of what it serves. Ranges held whole, and ranges with writes not
 * yet on disk, are read through the cache. Small reads always are, with the
 * kernel's readahead; large ones going direct also keep that readahead from
 * running ahead of them and filling the cache after all.
 */
const DIRECT_READ_MIN = 128 * 1024;
const DIRECT_READ_PIECE = 128 * 1024;
/** O_DIRECT wants position, length and memory aligned to the device's block; a page covers every block size. */
const DIRECT_ALIGN = 4096;
/** The aligned buffer a direct read into an unaligned one goes through, in turns of this size. */
const BOUNCE_BYTES = 1024 * 1024;
const MAX_BOUNCES = 4;
/**
 * Reads up to this size may block the calling thread when the owner says
 * nothing else waits for it (`blockingReads`). A cold 4 KiB read then costs
 * one system call instead of a submission and the wake-up that reports its
 * completion: cold random 4 KiB reads at queue depth 1 through a mount, 8
 * interleaved runs, median 7134 IOPS against 6341 asynchronously (higher in
 * 7 of 8). Larger reads stay asynchronous: blocking for them would hold up
 * requests that arrive meanwhile for longer.
 */
const BLOCKING_READ_MAX = 128 * 1024;

/** fs.read as a promise, without FileHandle's extra bookkeeping on the hot path. */
function readAt(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function writeAt(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function call<T>(fn: (cb: (err: NodeJS.ErrnoException | null, v?: T) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v as T))));
}

/** A block device over a host file, with positioned I/O on one descriptor. */
export class FileDevice implements BlockDevice, HoleMap, FileBacked {
  private length: number;
  private closed = false;
  /**
   * Reads are first tried with RWF_NOWAIT (page-cache hits are served on the
   * spot, without a threadpool round trip); null where the native module or
   * the host filesystem cannot. Misses go through io_uring where there is
   * one (src/io/uring.ts), else to the threadpool.
   */
  private nowait: NativeModule | null = loadNative();
  /** The native module for everything else (cachestat, alignment), whatever became of `nowait`. */
  private readonly native: NativeModule | null = loadNative();
  /** Consecutive page-cache misses (capped), and the counter that spaces out probes once they pile up. */
  private misses = 0;
  private probe = 0;
  /** Where misses go when there is an io_uring; null where there is none or this file refuses it. */
  private ring: UringReader | null = uringReader();
  /** Written to (or resized) since the last completed fdatasync: flush() has something to do. */
  private unsynced = false;
  /**
   * A second descriptor of the same file opened with O_DIRECT, for cold
   * large reads (see DIRECT_READ_MIN); -1 when not asked for (the file keeps
   * its readahead) or where the file, the host or the kernel cannot (no
   * io_uring, no cachestat, a file system without O_DIRECT).
   * Closing it with reads in flight is safe: io_uring holds the file.
   */
  private directFd = -1;
  private readonly cacheStat = new Float64Array(2);
  /** Aligned buffers for direct reads into unaligned ones, kept for reuse. */
  private readonly bounces: Buffer[] = [];
  /** See open(); undefined: reads that may wait always complete asynchronously. */
  private blockingReads: (() => boolean) | undefined;

  private constructor(
    readonly fd: number,
    readonly name: string,
    readonly readOnly: boolean,
    length: number,
  ) {
    this.length = length;
  }

  /**
   * Open a file. With `lock`, take QEMU's image locks (read-only users
   * share, writers exclude everyone else) and fail with LockConflictError.
   * With `readahead` false, the kernel reads nothing ahead in it and large
   * reads of what it does not cache go past the cache (DIRECT_READ_MIN).
   * `blockingReads` is asked before a small read through the cache: when it
   * returns true, the read is made on the spot with a blocking pread (see
   * BLOCKING_READ_MAX), for an owner with nothing else to do meanwhile.
   */
  static async open(
    path: string,
    opts: { readOnly?: boolean; lock?: boolean; readahead?: boolean; blockingReads?: () => boolean } = {},
  ): Promise<FileDevice> {
    const readOnly = opts.readOnly ?? false;
    const fd = await call<number>((cb) => fs.open(path, readOnly ? 'r' : 'r+', cb));
    try {
      const st = await call<fs.Stats>((cb) => fs.fstat(fd, cb));
      if (!st.isFile() && !st.isBlockDevice()) {
        throw Object.assign(new Error(`${path}: not a regular file`), { code: 'EINVAL' });
      }
      if (opts.lock) lockImage(fd, path, readOnly ? READ_ONLY_LOCK : READ_WRITE_LOCK);
      const dev = new FileDevice(fd, path, readOnly, st.size);
      dev.blockingReads = opts.blockingReads;
      if (opts.readahead === false && st.isFile()) dev.openDirect();
      return dev;
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  size(): number {
    return this.length;
  }

  pread(buf: Buffer, offset: number): Promise<number> {
    if (this.readsPastCache(offset, buf.length)) {
      if (this.native!.addressMod(buf, DIRECT_ALIGN) === 0) return this.preadDirect(buf, offset);
      return this.preadBounced(buf, offset);
    }
    return this.preadCached(buf, offset);
  }

  /** A direct read for a buffer O_DIRECT cannot take (not page-aligned): into an aligned one, then copied. */
  private async preadBounced(buf: Buffer, offset: number): Promise<number> {
    const bounce = this.bounces.pop() ?? this.native!.alignedBuffer(BOUNCE_BYTES);
    try {
      let done = 0;
      while (done < buf.length) {
        const len = Math.min(BOUNCE_BYTES, buf.length - done);
        // The whole range was checked above: every piece of it goes direct.
        const n = await this.preadDirect(bounce.subarray(0, len), offset + done);
        bounce.copy(buf, done, 0, n);
        done += n;
        if (n < len) break;
      }
      return done;
    } finally {
      if (this.bounces.length < MAX_BOUNCES) this.bounces.push(bounce);
    }
  }

  /**
   * Whether a read of this range goes past the page cache: it is large and
   * aligned, the cache does not hold all of it, nothing in it waits to be
   * written, and this file can be read so.
   * (Transports ask before splicing a range: splicing would fill the cache.)
   */
  readsPastCache(position: number, length: number): boolean {
    if (this.directFd < 0 || length < DIRECT_READ_MIN || position % DIRECT_ALIGN !== 0 || length % DIRECT_ALIGN !== 0) return false;
    const st = this.cacheStat;
    if (this.native!.cacheStat(this.fd, position, length, st) < 0) {
      this.dropDirect(); // ENOSYS: a kernel before 6.5 cannot tell without reading
      return false;
    }
    // Whole in the cache: read it from there. Anything written and not yet on disk: read
    // through the cache too (a direct read would first have to wait for it to be written).
    return st[0] < length && st[1] === 0;
  }

  /** No readahead on the file, and a second descriptor for direct reads where the host allows one. */
  private openDirect(): void {
    if (this.native === null || this.ring === null || process.env.QCOWFS_NO_DIRECT_READ === '1') return;
    try {
      // The same file, even if its path was renamed or replaced since.
      this.directFd = fs.openSync(`/proc/self/fd/${this.fd}`, fs.constants.O_RDONLY | fs.constants.O_DIRECT);
      this.native.adviseRandom(this.fd, true);
    } catch {
      // EINVAL: a file system without O_DIRECT (tmpfs); no /proc.
    }
  }

  /**
   * Let the kernel read ahead again: for a user whose reads turn out small
   * and sequential (compressed clusters, packed one after the other). Large
   * cold reads still go past the cache.
   */
  readAhead(): void {
    if (this.directFd >= 0) this.native!.adviseRandom(this.fd, false);
  }

  private dropDirect(): void {
    if (this.directFd >= 0) fs.closeSync(this.directFd);
    this.directFd = -1;
  }

  /** Read past the page cache, in pieces at once; any trouble (a short read at the end, a refusal) reads again through the cache. */
  private async preadDirect(buf: Buffer, offset: number): Promise<number> {
    const fd = this.directFd;
    const pieces: Promise<number>[] = [];
    let full = true;
    for (let at = 0; at < buf.length; at += DIRECT_READ_PIECE) {
      const len = Math.min(DIRECT_READ_PIECE, buf.length - at);
      const p = this.ring?.read(fd, buf, at, len, offset + at);
      if (!p) {
        full = false; // the ring is full (or gone)
        break;
      }
      pieces.push(p.then((n) => {
        if (n === -E.EINVAL || n === -E.EOPNOTSUPP) this.dropDirect();
        return n === len ? n : -1;
      }));
    }
    // Every piece in flight writes into buf: all must be done before it is read again another way.
    const results = await Promise.all(pieces);
    if (full && results.every((n) => n >= 0)) return buf.length;
    return this.preadCached(buf, offset);
  }

  private preadCached(buf: Buffer, offset: number): Promise<number> {
    if (buf.length <= BLOCKING_READ_MAX && this.blockingReads?.()) return this.preadNow(buf, offset);
    let done = 0;
    if (this.nowait !== null && buf.length > 0 && this.tryNowait()) {
      const n = this.nowait.preadNowait(this.fd, buf, 0, buf.length, offset);
      this.misses = n === buf.length ? 0 : Math.min(this.misses + 1, NOWAIT_MISS_LIMIT);
      if (n === buf.length) return Promise.resolve(n);
      if (n > 0) {
        done = n;
      } else if (n === -E.EOPNOTSUPP || n === -E.EINVAL || n === -E.ENOSYS) {
        this.nowait = null; // this file system cannot; stop asking
      }
      // -EAGAIN (not cached) and real errors go on below.
    }
    const viaRing = this.ring?.read(this.fd, buf, done, buf.length - done, offset + done);
    if (viaRing) {
      // Errors and short reads finish on the threadpool, which reports errors as Node does.
      return viaRing.then((n) => {
        if (n === buf.length - done) return buf.length;
        if (n === -E.EOPNOTSUPP || n === -E.EINVAL) this.ring = null; // this file cannot; stop asking
        return this.preadFrom(buf, offset, n > 0 ? done + n : done);
      });
    }
    return this.preadFrom(buf, offset, done);
  }

  /** A blocking read on the calling thread; a cached range costs the same as a RWF_NOWAIT attempt. */
  private preadNow(buf: Buffer, offset: number): Promise<number> {
    let done = 0;
    try {
      while (done < buf.length) {
        const n = fs.readSync(this.fd, buf, done, buf.length - done, offset + done);
        if (n === 0) break;
        done += n;
      }
    } catch (err) {
      return Promise.reject(err);
    }
    return Promise.resolve(done);
  }

  /**
   * Whether to try the page cache first. After a run of misses (a cold,
   * random workload) the attempt only costs a system call, so it is made
   * for one read in NOWAIT_PROBE_EVERY until one hits again.
   */
  private tryNowait(): boolean {
    if (this.misses < NOWAIT_MISS_LIMIT) return true;
    this.probe = (this.probe + 1) % NOWAIT_PROBE_EVERY;
    return this.probe === 0;
  }

  private async preadFrom(buf: Buffer, offset: number, done: number): Promise<number> {
    while (done < buf.length) {
      const n = await readAt(this.fd, buf, done, buf.length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  async pwrite(buf: Buffer, offset: number): Promise<void> {
    this.unsynced = true;
    if (buf.length <= SYNC_WRITE_MAX) {
      // A small write only copies into the page cache: doing it here saves a thread-pool round trip.
      let n = 0;
      while (n < buf.length) n += fs.writeSync(this.fd, buf, n, buf.length - n, offset + n);
      if (offset + buf.length > this.length) this.length = offset + buf.length;
      return;
    }
    let done = 0;
    while (done < buf.length) {
      done += await writeAt(this.fd, buf, done, buf.length - done, offset + done);
    }
    if (offset + buf.length > this.length) this.length = offset + buf.length;
  }

  /** fdatasync, skipped when nothing was written since the last one (FUSE sends FLUSH on every close). */
  async flush(): Promise<void> {
    if (this.readOnly || !this.unsynced) return;
    this.unsynced = false; // writes landing during the sync set it again
    try {
      await call<void>((cb) => fs.fdatasync(this.fd, cb));
    } catch (err) {
      this.unsynced = true;
      throw err;
    }
  }

  async truncate(size: number): Promise<void> {
    this.unsynced = true;
    await call<void>((cb) => fs.ftruncate(this.fd, size, cb));
    this.length = size;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.dropDirect();
    await call<void>((cb) => fs.close(this.fd, cb));
  }

  seekHoleOrData(offset: number, hole: boolean): number | null | undefined {
    const native = loadNative();
    if (native === null) return undefined;
    const r = native.seekData(this.fd, offset, hole);
    if (r >= 0) return r;
    if (r === -E.ENXIO) return hole ? this.length : null;
    return undefined; // EINVAL: the file system does not say; treat everything as data
  }

  /** Bytes the file occupies on the host (st_blocks * 512). */
  async allocatedBytes(): Promise<number> {
    const st = await call<fs.Stats>((cb) => fs.fstat(this.fd, cb));
    return st.blocks * 512;
  }
}
