/**
 * Where running mounts are recorded, so `qcowfs unmount` can find the
 * daemon serving a mountpoint and wait for it to finish flushing.
 */
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';

export interface MountRecord {
  pid: number;
  mountpoint: string;
  images: string[];
  transport: 'kernel' | 'libfuse';
  log: string | null;
}

export function stateDir(): string {
  if (process.env.QCOWFS_STATE_DIR) return process.env.QCOWFS_STATE_DIR;
  if (process.getuid?.() === 0) return '/run/qcowfs';
  if (process.env.XDG_RUNTIME_DIR) return path.join(process.env.XDG_RUNTIME_DIR, 'qcowfs');
  return path.join('/tmp', `qcowfs-${process.getuid?.() ?? 'user'}`);
}

function key(mountpoint: string): string {
  return crypto.createHash('sha1').update(path.resolve(mountpoint)).digest('hex').slice(0, 16);
}

export function recordPath(mountpoint: string): string {
  return path.join(stateDir(), `${key(mountpoint)}.json`);
}

export function logPath(mountpoint: string): string {
  return path.join(stateDir(), `${key(mountpoint)}.log`);
}

export function ensureStateDir(): void {
  fs.mkdirSync(stateDir(), { recursive: true, mode: 0o700 });
}

export function writeRecord(r: MountRecord): void {
  ensureStateDir();
  const p = recordPath(r.mountpoint);
  fs.writeFileSync(`${p}.tmp`, JSON.stringify(r));
  fs.renameSync(`${p}.tmp`, p);
}

export function readRecord(mountpoint: string): MountRecord | null {
  try {
    return JSON.parse(fs.readFileSync(recordPath(mountpoint), 'utf8')) as MountRecord;
  } catch {
    return null;
  }
}

export function removeRecord(mountpoint: string, pid?: number): void {
  const r = readRecord(mountpoint);
  if (r && pid !== undefined && r.pid !== pid) return;
  fs.rmSync(recordPath(mountpoint), { force: true });
}

/**
 * True while `pid` runs. A process that has exited but is not yet reaped (a
 * zombie) has closed its images and released its locks: it counts as gone.
 * The detached daemon's parent is init, and not every init reaps promptly.
 */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  return !isZombie(pid);
}

/** /proc/PID/stat is "pid (comm) state ..."; comm may itself hold ')' and spaces. */
function isZombie(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === 'Z';
  } catch {
    return false; // no procfs, or the process went away meanwhile: kill() said it was there
  }
}

/** Mounts served by a live qcowfs daemon that include `image`. */
export function mountedBy(image: string): MountRecord | null {
  const want = fs.realpathSync(image);
  let names: string[];
  try {
    names = fs.readdirSync(stateDir()).filter((n) => n.endsWith('.json'));
  } catch {
    return null;
  }
  for (const n of names) {
    try {
      const r = JSON.parse(fs.readFileSync(path.join(stateDir(), n), 'utf8')) as MountRecord;
      if (processAlive(r.pid) && r.images.some((i) => fs.existsSync(i) && fs.realpathSync(i) === want)) return r;
    } catch {
      // a record being rewritten: ignore
    }
  }
  return null;
}

