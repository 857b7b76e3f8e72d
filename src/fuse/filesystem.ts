/**
 * The interface a filesystem implements to be served over FUSE. It is
 * transport-neutral: the kernel-protocol session (session.ts) and the
 * libfuse transport (libfuse.ts) both drive it. It is inode-based, like the
 * kernel protocol; the libfuse transport resolves paths with lookup().
 *
 * Handlers return values or throw. A thrown error is turned into an errno
 * exactly once, by the `errnoOf` function given to the transport (the
 * filesystem layer owns that mapping); an error carrying a numeric `errno`
 * property (see FuseErrno) is used as is.
 */

/** Node ids: 1 is the root (FUSE_ROOT_ID). */
export type NodeId = number;
/** File handles returned by open/opendir. */
export type FileHandle = number;

export const FUSE_ROOT_ID: NodeId = 1;

export interface Attr {
  ino: number;
  size: number;
  /** 512-byte blocks really held. */
  blocks: number;
  atimeMs: number;
  mtimeMs: number;
  ctimeMs: number;
  /** Full st_mode including the type bits (S_IFREG | 0o644, ...). */
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  rdev: number;
  blksize: number;
}

export interface Entry {
  nodeid: NodeId;
  generation: number;
  attr: Attr;
  /** How long the kernel may cache the name and the attributes, in ms. */
  entryTimeoutMs: number;
  attrTimeoutMs: number;
}

export interface AttrReply {
  attr: Attr;
  attrTimeoutMs: number;
}

export interface SetattrChanges {
  size?: number;
  mode?: number;
  uid?: number;
  gid?: number;
  /** 'now' means the current time (FATTR_ATIME_NOW / FATTR_MTIME_NOW). */
  atimeMs?: number | 'now';
  mtimeMs?: number | 'now';
  ctimeMs?: number;
  fh?: FileHandle;
}

export interface OpenReply {
  fh: FileHandle;
  /** FOPEN_DIRECT_IO: bypass the page cache. */
  directIo?: boolean;
  /** FOPEN_KEEP_CACHE: keep cached pages from an earlier open. */
  keepCache?: boolean;
}

/**
 * A READ reply's bytes as ranges of open host files, which a transport can
 * move into the reply without copying them through user space (splice).
 * A slice with fd -1 is a run of zeroes. The ranges must keep their
 * contents until `release` is called; the transport calls it exactly once,
 * when the reply is sent or abandoned.
 */
export interface FileSlices {
  slices: Array<{ fd: number; position: number; length: number }>;
  release(): void;
}

export interface DirEntry {
  name: string;
  ino: number;
  /** File type bits (S_IFREG, S_IFDIR, ...) as in st_mode. */
  type: number;
}

export interface Statfs {
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  bsize: number;
  namelen: number;
  frsize: number;
}

export interface RequestContext {
  uid: number;
  gid: number;
  pid: number;
  /** Aborted when the kernel sends FUSE_INTERRUPT for this request. */
  signal?: AbortSignal;
}

/** What the transport negotiated, told to the filesystem at init. */
export interface ConnectionInfo {
  protoMajor: number;
  protoMinor: number;
  maxWrite: number;
  maxRead: number;
  /** Whether the kernel will send LSEEK / FALLOCATE (false on libfuse 2). */
  supportsLseek: boolean;
  supportsFallocate: boolean;
  /**
   * FUSE_DIRECT_IO_ALLOW_MMAP was agreed (7.39, Linux 6.6+): besides shared
   * mmap of FOPEN_DIRECT_IO files, the kernel then writes back and drops the
   * cached and mapped pages a direct write covers, whichever open cached them.
   */
  directIoAllowMmap: boolean;
  /**
   * Drop the kernel's cached pages of [offset, offset+length) of a file
   * (length 0: to its end), for data that changed behind the kernel's back.
   * Resolves once the kernel has done so; absent where the transport cannot.
   * Never await it while holding up a request on that same file: the kernel
   * may wait for that request's pages first.
   */
  invalidate?: (nodeid: number, offset: number, length: number) => Promise<void>;
  /**
   * True while the request being handled is the only one: no other handler
   * is pending and the device held no further request when last read. A
   * handler may then do a short blocking operation on the spot rather than
   * wait for an asynchronous completion, since nothing else waits for the
   * thread meanwhile. Absent where the transport cannot tell.
   */
  soleRequest?: () => boolean;
}

/** lseek whence values the filesystem may be asked for. */
export const SEEK_SET = 0;
export const SEEK_CUR = 1;
export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

/** fallocate mode bits (linux/falloc.h). */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export interface FuseFilesystem {
  init?(conn: ConnectionInfo): void | Promise<void>;
  /** Unmounted or stopping: flush and release everything. */
  destroy?(): Promise<void>;

  lookup(ctx: RequestContext, parent: NodeId, name: string): Promise<Entry>;
  forget?(nodeid: NodeId, nlookup: number): void;
  getattr(ctx: RequestContext, nodeid: NodeId, fh?: FileHandle): Promise<AttrReply>;
  setattr(ctx: RequestContext, nodeid: NodeId, changes: SetattrChanges): Promise<AttrReply>;
  access?(ctx: RequestContext, nodeid: NodeId, mask: number): Promise<void>;
  statfs(ctx: RequestContext, nodeid: NodeId): Promise<Statfs>;

  open(ctx: RequestContext, nodeid: NodeId, flags: number): Promise<OpenReply>;
  /**
   * Read up to `size` bytes at `offset`. Returns the data; a shorter buffer
   * means end of file. The returned buffer must stay untouched until the
   * reply has been written (the transport copies or writes it at once).
   * `into`, when given, is a buffer of at least `size` bytes the filesystem
   * may read into and return a view of: the transport reuses it once this
   * call has settled, which spares a fresh allocation (and its page faults)
   * per request.
   */
  read(ctx: RequestContext, nodeid: NodeId, fh: FileHandle, offset: number, size: number, into?: Buffer): Promise<Buffer>;
  /**
   * read(), answered before returning when that needs no waiting: the data
   * (a view of `into`, which holds at least `size` bytes, or of a buffer of
   * the filesystem's own that it leaves untouched until the event loop's
   * next turn: the transport writes the reply before that), or null when it
   * cannot be had at once, and the transport then calls read(). `mayBlock`:
   * nothing else waits to be served, so a short wait for the disk is allowed.
   * Errors are thrown, as read() rejects with them. The transport asks this
   * first for reads it would answer from a buffer, and answers them without
   * the bookkeeping of a request in flight.
   */
  readNow?(nodeid: NodeId, fh: FileHandle, offset: number, size: number, into: Buffer, mayBlock: boolean): Buffer | null;
  /**
   * The same bytes as read() would return (up to `size`, shorter at end of
   * file), as host file ranges; null when they cannot be described so, and
   * the transport then calls read(). Transports that can splice ask this
   * first for large reads.
   */
  readSlices?(ctx: RequestContext, nodeid: NodeId, fh: FileHandle, offset: number, size: number): Promise<FileSlices | null>;
  /**
   * Write `data` at `offset`; returns bytes written. `data` is only valid
   * until the promise settles (it may be a view of a pooled request buffer).
   */
  write(ctx: RequestContext, nodeid: NodeId, fh: FileHandle, offset: number, data: Buffer, flags: number): Promise<number>;
  /**
   * write(), done before returning when that needs no waiting: the bytes
   * written, or null when nothing was done, and the transport then calls
   * write(). Errors are thrown, as write() rejects with them. The transport
   * asks this first, and answers the writes it takes without the
   * bookkeeping of a request in flight. `data` is only valid during the call.
   */
  writeNow?(nodeid: NodeId, fh: FileHandle, offset: number, data: Buffer): number | null;
  flush?(ctx: RequestContext, nodeid: NodeId, fh: FileHandle): Promise<void>;
  fsync?(ctx: RequestContext, nodeid: NodeId, fh: FileHandle, datasync: boolean): Promise<void>;
  release(ctx: RequestContext, nodeid: NodeId, fh: FileHandle, flags: number): Promise<void>;

  opendir?(ctx: RequestContext, nodeid: NodeId, flags: number): Promise<OpenReply>;
  /** All entries of the directory, "." and ".." included; the transport pages them. */
  readdir(ctx: RequestContext, nodeid: NodeId, fh: FileHandle): Promise<DirEntry[]>;
  releasedir?(ctx: RequestContext, nodeid: NodeId, fh: FileHandle): Promise<void>;

  /** SEEK_DATA / SEEK_HOLE (others are handled by the kernel). Throw ENXIO-mapped errors past EOF. */
  lseek?(ctx: RequestContext, nodeid: NodeId, fh: FileHandle, offset: number, whence: number): Promise<number>;
  fallocate?(ctx: RequestContext, nodeid: NodeId, fh: FileHandle, offset: number, length: number, mode: number): Promise<void>;
}

/** An error that already is an errno (positive, e.g. 2 for ENOENT). */
export class FuseErrno extends Error {
  constructor(readonly errno: number, message?: string) {
    super(message ?? `errno ${errno}`);
    this.name = 'FuseErrno';
  }
}

/** Maps any error thrown by a handler to a positive errno. */
export type ErrnoMapper = (err: unknown) => number;

/** Options shared by both transports. */
export interface MountOptions {
  mountpoint: string;
  /** The root is a regular file (mount over a file) instead of a directory. */
  rootIsFile: boolean;
  readOnly: boolean;
  allowOther: boolean;
  /** Filesystem name shown in /proc/mounts (source field). */
  fsname: string;
  /** Subtype: mounts as "fuse.<subtype>". */
  subtype: string;
  /** One line per request to stderr. */
  debug: boolean;
  /** Largest read/write request to negotiate, in bytes (up to 1 MiB). */
  maxRequestBytes: number;
  /** How many requests may be in flight at once. */
  maxInFlight: number;
  errnoOf: ErrnoMapper;
}

/** A running mount, whatever the transport. */
export interface FuseMount {
  readonly mountpoint: string;
  readonly transport: 'kernel' | 'libfuse';
  /** Settles when the filesystem has been unmounted and the session ended. */
  readonly done: Promise<void>;
  /** Unmount (flushing through destroy) and end the session. */
  unmount(): Promise<void>;
}
