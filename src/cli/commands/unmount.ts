import * as fs from 'fs';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { OptionSpec, Parsed, flag, UsageError } from '../args';
import { Command, writeErr } from '../command';
import { CliError } from '../exit';
import { unmountPath } from '../../fuse/mount';
import { MountRecord, readRecord, removeRecord, processAlive, logPath } from '../state';

const options: OptionSpec[] = [
  { name: 'lazy', short: 'l', help: 'detach even while files are open (the daemon exits once they are closed)' },
  { name: 'timeout', value: true, meta: 'SECONDS', help: 'how long to wait for the daemon to finish flushing (default 120)' },
  { name: 'help', short: 'h', help: 'show this help' },
];

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** umount(8) as root, fusermount -u otherwise; EBUSY and EINVAL come back as error codes. */
async function detachMount(mountpoint: string, lazy: boolean): Promise<void> {
  if (process.getuid?.() === 0) {
    await unmountPath(mountpoint, { lazy });
    return;
  }
  const r = spawnSync('fusermount', ['-u', ...(lazy ? ['-z'] : []), mountpoint], { encoding: 'utf8' });
  if (r.status !== 0) {
    const msg = (r.stderr || '').trim();
    if (/busy/i.test(msg)) throw Object.assign(new Error(msg), { code: 'EBUSY' });
    if (/not found|not mounted/i.test(msg)) throw Object.assign(new Error(msg), { code: 'EINVAL' });
    throw new CliError(`unmounting ${mountpoint} failed: ${msg || `fusermount exited with ${r.status}`}`);
  }
}

/**
 * The mount has no daemon any more (killed, crashed): the kernel says its
 * connection is down. A recorded daemon still running is asked nothing: a
 * stuck one would hang the stat.
 */
function daemonGone(mountpoint: string, rec: MountRecord | null): boolean {
  if (rec && processAlive(rec.pid)) return false;
  try {
    fs.statSync(mountpoint);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOTCONN';
  }
}

/**
 * A daemon that exits cleanly removes its log; one that was killed cannot.
 * An empty log says nothing, so it goes; one with the daemon's last words stays.
 */
function removeEmptyLog(mountpoint: string): void {
  try {
    if (fs.statSync(logPath(mountpoint)).size === 0) fs.rmSync(logPath(mountpoint), { force: true });
  } catch {
    // no log
  }
}

async function run(p: Parsed): Promise<number> {
  const [target, ...rest] = p.positional;
  if (!target || rest.length > 0) throw new UsageError('unmount takes exactly one mountpoint');
  const mountpoint = path.resolve(target);
  const lazy = flag(p, 'lazy');
  const timeoutS = Number(p.options.get('timeout')?.[0] ?? 120);
  if (!Number.isFinite(timeoutS) || timeoutS < 0) throw new UsageError('--timeout takes a number of seconds');
  const rec = readRecord(mountpoint);
  try {
    await detachMount(mountpoint, lazy);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EBUSY' && !lazy && daemonGone(mountpoint, rec)) {
      // Nothing is left to flush and the mount can never serve again: files held
      // open on it only keep a dead mount in place. Detach it; they get ENOTCONN.
      await detachMount(mountpoint, true);
      writeErr(`qcowfs: the daemon serving ${mountpoint} is gone; detached the mount (files still open on it now fail)\n`);
      if (rec) removeRecord(mountpoint, rec.pid);
      removeEmptyLog(mountpoint);
      return 0;
    }
    if (code === 'EBUSY') throw new CliError(`${mountpoint} is busy: files on it are still open; close them and retry, or use --lazy`);
    if (code === 'EINVAL') {
      if (rec) removeRecord(mountpoint);
      throw new CliError(`${mountpoint} is not mounted`);
    }
    throw err;
  }
  // Wait for the daemon to flush the images and exit.
  if (rec && rec.pid !== process.pid) {
    const deadline = Date.now() + timeoutS * 1000;
    while (processAlive(rec.pid)) {
      if (Date.now() > deadline) {
        writeErr(`qcowfs: the daemon (pid ${rec.pid}) is still flushing ${rec.images.join(', ')}; not waiting longer\n`);
        return 1;
      }
      await sleep(lazy ? 200 : 50);
    }
    removeRecord(mountpoint, rec.pid);
  }
  removeEmptyLog(mountpoint);
  return 0;
}

export const unmountCommand: Command = {
  name: 'unmount',
  summary: 'flush and unmount a qcowfs mount, waiting until the images are closed',
  usage: 'qcowfs unmount MOUNTPOINT [--lazy]',
  details: 'Also cleans up the mount of a daemon that was killed, even while files on it are open. Fails clearly while files on a live mount are open, unless --lazy.',
  options,
  run,
};
