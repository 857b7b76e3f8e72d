/**
 * Real mounts for transport tests: each mount lives under its own mkdtemp
 * directory and is always taken down — by unmount(), then umount -l as the
 * last resort — and the directory removed, even when a test fails.
 *
 * Everything that touches the mountpoint runs in a child process: this
 * process serves the filesystem, so a synchronous call here would deadlock.
 */
import { execFile, execFileSync, spawn } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { constants } from 'os';
import { FuseErrno, type FuseFilesystem } from '../../../src/fuse/filesystem';
import { ensureThreadpool } from '../../../src/fuse/session';
import { mountKernel, type KernelMount, type KernelMountOptions } from '../../../src/fuse/mount';

// Only effective if nothing used the threadpool yet; the session copes
// either way because tests also pass a small `readers`.
ensureThreadpool(16);

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a shell command in a child process (never blocks this process). */
export function sh(command: string, timeoutMs = 30_000): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile('sh', ['-c', command], { timeout: timeoutMs, maxBuffer: 64 << 20, env: { ...process.env, LC_ALL: 'C' } }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Like sh() but fails on a non-zero exit status. */
export async function shOk(command: string, timeoutMs?: number): Promise<string> {
  const r = await sh(command, timeoutMs);
  if (r.code !== 0) throw new Error(`\`${command}\` exited ${r.code}: ${r.stderr.trim()}`);
  return r.stdout;
}

export function isMounted(mountpoint: string): boolean {
  const mounts = fs.readFileSync('/proc/self/mounts', 'utf8');
  return mounts.split('\n').some((l) => l.split(' ')[1] === mountpoint);
}

export function mountLine(mountpoint: string): string | undefined {
  return fs.readFileSync('/proc/self/mounts', 'utf8').split('\n').find((l) => l.split(' ')[1] === mountpoint);
}

export const defaultErrnoOf = (err: unknown): number => (err instanceof FuseErrno ? err.errno : constants.errno.EIO);

export interface TestMount {
  base: string;
  mountpoint: string;
  mount: KernelMount;
}

/** Mount `filesystem` under a fresh temporary directory. */
export async function mountForTest(filesystem: FuseFilesystem, extra: Partial<KernelMountOptions> = {}): Promise<TestMount> {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-fuse-'));
  const rootIsFile = extra.rootIsFile ?? false;
  const mountpoint = path.join(base, rootIsFile ? 'disk.img' : 'mnt');
  if (rootIsFile) fs.writeFileSync(mountpoint, '');
  else fs.mkdirSync(mountpoint);
  try {
    const mount = await mountKernel(filesystem, {
      mountpoint,
      rootIsFile,
      readOnly: false,
      allowOther: false,
      fsname: 'qcowfs-test',
      subtype: 'qcowfs',
      debug: process.env.QCOWFS_FUSE_DEBUG === '1',
      maxRequestBytes: 1 << 20,
      maxInFlight: 64,
      errnoOf: defaultErrnoOf,
      readers: 2,
      ...extra,
    });
    return { base, mountpoint, mount };
  } catch (e) {
    fs.rmSync(base, { recursive: true, force: true });
    throw e;
  }
}

/** Take a test mount down whatever state it is in, then remove its directory. */
export async function cleanupMount(t: TestMount | undefined): Promise<void> {
  if (t === undefined) return;
  try {
    if (isMounted(t.mountpoint)) {
      await Promise.race([t.mount.unmount({ force: true }), delay(10_000)]);
    }
  } catch {
    // fall through to the last resort
  }
  if (isMounted(t.mountpoint)) {
    try {
      execFileSync('umount', ['-l', t.mountpoint], { stdio: 'ignore' });
    } catch {
      // nothing more to try
    }
  }
  await Promise.race([t.mount.done.catch(() => undefined), delay(5_000)]);
  fs.rmSync(t.base, { recursive: true, force: true });
}

export function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Start a long-running child process whose working directory is `dir` (to
 * hold a mountpoint busy). The child changes directory itself: spawn()'s
 * `cwd` would chdir between fork and exec while this process waits for the
 * exec, and the chdir needs this very process to answer FUSE_ACCESS.
 */
export function holdBusy(dir: string): { kill(): void; exited: Promise<void> } {
  const child = spawn('sh', ['-c', 'cd "$1" && exec sleep 600', 'sh', dir], { stdio: 'ignore' });
  const exited = new Promise<void>((r) => child.on('exit', () => r()));
  return { kill: () => child.kill('SIGKILL'), exited };
}
