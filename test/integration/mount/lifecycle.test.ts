/**
 * The daemon's life: it exits once unmounted; unmounting a busy mount fails
 * clearly and leaves it serving; after a SIGKILL, `qcowfs unmount` (or
 * umount -l) leaves no dead mount behind and the image has no corruption;
 * and the errors a user meets first are one line, with no stack trace.
 */
import { expect } from 'chai';
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, qemuCheck, qemuRaw, run } from '../../helpers/qemu';
import { Sandbox, qcowfs, isMounted, daemonPid, processGone, expectCheckClean, errnoOf, waitFor, RunResult, abortFuseConnection } from '../../helpers/mount';
import { readRecord, logPath } from '../../../src/cli/state';

/** One line on stderr, prefixed "qcowfs:", no stack trace, non-zero exit. */
function expectOneLineError(r: RunResult, pattern: RegExp): void {
  expect(r.status, r.stderr).to.not.equal(0);
  const lines = r.stderr.replace(/\n$/, '').split('\n');
  expect(lines, r.stderr).to.have.length(1);
  expect(lines[0]).to.match(/^qcowfs: /);
  expect(lines[0]).to.match(pattern);
  expect(r.stderr).to.not.match(/\bat .*\.js:\d+|internal error/);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

describe('qcowfs mount: the daemon starts, stops, and is killed', function () {
  let sb: Sandbox;
  let mnt: string;
  before(() => {
    sb = new Sandbox('qcowfs-life-');
    mnt = sb.mkdir('mnt');
  });
  afterEach(() => sb.cleanup({ keepDir: true }));
  after(() => sb.cleanup());

  it('the daemon exits once unmounted, and leaves no record behind', () => {
    const img = sb.path('exit.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    const pid = sb.mount(img, mnt);
    expect(processGone(pid)).to.equal(false);
    fs.writeFileSync(path.join(mnt, 'exit.raw'), Buffer.alloc(4096, 1), { flag: 'r+' });
    sb.unmount(mnt);
    // unmount returns only after the daemon has closed the images and exited.
    expect(processGone(pid)).to.equal(true);
    expect(readRecord(mnt)).to.equal(null);
    expectCheckClean(img);
    expect(qemuRaw(img).subarray(0, 4096).equals(Buffer.alloc(4096, 1))).to.equal(true);
  });

  it('unmount while the raw file is open fails clearly and the mount keeps working; --lazy waits for the close', async () => {
    const img = sb.path('busy.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    const pid = sb.mount(img, mnt);
    const raw = path.join(mnt, 'busy.raw');
    const fd = fs.openSync(raw, 'r+');
    try {
      const r = qcowfs('unmount', mnt);
      expect(r.status).to.equal(1);
      expectOneLineError(r, /busy/);
      expect(isMounted(mnt)).to.equal(true);
      expect(processGone(pid)).to.equal(false);
      // Still serving, through the open descriptor and new ones.
      expect(fs.writeSync(fd, Buffer.alloc(512, 7), 0, 512, 4096)).to.equal(512);
      const b = Buffer.alloc(512);
      const fd2 = fs.openSync(raw, 'r');
      fs.readSync(fd2, b, 0, 512, 4096);
      fs.closeSync(fd2);
      expect(b.equals(Buffer.alloc(512, 7))).to.equal(true);

      // --lazy detaches now and returns once the daemon has exited, i.e. after the close.
      const lazy = spawn(process.execPath, [path.resolve(__dirname, '../../../../bin/qcowfs'), 'unmount', '--lazy', mnt], { stdio: 'ignore' });
      const lazyDone = new Promise<number | null>((resolve) => lazy.once('exit', resolve));
      await waitFor('the lazy unmount to detach', () => !isMounted(mnt));
      await sleep(300);
      expect(processGone(pid), 'the daemon serves the open file until it is closed').to.equal(false);
      fs.writeSync(fd, Buffer.alloc(512, 8), 0, 512, 8192);
      fs.closeSync(fd);
      expect(await lazyDone).to.equal(0);
      expect(processGone(pid)).to.equal(true);
    } finally {
      try { fs.closeSync(fd); } catch { /* closed above */ }
    }
    expectCheckClean(img);
    const q = qemuRaw(img);
    expect(q.subarray(4096, 4608).equals(Buffer.alloc(512, 7))).to.equal(true);
    expect(q.subarray(8192, 8704).equals(Buffer.alloc(512, 8))).to.equal(true);
  });

  it('kill -9 in the middle of a write with the file held open: qcowfs unmount clears the dead mount; no corruption', async () => {
    const img = sb.path('killed.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '256M');
    const pid = sb.mount(img, mnt);
    const raw = path.join(mnt, 'killed.raw');
    // A writer that keeps going until the mount dies under it.
    const writer = spawn('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=64k', 'count=4000', 'conv=notrunc'], { stdio: ['ignore', 'ignore', 'pipe'] });
    const writerDone = new Promise<number | null>((resolve) => writer.once('close', resolve));
    const holder = fs.openSync(raw, 'r');
    try {
      await sleep(200);
      expect(writer.exitCode, 'the writer is still writing').to.equal(null);
      process.kill(pid, 'SIGKILL');
      await waitFor('the daemon to die', () => processGone(pid));
      await writerDone;
      expect(errnoOf(() => fs.statSync(mnt))).to.equal('ENOTCONN');
      // Past what dd reaches, so no cached page answers.
      expect(errnoOf(() => fs.readSync(holder, Buffer.alloc(512), 0, 512, 255 << 20))).to.equal('ENOTCONN');

      // The held descriptor would make a plain umount fail; qcowfs unmount still clears it.
      const r = qcowfs('unmount', mnt);
      expect(r.status, r.stderr).to.equal(0);
      expect(r.stderr).to.match(/gone/);
      expect(isMounted(mnt)).to.equal(false);
      expect(fs.statSync(mnt).isDirectory()).to.equal(true);
      expect(readRecord(mnt)).to.equal(null);
      // The killed daemon had nothing to say: its empty log goes with the mount.
      expect(fs.existsSync(logPath(mnt))).to.equal(false);
    } finally {
      // Closing a file of a dead mount reports ENOTCONN (its flush has no one to answer).
      try { fs.closeSync(holder); } catch { /* ENOTCONN */ }
    }
    const c = qemuCheck(img);
    expect(c.corruptions ?? 0).to.equal(0);
    expect(c['check-errors']).to.equal(0);
    // The mountpoint and the image are usable again at once.
    sb.mount(img, mnt);
    expect(fs.statSync(path.join(mnt, 'killed.raw')).size).to.equal(256 << 20);
    sb.unmount(mnt);
  });

  it('kill -9 of an idle daemon: umount -l clears the mount and a new mount reuses the mountpoint', async () => {
    const img = sb.path('lazy.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    qemuIo(img, ['write -P 3 0 1M']);
    const pid = sb.mount(img, mnt);
    process.kill(pid, 'SIGKILL');
    await waitFor('the daemon to die', () => processGone(pid));
    expect(isMounted(mnt)).to.equal(true);
    run('umount', ['-l', mnt]);
    expect(isMounted(mnt)).to.equal(false);
    expectCheckClean(img, { allowLeaks: true });
    // The stale record of the dead daemon does not block the next mount.
    const pid2 = sb.mount(img, mnt);
    expect(pid2).to.not.equal(pid);
    expect(daemonPid(mnt)).to.equal(pid2);
    const b = Buffer.alloc(4096);
    const fd = fs.openSync(path.join(mnt, 'lazy.raw'), 'r');
    fs.readSync(fd, b, 0, 4096, 0);
    fs.closeSync(fd);
    expect(b.equals(Buffer.alloc(4096, 3))).to.equal(true);
    sb.unmount(mnt);
    expectCheckClean(img);
  });

  /**
   * `stat -f` of a mountpoint. If it has not answered in 10 s (the daemon waiting on its own
   * mount), the mount's FUSE connection is aborted: that ends the wait (a signal cannot: the
   * request is already with the daemon), and the cleanup does not hang too.
   */
  async function statfsOf(mountpoint: string): Promise<{ blocks: number; bsize: number }> {
    const child = spawn('stat', ['-f', '-c', '%b %S', mountpoint], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    const code = await Promise.race([exited, sleep(10_000).then(() => 'timeout' as const)]);
    if (code === 'timeout') {
      abortFuseConnection(mountpoint);
      await exited;
      expect.fail(`stat -f ${mountpoint} did not answer in 10 s`);
    }
    expect(code, `stat -f ${mountpoint}`).to.equal(0);
    const [blocks, bsize] = out.trim().split(' ').map(Number);
    return { blocks, bsize };
  }

  it('a mount over the image itself, or over its directory, answers statfs with the host\'s numbers and unmounts', async () => {
    const dir = sb.mkdir('covered');
    const host = await statfsOf(dir);
    expect(host.blocks).to.be.greaterThan(0);
    // Over the image file itself, as QEMU's FUSE export is often used.
    const img = path.join(dir, 'self.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    qemuIo(img, ['write -P 7 0 64k']);
    sb.mount(img, img);
    expect(await statfsOf(img)).to.deep.equal(host);
    const b = Buffer.alloc(65536);
    const fd = fs.openSync(img, 'r');
    fs.readSync(fd, b, 0, b.length, 0);
    fs.closeSync(fd);
    expect(b.equals(Buffer.alloc(65536, 7)), 'the image, read through the mount over it').to.equal(true);
    sb.unmount(img);
    expectCheckClean(img);
    // Over the directory that holds the image.
    sb.mount(img, dir);
    expect(await statfsOf(dir)).to.deep.equal(host);
    expect(fs.readdirSync(dir)).to.deep.equal(['self.raw']);
    sb.unmount(dir);
    expectCheckClean(img);
  });

  it('SIGKILL in the middle of fsynced writes, four times over: never a corruption, fsynced blocks kept', async () => {
    const img = sb.path('kills.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
    const block = 256 * 1024;
    const acked = new Map<number, number>(); // block -> fill byte, acknowledged by fsync
    for (let round = 0; round < 4; round++) {
      const pid = sb.mount(img, mnt);
      const script = `
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for i in range(200):
    b = (i * 37 + ${round} * 11) % 256
    v = ${round} * 50 + 1 + (i % 40)
    os.pwrite(fd, bytes([v]) * ${block}, b * ${block})
    os.fsync(fd)
    print(b, v, flush=True)
`;
      const writer = spawn('python3', ['-c', script, path.join(mnt, 'kills.raw')], { stdio: ['ignore', 'pipe', 'ignore'] });
      const done = new Promise((r) => writer.once('close', r));
      let out = '';
      writer.stdout.on('data', (d: Buffer) => { out += d.toString(); });
      await waitFor('the first acknowledged write', () => out.includes('\n'), 10000);
      await sleep(50 + round * 60);
      process.kill(pid, 'SIGKILL');
      await done;
      for (const line of out.split('\n').filter(Boolean)) {
        const [b, v] = line.split(' ').map(Number);
        acked.set(b, v);
      }
      const r = qcowfs('unmount', mnt);
      expect(r.status, r.stderr).to.equal(0);
      expect(isMounted(mnt)).to.equal(false);
      const c = qemuCheck(img);
      expect(c.corruptions ?? 0, `round ${round}`).to.equal(0);
      expect(c['check-errors']).to.equal(0);
      // Leaked clusters from the kill are reclaimed, as a user would.
      expect(qcowfs('check', '--repair', img).status).to.equal(0);
      expectCheckClean(img);
    }
    expect(acked.size).to.be.greaterThan(0);
    const data = qemuRaw(img);
    for (const [b, v] of acked) {
      const got = data.subarray(b * block, (b + 1) * block);
      // A later, unacknowledged write of the same block may have replaced it, but never with a mix.
      if (!got.equals(Buffer.alloc(block, v))) expect(got.every((x) => x === got[0]), `block ${b}`).to.equal(true);
    }
  });
});

describe('qcowfs mount: errors a user meets first', function () {
  let sb: Sandbox;
  let mnt: string;
  let img: string;
  before(() => {
    sb = new Sandbox('qcowfs-errors-');
    mnt = sb.mkdir('mnt');
    img = sb.path('ok.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '1M');
  });
  afterEach(() => sb.cleanup({ keepDir: true }));
  after(() => sb.cleanup());

  for (const mode of [[], ['--foreground']]) {
    const label = mode.length ? 'in the foreground' : 'detached';
    it(`missing image, ${label}: one line, non-zero exit, nothing mounted`, () => {
      expectOneLineError(qcowfs('mount', ...mode, sb.path('nope.qcow2'), mnt), /nope\.qcow2: no such image/);
      expect(isMounted(mnt)).to.equal(false);
    });

    it(`missing mountpoint, ${label}: one line, non-zero exit`, () => {
      expectOneLineError(qcowfs('mount', ...mode, img, sb.path('no-such-dir')), /no-such-dir does not exist/);
      expect(fs.existsSync(sb.path('no-such-dir'))).to.equal(false);
    });
  }

  it('a file that is not a qcow2 image: one line, non-zero exit, nothing mounted', () => {
    const junk = sb.path('junk.qcow2');
    fs.writeFileSync(junk, Buffer.alloc(65536, 0x41));
    expectOneLineError(qcowfs('mount', junk, mnt), /junk\.qcow2/);
    expect(isMounted(mnt)).to.equal(false);
  });

  it('a mountpoint that is already a qcowfs mount; unmounting what is not mounted; no arguments', () => {
    sb.mount(img, mnt);
    expectOneLineError(qcowfs('mount', img, mnt), /already a qcowfs mount/);
    sb.unmount(mnt);
    expectOneLineError(qcowfs('unmount', mnt), /not mounted/);
    const usage = qcowfs('mount', img);
    expect(usage.status).to.equal(2);
    expect(usage.stderr).to.match(/^qcowfs: /);
    expect(usage.stderr).to.not.match(/\bat .*\.js:\d+/);
  });
});
