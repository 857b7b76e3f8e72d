/**
 * The native module (native/*.c, built by node-gyp into build/Release):
 * what Node's fs module cannot do. qcowfs works without it, more slowly and
 * without QEMU's image locks; loadNative() returns null then.
 */
import * as path from 'path';

export interface NativeModule {
  /** fcntl(F_OFD_SETLK) on one range: 0 or an errno. type: 0 unlock, 1 read, 2 write. */
  setLock(fd: number, start: number, length: number, type: number): number;
  /** fcntl(F_OFD_GETLK): 0 if the lock could be taken, 1 if not, or -errno. */
  testLock(fd: number, start: number, length: number, exclusive: number): number;
  /** Set O_NONBLOCK: 0 or an errno. */
  setNonblock(fd: number): number;
  /** read(2) into the whole buffer: bytes read or -errno. */
  readInto(fd: number, buf: Buffer): number;
  /** preadv2(RWF_NOWAIT): bytes read or -errno (-EAGAIN when it would wait for the disk). */
  preadNowait(fd: number, buf: Buffer, offset: number, length: number, position: number): number;
  /** pread(2) into buf[offset, offset+length) until it is full or the file ends: bytes read, or -errno. */
  preadFull(fd: number, buf: Buffer, offset: number, length: number, position: number): number;
  /** pwrite(2) of buf[offset, offset+length) until it is all written: bytes written, or -errno. */
  pwriteFull(fd: number, buf: Buffer, offset: number, length: number, position: number): number;
  /** writev(2) of `first` then `second` in one call: bytes written, or -errno. */
  writeTwo(fd: number, first: Buffer, second: Buffer): number;
  /** Inflate raw deflate `src` into all of `dst` on the threadpool (QEMU's rule: dst exactly filled). */
  inflateCluster(src: Buffer, dst: Buffer, callback: (ok: boolean, message: string) => void): void;
  /** lseek(SEEK_DATA), or SEEK_HOLE when `hole`: the offset, or -errno (-ENXIO: no data at or after). */
  seekData(fd: number, position: number, hole: boolean): number;
  /**
   * cachestat (Linux 6.5) of a range: 0, or -errno (-ENOSYS before 6.5).
   * out[0] = bytes of it in the page cache, out[1] = bytes dirty or under writeback.
   */
  cacheStat(fd: number, position: number, length: number, out: Float64Array): number;
  /** posix_fadvise(POSIX_FADV_DONTNEED) of a range: its clean pages leave the page cache. 0 or an errno. */
  dropCached(fd: number, position: number, length: number): number;
  /** sync_file_range(SYNC_FILE_RANGE_WRITE): start writeback of the range's dirty pages; 0 or -errno. */
  startWriteback(fd: number, position: number, length: number): number;
  /** readahead(2): start reading the range's uncached pages into the page cache, without waiting; 0 or -errno. */
  readAhead(fd: number, position: number, length: number): number;
  /** An io_uring whose completions call `callback(id, bytes or -errno)` on the event loop; -errno if none. */
  uringCreate(entries: number, callback: (id: number, result: number) => void): UringHandle | number;
  /** Queue a read of buffer[offset, offset+length) from fd at position: 0, or -errno (-EBUSY: full). */
  uringRead(ring: UringHandle, fd: number, buf: Buffer, offset: number, length: number, position: number, id: number): number;
  /** 0, or -EBUSY while reads are in flight (the kernel may still write into their buffers). */
  uringClose(ring: UringHandle): number;
  /**
   * On the threadpool, send a FUSE READ reply for `unique` on fuseFd whose
   * data is spliced from (fd, position, length) triples (fd -1: zeroes).
   * The callback gets the stage (0: nothing was sent, 1: the kernel refused
   * it) and the reply's size or -errno.
   */
  spliceReply(fuseFd: number, unique: number, slices: Float64Array, callback: (stage: number, result: number) => void): void;
  /** The size (bytes) a new pipe can be given, up to `bytes`, or -errno. */
  pipeCapacity(bytes: number): number;
  /** Watch fd on the event loop; the callback gets 0 or a negative libuv status. */
  pollCreate(fd: number, callback: (status: number) => void): PollHandle;
  pollStart(h: PollHandle): number;
  pollStop(h: PollHandle): number;
  pollClose(h: PollHandle): number;
  /**
   * Keep the event loop turning without sleeping for the next `us`
   * microseconds (its poll phase then checks h's fd with a zero timeout);
   * 0 stops at once. Runs no JavaScript and allocates nothing per turn.
   */
  pollSpin(h: PollHandle, us: number): number;
}

/** An opaque io_uring. */
export type UringHandle = { readonly __uring: unique symbol };

/** An opaque uv_poll handle. */
export type PollHandle = { readonly __poll: unique symbol };

/** Where `npm run build` puts the module. */
export const NATIVE_MODULE_PATH = path.resolve(__dirname, '../../../build/Release/qcowfs_native.node');

let loaded: NativeModule | null | undefined;

/** The native module, or null if it was not built. Set QCOWFS_NO_NATIVE=1 to pretend it was not. */
export function loadNative(): NativeModule | null {
  if (loaded !== undefined) return loaded;
  if (process.env.QCOWFS_NO_NATIVE === '1') {
    loaded = null;
    return loaded;
  }
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const addon = require(NATIVE_MODULE_PATH) as NativeModule;
    // A copy with the same functions: an addon's exports object is built one property at a time
    // and ends up a dictionary, whose every property read in optimized code is a call to the
    // generic load IC. The hot path reads its functions from this object several times a request.
    loaded = { ...addon };
  } catch {
    loaded = null;
  }
  return loaded;
}
