/**
 * Real mounts for integration tests: through the CLI (`bin/qcowfs mount`,
 * detached or `--foreground` in a child process), inside a scratch directory
 * whose mounts, loop devices and daemons are always taken down again, even
 * when a test fails half-way.
 */
import { ChildProcess, spawn, spawnSync } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { expect } from 'chai';
import { qemuCheck, qemuMap, run } from './qemu';
import { readRecord, removeRecord, logPath } from '../../src/cli/state';

/** The CLI entry, from dist/test/helpers. */
export const QCOWFS_BIN = path.resolve(__dirname, '../../../bin/qcowfs');

/** The test sources (fsx.py lives there, not in dist). */
export const TEST_SOURCE_DIR = path.resolve(__dirname, '../../../test');

export interface RunResult {
  stdout: string;
  stderr: string;
  status: number;
}

/** `qcowfs ARGS...`, never throwing: the caller looks at status and stderr. */
export function qcowfs(...args: string[]): RunResult {
  return run(process.execPath, [QCOWFS_BIN, ...args], { allowFail: true });
}

/** /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeMountPath(p: string): string {
  return p.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Mount points currently on `p` (a stacked mount counts once per layer). */
export function mountCount(p: string): number {
  const abs = path.resolve(p);
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')
    .filter((l) => l && unescapeMountPath(l.split(' ')[4]) === abs).length;
}

export function isMounted(p: string): boolean {
  return mountCount(p) > 0;
}

/**
 * Abort the FUSE connection of the mount on `mountpoint` (fusectl), so that a hung mount's
 * requests fail and the processes waiting on them go on. Its number comes from
 * /proc/self/mountinfo: nothing here waits for the mount itself. False when nothing is
 * mounted there.
 */
export function abortFuseConnection(mountpoint: string): boolean {
  const abs = path.resolve(mountpoint);
  const line = fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')
    .find((l) => l && unescapeMountPath(l.split(' ')[4]) === abs);
  if (line === undefined) return false;
  const minor = line.split(' ')[2].split(':')[1];
  if (!fs.existsSync('/sys/fs/fuse/connections/')) spawnSync('mount', ['-t', 'fusectl', 'none', '/sys/fs/fuse/connections']);
  fs.writeFileSync(`/sys/fs/fuse/connections/${minor}/abort`, '1');
  return true;
}

/** The pid of the daemon serving `mountpoint`, from its state record. */
export function daemonPid(mountpoint: string): number {
  const rec = readRecord(path.resolve(mountpoint));
  if (!rec) throw new Error(`no qcowfs record for ${mountpoint}`);
  return rec.pid;
}

/** Gone, or exited and waiting to be reaped: either way it no longer serves anything. */
export function processGone(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] === 'Z';
  } catch {
    return true;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Run fn while strace watches process `pid` for posix_fadvise(POSIX_FADV_DONTNEED):
 * the ranges it dropped from the host page cache meanwhile, as "fd offset+length".
 * What the process asks for, not what the kernel's cache shows afterwards: the
 * kernel may reclaim clean pages on its own at any time.
 */
export async function cacheDropsWhile(pid: number, fn: () => void): Promise<string[]> {
  const out = path.join(os.tmpdir(), `qcowfs-strace-${pid}-${process.hrtime.bigint()}`);
  const child = spawn('strace', ['-f', '-e', 'trace=fadvise64', '-o', out, '-p', String(pid)], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  try {
    await new Promise<void>((resolve, reject) => {
      child.stderr!.on('data', (d: Buffer) => {
        err += d.toString();
        if (/ attached/.test(err)) resolve();
      });
      void exited.then((code) => reject(new Error(`strace -p ${pid} exited (${code}) before attaching: ${err.trim()}`)));
    });
    fn();
  } finally {
    child.kill('SIGINT');
    await exited;
  }
  try {
    return fs.readFileSync(out, 'utf8').split('\n')
      .map((l) => /fadvise64\((\d+), (\d+), (\d+), POSIX_FADV_DONTNEED\)/.exec(l))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => `fd ${m[1]} ${m[2]}+${m[3]}`);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

export async function waitFor(what: string, cond: () => boolean, timeoutMs = 20000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

export interface ForegroundMount {
  child: ChildProcess;
  pid: number;
  /** Resolves with the exit status once the daemon exits. */
  exited: Promise<number | null>;
  /** What the daemon wrote to stderr so far. */
  stderr(): string;
}

/**
 * A scratch directory for one test file. Everything it mounted or attached
 * is undone by `cleanup()` (call it from after/afterEach), newest first.
 */
export class Sandbox {
  readonly dir: string;
  private readonly mounts: string[] = [];
  private readonly loops: string[] = [];
  private readonly children: ForegroundMount[] = [];
  private readonly pids = new Set<number>();

  constructor(prefix = 'qcowfs-mount-') {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  }

  path(...parts: string[]): string {
    return path.join(this.dir, ...parts);
  }

  /** A new empty directory under the sandbox. */
  mkdir(name: string): string {
    const p = this.path(name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  }

  /** Remember a mount made by other means (a loop-mounted file system). */
  track(mountpoint: string): void {
    this.mounts.push(path.resolve(mountpoint));
  }

  /** Remember a loop device to detach. */
  trackLoop(dev: string): void {
    this.loops.push(dev);
  }

  /** `qcowfs mount ARGS...` (detached); throws with the CLI's stderr when it fails. */
  mount(...args: string[]): number {
    const mountpoint = path.resolve(args[args.length - 1]);
    this.track(mountpoint);
    const r = qcowfs('mount', ...args);
    if (r.status !== 0) throw new Error(`qcowfs mount ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
    expect(isMounted(mountpoint), `${mountpoint} mounted`).to.equal(true);
    const pid = daemonPid(mountpoint);
    this.pids.add(pid);
    return pid;
  }

  /** `qcowfs mount --foreground ARGS...` in a child process; resolves once the mount serves. */
  async mountForeground(...args: string[]): Promise<ForegroundMount> {
    const mountpoint = path.resolve(args[args.length - 1]);
    this.track(mountpoint);
    const child = spawn(process.execPath, [QCOWFS_BIN, 'mount', '--foreground', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
    let status: number | null | undefined;
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => { status = code; resolve(code); }));
    const fg: ForegroundMount = { child, pid: child.pid!, exited, stderr: () => err };
    this.children.push(fg);
    this.pids.add(child.pid!);
    // The daemon records itself once the mount is usable.
    await waitFor(`the foreground daemon to mount ${mountpoint}`, () => {
      if (status !== undefined) throw new Error(`qcowfs mount --foreground exited with ${status}: ${err}`);
      return readRecord(mountpoint)?.pid === child.pid && isMounted(mountpoint);
    });
    return fg;
  }

  /** `qcowfs unmount`, expecting success. */
  unmount(mountpoint: string): void {
    const r = qcowfs('unmount', mountpoint);
    expect(r.status, `qcowfs unmount ${mountpoint}: ${r.stderr}`).to.equal(0);
    expect(isMounted(mountpoint), `${mountpoint} still mounted`).to.equal(false);
  }

  /**
   * Undo everything, whatever state the test left: inner mounts and loop
   * devices first, then each qcowfs mount by `qcowfs unmount`, falling back
   * to `umount -l`; daemons still running after that are killed; the
   * directory is removed. Never throws; returns what it had to force.
   */
  async cleanup(opts: { keepDir?: boolean } = {}): Promise<string[]> {
    const forced: string[] = [];
    const unmountAll = (qcowfsMounts: boolean) => {
      for (const mp of [...this.mounts].reverse()) {
        // A qcowfs mount has a state record (even after its daemon was killed).
        if ((readRecord(mp) !== null) !== qcowfsMounts) continue;
        for (let i = 0; i < 8 && isMounted(mp); i++) {
          if (qcowfsMounts && qcowfs('unmount', mp).status === 0) continue;
          if (!qcowfsMounts && spawnSync('umount', [mp]).status === 0) continue;
          forced.push(`umount -l ${mp}`);
          spawnSync('umount', ['-l', mp]);
        }
      }
    };
    // File systems on loop devices first, then the loop devices, then the raw views under them.
    unmountAll(false);
    for (const dev of [...this.loops].reverse()) spawnSync('losetup', ['-d', dev]);
    unmountAll(true);
    // Whatever the record said, nothing of ours stays mounted.
    for (const mp of this.mounts) {
      while (isMounted(mp)) {
        forced.push(`umount -l ${mp}`);
        if (spawnSync('umount', ['-l', mp]).status !== 0) break;
      }
    }
    this.loops.length = 0;
    for (const pid of this.pids) {
      const deadline = Date.now() + 5000;
      while (!processGone(pid) && Date.now() < deadline) await sleep(50);
      if (!processGone(pid)) {
        forced.push(`kill ${pid}`);
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // already gone
        }
        for (let i = 0; i < 40 && !processGone(pid); i++) await sleep(50);
      }
    }
    this.pids.clear();
    // Records and logs of daemons that could not remove their own.
    for (const mp of new Set(this.mounts)) {
      const rec = readRecord(mp);
      if (rec && processGone(rec.pid)) removeRecord(mp, rec.pid);
      if (!rec || processGone(rec.pid)) fs.rmSync(logPath(mp), { force: true });
    }
    this.mounts.length = 0;
    for (const c of this.children) if (c.child.exitCode === null && c.child.signalCode === null) c.child.kill('SIGKILL');
    this.children.length = 0;
    if (!opts.keepDir) fs.rmSync(this.dir, { recursive: true, force: true });
    return forced;
  }
}

/** SEEK_DATA/SEEK_HOLE walk of a file as os.lseek sees it: the data ranges [start, end). */
export function seekDataRanges(file: string): Array<[number, number]> {
  const py = `
import os, sys, json, errno
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
out = []
pos = 0
while pos < size:
    try:
        d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno != errno.ENXIO: raise
        break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    out.append([d, h])
    pos = h
print(json.dumps(out))
`;
  return JSON.parse(run('python3', ['-c', py, file]).stdout) as Array<[number, number]>;
}

/** The data extents of `qemu-img map`, adjacent ones merged. */
export function qemuDataRanges(image: string, args: string[] = []): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  const map = JSON.parse(run('qemu-img', ['map', '--output=json', ...args, image]).stdout) as Array<{ start: number; length: number; data: boolean }>;
  for (const e of map) {
    if (!e.data) continue;
    const last = out[out.length - 1];
    if (last && last[1] === e.start) last[1] += e.length;
    else out.push([e.start, e.start + e.length]);
  }
  return out;
}

/** qemu-img map extents (for callers that want zero/depth detail). */
export { qemuMap };

/** `qemu-img check`: no leaks, corruptions or check errors (or only leaks, when allowed). */
export function expectCheckClean(image: string, opts: { allowLeaks?: boolean } = {}): void {
  const c = qemuCheck(image);
  const got = { leaks: opts.allowLeaks ? 0 : c.leaks ?? 0, corruptions: c.corruptions ?? 0, errors: c['check-errors'] };
  expect(got, `qemu-img check ${image}`).to.deep.equal({ leaks: 0, corruptions: 0, errors: 0 });
}

/** `cmp A B`: byte-equal files (sizes included). */
export function expectSameBytes(a: string, b: string): void {
  const r = run('cmp', [a, b], { allowFail: true });
  expect(r.status, `cmp ${a} ${b}: ${r.stdout}${r.stderr}`).to.equal(0);
}

/** `qemu-img convert -O raw` into `out` (the oracle of what the mount must show). */
export function qemuConvertRaw(image: string, out: string, opts: { snapshot?: string } = {}): string {
  const args = ['convert'];
  if (opts.snapshot) args.push('-l', `snapshot.name=${opts.snapshot}`);
  run('qemu-img', [...args, '-O', 'raw', image, out]);
  return out;
}

/** sha256 of `length` bytes of `file` at `offset`, read without loading the file whole. */
export function sha256Range(file: string, offset: number, length: number): string {
  const h = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(Math.min(length, 4 << 20));
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, buf, 0, Math.min(buf.length, length - done), offset + done);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
      done += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/** A shell-free errno probe: the code Node reports, or 'ok'. */
export function errnoOf(fn: () => unknown): string {
  try {
    fn();
    return 'ok';
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? String(err);
  }
}
