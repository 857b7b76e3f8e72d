import { expect } from 'chai';
import { ChildProcess, spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { abortFuseConnection } from '../../helpers/mount';
import { qemuImg, qemuCheck, tmpDir, run } from '../../helpers/qemu';

const BIN = path.resolve(__dirname, '../../../../bin/qcowfs');

function qcowfs(...args: string[]): { stdout: string; stderr: string; status: number } {
  return run(process.execPath, [BIN, ...args], { allowFail: true });
}

function unmountQuietly(dir: string): void {
  if (qcowfs('unmount', dir).status !== 0) run('umount', ['-l', dir], { allowFail: true });
}

describe('mount --partitions: each partition of the disk as its own file', function () {
  let dir: string;
  let mnt: string;
  let fsMnt: string;
  before(() => {
    dir = tmpDir();
    mnt = path.join(dir, 'mnt');
    fsMnt = path.join(dir, 'fs');
    fs.mkdirSync(mnt);
    fs.mkdirSync(fsMnt);
  });
  afterEach(() => {
    run('umount', [fsMnt], { allowFail: true });
    if (fs.readFileSync('/proc/mounts', 'utf8').includes(` ${mnt} `)) unmountQuietly(mnt);
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  for (const label of ['gpt', 'dos']) {
    it(`serves ${label} partitions that mkfs and mount use directly, and QEMU sees the result`, () => {
      const img = path.join(dir, `${label}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', img, '256M');
      expect(qcowfs('mount', img, mnt).status).to.equal(0);
      const disk = path.join(mnt, `${label}.raw`);
      // dos: a primary, an extended partition and one logical partition in it (numbered 5).
      const layout = label === 'dos'
        ? `label: dos\n${disk}1 : size=64M\n${disk}2 : size=64M, type=5\n${disk}5 : size=16M\n`
        : 'label: gpt\n,64M\n,\n';
      run('sfdisk', ['-q', disk], { input: layout });
      expect(qcowfs('unmount', mnt).status).to.equal(0);

      const r = qcowfs('mount', '--partitions', img, mnt);
      expect(r.status, r.stderr).to.equal(0);
      const names = fs.readdirSync(mnt).sort();
      const expected = label === 'dos' ? [`${label}-p1.raw`, `${label}-p5.raw`, `${label}.raw`] : [`${label}-p1.raw`, `${label}-p2.raw`, `${label}.raw`];
      expect(names).to.deep.equal(expected);
      const p1 = path.join(mnt, `${label}-p1.raw`);
      expect(fs.statSync(p1).size).to.equal(64 * 1024 * 1024);
      run('mkfs.ext4', ['-q', p1]);
      run('mount', [p1, fsMnt]);
      fs.writeFileSync(path.join(fsMnt, 'hello.txt'), 'partition data\n');
      run('umount', [fsMnt]);
      // The partition's bytes are the disk's bytes at the partition's offset.
      const whole = Buffer.alloc(4096);
      const part = Buffer.alloc(4096);
      const fdW = fs.openSync(path.join(mnt, `${label}.raw`), 'r');
      const fdP = fs.openSync(p1, 'r');
      fs.readSync(fdW, whole, 0, 4096, 1024 * 1024 + 1024);
      fs.readSync(fdP, part, 0, 4096, 1024);
      fs.closeSync(fdW);
      fs.closeSync(fdP);
      expect(part.equals(whole)).to.equal(true);
      expect(qcowfs('unmount', mnt).status).to.equal(0);
      const c = qemuCheck(img);
      expect((c.corruptions ?? 0) + (c.leaks ?? 0) + c['check-errors']).to.equal(0);
      // QEMU's view of the partition holds the file system we made.
      const raw = path.join(dir, `${label}.raw`);
      qemuImg('convert', '-O', 'raw', img, raw);
      run('mount', ['-o', 'loop,ro,offset=1048576,sizelimit=67108864', raw, fsMnt]);
      expect(fs.readFileSync(path.join(fsMnt, 'hello.txt'), 'utf8')).to.equal('partition data\n');
      run('umount', [fsMnt]);
      fs.rmSync(raw);
    });
  }

  /** A new image partitioned by sfdisk (through a mount), then mounted with --partitions. */
  function mountPartitioned(name: string, size: string, table: string): string {
    const img = path.join(dir, `${name}.qcow2`);
    qemuImg('create', '-q', '-f', 'qcow2', img, size);
    expect(qcowfs('mount', img, mnt).status).to.equal(0);
    run('sfdisk', ['-q', path.join(mnt, `${name}.raw`)], { input: table });
    expect(qcowfs('unmount', mnt).status).to.equal(0);
    expect(qcowfs('mount', '--partitions', img, mnt).status).to.equal(0);
    return img;
  }

  it('refuses I/O on partition files once the table changes', () => {
    mountPartitioned('chg', '128M', 'label: gpt\n,32M\n,\n');
    const p2 = path.join(mnt, 'chg-p2.raw');
    const buf = Buffer.alloc(4096);
    const fd = fs.openSync(p2, 'r');
    try {
      expect(fs.readSync(fd, buf, 0, 4096, 0)).to.equal(4096);
      run('sfdisk', ['-q', '--no-reread', path.join(mnt, 'chg.raw')], { input: 'label: gpt\n,48M\n,\n' });
      let errno: number | undefined;
      try {
        fs.readSync(fd, buf, 0, 4096, 0);
      } catch (err) {
        errno = (err as NodeJS.ErrnoException).errno;
      }
      expect(errno).to.equal(-os.constants.errno.ESTALE);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('a shared mapping of a partition file stops showing it once the table changes (SIGBUS, as a read gets ESTALE)', () => {
    mountPartitioned('map', '128M', 'label: gpt\n,32M\n,\n');
    const p2 = path.join(mnt, 'map-p2.raw');
    fs.writeFileSync(p2, Buffer.alloc(4096, 0x3c), { flag: 'r+' });
    // Map the first page, read it, change the table through the disk file, read it again.
    const script = [
      'import mmap, os, subprocess, sys',
      'fd = os.open(sys.argv[1], os.O_RDWR)',
      'm = mmap.mmap(fd, 4096, mmap.MAP_SHARED)',
      'print(m[0], flush=True)',
      "subprocess.run(['sfdisk', '-q', '--no-reread', sys.argv[2]], input=b'label: gpt\\n,48M\\n,\\n', check=True)",
      'print(m[0], flush=True)',
    ].join('\n');
    const r = spawnSync('python3', ['-c', script, p2, path.join(mnt, 'map.raw')], { encoding: 'utf8', timeout: 60_000 });
    expect(r.stdout.trim().split('\n'), r.stderr).to.deep.equal(['60']);
    expect(r.signal, 'the second read of the mapping').to.equal('SIGBUS');
  });

  it('keeps the disk file and a partition file coherent: a write through one is what the other reads', () => {
    const img = mountPartitioned('alias', '64M', 'label: gpt\nstart=2048, size=32M\n');
    const start = 2048 * 512;
    const disk = fs.openSync(path.join(mnt, 'alias.raw'), 'r+');
    const part = fs.openSync(path.join(mnt, 'alias-p1.raw'), 'r+');
    const page = Buffer.alloc(4096);
    try {
      // The disk file's pages are cached (kept across opens, too) ...
      expect(fs.readSync(disk, page, 0, 4096, start + 8192)).to.equal(4096);
      expect(page.equals(Buffer.alloc(4096))).to.equal(true);
      // ... and a write through the partition file reaches them.
      const one = Buffer.alloc(4096, 0x5a);
      expect(fs.writeSync(part, one, 0, 4096, 8192)).to.equal(4096);
      expect(fs.readSync(disk, page, 0, 4096, start + 8192)).to.equal(4096);
      expect(page.equals(one), 'the disk file reads the partition file\'s write').to.equal(true);
      // Zeroing through the partition file too (fallocate, as discard does).
      run('fallocate', ['--zero-range', '--keep-size', '-o', '8192', '-l', '4096', path.join(mnt, 'alias-p1.raw')]);
      expect(fs.readSync(disk, page, 0, 4096, start + 8192)).to.equal(4096);
      expect(page.equals(Buffer.alloc(4096)), 'the disk file reads the zeroes').to.equal(true);
      // The other way round.
      const two = Buffer.alloc(4096, 0xa5);
      expect(fs.writeSync(disk, two, 0, 4096, start + 16384)).to.equal(4096);
      expect(fs.readSync(part, page, 0, 4096, 16384)).to.equal(4096);
      expect(page.equals(two), 'the partition file reads the disk file\'s write').to.equal(true);
    } finally {
      fs.closeSync(part);
      fs.closeSync(disk);
    }
    expect(qcowfs('unmount', mnt).status).to.equal(0);
    // QEMU reads what both files were last given.
    run('qemu-img', ['convert', '-O', 'raw', img, `${img}.raw`]);
    const got = fs.readFileSync(`${img}.raw`);
    expect(got.subarray(start + 8192, start + 12288).equals(Buffer.alloc(4096))).to.equal(true);
    expect(got.subarray(start + 16384, start + 20480).equals(Buffer.alloc(4096, 0xa5))).to.equal(true);
    const c = qemuCheck(img);
    expect((c.corruptions ?? 0) + (c.leaks ?? 0) + c['check-errors']).to.equal(0);
  });

  it('asynchronous direct writes to a partition while the disk file reads the same bytes: no hang, the files agree, QEMU finds the image clean', async function () {
    this.timeout(120_000);
    const img = mountPartitioned('busy', '64M', 'label: dos\n1MiB,32MiB\n');
    const start = 1 << 20;
    const disk = path.join(mnt, 'busy.raw');
    const part = path.join(mnt, 'busy-p1.raw');
    const seconds = 10;
    // Each WRITE drops the disk file's cached copy of its page (FUSE_NOTIFY_INVAL_INODE); the
    // readers keep those pages under READ, which locks them, and the writer keeps every
    // request slot of the kernel (max_background) taken with WRITEs.
    const exited = (c: ChildProcess) => new Promise<number | null>((resolve) => c.on('close', (code) => resolve(code)));
    const readers = Array.from({ length: 4 }, (_, i) => spawn('bash', ['-c',
      `end=$((SECONDS+${seconds})); while [ $SECONDS -lt $end ]; do dd if="$1" of=/dev/null bs=${i === 0 ? '128k' : '4k'} skip=${i === 0 ? 8 : 256} count=${i === 0 ? 2 : 64} status=none; done`,
      'bash', disk], { stdio: 'ignore' }));
    const writer = spawn('fio', ['--name=w', `--filename=${part}`, '--rw=randwrite', '--bs=4k', '--size=256k', '--ioengine=libaio',
      '--iodepth=128', '--direct=1', '--time_based', `--runtime=${seconds}`, '--output=/dev/null'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let writerErr = '';
    writer.stderr!.on('data', (d: Buffer) => { writerErr += d.toString(); });
    const all = Promise.all([exited(writer), ...readers.map(exited)]);
    let timer: NodeJS.Timeout | undefined;
    const inTime = await Promise.race([
      all.then(() => true),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(false), (seconds + 30) * 1000); }),
    ]);
    clearTimeout(timer);
    if (!inTime) {
      abortFuseConnection(mnt);
      await all;
    }
    expect(inTime, 'the writer and the readers finished: the mount did not hang').to.equal(true);
    expect(writer.exitCode, writerErr).to.equal(0);
    for (const r of readers) expect(r.exitCode).to.equal(0);
    // Coherent once all is done: the disk file shows what the partition file holds.
    const fromPart = Buffer.alloc(256 * 1024);
    const fromDisk = Buffer.alloc(256 * 1024);
    const pfd = fs.openSync(part, 'r');
    const dfd = fs.openSync(disk, 'r');
    try {
      fs.readSync(pfd, fromPart, 0, fromPart.length, 0);
      fs.readSync(dfd, fromDisk, 0, fromDisk.length, start);
    } finally {
      fs.closeSync(pfd);
      fs.closeSync(dfd);
    }
    expect(fromDisk.equals(fromPart), 'the disk file reads what the partition file holds').to.equal(true);
    expect(fromPart.equals(Buffer.alloc(fromPart.length)), 'the writer wrote something').to.equal(false);
    expect(qcowfs('unmount', mnt).status).to.equal(0);
    const c = qemuCheck(img);
    expect((c.corruptions ?? 0) + (c.leaks ?? 0) + c['check-errors']).to.equal(0);
  });

  it('warns and serves the whole disk when there is no partition table', () => {
    const img = path.join(dir, 'none.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
    const r = qcowfs('mount', '--partitions', img, mnt);
    expect(r.status).to.equal(0);
    expect(r.stderr).to.match(/has no MBR or GPT partition table/);
    expect(fs.readdirSync(mnt)).to.deep.equal(['none.raw']);
  });
});
