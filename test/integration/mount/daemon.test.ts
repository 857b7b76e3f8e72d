/**
 * The daemon through real mounts: the raw view against QEMU's, sparseness,
 * a loop-mounted ext4, truncate, hole punching, concurrency, and clean-up
 * after unmount or a killed daemon.
 */
import { expect } from 'chai';
import { spawn, spawnSync } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, qemuRaw, qemuCheck, qemuMap, qemuInfo, tmpDir, run } from '../../helpers/qemu';

const BIN = path.resolve(__dirname, '../../../../bin/qcowfs');

function qcowfs(...args: string[]): { stdout: string; stderr: string; status: number } {
  return run(process.execPath, [BIN, ...args], { allowFail: true });
}

function mounted(p: string): boolean {
  return fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === p);
}

function clean(image: string): void {
  const c = qemuCheck(image);
  expect({ leaks: c.leaks ?? 0, corruptions: c.corruptions ?? 0, errors: c['check-errors'] }).to.deep.equal({ leaks: 0, corruptions: 0, errors: 0 });
}

/** SEEK_DATA/SEEK_HOLE walk of a file: the data ranges, as python's os.lseek sees them. */
function dataRanges(file: string): Array<[number, number]> {
  const py = `
import os, sys, json
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
out = []
pos = 0
while pos < size:
    try:
        d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:
        break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    out.append([d, h])
    pos = h
print(json.dumps(out))
`;
  return JSON.parse(run('python3', ['-c', py, file]).stdout) as Array<[number, number]>;
}

function sha(buf: Buffer): string {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

describe('qcowfs mount: the raw view through a real kernel mount', function () {
  let dir: string;
  let mnt: string;
  before(() => {
    dir = tmpDir();
    mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt);
  });
  afterEach(() => {
    for (const p of [path.join(dir, 'fs'), mnt]) {
      if (!mounted(p)) continue;
      if (p === mnt && qcowfs('unmount', p).status === 0) continue;
      run('umount', ['-l', p], { allowFail: true });
    }
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  const fixtures: Array<[string, (img: string) => void]> = [
    ['v2, 512 B clusters', (img) => { qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=512', img, '8M'); qemuIo(img, ['write -P 1 1000 300k', 'write -P 2 5M 1M']); }],
    ['v3, 64K clusters, zero and compressed clusters', (img) => { qemuImg('create', '-q', '-f', 'qcow2', img, '32M'); qemuIo(img, ['write -P 3 0 4M', 'write -z 1M 1M', 'write -c -P 4 8M 256k']); }],
    ['2M clusters, extended L2, zstd', (img) => { qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M,extended_l2=on,compression_type=zstd', img, '64M'); qemuIo(img, ['write -P 5 100k 3M', 'write -c -P 6 16M 2M']); }],
  ];
  for (const [name, make] of fixtures) {
    it(`reads byte-exact and SEEK_DATA/SEEK_HOLE follow qemu-img map (${name})`, () => {
      const img = path.join(dir, `f-${name.replace(/\W+/g, '_')}.qcow2`);
      make(img);
      const want = qemuRaw(img);
      expect(qcowfs('mount', '--read-only', img, mnt).status).to.equal(0);
      const file = path.join(mnt, path.basename(img).replace(/\.qcow2$/, '.raw'));
      expect(fs.readFileSync(file).equals(want)).to.equal(true);
      const fromMap: Array<[number, number]> = [];
      for (const e of qemuMap(img) as Array<{ start: number; length: number; data: boolean }>) {
        if (!e.data) continue;
        const last = fromMap[fromMap.length - 1];
        if (last && last[1] === e.start) last[1] += e.length;
        else fromMap.push([e.start, e.start + e.length]);
      }
      expect(dataRanges(file)).to.deep.equal(fromMap);
      expect(qcowfs('unmount', mnt).status).to.equal(0);
    });
  }

  it('serves a backing chain and writes into the overlay only', () => {
    const base = path.join(dir, 'base.qcow2');
    const top = path.join(dir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
    qemuIo(base, ['write -P 7 0 16M']);
    const baseSum = sha(fs.readFileSync(base));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
    expect(qcowfs('mount', top, mnt).status).to.equal(0);
    const file = path.join(mnt, 'top.raw');
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.alloc(1000, 9), 0, 1000, 70000);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const seen = fs.readFileSync(file);
    expect(qcowfs('unmount', mnt).status).to.equal(0);
    expect(qemuRaw(top).equals(seen)).to.equal(true);
    expect(seen[69999]).to.equal(7);
    expect(seen[70000]).to.equal(9);
    expect(sha(fs.readFileSync(base))).to.equal(baseSum);
    clean(top);
  });

  it('cp --sparse=always copies only the data of a 64 GiB image', () => {
    const img = path.join(dir, 'big.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64G');
    qemuIo(img, ['write -P 1 0 1M', 'write -P 2 20G 2M', 'write -P 3 63G 1M']);
    expect(qcowfs('mount', '--read-only', img, mnt).status).to.equal(0);
    const out = path.join(dir, 'copy.raw');
    run('cp', ['--sparse=always', path.join(mnt, 'big.raw'), out]);
    const st = fs.statSync(out);
    expect(st.size).to.equal(64 * 1024 ** 3);
    expect(st.blocks * 512).to.be.lessThan(64 * 1024 * 1024);
    const fd = fs.openSync(out, 'r');
    const probe = (off: number, len: number) => {
      const b = Buffer.alloc(len);
      fs.readSync(fd, b, 0, len, off);
      return b;
    };
    expect(probe(0, 1 << 20).equals(Buffer.alloc(1 << 20, 1))).to.equal(true);
    expect(probe(20 * 1024 ** 3, 2 << 20).equals(Buffer.alloc(2 << 20, 2))).to.equal(true);
    expect(probe(63 * 1024 ** 3, 1 << 20).equals(Buffer.alloc(1 << 20, 3))).to.equal(true);
    expect(probe(10 * 1024 ** 3, 1 << 20).equals(Buffer.alloc(1 << 20))).to.equal(true);
    fs.closeSync(fd);
    fs.rmSync(out);
  });

  it('a loop-mounted ext4 is used, trimmed and found intact by QEMU and e2fsck', () => {
    const img = path.join(dir, 'ext4.qcow2');
    const fsDir = path.join(dir, 'fs');
    fs.mkdirSync(fsDir, { recursive: true });
    qemuImg('create', '-q', '-f', 'qcow2', img, '256M');
    expect(qcowfs('mount', img, mnt).status).to.equal(0);
    const raw = path.join(mnt, 'ext4.raw');
    const loop = run('losetup', ['--find', '--show', raw]).stdout.trim();
    try {
      run('mkfs.ext4', ['-q', loop]);
      run('mount', [loop, fsDir]);
      for (let i = 0; i < 40; i++) fs.writeFileSync(path.join(fsDir, `file${i}`), crypto.randomBytes(256 * 1024));
      const keep = sha(fs.readFileSync(path.join(fsDir, 'file7')));
      for (let i = 10; i < 40; i++) fs.rmSync(path.join(fsDir, `file${i}`));
      run('sync', []);
      run('fstrim', [fsDir]);
      run('umount', [fsDir]);
      run('losetup', ['-d', loop]);
      expect(qcowfs('unmount', mnt).status).to.equal(0);
      clean(img);
      // Freed blocks were discarded: the image holds far less than the 10 MiB written.
      const allocated = (qemuMap(img) as Array<{ data: boolean; length: number }>).filter((e) => e.data).reduce((n, e) => n + e.length, 0);
      expect(allocated).to.be.lessThan(10 * 1024 * 1024 + 16 * 1024 * 1024);
      expect(qcowfs('mount', img, mnt).status).to.equal(0);
      expect(run('e2fsck', ['-fn', raw], { allowFail: true }).status).to.equal(0);
      run('mount', ['-o', 'ro,loop', raw, fsDir]);
      expect(sha(fs.readFileSync(path.join(fsDir, 'file7')))).to.equal(keep);
      expect(fs.readdirSync(fsDir).filter((n) => n.startsWith('file'))).to.have.length(10);
      run('umount', [fsDir]);
      expect(qcowfs('unmount', mnt).status).to.equal(0);
    } finally {
      spawnSync('umount', [fsDir]);
      spawnSync('losetup', ['-d', loop]);
    }
  });

  it('truncate grows and shrinks the disk to any byte size; punch and zero ranges read back as zeroes', () => {
    const img = path.join(dir, 'trunc.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
    qemuIo(img, ['write -P 1 0 16M']);
    expect(qcowfs('mount', img, mnt).status).to.equal(0);
    const raw = path.join(mnt, 'trunc.raw');
    run('truncate', ['-s', '40M', raw]);
    expect(fs.statSync(raw).size).to.equal(40 * 1024 * 1024);
    run('truncate', ['-s', '10000001', raw]);
    expect(fs.statSync(raw).size).to.equal(10000001);
    run('fallocate', ['--punch-hole', '--offset', '1048576', '--length', '2097152', raw]);
    run('fallocate', ['--zero-range', '--offset', '4194304', '--length', '1000000', raw]);
    const data = fs.readFileSync(raw);
    expect(data.subarray(1048576, 3145728).equals(Buffer.alloc(2097152))).to.equal(true);
    expect(data.subarray(4194304, 5194304).equals(Buffer.alloc(1000000))).to.equal(true);
    expect(data[1048575]).to.equal(1);
    expect(data[5194304]).to.equal(1);
    expect(qcowfs('unmount', mnt).status).to.equal(0);
    // The header keeps the exact size; QEMU rounds it down to 512 bytes when it reads it.
    expect(JSON.parse(qcowfs('info', '--json', img).stdout)['virtual-size']).to.equal(10000001);
    expect(qemuInfo(img)['virtual-size']).to.equal(Math.floor(10000001 / 512) * 512);
    clean(img);
    // QEMU reads the image rounded down to 512 bytes.
    expect(qemuRaw(img).equals(data.subarray(0, Math.floor(10000001 / 512) * 512))).to.equal(true);
  });

  it('two processes writing and reading different regions at once get their own data', () => {
    const img = path.join(dir, 'conc.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
    expect(qcowfs('mount', img, mnt).status).to.equal(0);
    const raw = path.join(mnt, 'conc.raw');
    const jobs = ['--name=a', '--offset=0', '--size=24M', '--name=b', '--offset=32M', '--size=24M'];
    run('fio', ['--filename=' + raw, '--rw=randrw', '--bs=4k', '--ioengine=psync', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output=/dev/null', ...jobs]);
    expect(qcowfs('unmount', mnt).status).to.equal(0);
    clean(img);
  });

  it('unmount while a file is open fails clearly and leaves the mount working; the daemon exits on unmount', () => {
    const img = path.join(dir, 'busy.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    expect(qcowfs('mount', img, mnt).status).to.equal(0);
    const fd = fs.openSync(path.join(mnt, 'busy.raw'), 'r');
    try {
      const r = qcowfs('unmount', mnt);
      expect(r.status).to.equal(1);
      expect(r.stderr).to.match(/busy/);
      expect(fs.readSync(fd, Buffer.alloc(512), 0, 512, 0)).to.equal(512);
    } finally {
      fs.closeSync(fd);
    }
    const pids = run('pgrep', ['-f', `qcowfs mount.*${img}`], { allowFail: true }).stdout.trim().split('\n').filter(Boolean);
    expect(pids.length).to.be.greaterThan(0);
    expect(qcowfs('unmount', mnt).status).to.equal(0);
    expect(mounted(mnt)).to.equal(false);
    for (const pid of pids) expect(fs.existsSync(`/proc/${pid}`)).to.equal(false);
  });

  it('after kill -9 of the daemon, qcowfs unmount cleans up and the image has no corruption', async () => {
    const img = path.join(dir, 'killed.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
    expect(qcowfs('mount', img, mnt).status).to.equal(0);
    const pid = Number(run('pgrep', ['-f', `qcowfs mount.*${img}`]).stdout.trim().split('\n')[0]);
    const writer = spawn('dd', ['if=/dev/urandom', `of=${path.join(mnt, 'killed.raw')}`, 'bs=64k', 'count=600', 'conv=notrunc'], { stdio: 'ignore' });
    await new Promise((r) => setTimeout(r, 300));
    process.kill(pid, 'SIGKILL');
    await new Promise((r) => writer.once('exit', r));
    const r = qcowfs('unmount', mnt);
    expect(r.status, r.stderr).to.equal(0);
    expect(mounted(mnt)).to.equal(false);
    const c = qemuCheck(img);
    expect(c.corruptions ?? 0).to.equal(0);
    expect(c['check-errors']).to.equal(0);
  });

  it('an fsx-style exerciser (reads, writes, truncates, punch/zero ranges, mmap) finds no difference from a plain file', () => {
    // The fsx script lives in the source tree beside this test.
    const fsx = path.resolve(__dirname, '../../../../test/integration/mount/fsx.py');
    // A plain file on a disk file system (tmpfs has no FALLOC_FL_ZERO_RANGE).
    const plain = path.join(dir, 'fsx-plain');
    try {
      for (const seed of [1, 2]) {
        expect(run('python3', [fsx, plain, String(seed), '1500', String(8 * 1024 * 1024)], { allowFail: true }).stdout).to.match(/^ok/m);
        const img = path.join(dir, `fsx-${seed}.qcow2`);
        qemuImg('create', '-q', '-f', 'qcow2', '-o', seed === 1 ? 'cluster_size=4096' : 'cluster_size=65536,extended_l2=on', img, '0');
        expect(qcowfs('mount', img, mnt).status).to.equal(0);
        const r = run('python3', [fsx, path.join(mnt, `fsx-${seed}.raw`), String(seed), '1500', String(8 * 1024 * 1024)], { allowFail: true });
        expect(r.stdout, r.stdout + r.stderr).to.match(/^ok/m);
        expect(qcowfs('unmount', mnt).status).to.equal(0);
        clean(img);
      }
    } finally {
      fs.rmSync(plain, { force: true });
    }
  });

  it('killed with SIGKILL in the middle of writes, again and again: no corruption, fsynced data kept', async () => {
    const img = path.join(dir, 'kills.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
    const acked = new Map<number, number>(); // block -> pattern, acknowledged by fsync
    const block = 256 * 1024;
    for (let round = 0; round < 4; round++) {
      expect(qcowfs('mount', img, mnt).status).to.equal(0);
      const pid = Number(run('pgrep', ['-f', `qcowfs mount.*${img}`]).stdout.trim().split('\n')[0]);
      // A writer that fsyncs each block and then says so.
      const script = `
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
r = ${round}
for i in range(200):
    b = (i * 37 + r * 11) % 256
    os.pwrite(fd, bytes([r * 50 + 1 + (i % 40)]) * ${block}, b * ${block})
    os.fsync(fd)
    print(b, r * 50 + 1 + (i % 40), flush=True)
`;
      const writer = spawn('python3', ['-c', script, path.join(mnt, 'kills.raw')], { stdio: ['ignore', 'pipe', 'ignore'] });
      const exited = new Promise((r) => writer.once('close', r));
      let out = '';
      writer.stdout.on('data', (d: Buffer) => { out += d.toString(); });
      await new Promise((r) => setTimeout(r, 150 + round * 120));
      process.kill(pid, 'SIGKILL');
      await exited;
      for (const line of out.split('\n').filter(Boolean)) {
        const [b, v] = line.split(' ').map(Number);
        acked.set(b, v);
      }
      expect(qcowfs('unmount', mnt).status).to.equal(0);
      const c = qemuCheck(img);
      expect(c.corruptions ?? 0, `round ${round}`).to.equal(0);
      expect(c['check-errors']).to.equal(0);
      // Leaks from the kill are reclaimed, as a user would.
      expect(qcowfs('check', '--repair', img).status).to.equal(0);
    }
    expect(acked.size).to.be.greaterThan(0);
    const data = qemuRaw(img);
    for (const [b, v] of acked) {
      const got = data.subarray(b * block, (b + 1) * block);
      // A later, unacknowledged write of the same block may have replaced it, but never with garbage.
      if (!got.equals(Buffer.alloc(block, v))) expect(got.every((x) => x === got[0]), `block ${b}`).to.equal(true);
    }
  });

  it('errors a user can hit are one line and a non-zero exit', () => {
    const missing = qcowfs('mount', path.join(dir, 'nope.qcow2'), mnt);
    expect(missing.status).to.not.equal(0);
    expect(missing.stderr.trim().split('\n')).to.have.length(1);
    expect(missing.stderr).to.match(/no such image/);
    const img = path.join(dir, 'ok.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '1M');
    const noMnt = qcowfs('mount', img, path.join(dir, 'no-such-dir'));
    expect(noMnt.status).to.not.equal(0);
    expect(noMnt.stderr).to.match(/does not exist/);
    expect(noMnt.stderr).to.not.match(/at .*\.js/);
  });
});
