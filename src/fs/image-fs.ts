/**
 * The filesystem a mount serves: a root directory holding one raw file per
 * view (or, mounted over a regular file, that one file as the root), each
 * backed by a FileBackend. Reads are clamped at the end of the file, writes
 * past it grow the disk, SETATTR size resizes it, LSEEK and FALLOCATE speak
 * the image's sparseness.
 */
import * as fs from 'fs';
import { constants } from 'os';
import {
  FuseFilesystem, RequestContext, NodeId, FileHandle, Entry, AttrReply, SetattrChanges, OpenReply, DirEntry,
  Statfs, Attr, FuseErrno, FUSE_ROOT_ID, SEEK_DATA, SEEK_HOLE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE, ConnectionInfo, FileSlices,
} from '../fuse/filesystem';
import { FileBackend } from './backend';
import { DirectReadAhead } from './read-ahead';

const E = constants.errno;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const O_ACCMODE = 3;
const O_RDONLY = 0;
const O_WRONLY = 1;
/** open(2) for a reference to a file that reads nothing (Linux; Node has no constant for it). */
const O_PATH = 0o10000000;
/** Attributes change only through us, so the kernel may cache them a while. */
const ATTR_TIMEOUT_MS = 1000;

/**
 * How long a change waits for the kernel to drop what other files of the same
 * disk cache of it (invalidateAliases) before it is answered all the same. The
 * kernel drops a page only once it is not locked, and a page being read is
 * locked until the daemon answers the READ; the kernel sends that READ only
 * when fewer than max_background requests are under way, and while it waits
 * those may all be asynchronous WRITEs of a partition waiting for that very
 * page: answered this late, they let it through. A drop takes at most about
 * a millisecond otherwise (7000 of them under a random-write load).
 */
const ALIAS_DROP_WAIT_MS = 50;

export interface MountedFile {
  /** File name in the mount directory (ignored when the root is the file). */
  name: string;
  backend: FileBackend;
  /**
   * The image on the host: its times seed the file's, and its file system
   * gives statfs its numbers. Opened when the filesystem is made, before
   * anything is mounted: the mount may cover it (a mount over the image
   * itself, or over its directory), and a lookup of it then would come back
   * to this filesystem and wait on itself.
   */
  hostPath: string;
  /** Bypass the page cache, so every read and write reaches the backend. */
  directIo?: boolean;
  /**
   * The file shows the bytes of `disk` from `start` on (a whole disk at 0, a
   * partition at its first byte). Files of one disk alias each other: what
   * is written through one, the kernel must not keep serving stale from
   * another's page cache.
   */
  window?: { disk: object; start: number };
}

interface Node {
  nodeid: NodeId;
  file: MountedFile;
  mode: number;
  uid: number;
  gid: number;
  atimeMs: number;
  mtimeMs: number;
  ctimeMs: number;
  openCount: number;
  /** Its cached pages were dropped for good (see FileBackend.withdrawn). */
  dropped?: boolean;
}

/** Wait for p to settle (either way), or for ms to pass. */
function settledWithin(p: Promise<unknown>, ms: number): Promise<void> {
  return new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, ms);
    const done = (): void => {
      clearTimeout(timer);
      resolve();
    };
    p.then(done, done);
  });
}

/** The file stopped serving its content and the kernel's pages of it are still to be dropped (dropWithdrawn). */
function toDrop(m: Node): boolean {
  return !m.dropped && m.file.backend.withdrawn === true;
}

export interface ImageFsOptions {
  rootIsFile: boolean;
  uid: number;
  gid: number;
  /** One line per operation that fails, to stderr. */
  onError?: (op: string, err: unknown) => void;
}

export class ImageFs implements FuseFilesystem {
  private readonly nodes = new Map<NodeId, Node>();
  private readonly byName = new Map<string, Node>();
  private nextFh = 1;
  private readonly startMs = Date.now();
  private conn: ConnectionInfo | null = null;
  private readonly readAhead = new DirectReadAhead();
  /** O_PATH descriptors of the images on the host, by path (see MountedFile.hostPath); -1 if it could not be opened. */
  private readonly hostRefs = new Map<string, number>();

  constructor(files: MountedFile[], private readonly opts: ImageFsOptions) {
    if (opts.rootIsFile && files.length !== 1) throw new Error('a mount over a file serves exactly one image');
    const seen = new Set<string>();
    files.forEach((file, i) => {
      if (seen.has(file.name)) throw new Error(`two images would both appear as '${file.name}'`);
      seen.add(file.name);
      const nodeid = opts.rootIsFile ? FUSE_ROOT_ID : i + 2;
      if (!this.hostRefs.has(file.hostPath)) {
        let fd = -1;
        try {
          fd = fs.openSync(file.hostPath, O_PATH);
        } catch {
          fd = -1; // the file's times start now, and statfs reports nothing of the host
        }
        this.hostRefs.set(file.hostPath, fd);
      }
      const ref = this.hostRefs.get(file.hostPath)!;
      let st: fs.Stats | null = null;
      try {
        st = ref >= 0 ? fs.fstatSync(ref) : null;
      } catch {
        st = null;
      }
      const node: Node = {
        nodeid,
        file,
        mode: S_IFREG | (file.backend.readOnly ? 0o444 : 0o644),
        uid: opts.uid,
        gid: opts.gid,
        atimeMs: st?.atimeMs ?? this.startMs,
        mtimeMs: st?.mtimeMs ?? this.startMs,
        ctimeMs: st?.ctimeMs ?? this.startMs,
        openCount: 0,
      };
      this.nodes.set(nodeid, node);
      this.byName.set(file.name, node);
    });
  }

  /** What the transport negotiated (null before init). */
  get connection(): ConnectionInfo | null {
    return this.conn;
  }

  /** Files still open through the mount. */
  get openFiles(): number {
    let n = 0;
    for (const node of this.nodes.values()) n += node.openCount;
    return n;
  }

  init(conn: ConnectionInfo): void {
    this.conn = conn;
  }

  async destroy(): Promise<void> {
    await this.flushAll();
    for (const fd of this.hostRefs.values()) if (fd >= 0) fs.closeSync(fd);
    this.hostRefs.clear();
  }

  /**
   * Run a change to what a file shows. What was read ahead is forgotten when
   * it starts and again when it is done: a read-ahead that ran meanwhile may
   * have read the bytes from before it.
   */
  private async changing(change: () => Promise<void>): Promise<void> {
    this.readAhead.changed();
    try {
      await change();
    } finally {
      this.readAhead.changed();
    }
  }

  /** Flush every writable backend. */
  async flushAll(): Promise<void> {
    for (const node of this.nodes.values()) {
      if (!node.file.backend.readOnly) await node.file.backend.flush();
    }
  }

  private node(nodeid: NodeId): Node {
    const n = this.nodes.get(nodeid);
    if (!n) throw new FuseErrno(E.ENOENT, `no node ${nodeid}`);
    return n;
  }

  private isRootDir(nodeid: NodeId): boolean {
    return nodeid === FUSE_ROOT_ID && !this.opts.rootIsFile;
  }

  private async fileAttr(n: Node): Promise<Attr> {
    const size = n.file.backend.size();
    const allocated = await n.file.backend.allocatedBytes();
    return {
      ino: n.nodeid,
      size,
      blocks: Math.ceil(Math.min(allocated, Math.max(size, allocated)) / 512),
      atimeMs: n.atimeMs,
      mtimeMs: n.mtimeMs,
      ctimeMs: n.ctimeMs,
      mode: n.mode,
      nlink: 1,
      uid: n.uid,
      gid: n.gid,
      rdev: 0,
      blksize: 4096,
    };
  }

  private rootAttr(): Attr {
    return {
      ino: FUSE_ROOT_ID,
      size: 4096,
      blocks: 0,
      atimeMs: this.startMs,
      mtimeMs: this.startMs,
      ctimeMs: this.startMs,
      mode: S_IFDIR | 0o755,
      nlink: 2,
      uid: this.opts.uid,
      gid: this.opts.gid,
      rdev: 0,
      blksize: 4096,
    };
  }

  private async attrOf(nodeid: NodeId): Promise<Attr> {
    return this.isRootDir(nodeid) ? this.rootAttr() : this.fileAttr(this.node(nodeid));
  }

  async lookup(_ctx: RequestContext, parent: NodeId, name: string): Promise<Entry> {
    if (!this.isRootDir(parent)) throw new FuseErrno(E.ENOTDIR);
    const n = this.byName.get(name);
    if (!n) throw new FuseErrno(E.ENOENT);
    return { nodeid: n.nodeid, generation: 1, attr: await this.fileAttr(n), entryTimeoutMs: ATTR_TIMEOUT_MS, attrTimeoutMs: ATTR_TIMEOUT_MS };
  }

  async getattr(_ctx: RequestContext, nodeid: NodeId): Promise<AttrReply> {
    return { attr: await this.attrOf(nodeid), attrTimeoutMs: ATTR_TIMEOUT_MS };
  }

  async setattr(_ctx: RequestContext, nodeid: NodeId, ch: SetattrChanges): Promise<AttrReply> {
    if (this.isRootDir(nodeid)) {
      if (ch.size !== undefined) throw new FuseErrno(E.EISDIR);
      return { attr: this.rootAttr(), attrTimeoutMs: ATTR_TIMEOUT_MS };
    }
    const n = this.node(nodeid);
    const now = Date.now();
    if (ch.size !== undefined && ch.size !== n.file.backend.size()) {
      if (n.file.backend.readOnly) throw new FuseErrno(E.EROFS);
      await this.changing(() => n.file.backend.resize(ch.size!));
      n.mtimeMs = n.ctimeMs = now;
      await this.dropWithdrawn();
    }
    if (ch.mode !== undefined) {
      n.mode = S_IFREG | (ch.mode & 0o7777);
      n.ctimeMs = now;
    }
    if (ch.uid !== undefined) n.uid = ch.uid;
    if (ch.gid !== undefined) n.gid = ch.gid;
    if (ch.atimeMs !== undefined) n.atimeMs = ch.atimeMs === 'now' ? now : ch.atimeMs;
    if (ch.mtimeMs !== undefined) n.mtimeMs = ch.mtimeMs === 'now' ? now : ch.mtimeMs;
    if (ch.uid !== undefined || ch.gid !== undefined || ch.atimeMs !== undefined || ch.mtimeMs !== undefined) n.ctimeMs = now;
    return { attr: await this.fileAttr(n), attrTimeoutMs: ATTR_TIMEOUT_MS };
  }

  async access(_ctx: RequestContext, nodeid: NodeId, mask: number): Promise<void> {
    const W_OK = 2;
    if (!this.isRootDir(nodeid) && (mask & W_OK) && this.node(nodeid).file.backend.readOnly) throw new FuseErrno(E.EROFS);
  }

  async statfs(_ctx: RequestContext, nodeid: NodeId): Promise<Statfs> {
    const file = this.isRootDir(nodeid) ? [...this.nodes.values()][0]?.file : this.node(nodeid).file;
    let bsize = 4096;
    let blocks = 0;
    let bfree = 0;
    let bavail = 0;
    const ref = file ? this.hostRefs.get(file.hostPath) ?? -1 : -1;
    if (ref >= 0) {
      try {
        // Through the descriptor's /proc link, which leads to the open file without a lookup of its path.
        const s = fs.statfsSync(`/proc/self/fd/${ref}`);
        bsize = s.bsize;
        blocks = s.blocks;
        bfree = s.bfree;
        bavail = s.bavail;
      } catch {
        // statfs of the host is best effort
      }
    }
    return { blocks, bfree, bavail, files: this.nodes.size + 1, ffree: 0, bsize, namelen: 255, frsize: bsize };
  }

  async open(_ctx: RequestContext, nodeid: NodeId, flags: number): Promise<OpenReply> {
    if (this.isRootDir(nodeid)) throw new FuseErrno(E.EISDIR);
    const n = this.node(nodeid);
    if ((flags & O_ACCMODE) !== O_RDONLY && n.file.backend.readOnly) throw new FuseErrno(E.EROFS);
    n.openCount++;
    if (n.file.directIo) return { fh: this.nextFh++, directIo: true };
    // A write-only open never reads what it caches: its writes go past the kernel's page
    // cache, without the copy into fresh pages there (a 1 GiB dd into a new image, interleaved
    // runs: 1.5-1.9 s against 2.0-5.1 s). Only where the kernel keeps the pages other opens
    // cached or mapped coherent with direct writes.
    if ((flags & O_ACCMODE) === O_WRONLY && this.conn?.directIoAllowMmap) return { fh: this.nextFh++, directIo: true };
    return { fh: this.nextFh++, keepCache: true };
  }

  async read(_ctx: RequestContext, nodeid: NodeId, _fh: FileHandle, offset: number, size: number, into?: Buffer): Promise<Buffer> {
    const n = this.node(nodeid);
    const end = Math.min(offset + size, n.file.backend.size());
    if (end <= offset) return Buffer.alloc(0);
    const buf = into !== undefined && into.length >= end - offset ? into.subarray(0, end - offset) : Buffer.allocUnsafe(end - offset);
    await n.file.backend.read(buf, offset);
    return buf;
  }

  readNow(nodeid: NodeId, _fh: FileHandle, offset: number, size: number, into: Buffer, mayBlock: boolean): Buffer | null {
    const n = this.nodes.get(nodeid);
    const b = n?.file.backend;
    if (n === undefined || b?.readNow === undefined) return null;
    const end = Math.min(offset + size, b.size());
    const length = end - offset;
    if (length <= 0 || into.length < length) return null;
    // Direct-I/O files: the kernel reads nothing ahead of them, so this does (see DirectReadAhead).
    const ahead = n.file.directIo ? this.readAhead.take(n, offset, length) : null;
    const buf = ahead ?? into.subarray(0, length);
    if (ahead === null && !b.readNow(buf, offset, mayBlock)) return null;
    if (n.file.directIo) this.readAhead.follow(n, b, offset, length);
    return buf;
  }

  async readSlices(_ctx: RequestContext, nodeid: NodeId, _fh: FileHandle, offset: number, size: number): Promise<FileSlices | null> {
    const b = this.node(nodeid).file.backend;
    const end = Math.min(offset + size, b.size());
    if (end <= offset || !b.mapForRead) return null;
    return b.mapForRead(offset, end - offset);
  }

  async write(_ctx: RequestContext, nodeid: NodeId, _fh: FileHandle, offset: number, data: Buffer): Promise<number> {
    const n = this.node(nodeid);
    const b = n.file.backend;
    if (b.readOnly) throw new FuseErrno(E.EROFS);
    await this.changing(async () => {
      if (offset + data.length > b.size()) await b.resize(offset + data.length);
      await b.write(data, offset);
    });
    n.mtimeMs = n.ctimeMs = Date.now();
    await this.invalidateAliases(n, offset, data.length);
    return data.length;
  }

  /**
   * write(), done before returning when that needs no waiting (see
   * FileBackend.writeNow): the bytes written, or null and nothing done. Only
   * for a file no other file of the mount aliases (whose pages would have to
   * be dropped first) and within its size.
   */
  writeNow(nodeid: NodeId, _fh: FileHandle, offset: number, data: Buffer): number | null {
    const n = this.nodes.get(nodeid);
    const b = n?.file.backend;
    if (n === undefined || b?.writeNow === undefined || n.file.window !== undefined || b.readOnly) return null;
    if (offset + data.length > b.size()) return null;
    for (const m of this.nodes.values()) if (toDrop(m)) return null; // dropWithdrawn() must run first
    // As changing() does, around a change with nothing to wait for in between.
    this.readAhead.changed();
    if (!b.writeNow(data, offset)) return null;
    n.mtimeMs = n.ctimeMs = Date.now();
    return data.length;
  }

  /**
   * Drop the kernel's cached pages of [offset, offset+length) of n as other
   * files of the same disk show them. Done before the change is answered, so
   * a read through any of them that follows sees it; only a drop that waits
   * for a page still being read is left to finish after the answer, past
   * ALIAS_DROP_WAIT_MS, and until it does that page may show what it held
   * before the change.
   */
  private async invalidateAliases(n: Node, offset: number, length: number): Promise<void> {
    await this.dropWithdrawn();
    const w = n.file.window;
    const invalidate = this.conn?.invalidate;
    if (w === undefined || invalidate === undefined || length <= 0) return;
    const from = w.start + offset;
    const to = from + length;
    const pending: Promise<void>[] = [];
    for (const m of this.nodes.values()) {
      const v = m.file.window;
      if (m === n || v === undefined || v.disk !== w.disk) continue;
      const a = Math.max(from, v.start);
      const b = Math.min(to, v.start + m.file.backend.size());
      if (a < b) pending.push(invalidate(m.nodeid, a - v.start, b - a));
    }
    if (pending.length > 0) await settledWithin(Promise.all(pending), ALIAS_DROP_WAIT_MS);
  }

  /**
   * Drop every cached page of the files that stopped serving their content
   * (FileBackend.withdrawn), mapped pages too: a mapping made before then
   * faults again, and fails as the file's reads do.
   */
  private async dropWithdrawn(): Promise<void> {
    const invalidate = this.conn?.invalidate;
    if (invalidate === undefined) return;
    const pending: Promise<void>[] = [];
    for (const m of this.nodes.values()) {
      if (!toDrop(m)) continue;
      m.dropped = true;
      pending.push(invalidate(m.nodeid, 0, 0));
    }
    if (pending.length > 0) await settledWithin(Promise.all(pending), ALIAS_DROP_WAIT_MS);
  }

  async flush(_ctx: RequestContext, nodeid: NodeId): Promise<void> {
    const n = this.node(nodeid);
    if (!n.file.backend.readOnly) await n.file.backend.flush();
  }

  async fsync(_ctx: RequestContext, nodeid: NodeId): Promise<void> {
    const n = this.node(nodeid);
    if (!n.file.backend.readOnly) await n.file.backend.flush();
  }

  async release(_ctx: RequestContext, nodeid: NodeId): Promise<void> {
    const n = this.nodes.get(nodeid);
    if (n && n.openCount > 0) n.openCount--;
  }

  async opendir(_ctx: RequestContext, nodeid: NodeId): Promise<OpenReply> {
    if (!this.isRootDir(nodeid)) throw new FuseErrno(E.ENOTDIR);
    return { fh: this.nextFh++ };
  }

  async readdir(_ctx: RequestContext, nodeid: NodeId): Promise<DirEntry[]> {
    if (!this.isRootDir(nodeid)) throw new FuseErrno(E.ENOTDIR);
    const out: DirEntry[] = [
      { name: '.', ino: FUSE_ROOT_ID, type: S_IFDIR },
      { name: '..', ino: FUSE_ROOT_ID, type: S_IFDIR },
    ];
    for (const n of this.nodes.values()) out.push({ name: n.file.name, ino: n.nodeid, type: S_IFREG });
    return out;
  }

  async releasedir(): Promise<void> {}

  async lseek(_ctx: RequestContext, nodeid: NodeId, _fh: FileHandle, offset: number, whence: number): Promise<number> {
    const b = this.node(nodeid).file.backend;
    if (whence === SEEK_DATA) return b.seekData(offset);
    if (whence === SEEK_HOLE) return b.seekHole(offset);
    throw new FuseErrno(E.EINVAL);
  }

  async fallocate(_ctx: RequestContext, nodeid: NodeId, _fh: FileHandle, offset: number, length: number, mode: number): Promise<void> {
    const n = this.node(nodeid);
    const b = n.file.backend;
    if (b.readOnly) throw new FuseErrno(E.EROFS);
    const keepSize = (mode & FALLOC_FL_KEEP_SIZE) !== 0;
    const known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
    if (mode & ~known) throw new FuseErrno(E.EOPNOTSUPP);
    await this.changing(() => this.allocate(n, b, offset, length, mode, keepSize));
    n.mtimeMs = n.ctimeMs = Date.now();
  }

  private async allocate(n: Node, b: FileBackend, offset: number, length: number, mode: number, keepSize: boolean): Promise<void> {
    const end = offset + length;
    if (mode & FALLOC_FL_PUNCH_HOLE) {
      if (!keepSize) throw new FuseErrno(E.EINVAL); // PUNCH_HOLE must come with KEEP_SIZE (fallocate(2))
      const stop = Math.min(end, b.size());
      if (stop > offset) await b.writeZeroes(offset, stop - offset, true);
      await this.invalidateAliases(n, offset, stop - offset);
    } else if (mode & FALLOC_FL_ZERO_RANGE) {
      if (!keepSize && end > b.size()) await b.resize(end);
      const stop = Math.min(end, b.size());
      if (stop > offset) await b.writeZeroes(offset, stop - offset, false);
      await this.invalidateAliases(n, offset, stop - offset);
    } else if (!keepSize && end > b.size()) {
      // Plain allocation: the file grows; clusters are allocated when written.
      await b.resize(end);
      await this.dropWithdrawn();
    }
  }
}
