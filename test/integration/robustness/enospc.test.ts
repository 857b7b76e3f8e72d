/**
 * The image lives on a small host filesystem (a tmpfs with size=) that fills
 * up while a guest writes through a real mount: the writes fail with ENOSPC,
 * what was written and fsynced before survives, QEMU finds no corruption
 * (leaked clusters allowed), and once the host has room again writing works.
 */
import { expect } from 'chai';
import * as fs from 'fs';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { qemuImg, qemuCheck, tmpDir, run } from '../../helpers/qemu';

const BIN = path.resolve(__dirname, '../../../../bin/qcowfs');
const MiB = 1024 * 1024;

function qcowfs(...args: string[]): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 60000, killSignal: 'SIGKILL' });
  return { status: r.status, stderr: r.stderr ?? '' };
}

function isMounted(dir: string): boolean {
  return fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === dir);
}

/** Chunk i of the guest data: 1 MiB of one byte value, so qemu-io can verify it with read -P. */
function chunkByte(i: number): number {
  return (i % 250) + 1;
}

/** Write chunk i at i MiB and fsync it; the errno code when either fails. */
function writeChunk(fd: number, i: number): string | null {
  try {
    fs.writeSync(fd, Buffer.alloc(MiB, chunkByte(i)), 0, MiB, i * MiB);
    fs.fsyncSync(fd);
    return null;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? String(err);
  }
}

describe('ENOSPC: a full host filesystem under a mounted image', function () {
  this.timeout(180000);
  let root: string;
  let host: string;
  let mnt: string;
  let img: string;

  before(() => {
    root = tmpDir('qcowfs-enospc-');
    host = path.join(root, 'host');
    mnt = path.join(root, 'mnt');
    fs.mkdirSync(host);
    fs.mkdirSync(mnt);
    run('mount', ['-t', 'tmpfs', '-o', 'size=40m', 'qcowfs-enospc', host]);
    img = path.join(host, 'disk.qcow2');
  });

  afterEach(() => {
    if (isMounted(mnt) && qcowfs('unmount', mnt).status !== 0) run('umount', ['-l', mnt], { allowFail: true });
  });

  after(() => {
    if (isMounted(mnt)) run('umount', ['-l', mnt], { allowFail: true });
    if (isMounted(host)) run('umount', [host], { allowFail: true });
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('fails writes with ENOSPC, keeps fsynced data, stays consistent and recovers when space is freed', () => {
    qemuImg('create', '-q', '-f', 'qcow2', img, '256M');
    // Room the test gives back to the host later.
    const filler = path.join(host, 'filler');
    fs.writeFileSync(filler, Buffer.alloc(8 * MiB, 0xff));

    const m = qcowfs('mount', img, mnt);
    expect(m.status, m.stderr).to.equal(0);
    const raw = path.join(mnt, 'disk.raw');
    const fd = fs.openSync(raw, 'r+');
    let synced = 0;
    let failure: string | null = null;
    try {
      // 64 chunks of 1 MiB cannot fit in 40 MiB.
      for (let i = 0; i < 64; i++) {
        failure = writeChunk(fd, i);
        if (failure) break;
        synced = i + 1;
      }
      expect(failure, 'the host filesystem filled up').to.equal('ENOSPC');
      expect(synced, 'some chunks fitted before the host filled up').to.be.greaterThan(8);

      // Everything fsynced is still there, read back through the mount.
      const back = Buffer.alloc(MiB);
      for (let i = 0; i < synced; i++) {
        fs.readSync(fd, back, 0, MiB, i * MiB);
        expect(back.equals(Buffer.alloc(MiB, chunkByte(i))), `chunk ${i} after ENOSPC`).to.equal(true);
      }
      // Still full: the next write fails the same way, without hanging or crashing the daemon.
      expect(writeChunk(fd, synced)).to.equal('ENOSPC');

      // Space comes back: the failed chunk and one more can be written.
      fs.rmSync(filler);
      expect(writeChunk(fd, synced)).to.equal(null);
      expect(writeChunk(fd, synced + 1)).to.equal(null);
      fs.readSync(fd, back, 0, MiB, synced * MiB);
      expect(back.equals(Buffer.alloc(MiB, chunkByte(synced)))).to.equal(true);
    } finally {
      fs.closeSync(fd);
    }
    const u = qcowfs('unmount', mnt);
    expect(u.status, u.stderr).to.equal(0);

    // QEMU's view: no corruption (leaks from the failed allocations are allowed) and every chunk intact.
    const c = qemuCheck(img);
    expect(c.corruptions ?? 0, JSON.stringify(c)).to.equal(0);
    expect(c['check-errors'], JSON.stringify(c)).to.equal(0);
    const reads: string[] = [];
    for (let i = 0; i < synced + 2; i++) reads.push('-c', `read -q -P ${chunkByte(i)} ${i * MiB} ${MiB}`);
    const io = run('qemu-io', ['-f', 'qcow2', '-r', ...reads, img], { allowFail: true });
    expect(io.status, io.stderr).to.equal(0);
    expect(io.stdout + io.stderr).to.not.match(/Pattern verification failed|error/i);
  });
});
