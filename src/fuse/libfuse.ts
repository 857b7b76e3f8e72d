/**
 * The libfuse 2 transport, through the fuse-native package: for users who
 * may not mount with the kernel protocol (no CAP_SYS_ADMIN), since libfuse
 * mounts through the setuid `fusermount`.
 *
 * Limits of this transport (libfuse 2's high-level, path-based API as
 * fuse-native exposes it):
 * - no LSEEK: SEEK_DATA/SEEK_HOLE are answered by the kernel as for a file
 *   without holes, so `cp --sparse` reads everything (it still writes holes
 *   where it finds zeroes);
 * - no FALLOCATE: hole punching and zero ranges fail with EOPNOTSUPP;
 * - requests are at most 128 KiB and handled one path lookup at a time;
 * - mounting over a regular file works only where fusermount allows it
 *   (the user must own the file).
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';

import {
  FuseFilesystem, FuseMount, MountOptions, NodeId, FUSE_ROOT_ID, RequestContext, Attr,
} from './filesystem';



interface FuseNativeStat {
  mtime: Date; atime: Date; ctime: Date; size: number; mode: number; uid: number; gid: number; nlink?: number; blocks?: number; blksize?: number; ino?: number; dev?: number; rdev?: number;
}

type Cb = (code: number, ...rest: unknown[]) => void;

interface FuseNative {
  mount(cb: (err: Error | null) => void): void;
  unmount(cb: (err: Error | null) => void): void;
}

interface FuseNativeCtor {
  new (mnt: string, ops: Record<string, (...args: never[]) => void>, opts: Record<string, unknown>): FuseNative;
  unmount(mnt: string, cb: (err: Error | null) => void): void;
}

function loadFuseNative(): FuseNativeCtor | null {
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return require('fuse-native') as FuseNativeCtor;
  } catch {
    return null;
  }
}

/** fuse-native loads and a fusermount binary is on the PATH. */
export function libfuseAvailable(): boolean {
  if (!loadFuseNative()) return false;
  try {
    execFileSync('sh', ['-c', 'command -v fusermount || command -v fusermount3'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function toStat(a: Attr): FuseNativeStat {
  return {
    mtime: new Date(a.mtimeMs), atime: new Date(a.atimeMs), ctime: new Date(a.ctimeMs),
    size: a.size, mode: a.mode, uid: a.uid, gid: a.gid, nlink: a.nlink, blocks: a.blocks, blksize: a.blksize, ino: a.ino, rdev: a.rdev,
  };
}

function isMounted(mountpoint: string): boolean {
  try {
    return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => l.split(' ')[4] === mountpoint);
  } catch {
    return false;
  }
}

class LibfuseMount implements FuseMount {
  readonly transport = 'libfuse' as const;
  readonly done: Promise<void>;
  private resolveDone!: () => void;
  private watch: NodeJS.Timeout | null = null;
  private finished = false;

  constructor(readonly mountpoint: string, private readonly fuse: FuseNative, private readonly filesystem: FuseFilesystem) {
    this.done = new Promise((r) => { this.resolveDone = r; });
  }

  /** Notice an unmount from outside (fusermount -u): libfuse 2 does not tell us. */
  startWatching(): void {
    this.watch = setInterval(() => {
      if (!isMounted(this.mountpoint)) void this.finish();
    }, 500);
  }

  private async finish(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    if (this.watch) clearInterval(this.watch);
    try {
      await this.filesystem.destroy?.();
    } finally {
      this.resolveDone();
    }
  }

  async unmount(): Promise<void> {
    if (!this.finished) {
      await new Promise<void>((resolve, reject) => this.fuse.unmount((err) => (err && isMounted(this.mountpoint) ? reject(err) : resolve())));
      await this.finish();
    }
    await this.done;
  }
}

/** Mount `filesystem` with libfuse 2; resolves once the mount is usable. */
export async function mountLibfuse(filesystem: FuseFilesystem, opts: MountOptions): Promise<FuseMount> {
  const Fuse = loadFuseNative();
  if (!Fuse) throw Object.assign(new Error('the libfuse transport needs the fuse-native package, which did not load'), { code: 'ENOSYS' });
  const mountpoint = path.resolve(opts.mountpoint);
  const ctx: RequestContext = { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, pid: 0 };
  const cache = new Map<string, NodeId>([['/', FUSE_ROOT_ID]]);
  const fail = (cb: Cb, err: unknown, ...defaults: unknown[]) => cb(-opts.errnoOf(err), ...defaults);
  const log = (op: string, p: string, r: string) => { if (opts.debug) process.stderr.write(`libfuse ${op} ${p} -> ${r}\n`); };

  /** Resolve a path to a node id, component by component. */
  const resolve = async (p: string): Promise<NodeId> => {
    if (opts.rootIsFile) return FUSE_ROOT_ID;
    const known = cache.get(p);
    if (known !== undefined) return known;
    let node: NodeId = FUSE_ROOT_ID;
    for (const part of p.split('/').filter(Boolean)) node = (await filesystem.lookup(ctx, node, part)).nodeid;
    cache.set(p, node);
    return node;
  };

  const run = (op: string, p: string, cb: Cb, fn: () => Promise<unknown[]>, ...defaults: unknown[]) => {
    fn().then(
      (res) => { log(op, p, 'ok'); cb(0, ...res); },
      (err) => { log(op, p, `error ${opts.errnoOf(err)}`); fail(cb, err, ...defaults); },
    );
  };

  const ops = {
    init: (cb: Cb) => {
      Promise.resolve(filesystem.init?.({ protoMajor: 7, protoMinor: 26, maxWrite: 131072, maxRead: 131072, supportsLseek: false, supportsFallocate: false }))
        .then(() => cb(0), (err) => fail(cb, err));
    },
    getattr: (p: string, cb: Cb) => run('getattr', p, cb, async () => [toStat((await filesystem.getattr(ctx, await resolve(p))).attr)]),
    fgetattr: (p: string, fh: number, cb: Cb) => run('fgetattr', p, cb, async () => [toStat((await filesystem.getattr(ctx, await resolve(p), fh)).attr)]),
    access: (p: string, mode: number, cb: Cb) => run('access', p, cb, async () => { await filesystem.access?.(ctx, await resolve(p), mode); return []; }),
    statfs: (p: string, cb: Cb) => run('statfs', p, cb, async () => {
      const s = await filesystem.statfs(ctx, await resolve(p));
      return [{ bsize: s.bsize, frsize: s.frsize, blocks: s.blocks, bfree: s.bfree, bavail: s.bavail, files: s.files, ffree: s.ffree, favail: s.ffree, fsid: 0, flag: 0, namemax: s.namelen }];
    }),
    readdir: (p: string, cb: Cb) => run('readdir', p, cb, async () => {
      const node = await resolve(p);
      const fh = (await filesystem.opendir?.(ctx, node, 0))?.fh ?? 0;
      const entries = (await filesystem.readdir(ctx, node, fh)).filter((e) => e.name !== '.' && e.name !== '..');
      await filesystem.releasedir?.(ctx, node, fh);
      return [entries.map((e) => e.name)];
    }, [], []),
    open: (p: string, flags: number, cb: Cb) => run('open', p, cb, async () => [(await filesystem.open(ctx, await resolve(p), flags)).fh], 0),
    release: (p: string, fh: number, cb: Cb) => run('release', p, cb, async () => { await filesystem.release(ctx, await resolve(p), fh, 0); return []; }),
    read: (p: string, fh: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) => {
      resolve(p)
        .then((node) => filesystem.read(ctx, node, fh, pos, len))
        .then((data) => { data.copy(buf, 0, 0, Math.min(len, data.length)); cb(Math.min(len, data.length)); }, (err) => cb(-opts.errnoOf(err)));
    },
    write: (p: string, fh: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) => {
      resolve(p)
        .then((node) => filesystem.write(ctx, node, fh, pos, buf.subarray(0, len), 0))
        .then((n) => cb(n), (err) => cb(-opts.errnoOf(err)));
    },
    truncate: (p: string, size: number, cb: Cb) => run('truncate', p, cb, async () => { await filesystem.setattr(ctx, await resolve(p), { size }); return []; }),
    ftruncate: (p: string, fh: number, size: number, cb: Cb) => run('ftruncate', p, cb, async () => { await filesystem.setattr(ctx, await resolve(p), { size, fh }); return []; }),
    flush: (p: string, fh: number, cb: Cb) => run('flush', p, cb, async () => { await filesystem.flush?.(ctx, await resolve(p), fh); return []; }),
    fsync: (p: string, datasync: boolean, fh: number, cb: Cb) => run('fsync', p, cb, async () => { await filesystem.fsync?.(ctx, await resolve(p), fh, !!datasync); return []; }),
    utimens: (p: string, atime: Date | number, mtime: Date | number, cb: Cb) => run('utimens', p, cb, async () => {
      const ms = (t: Date | number) => (t instanceof Date ? t.getTime() : Number(t));
      await filesystem.setattr(ctx, await resolve(p), { atimeMs: ms(atime), mtimeMs: ms(mtime) });
      return [];
    }),
    chmod: (p: string, mode: number, cb: Cb) => run('chmod', p, cb, async () => { await filesystem.setattr(ctx, await resolve(p), { mode }); return []; }),
    chown: (p: string, uid: number, gid: number, cb: Cb) => run('chown', p, cb, async () => { await filesystem.setattr(ctx, await resolve(p), { uid, gid }); return []; }),
  };

  const fuse = new Fuse(mountpoint, ops as unknown as Record<string, (...args: never[]) => void>, {
    allowOther: opts.allowOther,
    fsname: opts.fsname,
    subtype: opts.subtype,
    maxRead: Math.min(opts.maxRequestBytes, 131072),
    debug: false,
    timeout: false,
  });
  await new Promise<void>((resolve, reject) => {
    fuse.mount((err) => {
      if (!err) return resolve();
      const msg = err.message || String(err);
      reject(Object.assign(new Error(`mounting ${mountpoint} with libfuse failed: ${msg}`), { code: /busy/i.test(msg) ? 'EBUSY' : /permission|not permitted/i.test(msg) ? 'EPERM' : 'EMOUNT' }));
    });
  });
  const m = new LibfuseMount(mountpoint, fuse, filesystem);
  m.startWatching();
  return m;
}


