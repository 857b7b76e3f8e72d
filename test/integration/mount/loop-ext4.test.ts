/**
 * The raw view as a block device: losetup, mkfs.ext4, files written and
 * deleted, fstrim discarding what they freed, then everything taken down in
 * order. QEMU finds the image clean, and a second mount shows the same
 * file system, which e2fsck accepts.
 */
import { expect } from 'chai';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, patternBuffer, run } from '../../helpers/qemu';
import { Sandbox, expectCheckClean, qemuMap, isMounted } from '../../helpers/mount';

function sha(buf: Buffer): string {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

/** Every regular file under `dir`, relative name -> sha256. */
function tree(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) { if (e.name !== 'lost+found') walk(p); } else if (e.isFile()) out[path.relative(dir, p)] = sha(fs.readFileSync(p));
    }
  };
  walk(dir);
  return out;
}

function allocatedBytes(image: string): number {
  return (qemuMap(image) as Array<{ data: boolean; present?: boolean; length: number; depth: number }>)
    .filter((e) => e.data && e.depth === 0).reduce((n, e) => n + e.length, 0);
}

describe('qcowfs mount: a loop-mounted ext4 on the raw view', function () {
  let sb: Sandbox;
  before(() => { sb = new Sandbox('qcowfs-loop-'); });
  afterEach(() => sb.cleanup({ keepDir: true }));
  after(() => sb.cleanup());

  // The loop driver writes through the page cache of the raw file by default; with
  // `losetup --direct-io=on` it sends O_DIRECT reads and writes, several in flight
  // (FUSE's async direct I/O); with `mount --direct-io` the file itself is direct.
  const variants = [
    { name: '', mountArgs: [] as string[], loopArgs: [] as string[], dio: '0' },
    { name: ' (losetup --direct-io=on)', mountArgs: [], loopArgs: ['--direct-io=on'], dio: '1' },
    { name: ' (mount --direct-io)', mountArgs: ['--direct-io'], loopArgs: [], dio: '0' },
  ];
  for (const v of variants) it(`mkfs, write, delete, fstrim, unmount in order: qemu-img check clean, files intact on a second mount, e2fsck clean${v.name}`, () => {
    const img = sb.path('ext4.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '256M');
    const mnt = sb.mkdir('mnt');
    const fsDir = sb.mkdir('fs');
    sb.mount(...v.mountArgs, img, mnt);
    const raw = path.join(mnt, 'ext4.raw');

    const loop = run('losetup', [...v.loopArgs, '--find', '--show', raw]).stdout.trim();
    sb.trackLoop(loop);
    expect(loop).to.match(/^\/dev\/loop\d+$/);
    expect(run('losetup', ['--list', '--noheadings', '--output', 'DIO', loop]).stdout.trim()).to.equal(v.dio);
    run('mkfs.ext4', ['-q', '-E', 'nodiscard', loop]);
    sb.track(fsDir);
    run('mount', [loop, fsDir]);
    fs.mkdirSync(path.join(fsDir, 'keep/deep'), { recursive: true });
    fs.mkdirSync(path.join(fsDir, 'gone'));
    for (let i = 0; i < 12; i++) fs.writeFileSync(path.join(fsDir, 'keep', `small${i}`), patternBuffer(1000 + i * 4097, i));
    fs.writeFileSync(path.join(fsDir, 'keep/deep/big'), patternBuffer(20 << 20, 100));
    for (let i = 0; i < 30; i++) fs.writeFileSync(path.join(fsDir, 'gone', `f${i}`), patternBuffer(1 << 20, 200 + i));
    fs.symlinkSync('deep/big', path.join(fsDir, 'keep/link'));
    run('sync', ['-f', fsDir]);
    fs.rmSync(path.join(fsDir, 'gone'), { recursive: true });
    const want = tree(fsDir);
    expect(Object.keys(want)).to.have.length(13);
    run('sync', ['-f', fsDir]);
    run('fstrim', [fsDir]);
    run('umount', [fsDir]);
    run('losetup', ['-d', loop]);
    sb.unmount(mnt);

    expectCheckClean(img);
    // fstrim discarded the 30 MiB freed by the deletions: what stays allocated is
    // the 21 MiB kept plus ext4's metadata (journal 8 MiB, tables), well under 30 + 21.
    expect(allocatedBytes(img)).to.be.lessThan(40 << 20);

    sb.mount(img, mnt);
    const e2 = run('e2fsck', ['-fn', raw], { allowFail: true });
    expect(e2.status, e2.stdout + e2.stderr).to.equal(0);
    run('mount', ['-o', 'ro,loop', raw, fsDir]);
    expect(isMounted(fsDir)).to.equal(true);
    expect(tree(fsDir)).to.deep.equal(want);
    expect(fs.readlinkSync(path.join(fsDir, 'keep/link'))).to.equal('deep/big');
    expect(fs.existsSync(path.join(fsDir, 'gone'))).to.equal(false);
    run('umount', [fsDir]);
    sb.unmount(mnt);
    expectCheckClean(img);
  });
});
