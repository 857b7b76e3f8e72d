/**
 * Writes into clusters that already hold data, through a real mount: the
 * image's own clusters are written in place (on the spot when nothing is in
 * the way), clusters shared with an internal snapshot are copied first, and
 * QEMU then reads the new bytes, the old ones around them and the snapshot's
 * untouched.
 */
import { expect } from 'chai';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, patternBuffer } from '../../helpers/qemu';
import { Sandbox, expectCheckClean, qemuConvertRaw } from '../../helpers/mount';

const KiB = 1024;
const MiB = 1024 * KiB;

describe('qcowfs mount: writes over existing data', function () {
  let sb: Sandbox;
  let mnt: string;
  before(() => {
    sb = new Sandbox('qcowfs-inplace-');
    mnt = sb.mkdir('mnt');
  });
  afterEach(() => sb.cleanup({ keepDir: true }));
  after(() => sb.cleanup());

  it('writes the image\'s own clusters in place and copies those a snapshot shares; QEMU reads both and the snapshot intact', () => {
    const img = sb.path('d.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
    qemuIo(img, ['write -P 0x11 0 32M']);
    qemuImg('snapshot', '-c', 'before', img);
    qemuIo(img, ['write -P 0x22 0 8M']); // the first 8 MiB are the image's own again
    const want = Buffer.alloc(64 * MiB);
    want.fill(0x11, 0, 32 * MiB);
    want.fill(0x22, 0, 8 * MiB);

    sb.mount(img, mnt);
    const raw = path.join(mnt, 'd.raw');
    const fd = fs.openSync(raw, fs.constants.O_WRONLY);
    try {
      // 4 KiB writes, each its own request (the open is write-only: direct I/O), some of them twice:
      // into owned clusters, and into shared ones (the first write to each copies the cluster).
      let n = 0;
      for (const base of [1 * MiB, 3 * MiB + 512 * KiB, 12 * MiB, 20 * MiB + 60 * KiB]) {
        for (let i = 0; i < 48; i++) {
          const at = base + (i % 32) * 4 * KiB;
          const data = patternBuffer(4 * KiB, ++n);
          expect(fs.writeSync(fd, data, 0, data.length, at)).to.equal(data.length);
          data.copy(want, at);
        }
      }
    } finally {
      fs.closeSync(fd);
    }
    const back = fs.readFileSync(raw);
    expect(back.equals(want), 'read back through the mount').to.equal(true);
    sb.unmount(mnt);

    expectCheckClean(img);
    expect(fs.readFileSync(qemuConvertRaw(img, sb.path('now.raw'))).equals(want), 'the image, as QEMU reads it').to.equal(true);
    const snap = fs.readFileSync(qemuConvertRaw(img, sb.path('before.raw'), { snapshot: 'before' }));
    const old = Buffer.alloc(64 * MiB);
    old.fill(0x11, 0, 32 * MiB);
    expect(snap.equals(old), 'the snapshot, as QEMU reads it').to.equal(true);
  });
});
