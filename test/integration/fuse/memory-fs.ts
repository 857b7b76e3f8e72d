/**
 * A tiny in-memory FuseFilesystem for transport tests: a root directory with
 * one file backed by a Buffer (or, with rootIsFile, the root itself is that
 * file). It supports read, write, truncate, SEEK_DATA/SEEK_HOLE over an
 * explicit map of allocated 4 KiB blocks, and fallocate (punch hole, zero
 * range, allocate). It records what it was asked so tests can check what the
 * kernel sent.
 */
import { expect } from 'chai';
import { constants } from 'os';
import {
  FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, FUSE_ROOT_ID, FuseErrno, SEEK_DATA, SEEK_HOLE,
  type Attr, type AttrReply, type ConnectionInfo, type DirEntry, type Entry, type FuseFilesystem, type NodeId,
  type OpenReply, type RequestContext, type SetattrChanges, type Statfs,
} from '../../../src/fuse/filesystem';

const E = constants.errno;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
export const BLOCK = 4096;

export interface MemoryFsOptions {
  rootIsFile?: boolean;
  fileName?: string;
  initialSize?: number;
  /** Answer OPEN with FOPEN_DIRECT_IO, so every read/write reaches the filesystem. */
  directIo?: boolean;
  /** Delay every read by this many ms (to observe concurrency). */
  readDelayMs?: number;
  /** Answer readNow: serve the data, decline (the transport then calls read()), or throw. Unset: decline without counting. */
  readNow?: 'serve' | 'decline' | 'throw';
  /** The first readNow holds up the event loop this long (so that the requests sent meanwhile queue up). */
  readNowStallMs?: number;
  /** Answer writeNow: write on the spot, decline (the transport then calls write()), or throw. Unset: decline without counting. */
  writeNow?: 'serve' | 'decline' | 'throw';
}

export interface MemoryFsStats {
  maxReadSize: number;
  maxWriteSize: number;
  reads: number;
  writes: number;
  inFlightReads: number;
  peakInFlightReads: number;
  /** What ConnectionInfo.soleRequest said in each read, once the handler had yielded (as a real one has before its I/O). */
  soleReads: Array<boolean | undefined>;
  /** `mayBlock` of each readNow call (when the option is set). */
  readNows: boolean[];
  /** writeNow calls (when the option is set). */
  writeNows: number;
  lseeks: Array<{ offset: number; whence: number; result: number | string }>;
  fallocates: Array<{ offset: number; length: number; mode: number }>;
  readdirs: number;
  init?: ConnectionInfo;
  destroyed: number;
}

export class MemoryFs implements FuseFilesystem {
  readonly fileIno: NodeId;
  readonly fileName: string;
  data: Buffer;
  size: number;
  /** Block index -> allocated (holes are blocks never written or punched). */
  readonly allocated = new Set<number>();
  readonly stats: MemoryFsStats = {
    maxReadSize: 0, maxWriteSize: 0, reads: 0, writes: 0, inFlightReads: 0, peakInFlightReads: 0, soleReads: [], readNows: [],
    writeNows: 0, lseeks: [], fallocates: [], readdirs: 0, destroyed: 0,
  };
  private mtimeMs = Date.now();
  private nextFh = 1;

  constructor(private readonly opts: MemoryFsOptions = {}) {
    this.fileIno = opts.rootIsFile ? FUSE_ROOT_ID : 2;
    this.fileName = opts.fileName ?? 'disk.raw';
    this.size = opts.initialSize ?? 0;
    this.data = Buffer.alloc(Math.max(this.size, BLOCK));
  }

  /** Fill [offset, offset+bytes.length) and mark the blocks allocated. */
  preload(offset: number, bytes: Buffer): void {
    this.ensureCapacity(offset + bytes.length);
    bytes.copy(this.data, offset);
    this.markAllocated(offset, bytes.length);
    this.size = Math.max(this.size, offset + bytes.length);
  }

  init(conn: ConnectionInfo): void {
    this.stats.init = conn;
  }

  async destroy(): Promise<void> {
    this.stats.destroyed++;
  }

  private fileAttr(): Attr {
    return {
      ino: this.fileIno, size: this.size, blocks: this.allocated.size * (BLOCK / 512),
      atimeMs: this.mtimeMs, mtimeMs: this.mtimeMs, ctimeMs: this.mtimeMs,
      mode: S_IFREG | 0o644, nlink: 1, uid: 0, gid: 0, rdev: 0, blksize: BLOCK,
    };
  }

  private dirAttr(): Attr {
    return {
      ino: FUSE_ROOT_ID, size: 0, blocks: 0, atimeMs: this.mtimeMs, mtimeMs: this.mtimeMs, ctimeMs: this.mtimeMs,
      mode: S_IFDIR | 0o755, nlink: 2, uid: 0, gid: 0, rdev: 0, blksize: BLOCK,
    };
  }

  private attrOf(nodeid: NodeId): Attr {
    if (nodeid === this.fileIno) return this.fileAttr();
    if (nodeid === FUSE_ROOT_ID) return this.dirAttr();
    throw new FuseErrno(E.ENOENT);
  }

  async lookup(_ctx: RequestContext, parent: NodeId, name: string): Promise<Entry> {
    if (parent !== FUSE_ROOT_ID || this.opts.rootIsFile || name !== this.fileName) throw new FuseErrno(E.ENOENT);
    return { nodeid: this.fileIno, generation: 1, attr: this.fileAttr(), entryTimeoutMs: 1000, attrTimeoutMs: 0 };
  }

  async getattr(_ctx: RequestContext, nodeid: NodeId): Promise<AttrReply> {
    return { attr: this.attrOf(nodeid), attrTimeoutMs: 0 };
  }

  async setattr(_ctx: RequestContext, nodeid: NodeId, changes: SetattrChanges): Promise<AttrReply> {
    if (nodeid !== this.fileIno) throw new FuseErrno(E.EPERM);
    if (changes.size !== undefined) this.truncate(changes.size);
    if (typeof changes.mtimeMs === 'number') this.mtimeMs = changes.mtimeMs;
    else if (changes.mtimeMs === 'now') this.mtimeMs = Date.now();
    return { attr: this.fileAttr(), attrTimeoutMs: 0 };
  }

  async statfs(): Promise<Statfs> {
    return { blocks: 1024, bfree: 512, bavail: 512, files: 2, ffree: 0, bsize: BLOCK, namelen: 255, frsize: BLOCK };
  }

  async open(_ctx: RequestContext, nodeid: NodeId): Promise<OpenReply> {
    if (nodeid !== this.fileIno) throw new FuseErrno(E.EISDIR);
    return { fh: this.nextFh++, directIo: this.opts.directIo };
  }

  async read(_ctx: RequestContext, nodeid: NodeId, _fh: number, offset: number, size: number, into?: Buffer): Promise<Buffer> {
    if (nodeid !== this.fileIno) throw new FuseErrno(E.EISDIR);
    this.stats.reads++;
    this.stats.maxReadSize = Math.max(this.stats.maxReadSize, size);
    this.stats.inFlightReads++;
    this.stats.peakInFlightReads = Math.max(this.stats.peakInFlightReads, this.stats.inFlightReads);
    try {
      await Promise.resolve();
      this.stats.soleReads.push(this.stats.init?.soleRequest?.());
      if (this.opts.readDelayMs) await new Promise((r) => setTimeout(r, this.opts.readDelayMs));
      const end = Math.min(this.size, offset + size);
      if (offset >= end) return Buffer.alloc(0);
      if (into === undefined) return this.data.subarray(offset, end);
      // Into the transport's reused buffer, as ImageFs does, so its reuse is exercised.
      expect(into.length).to.be.at.least(size);
      this.data.copy(into, 0, offset, end);
      return into.subarray(0, end - offset);
    } finally {
      this.stats.inFlightReads--;
    }
  }

  readNow(nodeid: NodeId, _fh: number, offset: number, size: number, into: Buffer, mayBlock: boolean): Buffer | null {
    if (this.opts.readNow === undefined || nodeid !== this.fileIno) return null;
    this.stats.readNows.push(mayBlock);
    if (this.stats.readNows.length === 1 && this.opts.readNowStallMs) {
      const until = Date.now() + this.opts.readNowStallMs;
      while (Date.now() < until) { /* a handler busy on the spot */ }
    }
    if (this.opts.readNow === 'decline') return null;
    if (this.opts.readNow === 'throw') throw new FuseErrno(E.EILSEQ, 'readNow refuses');
    expect(into.length).to.be.at.least(size);
    const end = Math.min(this.size, offset + size);
    if (offset >= end) return into.subarray(0, 0);
    this.data.copy(into, 0, offset, end);
    return into.subarray(0, end - offset);
  }

  async write(_ctx: RequestContext, nodeid: NodeId, _fh: number, offset: number, data: Buffer): Promise<number> {
    if (nodeid !== this.fileIno) throw new FuseErrno(E.EISDIR);
    this.stats.writes++;
    return this.store(offset, data);
  }

  writeNow(nodeid: NodeId, _fh: number, offset: number, data: Buffer): number | null {
    if (this.opts.writeNow === undefined || nodeid !== this.fileIno) return null;
    this.stats.writeNows++;
    if (this.opts.writeNow === 'decline') return null;
    if (this.opts.writeNow === 'throw') throw new FuseErrno(E.EILSEQ, 'writeNow refuses');
    return this.store(offset, data);
  }

  private store(offset: number, data: Buffer): number {
    this.stats.maxWriteSize = Math.max(this.stats.maxWriteSize, data.length);
    this.ensureCapacity(offset + data.length);
    data.copy(this.data, offset);
    this.markAllocated(offset, data.length);
    this.size = Math.max(this.size, offset + data.length);
    this.mtimeMs = Date.now();
    return data.length;
  }

  async release(): Promise<void> {}

  async readdir(_ctx: RequestContext, nodeid: NodeId): Promise<DirEntry[]> {
    if (nodeid !== FUSE_ROOT_ID || this.opts.rootIsFile) throw new FuseErrno(E.ENOTDIR);
    this.stats.readdirs++;
    return [
      { name: '.', ino: FUSE_ROOT_ID, type: S_IFDIR },
      { name: '..', ino: FUSE_ROOT_ID, type: S_IFDIR },
      { name: this.fileName, ino: this.fileIno, type: S_IFREG },
    ];
  }

  async lseek(_ctx: RequestContext, nodeid: NodeId, _fh: number, offset: number, whence: number): Promise<number> {
    if (nodeid !== this.fileIno) throw new FuseErrno(E.EINVAL);
    let result: number | string;
    try {
      result = this.seek(offset, whence);
    } catch (e) {
      this.stats.lseeks.push({ offset, whence, result: 'ENXIO' });
      throw e;
    }
    this.stats.lseeks.push({ offset, whence, result });
    return result;
  }

  private seek(offset: number, whence: number): number {
    if (offset >= this.size) throw new FuseErrno(E.ENXIO);
    if (whence === SEEK_DATA) {
      for (let b = Math.floor(offset / BLOCK); b * BLOCK < this.size; b++) {
        if (this.allocated.has(b)) return Math.max(offset, b * BLOCK);
      }
      throw new FuseErrno(E.ENXIO);
    }
    if (whence === SEEK_HOLE) {
      for (let b = Math.floor(offset / BLOCK); b * BLOCK < this.size; b++) {
        if (!this.allocated.has(b)) return Math.max(offset, b * BLOCK);
      }
      return this.size;
    }
    throw new FuseErrno(E.EINVAL);
  }

  async fallocate(_ctx: RequestContext, nodeid: NodeId, _fh: number, offset: number, length: number, mode: number): Promise<void> {
    if (nodeid !== this.fileIno) throw new FuseErrno(E.EINVAL);
    this.stats.fallocates.push({ offset, length, mode });
    const end = offset + length;
    if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
      const stop = Math.min(end, this.size);
      if (stop > offset) this.data.fill(0, offset, stop);
      if (mode & FALLOC_FL_PUNCH_HOLE) {
        for (let b = Math.ceil(offset / BLOCK); (b + 1) * BLOCK <= end; b++) this.allocated.delete(b);
        return;
      }
    } else {
      this.ensureCapacity(end);
      this.markAllocated(offset, length);
    }
    if (!(mode & FALLOC_FL_KEEP_SIZE) && end > this.size) this.size = end;
  }

  private truncate(size: number): void {
    if (size < this.size) {
      this.data.fill(0, size, this.size);
      for (const b of [...this.allocated]) if (b * BLOCK >= size) this.allocated.delete(b);
    } else {
      this.ensureCapacity(size);
    }
    this.size = size;
  }

  private ensureCapacity(bytes: number): void {
    if (bytes <= this.data.length) return;
    const grown = Buffer.alloc(Math.max(bytes, this.data.length * 2));
    this.data.copy(grown);
    this.data = grown;
  }

  private markAllocated(offset: number, length: number): void {
    for (let b = Math.floor(offset / BLOCK); b * BLOCK < offset + length; b++) this.allocated.add(b);
  }
}
