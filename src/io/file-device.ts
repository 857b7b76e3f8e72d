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
 * Drop-behind (FileDevice.open `dropBehind`), for an owner that keeps its
 * own cache of what it reads (a FUSE mount through the kernel's page cache
 * holds every byte it serves in the raw file's pages, and the image file's
 * pages would be a second copy of them), or whose sequential reads are
 * bound by something else than the disk when they come again (a mount with
 * direct I/O: a round trip to the daemon per read). Reads that follow one
 * another form a stream; what a stream has read more than
 * STREAM_LAG behind its newest read leaves the host page cache
 * (POSIX_FADV_DONTNEED). The kernel's readahead still runs ahead of the
 * stream, and the pages dropped behind it are the ones it reads ahead into
 * next: the stream reuses a few MiB of memory instead of filling fresh pages,
 * which on a virtual machine that hands free memory back to its host cost a
 * fault each (0.4-2.5 GB/s here, against 25-40 GB/s for memory in use).
 * Cold 4 GiB reads through a mount, 5 interleaved runs each: `dd bs=1M`
 * 1.98 s median, against 3.46 s reading past the cache with O_DIRECT and
 * 6.58 s with no drop; `dd iflag=direct` 1.54 s against 4.44 s;
 * `cp --sparse=always` of 256 MiB 0.21 s against 0.31 s.
 *
 * A stream whose first read finds its range cached whole is warm: another
 * user of the file, or an earlier read, brought it in, and it stays; a warm
 * stream drops nothing. Only the first read can tell: the stream's own
 * readahead has cached the ranges of the reads after it. So reads of every
 * size count, small ones too (a stream that begins with a few small reads
 * has begun, cold, with the first). A read with no RWF_NOWAIT try of its
 * own asks cachestat, except while the file's reads keep missing the cache
 * (NOWAIT_MISS_LIMIT in a row, the run during which those tries are
 * skipped): a new stream is then taken as cold. Every read of a cold random
 * workload starts a new stream, and asking cost it a system call each (2% of
 * the daemon's time at queue depth 1). A warm stream that begins during such
 * a run is taken as cold too, and drops what it leaves behind though another
 * reader had cached it (a mount's raw file still holds what it served, in
 * the kernel's cache above); the run ends at the first read that tries the
 * cache and hits.
 * Dirty pages never leave the cache this way: the kernel only starts their
 * writeback.
 */
/** Reads in flight lie within a few requests of the newest; pages this far behind it have been read. */
const STREAM_LAG = 4 * 1024 * 1024;
/** A read this far past a stream's end still continues it (a table cluster between two runs of data). */
const STREAM_GAP = 1024 * 1024;
/** Ranges are dropped in whole units of this: the kernel only drops a large folio (2 MiB at most) whole. */
const DROP_UNIT = 2 * 1024 * 1024;
/** Streams followed at once per file; a new one replaces the one read longest ago. */
const MAX_STREAMS = 8;

/**
 * Write-behind, with drop-behind: a run of sequential writes starts the
 * writeback of what it wrote more than WRITEBACK_LAG behind its newest
 * write (sync_file_range(SYNC_FILE_RANGE_WRITE), which does not wait), and
 * drops what it wrote more than WRITE_DROP_LAG behind, by then clean (pages
 * still under writeback stay). The disk works while the stream goes on, not
 * all at the fdatasync that ends it, and the pages freed behind are the
 * ones the next writes fill. Nothing changes what reaches the disk or when
 * it is durable: the kernel may write dirty pages back whenever it likes,
 * and only fdatasync (flush) promises anything. A 1 GiB sequential write of
 * 1 MiB + fdatasync on the benchmark machine: 1.9-2.2 GB/s against
 * 0.4-1.5 GB/s without, in interleaved runs.
 */
const WRITEBACK_LAG = 4 * 1024 * 1024;
const WRITE_DROP_LAG = 16 * 1024 * 1024;

/**
 * Read-around: a small read that misses the page cache near another recent
 * miss starts reading the whole aligned AROUND_WINDOW around it (readahead(2),
 * which does not wait), in the one disk request that brings its own bytes.
 * A filesystem on a loop device over the mount reads a directory's files, and
 * their inodes, in an order of its own within a few hundred KiB of the
 * image: each of those misses is a disk round trip, where one read of the
 * window around the first serves the next ones from the cache. The kernel
 * reads such random small misses as they come (its readahead follows only
 * sequential reads). Misses scattered over the image (random reads of a
 * large file) seldom fall this near each other and are read as they come.
 * Reading back 3000 small files from ext4 on a loop device over a mount,
 * caches dropped, 16 interleaved runs: 0.233 s median against 0.264 s
 * without (faster in 16 of 16; the image's misses went from 110-400 to
 * 40-50); cold random 4 KiB reads of a 4 GiB image, at queue depth 1 and 16,
 * did not change (one in 250 of their misses is read around).
 */
const AROUND_WINDOW = 128 * 1024;
/** A miss this near one of the last AROUND_HISTORY misses is local. */
const AROUND_NEAR = 1024 * 1024;
const AROUND_HISTORY = 8;

interface WriteStream {
  end: number;
  /** Writeback has been started for everything before this. */
  started: number;
  /** Everything before this has been dropped (or was before the stream began). */
  dropped: number;
}

interface Stream {
  /** End of the newest read started. */
  end: number;
  /** Everything before this has been dropped (or was before the stream began). */
  dropped: number;
  warm: boolean;
  lastUse: number;
}

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

/** An RWF_NOWAIT read's result that says the file system cannot serve such reads. */
function cannotNowait(result: number): boolean {
  return result === -E.EOPNOTSUPP || result === -E.EINVAL || result === -E.ENOSYS;
}

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
  /** The native module for everything else (cachestat, fadvise), whatever became of `nowait`. */
  private readonly native: NativeModule | null = loadNative();
  /** Consecutive page-cache misses (capped), and the counter that spaces out probes once they pile up. */
  private misses = 0;
  private probe = 0;
  /** Where misses go when there is an io_uring; null where there is none or this file refuses it. */
  private ring: UringReader | null = uringReader();
  /** Written to (or resized) since the last fdatasync began: flush() has something to do. */
  private unsynced = false;
  /** The latest fdatasync while it runs. */
  private syncing: Promise<void> | null = null;
  /** Drop-behind streams (see STREAM_LAG); null when not asked for or without the native module. */
  private streams: Stream[] | null = null;
  private streamClock = 0;
  /** The run of sequential writes (write-behind); null when not following, or no writes yet. */
  private writeStream: WriteStream | null = null;
  private readonly cacheStat = new Float64Array(2);
  /** See open(); undefined: reads that may wait always complete asynchronously. */
  private blockingReads: (() => boolean) | undefined;
  /** Where the last AROUND_HISTORY small misses began (NaN: none yet), and the next slot to fill. */
  private readonly recentMisses = new Float64Array(AROUND_HISTORY).fill(NaN);
  private nextMiss = 0;

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
   * With `dropBehind`, sequential large reads drop what they have read
   * from the host page cache (see STREAM_LAG): for an owner that keeps
   * its own cache of what it reads.
   * `blockingReads` is asked before a small read through the cache: when it
   * returns true, the read is made on the spot with a blocking pread (see
   * BLOCKING_READ_MAX), for an owner with nothing else to do meanwhile.
   */
  static async open(
    path: string,
    opts: { readOnly?: boolean; lock?: boolean; dropBehind?: boolean; blockingReads?: () => boolean } = {},
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
      if (opts.dropBehind && st.isFile() && dev.native !== null) dev.streams = [];
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
    return this.preadCached(buf, offset);
  }

  /**
   * A read of [position, position+length) is about to start: follow the
   * stream it belongs to and drop what that stream has left behind. The
   * device's own reads come here from pread() and preadNow(); a transport
   * that splices ranges of the file calls it for each range before splicing
   * it. `cached`: whether the page cache holds the range whole, when the
   * caller knows (else a new stream asks cachestat).
   */
  reading(position: number, length: number, cached?: boolean): void {
    const streams = this.streams;
    if (streams === null || length <= 0) return;
    const end = position + length;
    const now = ++this.streamClock;
    // Plain loops, no closures: this runs for every read.
    let oldest = 0;
    for (let i = 0; i < streams.length; i++) {
      const x = streams[i];
      if (position >= x.end - STREAM_LAG && position <= x.end + STREAM_GAP) return this.continueStream(x, end, now);
      if (x.lastUse < streams[oldest].lastUse) oldest = i;
    }
    // A new stream, in a free slot or in place of the one read longest ago.
    const dropped = Math.ceil(position / DROP_UNIT) * DROP_UNIT;
    const warm = cached ?? (this.inMissRun() ? false : this.cachedWhole(position, length));
    if (streams.length < MAX_STREAMS) {
      streams.push({ end, dropped, warm, lastUse: now });
      return;
    }
    const s = streams[oldest];
    s.end = end;
    s.dropped = dropped;
    s.warm = warm;
    s.lastUse = now;
  }

  /** A read up to `end` continues stream s: drop what it has left behind. */
  private continueStream(s: Stream, end: number, now: number): void {
    s.lastUse = now;
    if (end > s.end) s.end = end;
    if (s.warm) return;
    const upTo = Math.floor((s.end - STREAM_LAG) / DROP_UNIT) * DROP_UNIT;
    if (upTo <= s.dropped) return;
    this.native!.dropCached(this.fd, s.dropped, upTo - s.dropped);
    s.dropped = upTo;
  }

  /** The last NOWAIT_MISS_LIMIT reads that tried the page cache all missed it (a cold, random workload). */
  private inMissRun(): boolean {
    return this.nowait !== null && this.misses >= NOWAIT_MISS_LIMIT;
  }

  /** Whether the page cache holds all of the range before it is read; without cachestat (before Linux 6.5), no. */
  private cachedWhole(position: number, length: number): boolean {
    const st = this.cacheStat;
    return this.native!.cacheStat(this.fd, position, length, st) === 0 && st[0] >= length;
  }

  private preadCached(buf: Buffer, offset: number): Promise<number> {
    let done = 0;
    // The cache was found not to hold all of the range (or, untried after a run of misses, most likely does not).
    let missed = false;
    if (this.nowait !== null && buf.length > 0 && this.tryNowait()) {
      const n = this.readCached(this.nowait, buf, offset);
      if (n === buf.length) return Promise.resolve(n);
      if (n > 0) done = n;
      // -EAGAIN (not cached), file systems that cannot say and real errors go on below.
      missed = n > 0 || n === -E.EAGAIN;
    } else {
      this.reading(offset, buf.length);
      missed = this.nowait !== null && buf.length > 0; // untried after a run of misses
    }
    if (missed && buf.length - done < AROUND_WINDOW) this.readAround(offset + done, buf.length - done);
    if (buf.length <= BLOCKING_READ_MAX && this.blockingReads?.()) return this.preadBlocking(buf, offset, done);
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

  /** A small read of [position, +length) missed the cache: read around it if it lies near a recent miss (AROUND_WINDOW). */
  private readAround(position: number, length: number): void {
    if (this.native === null) return;
    const recent = this.recentMisses;
    let near = false;
    for (let i = 0; i < recent.length && !near; i++) near = Math.abs(recent[i] - position) < AROUND_NEAR;
    recent[this.nextMiss] = position;
    this.nextMiss = (this.nextMiss + 1) % recent.length;
    if (!near) return;
    const start = position - (position % AROUND_WINDOW);
    const end = Math.min(Math.max(start + AROUND_WINDOW, position + length), this.length);
    if (end > start) this.native.readAhead(this.fd, start, end - start);
  }

  /** A blocking read on the calling thread of what is left from `done` on. */
  private preadBlocking(buf: Buffer, offset: number, done: number): Promise<number> {
    try {
      return Promise.resolve(this.readSyncFrom(buf, offset, done));
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private readSyncFrom(buf: Buffer, offset: number, done: number): number {
    if (this.native !== null && done < buf.length) {
      const n = this.native.preadFull(this.fd, buf, done, buf.length - done, offset + done);
      if (n >= 0) return done + n;
      // An error: read through Node, which reports it as Node does.
    }
    while (done < buf.length) {
      const n = fs.readSync(this.fd, buf, done, buf.length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  /**
   * pread() done on the spot: a page-cache hit, or with `mayBlock` (the
   * caller has nothing else to do meanwhile) a small read that waits for the
   * disk (see BLOCKING_READ_MAX). null when it would have to wait otherwise,
   * once reads have kept missing the cache and this one would only have been
   * a probe, or when the read failed: the caller goes through pread(), which
   * takes it from there (and reports the error as Node does).
   */
  preadNow(buf: Buffer, offset: number, mayBlock: boolean): number | null {
    if (buf.length === 0) return 0;
    const blocking = mayBlock && buf.length <= BLOCKING_READ_MAX;
    const nowait = this.nowait;
    const tryCache = nowait !== null && (blocking ? this.tryNowait() : !this.inMissRun());
    if (!tryCache && !blocking) return null;
    let done = 0;
    if (tryCache) {
      const n = this.readCached(nowait!, buf, offset);
      if (n === buf.length) return n;
      if (n > 0) done = n;
      else if (n !== -E.EAGAIN && !cannotNowait(n)) return null; // a real error: pread() reports it as Node does
    } else {
      this.reading(offset, buf.length);
    }
    if (!blocking) return null;
    if (buf.length - done < AROUND_WINDOW) this.readAround(offset + done, buf.length - done);
    try {
      return this.readSyncFrom(buf, offset, done);
    } catch {
      return null;
    }
  }

  /**
   * One RWF_NOWAIT read of all of buf at offset: the bytes read (all of
   * them: a hit), or -errno (-EAGAIN: not cached). Counts the misses, stops
   * asking a file system that cannot say (see cannotNowait), and tells the
   * drop-behind streams of the read with what it found: whether the cache
   * held the range whole is what a new stream would otherwise ask cachestat.
   */
  private readCached(nowait: NativeModule, buf: Buffer, offset: number): number {
    const n = nowait.preadNowait(this.fd, buf, 0, buf.length, offset);
    this.misses = n === buf.length ? 0 : Math.min(this.misses + 1, NOWAIT_MISS_LIMIT);
    if (cannotNowait(n)) this.nowait = null;
    this.reading(offset, buf.length, n === buf.length ? true : n > 0 || n === -E.EAGAIN ? false : undefined);
    return n;
  }

  /**
   * Whether to try the page cache first. After a run of misses (a cold,
   * random workload) the attempt only costs a system call, so it is made
   * for one read in NOWAIT_PROBE_EVERY until one hits again.
   */
  private tryNowait(): boolean {
    if (!this.inMissRun()) return true;
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
      if (this.pwriteNow(buf, offset)) return;
      // Without the native module, or after an error: through Node, which reports it as Node does.
      let n = 0;
      while (n < buf.length) n += fs.writeSync(this.fd, buf, n, buf.length - n, offset + n);
      this.wroteNow(offset, buf.length);
      return;
    }
    let done = 0;
    while (done < buf.length) {
      done += await writeAt(this.fd, buf, done, buf.length - done, offset + done);
    }
    // Again once it has landed: a sync that began while it was under way may not cover it.
    this.unsynced = true;
    if (offset + buf.length > this.length) this.length = offset + buf.length;
    this.written(offset, buf.length);
  }

  /**
   * pwrite() of a write up to SYNC_WRITE_MAX, which it would make on the spot
   * anyway, with the native module: false when it failed, and pwrite() then
   * writes it all again and reports the error.
   */
  pwriteNow(buf: Buffer, offset: number): boolean {
    if (this.readOnly || this.native === null || buf.length > SYNC_WRITE_MAX) return false;
    this.unsynced = true;
    if (this.native.pwriteFull(this.fd, buf, 0, buf.length, offset) !== buf.length) return false;
    this.wroteNow(offset, buf.length);
    return true;
  }

  private wroteNow(offset: number, length: number): void {
    if (offset + length > this.length) this.length = offset + length;
    this.written(offset, length);
  }

  /** A write of [position, position+length) is done: follow the run of sequential writes (see WRITEBACK_LAG). */
  private written(position: number, length: number): void {
    if (this.streams === null) return;
    const end = position + length;
    const w = this.writeStream;
    if (w === null || position < w.end - WRITEBACK_LAG || position > w.end + STREAM_GAP) {
      const start = Math.ceil(position / DROP_UNIT) * DROP_UNIT;
      this.writeStream = { end, started: start, dropped: start };
      return;
    }
    if (end > w.end) w.end = end;
    const startTo = Math.floor((w.end - WRITEBACK_LAG) / DROP_UNIT) * DROP_UNIT;
    if (startTo > w.started) {
      this.native!.startWriteback(this.fd, w.started, startTo - w.started);
      w.started = startTo;
    }
    const dropTo = Math.floor((w.end - WRITE_DROP_LAG) / DROP_UNIT) * DROP_UNIT;
    if (dropTo > w.dropped) {
      this.native!.dropCached(this.fd, w.dropped, dropTo - w.dropped);
      w.dropped = dropTo;
    }
  }

  /**
   * fdatasync, when anything was written since the last one began (FUSE sends
   * FLUSH on every close, mostly with nothing to sync). Flushes may
   * overlap: one that finds nothing new written still waits for a sync under
   * way, which may not yet cover the writes its caller saw complete.
   */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    if (!this.unsynced) {
      if (this.syncing !== null) await this.syncing;
      return;
    }
    this.unsynced = false; // writes landing during the sync set it again
    const sync = call<void>((cb) => fs.fdatasync(this.fd, cb)).catch((err: unknown) => {
      this.unsynced = true;
      throw err;
    });
    this.syncing = sync;
    try {
      await sync;
    } finally {
      if (this.syncing === sync) this.syncing = null;
    }
  }

  async truncate(size: number): Promise<void> {
    this.unsynced = true;
    await call<void>((cb) => fs.ftruncate(this.fd, size, cb));
    this.unsynced = true; // as for pwrite: a sync may have begun meanwhile
    this.length = size;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // A sync under way (a flush overlapping the last one) finishes on this descriptor first.
    if (this.syncing !== null) await this.syncing.catch(() => undefined);
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
