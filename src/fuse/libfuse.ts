/**
 * The libfuse transport: serves a FuseFilesystem through fuse-native, which
 * binds libfuse 2's high-level (path-based) API. It is the transport for
 * users who may not mount with the kernel protocol (no CAP_SYS_ADMIN):
 * libfuse mounts through the setuid `fusermount`.
 *
 * Limits of this transport, all from libfuse 2 (FUSE protocol 7.19) and
 * from what fuse-native 2.2 binds of it:
 * - No lseek: SEEK_DATA/SEEK_HOLE are answered by the kernel as for a file
 *   without holes, so sparse-aware copies read the whole raw file (they
 *   still write holes where they find zeroes).
 * - No fallocate: hole punching and zero ranges (fallocate -p/-z, discard
 *   from a loop device) fail with EOPNOTSUPP and free nothing in the image.
 * - No mount over a regular file: fuse-native mounts on directories only.
 * - Requests of at most 128 KiB; all callers are seen as the mounting user
 *   (libfuse's caller credentials are not passed on) and no request can be
 *   interrupted; attribute and name caching use libfuse's fixed 1 s
 *   timeouts; per-open direct I/O and keep-cache are not available.
 * - Times: libfuse 2 passes a change of the times on only when both stamps
 *   change (touch -a or -m alone change nothing), and fuse-native hands over
 *   the access time for both, so both are set to the new access time.
 * - Other users reach the mount only with allow_other, which an
 *   unprivileged user may ask for only when /etc/fuse.conf has
 *   `user_allow_other`.
 * - An unmount from outside (fusermount -u) is noticed by polling the
 *   mount's fusectl connection (or /proc/self/mountinfo), within ~200 ms.
 *   Without fusectl (systemd mounts it at /sys/fs/fuse/connections) a
 *   lazily detached mount counts as ended when it leaves mountinfo, even
 *   while files on it are still open.
 *
 * Needs the system's libfuse 2 (fuse-native's prebuilt module links
 * libfuse.so.2) and a `fusermount` binary: libfuse 2 runs /bin/fusermount or
 * `fusermount` from PATH (Debian's fuse3 provides it as a link to
 * fusermount3, which speaks the same protocol).
 */
import { execFile } from 'child_process';
import * as fs from 'fs';
import { constants as osConstants } from 'os';
import * as path from 'path';

import {
  Attr, ConnectionInfo, FileHandle, FuseErrno, FuseFilesystem, FuseMount, FUSE_ROOT_ID,
  MountOptions, NodeId, RequestContext, Statfs,
} from './filesystem';
import { statMountpoint } from './mount';
import { codeError } from './session';

const E = osConstants.errno;

/** libfuse 2.9 speaks FUSE 7.19 (fuse_kernel.h of libfuse 2.9.9). */
const LIBFUSE2_PROTO_MAJOR = 7;
const LIBFUSE2_PROTO_MINOR = 19;
/** libfuse 2 reads each request into a 128 KiB + header buffer: no larger reads or writes. */
export const LIBFUSE2_MAX_REQUEST = 128 * 1024;
/** How often the mount is checked for an unmount from outside. */
const WATCH_INTERVAL_MS = 200;
const FUSECTL_DIR = '/sys/fs/fuse/connections';

/** Options of mountLibfuse(): the shared MountOptions plus libfuse-only knobs. */
export interface LibfuseMountOptions extends MountOptions {
  /** Let the kernel check permissions from the attributes (mount option default_permissions). */
  defaultPermissions?: boolean;
  /** How long to wait for the mount to answer its first request (default 30 s). */
  initTimeoutMs?: number;
}

export interface LibfuseUnmountOptions {
  /** When the mountpoint is busy, detach it lazily (fusermount -uz) instead of failing. */
  force?: boolean;
}

// --- fuse-native, as much of it as is used --------------------------------------------------

type Callback = (code: number, ...results: unknown[]) => void;
type NativeOps = Record<string, (...args: never[]) => void>;

interface FuseNativeInstance {
  readonly mnt: string;
  /** The native fuse_thread_t, allocated at mount. */
  readonly _thread: Buffer | null;
  mount(cb: (err: Error | null) => void): void;
  unmount(cb: (err: Error | null) => void): void;
  /** Builds the "-o..." argument libfuse is given (fuse-native 2.2, index.js). */
  _fuseOptions(): string;
  /** nanoresource's close hook: fusermount -uz, then the native release. */
  _close(cb: (err: Error | null) => void): void;
}

/** fuse-native's native module (the same instance its index.js loaded). */
interface FuseNativeBinding {
  fuse_native_unmount(mnt: string, thread: Buffer): void;
}

interface FuseNativeCtor {
  new (mountpoint: string, ops: NativeOps, opts: Record<string, unknown>): FuseNativeInstance;
}

/** fuse.h's struct stat as fuse-native takes it: times as Date or milliseconds. */
interface NativeStat {
  mode: number; uid: number; gid: number; size: number; dev: number; nlink: number; ino: number;
  rdev: number; blksize: number; blocks: number; atime: number; mtime: number; ctime: number;
}

let fuseNative: { Fuse: FuseNativeCtor; binding: FuseNativeBinding } | null | undefined;

function loadFuseNative(): { Fuse: FuseNativeCtor; binding: FuseNativeBinding } | null {
  if (fuseNative === undefined) {
    try {
      // Loaded on first use: it brings a native module linked against libfuse.so.2.
      /* eslint-disable @typescript-eslint/no-require-imports */
      const Fuse = require('fuse-native') as FuseNativeCtor;
      const dir = path.dirname(require.resolve('fuse-native/package.json'));
      const gypBuild = require(require.resolve('node-gyp-build', { paths: [dir] })) as (dir: string) => FuseNativeBinding;
      /* eslint-enable @typescript-eslint/no-require-imports */
      fuseNative = { Fuse, binding: gypBuild(dir) };
    } catch {
      fuseNative = null;
    }
  }
  return fuseNative;
}

/** Where libfuse 2 looks for fusermount: FUSERMOUNT_DIR (/bin on Debian), then PATH. */
export function findFusermount(): string | null {
  const dirs = ['/bin', '/usr/bin', ...(process.env.PATH ?? '').split(':').filter(Boolean)];
  for (const dir of dirs) {
    const candidate = path.join(dir, 'fusermount');
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return null;
}

/** fuse-native loads (so libfuse.so.2 is there) and a `fusermount` binary exists. */
export function libfuseAvailable(): boolean {
  return loadFuseNative() !== null && findFusermount() !== null;
}

// --- pure helpers --------------------------------------------------------------------------

/** libfuse's option parser splits on commas; a backslash escapes one. */
function escapeOption(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/,/g, '\\,');
}

/** The requests' size limit: what was asked for, within libfuse 2's buffer, whole pages. */
export function libfuseRequestBytes(maxRequestBytes: number): number {
  const pages = Math.floor(Math.min(Math.max(maxRequestBytes, 4096), LIBFUSE2_MAX_REQUEST) / 4096);
  return pages * 4096;
}

/** The libfuse 2 options (mount and library) for these mount options. */
export function libfuseOptions(opts: LibfuseMountOptions): string[] {
  const bytes = libfuseRequestBytes(opts.maxRequestBytes);
  const list: string[] = [];
  if (opts.allowOther) list.push('allow_other');
  if (opts.defaultPermissions) list.push('default_permissions');
  if (opts.readOnly) list.push('ro');
  const subtype = opts.subtype.replace(/[^A-Za-z0-9_+-]/g, '_') || 'qcowfs';
  list.push(`fsname=${escapeOption(opts.fsname || subtype)}`, `subtype=${subtype}`);
  // Without big_writes libfuse 2 has the kernel split every write into 4 KiB requests.
  list.push(`max_read=${bytes}`, 'big_writes', `max_write=${bytes}`);
  // opts.debug is served by one line per request here, not by libfuse's own debug dump.
  return list;
}

/** fuse-native's stat array keeps 64-bit fields as two 32-bit halves; times in ms. */
function toNativeStat(a: Attr): NativeStat {
  return {
    mode: a.mode, uid: a.uid, gid: a.gid, size: a.size, dev: 0, nlink: a.nlink, ino: a.ino,
    rdev: a.rdev, blksize: a.blksize, blocks: a.blocks,
    atime: a.atimeMs, mtime: a.mtimeMs, ctime: a.ctimeMs,
  };
}

/**
 * fuse-native passes statvfs counts as 32-bit words: scale the fragment size
 * up (the block counts down) until the counts fit, as statfs(2) users expect
 * blocks * frsize to be the size.
 */
export function fitStatfs(s: Statfs): Record<string, number> {
  const U32 = 0xffffffff;
  let frsize = s.frsize || s.bsize || 4096;
  let { blocks, bfree, bavail } = s;
  while (blocks > U32 && frsize < 2 ** 30) {
    frsize *= 2;
    blocks = Math.floor(blocks / 2);
    bfree = Math.floor(bfree / 2);
    bavail = Math.floor(bavail / 2);
  }
  const clamp = (n: number) => Math.min(Math.max(Math.floor(n), 0), U32);
  return {
    bsize: clamp(Math.max(s.bsize, frsize)), frsize: clamp(frsize), blocks: clamp(blocks), bfree: clamp(bfree),
    bavail: clamp(bavail), files: clamp(s.files), ffree: clamp(s.ffree), favail: clamp(s.ffree), fsid: 0, flag: 0,
    namemax: clamp(s.namelen),
  };
}

// --- mount state from the kernel ------------------------------------------------------------

interface MountInfoLine {
  /** The mount's device, "0:NN": NN names its fusectl connection. */
  dev: string;
  fstype: string;
}

/** /proc/self/mountinfo escapes space, tab, newline and backslash in paths as \ooo. */
function unescapeMountPath(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

function findMount(mountpoint: string): MountInfoLine | null {
  let text: string;
  try {
    text = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return null;
  }
  let found: MountInfoLine | null = null;
  for (const line of text.split('\n')) {
    // id parent MAJ:MIN root mountpoint options [optional...] - fstype source superopts
    const fields = line.split(' ');
    if (fields.length < 7 || unescapeMountPath(fields[4]) !== mountpoint) continue;
    const sep = fields.indexOf('-', 6);
    // The last one listed is on top.
    found = { dev: fields[2], fstype: sep > 0 ? fields[sep + 1] : '' };
  }
  return found;
}

/**
 * A mount's connection as fusectl shows it: a directory named by the device
 * minor that exists for as long as the connection does. Minors are reused at
 * once, so the directory's inode number tells this connection from a later one.
 */
interface Connection {
  dir: string;
  ino: number;
}

function connectionOf(dev: string): Connection | null {
  const [major, minor] = dev.split(':').map(Number);
  if (major !== 0 || !Number.isInteger(minor)) return null;
  const dir = path.join(FUSECTL_DIR, String(minor));
  try {
    return { dir, ino: fs.statSync(dir).ino };
  } catch {
    return null; // fusectl not mounted
  }
}

function connectionAlive(c: Connection): boolean {
  try {
    return fs.statSync(c.dir).ino === c.ino;
  } catch {
    return false;
  }
}

/** fusermount -u [-z]: busy and not-mounted come back as codes EBUSY and EINVAL. */
function fusermountUnmount(fusermount: string, mountpoint: string, lazy: boolean): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(fusermount, ['-u', ...(lazy ? ['-z'] : []), '--', mountpoint], { env: { ...process.env, LC_ALL: 'C' } }, (err, _stdout, stderr) => {
      if (!err) return resolve();
      const msg = String(stderr).trim().split('\n').filter(Boolean).join('; ') || err.message;
      if (/busy/i.test(msg)) return reject(codeError('EBUSY', `${mountpoint} is busy (a process uses it); close it or unmount lazily`));
      if (/not found|not mounted|invalid argument/i.test(msg)) return reject(codeError('EINVAL', `${mountpoint} is not mounted`));
      if (/permission|not permitted/i.test(msg)) return reject(codeError('EPERM', `not allowed to unmount ${mountpoint}: ${msg}`));
      reject(codeError('EUMOUNT', `unmounting ${mountpoint} failed: ${msg}`));
    });
  });
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// --- the mount ------------------------------------------------------------------------------

export class LibfuseMount implements FuseMount {
  readonly transport = 'libfuse' as const;
  readonly done: Promise<void>;
  private settle!: (err?: unknown) => void;
  private watch: NodeJS.Timeout | null = null;
  private ending: Promise<void> | undefined;
  private unmounting: Promise<void> | undefined;

  constructor(
    readonly mountpoint: string,
    private readonly filesystem: FuseFilesystem,
    private readonly fuse: FuseNativeInstance,
    private readonly fusermount: string,
    /** The mount's fusectl connection, when fusectl is mounted. */
    private readonly connection: Connection | null,
  ) {
    this.done = new Promise<void>((resolve, reject) => {
      this.settle = (err?: unknown) => (err === undefined ? resolve() : reject(err));
    });
    // An unhandled rejection of `done` must not kill a caller that only awaits unmount().
    this.done.catch(() => undefined);
  }

  /** Gone means: the kernel connection has ended (a lazily detached mount ends at its last close). */
  gone(): boolean {
    if (this.connection !== null) return !connectionAlive(this.connection);
    return findMount(this.mountpoint) === null;
  }

  /** libfuse 2 does not tell when it has been unmounted: look. */
  startWatching(): void {
    this.watch = setInterval(() => {
      if (this.gone()) void this.end();
    }, WATCH_INTERVAL_MS);
    // The session keeps the process alive through libfuse's thread, not this timer.
    this.watch.unref();
  }

  /** The connection has gone: flush and release through destroy, then settle `done`. */
  end(): Promise<void> {
    this.ending ??= (async () => {
      if (this.watch) clearInterval(this.watch);
      // Let go of fuse-native's loop handle, or this process could never exit by itself.
      await new Promise<void>((r) => this.fuse.unmount(() => r()));
      try {
        await this.filesystem.destroy?.();
        this.settle();
      } catch (err) {
        this.settle(err);
      }
    })();
    return this.ending;
  }

  /**
   * Unmount and wait for the session to end (the filesystem's destroy() has
   * run when this resolves). A busy mountpoint fails with code EBUSY unless
   * `force` is set, which detaches it lazily: the session then ends when the
   * last file on it is closed.
   */
  unmount(opts: LibfuseUnmountOptions = {}): Promise<void> {
    this.unmounting ??= this.doUnmount(opts).finally(() => { this.unmounting = undefined; });
    return this.unmounting;
  }

  private async doUnmount(opts: LibfuseUnmountOptions): Promise<void> {
    if (this.ending === undefined && findMount(this.mountpoint) !== null) {
      try {
        await fusermountUnmount(this.fusermount, this.mountpoint, false);
      } catch (err) {
        const code = (err as { code?: string }).code;
        if (code === 'EBUSY' && opts.force) await fusermountUnmount(this.fusermount, this.mountpoint, true);
        else if (code !== 'EINVAL') throw err;
        // EINVAL: raced with an unmount from elsewhere
      }
    }
    while (this.ending === undefined && !this.gone()) await delay(20);
    await this.end();
    await this.done;
  }
}

/**
 * Mount `filesystem` at opts.mountpoint with libfuse 2 and serve it from
 * this process. Resolves once the filesystem's init() has run and the mount
 * has answered a first request, i.e. the mount is usable.
 *
 * Errors a user can meet carry a `code`: ENOSYS (fuse-native or fusermount
 * missing), ENOTSUP (a regular file as mountpoint), ENOENT, ENOTDIR, EBUSY,
 * EACCES, EPERM, EMOUNT (libfuse refused: fusermount says why on stderr),
 * ETIMEDOUT, or the filesystem's own init() error.
 */
export async function mountLibfuse(filesystem: FuseFilesystem, opts: LibfuseMountOptions): Promise<LibfuseMount> {
  const mountpoint = path.resolve(opts.mountpoint);
  if (opts.rootIsFile) {
    throw codeError('ENOTSUP', `the libfuse transport cannot mount over a regular file (${mountpoint}): fuse-native mounts on directories only; mount on a directory, or as root with the kernel transport`);
  }
  const native = loadFuseNative();
  if (!native) throw codeError('ENOSYS', 'the libfuse transport needs the fuse-native package and libfuse 2 (libfuse.so.2), which did not load');
  const fusermount = findFusermount();
  if (!fusermount) throw codeError('ENOSYS', 'the libfuse transport needs a fusermount binary (libfuse 2 runs /bin/fusermount or fusermount from PATH)');
  checkMountpoint(mountpoint);
  checkUnprivileged(opts);

  const ctx: RequestContext = { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, pid: 0 };
  const requestBytes = libfuseRequestBytes(opts.maxRequestBytes);
  const errnoFor = (err: unknown): number => {
    let errno: number = E.EIO;
    try {
      errno = err instanceof FuseErrno ? err.errno : opts.errnoOf(err);
    } catch {
      errno = E.EIO;
    }
    return Number.isInteger(errno) && errno > 0 && errno < 4096 ? errno : E.EIO;
  };
  const log = opts.debug
    ? (op: string, p: string, result: string) => process.stderr.write(`qcowfs: libfuse: ${op} ${p} -> ${result}\n`)
    : null;

  // Path -> node id, resolved component by component from the root. Paths
  // never change under this transport (it offers no rename, unlink or create),
  // so entries stay valid; failed lookups are not kept.
  const nodes = new Map<string, Promise<NodeId>>([['/', Promise.resolve(FUSE_ROOT_ID)]]);
  const resolve = (p: string): Promise<NodeId> => {
    let node = nodes.get(p);
    if (node === undefined) {
      const slash = p.lastIndexOf('/');
      const parentPath = slash <= 0 ? '/' : p.slice(0, slash);
      const name = p.slice(slash + 1);
      node = resolve(parentPath).then(async (parent) => (await filesystem.lookup(ctx, parent, name)).nodeid);
      nodes.set(p, node);
      node.catch(() => nodes.delete(p));
    }
    return node;
  };

  // libfuse 2 runs as many worker threads as requests arrive; at most
  // maxInFlight of them reach the filesystem at once, the others wait here.
  const maxInFlight = Math.max(1, Math.floor(opts.maxInFlight) || 1);
  let inFlight = 0;
  const waiting: Array<() => void> = [];
  const limited = async <T>(work: () => Promise<T>): Promise<T> => {
    if (inFlight < maxInFlight) inFlight++;
    else await new Promise<void>((r) => waiting.push(r));
    try {
      return await work();
    } finally {
      // A waiting request takes the slot over; none waiting, the slot is free.
      const next = waiting.shift();
      if (next) next();
      else inFlight--;
    }
  };

  /** Run an op; its promise's value is the success arguments after code 0. */
  const serve = (op: string, p: string, cb: Callback, work: () => Promise<unknown[]>): void => {
    limited(work).then(
      (results) => {
        log?.(op, p, 'ok');
        cb(0, ...results);
      },
      (err: unknown) => {
        const errno = errnoFor(err);
        log?.(op, p, `errno ${errno}`);
        cb(-errno);
      },
    );
  };
  /** read and write answer with one number: the byte count, or -errno. */
  const serveCount = (op: string, p: string, cb: (n: number) => void, work: () => Promise<number>): void => {
    limited(work).then(
      (n) => {
        log?.(op, p, `${n} bytes`);
        cb(n);
      },
      (err: unknown) => {
        const errno = errnoFor(err);
        log?.(op, p, `errno ${errno}`);
        cb(-errno);
      },
    );
  };

  let initError: unknown;
  let initDone!: () => void;
  const initialized = new Promise<void>((r) => { initDone = r; });
  const conn: ConnectionInfo = {
    protoMajor: LIBFUSE2_PROTO_MAJOR,
    protoMinor: LIBFUSE2_PROTO_MINOR,
    maxWrite: requestBytes,
    maxRead: requestBytes,
    supportsLseek: false,
    supportsFallocate: false,
    directIoAllowMmap: false,
  };

  const ops: Record<string, unknown> = {
    init: (cb: Callback) => {
      Promise.resolve()
        .then(() => filesystem.init?.(conn))
        .catch((err: unknown) => { initError = err; })
        .finally(() => {
          // libfuse 2 cannot refuse INIT from here: answer it, and unmount below.
          cb(0);
          initDone();
        });
    },
    getattr: (p: string, cb: Callback) => serve('getattr', p, cb, async () => [toNativeStat((await filesystem.getattr(ctx, await resolve(p))).attr)]),
    statfs: (p: string, cb: Callback) => serve('statfs', p, cb, async () => [fitStatfs(await filesystem.statfs(ctx, await resolve(p)))]),
    readdir: (p: string, cb: Callback) => serve('readdir', p, cb, async () => {
      // fuse-native gives readdir no handle: open, read and release the directory at once.
      const node = await resolve(p);
      const fh = (await filesystem.opendir?.(ctx, node, 0))?.fh ?? 0;
      try {
        const entries = await filesystem.readdir(ctx, node, fh);
        const names = entries.map((e) => e.name);
        const stats = entries.map((e) => ({ mode: e.type, ino: e.ino }));
        return [names, stats];
      } finally {
        await filesystem.releasedir?.(ctx, node, fh);
      }
    }),
    open: (p: string, flags: number, cb: Callback) => serve('open', p, cb, async () => {
      const { fh } = await filesystem.open(ctx, await resolve(p), flags);
      // fuse-native carries handles as int32 and takes 0 for "none".
      if (!Number.isInteger(fh) || fh < 0 || fh > 0x7fffffff) throw new FuseErrno(E.EOVERFLOW, `file handle ${fh} does not fit libfuse`);
      return [fh];
    }),
    release: (p: string, fh: FileHandle, cb: Callback) => serve('release', p, cb, async () => {
      await filesystem.release(ctx, await resolve(p), fh, 0);
      return [];
    }),
    read: (p: string, fh: FileHandle, buf: Buffer, len: number, pos: number, cb: (n: number) => void) =>
      serveCount('read', p, cb, async () => {
        const data = await filesystem.read(ctx, await resolve(p), fh, pos, len);
        // `buf` is libfuse's own memory, valid until cb: copy into it.
        return data.copy(buf, 0, 0, Math.min(len, data.length));
      }),
    write: (p: string, fh: FileHandle, buf: Buffer, len: number, pos: number, cb: (n: number) => void) =>
      serveCount('write', p, cb, async () => filesystem.write(ctx, await resolve(p), fh, pos, buf.subarray(0, len), 0)),
    truncate: (p: string, size: number, cb: Callback) => serve('truncate', p, cb, async () => {
      await filesystem.setattr(ctx, await resolve(p), { size });
      return [];
    }),
    ftruncate: (p: string, fh: FileHandle, size: number, cb: Callback) => serve('ftruncate', p, cb, async () => {
      await filesystem.setattr(ctx, await resolve(p), { size, fh });
      return [];
    }),
    utimens: (p: string, atime: number, _mtime: number, cb: Callback) => serve('utimens', p, cb, async () => {
      // fuse-native passes the access time in both arguments (see the limits
      // above); libfuse 2 has already turned "now" into the kernel's time.
      await filesystem.setattr(ctx, await resolve(p), { atimeMs: atime, mtimeMs: atime });
      return [];
    }),
    chmod: (p: string, mode: number, cb: Callback) => serve('chmod', p, cb, async () => {
      await filesystem.setattr(ctx, await resolve(p), { mode });
      return [];
    }),
    chown: (p: string, uid: number, gid: number, cb: Callback) => serve('chown', p, cb, async () => {
      // chown(2) with -1 leaves that id alone; it arrives as 2^32 - 1.
      const changes: { uid?: number; gid?: number } = {};
      if (uid !== 0xffffffff && uid !== -1) changes.uid = uid;
      if (gid !== 0xffffffff && gid !== -1) changes.gid = gid;
      await filesystem.setattr(ctx, await resolve(p), changes);
      return [];
    }),
  };
  // Ops the filesystem lacks stay unregistered: libfuse answers ENOSYS and
  // the kernel stops asking (for access, flush and fsync that means success).
  if (filesystem.access) {
    const access = filesystem.access.bind(filesystem);
    ops.access = (p: string, mask: number, cb: Callback) => serve('access', p, cb, async () => {
      await access(ctx, await resolve(p), mask);
      return [];
    });
  }
  if (filesystem.flush) {
    const flush = filesystem.flush.bind(filesystem);
    ops.flush = (p: string, fh: FileHandle, cb: Callback) => serve('flush', p, cb, async () => {
      await flush(ctx, await resolve(p), fh);
      return [];
    });
  }
  if (filesystem.fsync) {
    const fsync = filesystem.fsync.bind(filesystem);
    ops.fsync = (p: string, datasync: number, fh: FileHandle, cb: Callback) => serve('fsync', p, cb, async () => {
      await fsync(ctx, await resolve(p), fh, datasync !== 0);
      return [];
    });
  }

  const options = libfuseOptions(opts);
  const { Fuse, binding } = native;
  class QcowfsFuse extends Fuse {
    // The whole option list is ours: fuse-native knows neither ro nor big_writes/max_write.
    override _fuseOptions(): string {
      return `-o${options.join(',')}`;
    }

    // Unmounting is LibfuseMount's (fuse-native would always detach lazily):
    // by the time this runs the mount is gone, and only the native side is left.
    override _close(cb: (err: Error | null) => void): void {
      try {
        if (this._thread) binding.fuse_native_unmount(this.mnt, this._thread);
        cb(null);
      } catch (err) {
        cb(err as Error);
      }
    }
  }
  // timeout: false: a slow flush is still a flush, never answer ETIMEDOUT for it.
  const fuse = new QcowfsFuse(mountpoint, ops as NativeOps, { timeout: false });

  const mountedBefore = findMount(mountpoint);
  await new Promise<void>((resolveMount, reject) => {
    fuse.mount((err) => {
      if (!err) return resolveMount();
      const msg = err.message || String(err);
      // libfuse may have mounted and then refused an option: leave nothing behind.
      if (findMount(mountpoint)?.dev !== mountedBefore?.dev) void fusermountUnmount(fusermount, mountpoint, true).catch(() => undefined);
      if (/in use/i.test(msg)) return reject(codeError('EBUSY', `mountpoint ${mountpoint} is already a mountpoint`));
      reject(codeError('EMOUNT', `mounting ${mountpoint} with libfuse failed (${msg}); fusermount's reason, if any, is on stderr`));
    });
  });

  const found = findMount(mountpoint);
  const mount = new LibfuseMount(mountpoint, filesystem, fuse, fusermount, found ? connectionOf(found.dev) : null);
  const timeoutMs = opts.initTimeoutMs ?? 30_000;
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      (async () => {
        await initialized;
        if (initError !== undefined) throw initError;
        // The first request of another thread: answered only once INIT has been.
        await fs.promises.stat(mountpoint);
      })(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(codeError('ETIMEDOUT', `the mount at ${mountpoint} did not answer within ${timeoutMs} ms`)), timeoutMs);
      }),
    ]);
  } catch (err) {
    // Mounted but unusable: detach it so nothing hangs on it.
    await fusermountUnmount(fusermount, mountpoint, true).catch(() => undefined);
    await mount.end().catch(() => undefined);
    throw err;
  } finally {
    if (timer) clearTimeout(timer);
  }
  mount.startWatching();
  return mount;
}

function checkMountpoint(mountpoint: string): void {
  const st = statMountpoint(mountpoint, 'fusermount -u');
  if (!st.isDirectory()) throw codeError('ENOTDIR', `mountpoint ${mountpoint} is not a directory`);
}

/** What fusermount would refuse an unprivileged user, said before it is asked. */
function checkUnprivileged(opts: MountOptions): void {
  if (process.getuid?.() === 0) return;
  try {
    // fusermount opens /dev/fuse with the caller's file system uid.
    fs.accessSync('/dev/fuse', fs.constants.R_OK | fs.constants.W_OK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw codeError('ENOENT', '/dev/fuse is not available: load the fuse module (modprobe fuse) or give the container the device');
    throw codeError('EACCES', '/dev/fuse is not readable and writable for this user (stock systems have it mode 0666)');
  }
  if (opts.allowOther) {
    let conf = '';
    try {
      conf = fs.readFileSync('/etc/fuse.conf', 'utf8');
    } catch {
      // no configuration: nothing is allowed
    }
    if (!/^\s*user_allow_other\s*$/m.test(conf)) {
      throw codeError('EPERM', 'allow_other needs user_allow_other in /etc/fuse.conf when an unprivileged user mounts');
    }
  }
}
