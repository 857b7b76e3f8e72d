/**
 * The libfuse transport through the real CLI: as root and as an
 * unprivileged user (through the setuid fusermount), the same raw view.
 */
import { expect } from 'chai';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, qemuRaw, qemuCheck, tmpDir, run } from '../../helpers/qemu';

const BIN = path.resolve(__dirname, '../../../../bin/qcowfs');

function mounted(p: string): boolean {
  return fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === p);
}

describe('libfuse transport (fuse-native through fusermount)', function () {
  let dir: string;
  let mnt: string;
  let fuseMode: number;
  before(() => {
    dir = tmpDir();
    fs.chmodSync(dir, 0o755);
    mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt);
    // Stock Debian has /dev/fuse 0666; this machine may not.
    fuseMode = fs.statSync('/dev/fuse').mode & 0o777;
    fs.chmodSync('/dev/fuse', 0o666);
  });
  afterEach(() => {
    if (mounted(mnt)) {
      run('fusermount', ['-u', mnt], { allowFail: true });
      if (mounted(mnt)) run('umount', ['-l', mnt], { allowFail: true });
    }
  });
  after(() => {
    fs.chmodSync('/dev/fuse', fuseMode);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function image(name: string): string {
    const img = path.join(dir, name);
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
    qemuIo(img, ['write -P 1 0 3M', 'write -z 4M 1M', 'write -c -P 2 8M 1M']);
    return img;
  }

  it('as root: reads byte-exact, writes, truncates, and QEMU finds the image clean', () => {
    const img = image('root.qcow2');
    const want = qemuRaw(img);
    const r = run(process.execPath, [BIN, 'mount', '--transport', 'libfuse', img, mnt], { allowFail: true });
    expect(r.status, r.stderr).to.equal(0);
    const raw = path.join(mnt, 'root.raw');
    expect(fs.readFileSync(raw).equals(want)).to.equal(true);
    const fd = fs.openSync(raw, 'r+');
    fs.writeSync(fd, Buffer.alloc(70000, 7), 0, 70000, 5000);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    run('truncate', ['-s', '20M', raw]);
    expect(fs.statSync(raw).size).to.equal(20 * 1024 * 1024);
    want.fill(7, 5000, 75000);
    const after = fs.readFileSync(raw);
    expect(after.subarray(0, want.length).equals(want)).to.equal(true);
    expect(run(process.execPath, [BIN, 'unmount', mnt], { allowFail: true }).status).to.equal(0);
    expect(mounted(mnt)).to.equal(false);
    const c = qemuCheck(img);
    expect((c.leaks ?? 0) + (c.corruptions ?? 0) + c['check-errors']).to.equal(0);
    expect(qemuRaw(img).equals(after)).to.equal(true);
  });

  it('as an unprivileged user through fusermount', () => {
    const img = image('user.qcow2');
    fs.chmodSync(img, 0o666);
    run('chown', ['nobody:nogroup', mnt]);
    const want = qemuRaw(img);
    const asNobody = (...args: string[]) => run('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', process.execPath, BIN, ...args], { allowFail: true });
    const r = asNobody('mount', img, mnt);
    expect(r.status, r.stderr).to.equal(0);
    expect(mounted(mnt)).to.equal(true);
    // Without allow_other only the mounting user may look: read as that user.
    const sum = run('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', 'sha256sum', path.join(mnt, 'user.raw')]).stdout.split(' ')[0];
    const wantSum = crypto.createHash('sha256').update(want).digest('hex');
    expect(sum).to.equal(wantSum);
    const u = asNobody('unmount', mnt);
    expect(u.status, u.stderr).to.equal(0);
    expect(mounted(mnt)).to.equal(false);
  });
});
