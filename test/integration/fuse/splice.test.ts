/**
 * READ replies spliced from file ranges (FuseFilesystem.readSlices and
 * native/splice.c), mounted for real: the bytes that arrive are the slices'
 * bytes, zero runs read as zeroes, every slice set is released exactly once,
 * and a filesystem that cannot describe a read (null) or whose slices cannot
 * be spliced is answered through read() instead.
 */
import { expect } from 'chai';
import { randomBytes } from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { type FileSlices, type NodeId, type RequestContext } from '../../../src/fuse/filesystem';
import { canMountKernel } from '../../../src/fuse/mount';
import { readRequestMax, SPLICE_MIN_BYTES } from '../../../src/fuse/session';
import { loadNative } from '../../../src/io/native';
import { MemoryFs } from './memory-fs';
import { cleanupMount, mountForTest, shOk, type TestMount } from './harness';

const KiB = 1024;
const MiB = 1 << 20;

type Mode = 'file' | 'split' | 'null' | 'badfd';

/** MemoryFs whose file is mirrored in a host file, described by readSlices. */
class SlicedFs extends MemoryFs {
  mode: Mode = 'file';
  /** A zero run of the data, served as an fd -1 slice in 'split' mode. */
  zeroRun: [number, number] = [0, 0];
  readonly sliceCalls: number[] = [];
  /** Slice sets handed out, and released. */
  lent = 0;
  released = 0;
  private readonly fd: number;

  constructor(readonly hostFile: string, data: Buffer) {
    super({ initialSize: 0 });
    this.preload(0, data);
    fs.writeFileSync(hostFile, data);
    this.fd = fs.openSync(hostFile, 'r');
  }

  /** Sizes of the reads answered by read() (not counting reads at the end of the file). */
  readonly readSizes: number[] = [];

  override read(ctx: RequestContext, nodeid: NodeId, fh: number, offset: number, size: number, into?: Buffer): Promise<Buffer> {
    if (offset < this.size) this.readSizes.push(size);
    return super.read(ctx, nodeid, fh, offset, size, into);
  }

  close(): void {
    fs.closeSync(this.fd);
  }

  async readSlices(_ctx: RequestContext, nodeid: NodeId, _fh: number, offset: number, size: number): Promise<FileSlices | null> {
    expect(nodeid).to.equal(this.fileIno);
    this.sliceCalls.push(size);
    const end = Math.min(this.size, offset + size);
    if (this.mode === 'null' || end <= offset) return null;
    const fd = this.mode === 'badfd' ? 987654 : this.fd;
    let slices = [{ fd, position: offset, length: end - offset }];
    if (this.mode === 'split') {
      const [z0, z1] = this.zeroRun;
      slices = [];
      let at = offset;
      for (const [a, b, zero] of [[offset, Math.min(end, z0), false], [Math.max(offset, z0), Math.min(end, z1), true], [Math.max(offset, z1), end, false]] as const) {
        if (b <= a) continue;
        expect(a).to.equal(at);
        slices.push(zero ? { fd: -1, position: 0, length: b - a } : { fd: this.fd, position: a, length: b - a });
        at = b;
      }
    }
    let done = false;
    this.lent++;
    return {
      slices,
      release: () => {
        expect(done, 'released twice').to.equal(false);
        done = true;
        this.released++;
      },
    };
  }
}

describe('FUSE kernel transport: spliced READ replies', function () {
  this.timeout(60_000);
  let t: TestMount | undefined;
  let sfs: SlicedFs | undefined;
  let dir: string;

  before(function () {
    if (!canMountKernel()) throw new Error('these tests need root and /dev/fuse');
    if (loadNative() === null) throw new Error('the native module is not built (npm run build)');
  });

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-splice-'));
  });

  afterEach(async () => {
    await cleanupMount(t);
    t = undefined;
    sfs?.close();
    sfs = undefined;
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function mountSliced(data: Buffer): Promise<{ file: string; expected: string }> {
    sfs = new SlicedFs(path.join(dir, 'host.bin'), data);
    t = await mountForTest(sfs);
    const expected = path.join(dir, 'expected.bin');
    fs.writeFileSync(expected, data);
    return { file: path.join(t.mountpoint, sfs.fileName), expected };
  }

  it('asks for reads whose replies fit a pipe, and serves them from the slices', async () => {
    const data = randomBytes(8 * MiB + 12345);
    const { file, expected } = await mountSliced(data);
    await shOk(`cmp ${file} ${expected}`);
    // O_DIRECT reads of 1 MiB: requests of max_read (the test mount keeps the kernel's small readahead).
    await shOk(`dd if=${file} iflag=direct bs=1M status=none | cmp - ${expected}`);
    const large = sfs!.sliceCalls.filter((n) => n >= SPLICE_MIN_BYTES);
    expect(large.length).to.be.greaterThan(0);
    // Every read asked as slices was spliced: read() saw only the small ones.
    expect(large.length).to.equal(sfs!.sliceCalls.length);
    expect(sfs!.readSizes.filter((n) => n >= SPLICE_MIN_BYTES)).to.deep.equal([]);
    expect(sfs!.released).to.equal(sfs!.lent);
    expect(sfs!.lent).to.be.at.least(sfs!.sliceCalls.length - 1); // the read at the end of the file gets null
    // max_read: the largest reply that fits a pipe this process may have (512 KiB without CAP_SYS_RESOURCE).
    const capacity = loadNative()!.pipeCapacity(2 * MiB);
    const maxRead = readRequestMax(sfs!, { maxRequestBytes: MiB } as never);
    expect(maxRead + 4096).to.be.at.most(capacity);
    expect(Math.max(...sfs!.sliceCalls)).to.be.at.most(maxRead);
    expect(t!.mount.session.connection!.maxRead).to.equal(maxRead);
  });

  it('reads runs of zeroes between file ranges, and direct reads of any alignment', async () => {
    const data = randomBytes(4 * MiB);
    data.fill(0, 1 * MiB + 4096, 2 * MiB + 777);
    const { file, expected } = await mountSliced(data);
    sfs!.mode = 'split';
    sfs!.zeroRun = [1 * MiB + 4096, 2 * MiB + 777];
    await shOk(`cmp ${file} ${expected}`);
    for (const [skip, count] of [[0, 1], [3, 5], [7, 9]]) {
      await shOk(`dd if=${file} iflag=direct,skip_bytes,count_bytes bs=${384 * KiB + 1000} skip=${skip * 100000} count=${count * 100000} status=none ` +
        `| cmp - ${expected} -i 0:${skip * 100000} -n ${count * 100000}`);
    }
    expect(sfs!.sliceCalls.filter((n) => n >= SPLICE_MIN_BYTES).length).to.be.greaterThan(0);
    expect(sfs!.released).to.equal(sfs!.lent);
  });

  it('reads as zeroes past the end of a host file that ends inside a slice, from any alignment', async () => {
    const data = randomBytes(4 * MiB);
    const cut = 3 * MiB + 4095; // the host file ends one byte before a page boundary
    data.fill(0, cut);
    const { file, expected } = await mountSliced(data);
    fs.truncateSync(sfs!.hostFile, cut);
    // Direct reads of 385 KiB (spliced) that start just before the end, in the page before it
    // and a page earlier: their slice takes the file's last pages, then the zero page.
    for (const start of [cut - 1, cut - 4000, cut - 300001, 3 * MiB - 1]) {
      await shOk(`dd if=${file} iflag=direct,skip_bytes,count_bytes bs=${384 * KiB + 1000} skip=${start} count=600000 status=none ` +
        `| cmp - ${expected} -i 0:${start} -n 600000`);
    }
    await shOk(`cmp ${file} ${expected}`);
    expect(sfs!.sliceCalls.filter((n) => n >= SPLICE_MIN_BYTES).length).to.be.greaterThan(0);
    // Every one was spliced: read() answered none of the large reads.
    expect(sfs!.readSizes.filter((n) => n >= SPLICE_MIN_BYTES)).to.deep.equal([]);
    expect(sfs!.released).to.equal(sfs!.lent);
  });

  it('answers through read() when the filesystem has no slices, or they cannot be spliced', async () => {
    const data = randomBytes(2 * MiB);
    const { file, expected } = await mountSliced(data);
    for (const mode of ['null', 'badfd'] as const) {
      sfs!.mode = mode;
      const reads = sfs!.stats.reads;
      const calls = sfs!.sliceCalls.length;
      const released = sfs!.released;
      await shOk(`dd if=${file} iflag=direct bs=256k status=none | cmp - ${expected}`);
      // Eight 256 KiB reads (SPLICE_MIN_BYTES), each asked as slices first and then answered by read().
      expect(sfs!.sliceCalls.length - calls, mode).to.equal(8);
      expect(sfs!.stats.reads - reads, mode).to.equal(8);
      // Slices that could not be spliced are still released, once each.
      expect(sfs!.released - released, mode).to.equal(mode === 'badfd' ? 8 : 0);
    }
  });
});
