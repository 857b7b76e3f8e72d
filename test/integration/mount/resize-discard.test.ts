/**
 * Changing the disk through the raw file: truncate(1) grows and shrinks it
 * to any byte size (QEMU agrees, rounding an odd size down to 512 as it
 * reads it), and fallocate(1) punches holes and zeroes ranges that then read
 * back as zeroes, with clusters freed or made zero clusters.
 */
import { expect } from 'chai';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, qemuInfo, run } from '../../helpers/qemu';
import { Sandbox, qcowfs, expectCheckClean, expectSameBytes, qemuConvertRaw, seekDataRanges, qemuDataRanges } from '../../helpers/mount';

const MiB = 1024 * 1024;

describe('qcowfs mount: truncate and fallocate on the raw view', function () {
  let sb: Sandbox;
  let mnt: string;
  before(() => {
    sb = new Sandbox('qcowfs-resize-');
    mnt = sb.mkdir('mnt');
  });
  afterEach(() => sb.cleanup({ keepDir: true }));
  after(() => sb.cleanup());

  it('truncate -s grows and shrinks to odd and even sizes; qemu-img info and the content agree after each', () => {
    const img = sb.path('trunc.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
    qemuIo(img, ['write -P 1 0 16M']);
    const raw = path.join(mnt, 'trunc.raw');
    // The model: pattern 1 up to the smallest size seen so far, zeroes after it.
    let keep = 16 * MiB;
    const steps = [40 * MiB + 3, 10000001, 12 * MiB, 1000, 3 * MiB + 511, 100 * MiB, 65536];
    for (const size of steps) {
      sb.mount(img, mnt);
      run('truncate', ['-s', String(size), raw]);
      keep = Math.min(keep, size);
      expect(fs.statSync(raw).size, `after truncate -s ${size}`).to.equal(size);
      const seen = fs.readFileSync(raw);
      expect(seen.length).to.equal(size);
      const want = Buffer.alloc(size);
      want.fill(1, 0, keep);
      expect(seen.equals(want), `content after truncate -s ${size}`).to.equal(true);
      sb.unmount(mnt);

      expect(qemuInfo(img)['virtual-size'], `qemu-img info after truncate -s ${size}`).to.equal(Math.floor(size / 512) * 512);
      expect(JSON.parse(qcowfs('info', '--json', img).stdout)['virtual-size']).to.equal(size);
      expectCheckClean(img);
      const q = fs.readFileSync(qemuConvertRaw(img, sb.path('trunc.want')));
      expect(q.equals(want.subarray(0, Math.floor(size / 512) * 512)), `qemu's view after truncate -s ${size}`).to.equal(true);
    }
  });

  it('truncate of an image with a backing file: shrunk-off backing data does not come back on growing', () => {
    const base = sb.path('tb-base.qcow2');
    const top = sb.path('tb-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '8M');
    qemuIo(base, ['write -P 7 0 8M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'tb-base.qcow2', '-F', 'qcow2', top, '8M');
    const raw = path.join(mnt, 'tb-top.raw');
    sb.mount(top, mnt);
    run('truncate', ['-s', '3000000', raw]);
    run('truncate', ['-s', String(8 * MiB), raw]);
    const seen = fs.readFileSync(raw);
    const want = Buffer.alloc(8 * MiB);
    want.fill(7, 0, 3000000);
    expect(seen.equals(want)).to.equal(true);
    sb.unmount(mnt);
    expectCheckClean(top);
    expect(fs.readFileSync(qemuConvertRaw(top, sb.path('tb.want'))).equals(want)).to.equal(true);
  });

  it('fallocate --punch-hole and --zero-range read back as zeroes, free or zero whole clusters, and keep the image clean', () => {
    const img = sb.path('holes.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
    qemuIo(img, ['write -P 1 0 16M']);
    const raw = path.join(mnt, 'holes.raw');
    const model = Buffer.alloc(16 * MiB, 1);
    const ops: Array<[string, number, number]> = [
      ['--punch-hole', 1 * MiB, 2 * MiB], // whole clusters
      ['--punch-hole', 5 * MiB + 1000, 200000], // partial clusters at both ends
      ['--zero-range', 8 * MiB, 1 * MiB],
      ['--zero-range', 10 * MiB + 77, 1000000],
      ['--punch-hole', 12 * MiB + 65536 - 1, 2], // straddles a cluster boundary
      ['--zero-range', 13 * MiB + 17, 100],
      ['--punch-hole', 15 * MiB + 512 * 1024, 4 * MiB], // past the end: the size stays
    ];
    sb.mount(img, mnt);
    for (const [op, off, len] of ops) {
      run('fallocate', [op, '--offset', String(off), '--length', String(len), raw]);
      model.fill(0, off, Math.min(off + len, model.length));
      expect(fs.statSync(raw).size, `${op} ${off}+${len}`).to.equal(16 * MiB);
    }
    expect(fs.readFileSync(raw).equals(model)).to.equal(true);
    // Whole clusters punched or zeroed are holes for SEEK_HOLE; nothing else is.
    const holes = [[1 * MiB, 3 * MiB], [8 * MiB, 9 * MiB]];
    const dataRanges = seekDataRanges(raw);
    for (const [s, e] of holes) {
      expect(dataRanges.some(([ds, de]) => ds < e && de > s), `hole ${s}-${e}`).to.equal(false);
    }
    // zero-range past the end without --keep-size grows the file, zeroes included.
    run('fallocate', ['--zero-range', '--offset', String(16 * MiB - 4096), '--length', String(MiB), raw]);
    expect(fs.statSync(raw).size).to.equal(17 * MiB - 4096);
    const grown = Buffer.concat([model.subarray(0, 16 * MiB - 4096), Buffer.alloc(MiB)]);
    expect(fs.readFileSync(raw).equals(grown)).to.equal(true);
    sb.unmount(mnt);

    expectCheckClean(img);
    expectSameBytes(qemuConvertRaw(img, sb.path('holes.want')), writeTmp(sb.path('holes.model'), grown));
    const qemuData = qemuDataRanges(img);
    for (const [s, e] of holes) {
      expect(qemuData.some(([ds, de]) => ds < e && de > s), `qemu-img map data over ${s}-${e}`).to.equal(false);
    }
    sb.mount('--read-only', img, mnt);
    expect(seekDataRanges(raw)).to.deep.equal(qemuData);
    sb.unmount(mnt);
  });
});

function writeTmp(p: string, b: Buffer): string {
  fs.writeFileSync(p, b);
  return p;
}
