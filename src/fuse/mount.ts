/**
 * Mounting with the kernel transport: open /dev/fuse, have mount(8) bind it
 * to the mountpoint (the descriptor is handed to the child as its fd 3 and
 * named by the `fd=3` option, the way fusermount does it), then run a
 * FuseSession on it. Needs root (CAP_SYS_ADMIN); there is no fusermount
 * fallback.
 *
 * Errors a user can meet are thrown as Errors with a one-line message and a
 * `code` (ENOENT, ENOTDIR, EISDIR, EPERM, EACCES, EBUSY, EINVAL, ETIMEDOUT,
 * EMOUNT for any other mount(8) failure).
 */
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { clampMaxWrite, codeError, FuseSession, readRequestMax, type KernelSessionOptions } from './session';
import type { ConnectionInfo, FuseFilesystem, FuseMount } from './filesystem';

/** Options of mountKernel(): the shared MountOptions plus kernel-only knobs. */
export interface KernelMountOptions extends KernelSessionOptions {
  /** Let the kernel check permissions from the attributes (mount option default_permissions). */
  defaultPermissions?: boolean;
  /** How long to wait for the kernel's INIT after mount(8) succeeded (default 30 s). */
  initTimeoutMs?: number;
}

export interface UnmountOptions {
  /** When the mountpoint is busy, detach it lazily (umount -l) instead of failing. */
  force?: boolean;
}

/** A mount served by this process over /dev/fuse. */
export class KernelMount implements FuseMount {
  readonly transport = 'kernel' as const;
  private unmounting: Promise<void> | undefined;

  constructor(
    readonly mountpoint: string,
    readonly session: FuseSession,
  ) {}

  get done(): Promise<void> {
    return this.session.done;
  }

  /** What INIT negotiated. */
  get connection(): ConnectionInfo | undefined {
    return this.session.connection;
  }

  /**
   * Unmount and wait for the session to end (the filesystem's destroy() has
   * run when this resolves). A busy mountpoint fails with code EBUSY unless
   * `force` is set, which detaches it lazily.
   */
  unmount(opts: UnmountOptions = {}): Promise<void> {
    this.unmounting ??= this.doUnmount(opts).finally(() => { this.unmounting = undefined; });
    return this.unmounting;
  }

  private async doUnmount(opts: UnmountOptions): Promise<void> {
    if (!this.session.ended) {
      try {
        await unmountPath(this.mountpoint, { lazy: false });
      } catch (e) {
        const code = (e as { code?: string }).code;
        if (code === 'EINVAL' && this.session.ended) {
          // raced with an unmount from elsewhere
        } else if (code === 'EBUSY' && opts.force) {
          await unmountPath(this.mountpoint, { lazy: true });
        } else {
          throw e;
        }
      }
    }
    await this.session.done;
  }
}

/**
 * Mount `filesystem` at opts.mountpoint and serve it from this process.
 * Resolves once the kernel's INIT has been answered, i.e. the mount is usable.
 */
export async function mountKernel(filesystem: FuseFilesystem, opts: KernelMountOptions): Promise<KernelMount> {
  const mountpoint = path.resolve(opts.mountpoint);
  checkMountpoint(mountpoint, opts.rootIsFile);
  if (!hasMountPrivilege()) {
    throw codeError('EPERM', 'mounting with the kernel transport needs root (CAP_SYS_ADMIN)');
  }
  opts = { ...opts, maxReadBytes: opts.maxReadBytes ?? readRequestMax(filesystem, opts) };
  const fd = openFuseDevice();
  let session: FuseSession | undefined;
  try {
    await runMount(fd, mountpoint, opts);
    session = new FuseSession(fd, filesystem, opts);
    session.start();
  } catch (e) {
    if (session === undefined) fs.closeSync(fd);
    throw e;
  }
  const timeoutMs = opts.initTimeoutMs ?? 30_000;
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      session.initialized,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(codeError('ETIMEDOUT', `the kernel did not initialise the mount at ${mountpoint} within ${timeoutMs} ms`)), timeoutMs);
      }),
    ]);
  } catch (e) {
    // The mount exists but is unusable: detach it so nothing hangs on it.
    await unmountPath(mountpoint, { lazy: true }).catch(() => undefined);
    await Promise.race([session.done.catch(() => undefined), delay(5000)]);
    throw e;
  } finally {
    if (timer) clearTimeout(timer);
  }
  return new KernelMount(mountpoint, session);
}

/**
 * Unmount whatever is mounted at `target` (for `qcowfs unmount`). `lazy`
 * detaches it even when busy (umount -l). Fails with code EBUSY when busy,
 * EINVAL when nothing is mounted there, ENOENT when the path does not exist.
 */
export async function unmountPath(target: string, opts: { lazy?: boolean } = {}): Promise<void> {
  const abs = path.resolve(target);
  const args = opts.lazy ? ['-l', abs] : [abs];
  const { code, stderr } = await run('umount', args);
  if (code === 0) return;
  const msg = oneLine(stderr) || `umount exited with status ${code}`;
  if (/busy/i.test(msg)) {
    throw codeError('EBUSY', `${abs} is busy (a process uses it); close it or unmount lazily`);
  }
  if (/not mounted|not found in mtab|no mount point/i.test(msg)) throw codeError('EINVAL', `${abs} is not mounted`);
  if (/no such file/i.test(msg)) throw codeError('ENOENT', `${abs} does not exist`);
  if (/permission|must be superuser|not permitted/i.test(msg)) throw codeError('EPERM', `not allowed to unmount ${abs}: ${msg}`);
  throw codeError('EUMOUNT', `unmounting ${abs} failed: ${msg}`);
}

/**
 * True when this process can mount with the kernel transport: it is root or
 * holds CAP_SYS_ADMIN, and /dev/fuse can be opened for reading and writing.
 */
export function canMountKernel(): boolean {
  if (!hasMountPrivilege()) return false;
  try {
    fs.closeSync(fs.openSync('/dev/fuse', 'r+'));
    return true;
  } catch {
    return false;
  }
}

// --- helpers -----------------------------------------------------------------

const CAP_SYS_ADMIN = 21;

function hasMountPrivilege(): boolean {
  if (process.getuid?.() === 0) return true;
  try {
    const status = fs.readFileSync('/proc/self/status', 'utf8');
    const m = /^CapEff:\s*([0-9a-f]+)$/im.exec(status);
    return m !== null && ((BigInt(`0x${m[1]}`) >> BigInt(CAP_SYS_ADMIN)) & 1n) === 1n;
  } catch {
    return false;
  }
}

/**
 * stat() a mountpoint for either transport, with the errors users meet: it
 * is missing, or a dead FUSE mount (`unmountWith` says how to clear it).
 */
export function statMountpoint(mountpoint: string, unmountWith: string): fs.Stats {
  try {
    return fs.statSync(mountpoint);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? 'ENOENT';
    if (code === 'ENOENT') throw codeError('ENOENT', `mountpoint ${mountpoint} does not exist`);
    if (code === 'ENOTCONN') throw codeError('EBUSY', `mountpoint ${mountpoint} is a dead FUSE mount; unmount it first (${unmountWith})`);
    throw codeError(code, `mountpoint ${mountpoint}: ${(e as Error).message}`);
  }
}

function checkMountpoint(mountpoint: string, rootIsFile: boolean): void {
  const st = statMountpoint(mountpoint, 'qcowfs unmount');
  if (rootIsFile && !st.isFile()) {
    throw codeError(st.isDirectory() ? 'EISDIR' : 'EINVAL', `mountpoint ${mountpoint} must be a regular file to mount a file over it`);
  }
  if (!rootIsFile && !st.isDirectory()) {
    throw codeError('ENOTDIR', `mountpoint ${mountpoint} is not a directory`);
  }
}

function openFuseDevice(): number {
  try {
    return fs.openSync('/dev/fuse', 'r+');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? 'EIO';
    if (code === 'ENOENT' || code === 'ENODEV' || code === 'ENXIO') {
      throw codeError('ENOENT', '/dev/fuse is not available: load the fuse module (modprobe fuse) or give the container the device');
    }
    if (code === 'EACCES' || code === 'EPERM') throw codeError(code, 'permission denied opening /dev/fuse');
    throw codeError(code, `cannot open /dev/fuse: ${(e as Error).message}`);
  }
}

/** The option string given to mount(8) (and from it to the kernel's fuse). */
export function kernelMountOptions(opts: KernelMountOptions, uid: number, gid: number): string {
  const list = [
    'fd=3',
    `rootmode=${opts.rootIsFile ? '100000' : '40000'}`,
    `user_id=${uid}`,
    `group_id=${gid}`,
    `max_read=${opts.maxReadBytes ?? clampMaxWrite(opts.maxRequestBytes)}`,
  ];
  if (opts.allowOther) list.push('allow_other');
  if (opts.defaultPermissions) list.push('default_permissions');
  if (opts.readOnly) list.push('ro');
  return list.join(',');
}

async function runMount(fd: number, mountpoint: string, opts: KernelMountOptions): Promise<void> {
  const subtype = opts.subtype.replace(/[^A-Za-z0-9_+-]/g, '_') || 'qcowfs';
  const fsname = opts.fsname || subtype;
  const options = kernelMountOptions(opts, process.getuid?.() ?? 0, process.getgid?.() ?? 0);
  // -i: no /sbin/mount.fuse helper; the descriptor is already ours.
  const { code, stderr } = await run('mount', ['-i', '-t', `fuse.${subtype}`, '-o', options, fsname, mountpoint], fd);
  if (code === 0) return;
  const msg = oneLine(stderr) || `mount exited with status ${code}`;
  if (/busy/i.test(msg)) throw codeError('EBUSY', `mountpoint ${mountpoint} is busy: ${msg}`);
  if (/permission denied|must be superuser|not permitted/i.test(msg)) throw codeError('EPERM', `not allowed to mount on ${mountpoint}: ${msg}`);
  if (/does not exist|no such file/i.test(msg)) throw codeError('ENOENT', `mounting on ${mountpoint} failed: ${msg}`);
  throw codeError('EMOUNT', `mounting on ${mountpoint} failed: ${msg}`);
}

/** Run a command; `fd3` is passed to the child as its descriptor 3. */
function run(cmd: string, args: string[], fd3?: number): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve, reject) => {
    const stdio: Array<'ignore' | 'pipe' | number> = ['ignore', 'ignore', 'pipe'];
    if (fd3 !== undefined) stdio.push(fd3);
    const child = spawn(cmd, args, { stdio, env: { ...process.env, LC_ALL: 'C' } });
    let stderr = '';
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (s: string) => { stderr += s; });
    child.on('error', (e: NodeJS.ErrnoException) => {
      reject(codeError(e.code === 'ENOENT' ? 'ENOENT' : e.code ?? 'EIO', `cannot run ${cmd}: ${e.message}`));
    });
    child.on('close', (code, signal) => resolve({ code: code ?? (signal ? 128 : 1), stderr }));
  });
}

function oneLine(s: string): string {
  return s.trim().split('\n').map((l) => l.trim()).filter(Boolean).join('; ');
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref());
}

