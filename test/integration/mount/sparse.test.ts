/**
 * Sparseness through the mount: `cp --sparse=always` out of a 64 GiB image
 * holding a few MiB of data copies only the data (it walks SEEK_DATA and
 * SEEK_HOLE), and the copy has the image's content.
 */
import { expect } from 'chai';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, patternBuffer, run } from '../../helpers/qemu';
import { Sandbox, seekDataRanges, qemuDataRanges, sha256Range, expectCheckClean } from '../../helpers/mount';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

/** The union of two sorted lists of [start, end) ranges, merged. */
function union(a: Array<[number, number]>, b: Array<[number, number]>): Array<[number, number]> {
  const all = [...a, ...b].sort((x, y) => x[0] - y[0]);
  const out: Array<[number, number]> = [];
  for (const [s, e] of all) {
    const last = out[out.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  }
  return out;
}

describe('qcowfs mount: sparse copies', function () {
  let sb: Sandbox;
  before(() => { sb = new Sandbox('qcowfs-sparse-'); });
  afterEach(() => sb.cleanup({ keepDir: true }));
  after(() => sb.cleanup());

  it('cp --sparse=always of a 64 GiB image with a few MiB of data is small and has the same content', () => {
    const img = sb.path('big.qcow2');
    const size = 64 * GiB;
    qemuImg('create', '-q', '-f', 'qcow2', img, String(size));
    const src = sb.path('random.src');
    fs.writeFileSync(src, patternBuffer(MiB, 9));
    qemuIo(img, [
      'write -P 1 0 1M',
      `write -s ${src} ${20 * GiB + 4096} 1M`,
      'write -c -P 3 30G 64k',
      'write -z 40G 1M',
      `write -P 4 ${size - 4096} 4096`,
    ]);
    const wantData = qemuDataRanges(img);
    const mnt = sb.mkdir('mnt');
    sb.mount(img, mnt);
    const raw = path.join(mnt, 'big.raw');
    expect(fs.statSync(raw).size).to.equal(size);
    const mountData = seekDataRanges(raw);
    expect(mountData).to.deep.equal(wantData);

    const copy = sb.path('copy.raw');
    run('cp', ['--sparse=always', raw, copy]);
    const st = fs.statSync(copy);
    expect(st.size).to.equal(size);
    // About 3.1 MiB of data; allow for the host file system's allocation granularity.
    expect(st.blocks * 512).to.be.lessThan(16 * MiB);

    // Equal content: wherever either file holds data the bytes agree; everywhere
    // else both are holes, which read as zeroes (the mount's holes are qemu-img
    // map's non-data ranges, which read as zeroes with no backing file).
    const copyData = seekDataRanges(copy);
    const ranges = union(copyData, mountData);
    expect(ranges.reduce((n, [s, e]) => n + e - s, 0)).to.be.lessThan(16 * MiB);
    for (const [s, e] of ranges) {
      expect(sha256Range(copy, s, e - s), `range ${s}-${e}`).to.equal(sha256Range(raw, s, e - s));
    }
    // And the content is the one written, not merely the same wrong bytes on both sides.
    expect(fs.readFileSync(src).equals(readAt(copy, 20 * GiB + 4096, MiB))).to.equal(true);
    expect(readAt(copy, 30 * GiB, 65536).equals(Buffer.alloc(65536, 3))).to.equal(true);
    expect(readAt(copy, size - 4096, 4096).equals(Buffer.alloc(4096, 4))).to.equal(true);
    expect(readAt(copy, 40 * GiB, MiB).equals(Buffer.alloc(MiB))).to.equal(true);
    fs.rmSync(copy);
    sb.unmount(mnt);
    expectCheckClean(img);
  });
});

function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    expect(fs.readSync(fd, b, 0, length, offset)).to.equal(length);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}
