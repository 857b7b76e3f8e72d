/**
 * The write engine on an in-memory device: cluster reuse, refcount widths,
 * refcount table and L1 growth, copy-on-write of snapshot-shared clusters
 * and corruption found while writing. Where a claim is about the format,
 * the memory image is also written to a file and shown to qemu-img.
 */
import { expect } from 'chai';
import * as fs from 'fs';
import * as path from 'path';
import { MemoryDevice } from '../../../src/io/memory-device';
import { Qcow2Image, createOnDevice, checkImage, CorruptImageError, CreateOptions } from '../../../src/qcow2';
import { readRefcountEntry, writeRefcountEntry } from '../../../src/qcow2/refcount';
import { readL2Entry, entryOffset, isCopied } from '../../../src/qcow2/l2-entry';
import { QCOW2_INCOMPAT_CORRUPT } from '../../../src/qcow2/constants';
import { qemuImg, qemuIo, qemuRaw, qemuCheck, qemuInfo, tmpDir, patternBuffer } from '../../helpers/qemu';
import { Rng, Model, randomOp, applyToEngine, testSeed } from '../../integration/qcow2/write-harness';

const KiB = 1024;
const MiB = 1024 * 1024;

let scratch: string;
before(() => {
  scratch = tmpDir('qcowfs-unit-write-');
});
after(() => {
  fs.rmSync(scratch, { recursive: true, force: true });
});

let fileNo = 0;
/** The device's bytes as a file QEMU can open. */
function toFile(dev: MemoryDevice): string {
  const file = path.join(scratch, `img-${++fileNo}.qcow2`);
  fs.writeFileSync(file, dev.contents());
  return file;
}

function expectQemuClean(dev: MemoryDevice, what: string): string {
  const file = toFile(dev);
  const c = qemuCheck(file);
  expect({ leaks: c.leaks ?? 0, corruptions: c.corruptions ?? 0, errors: c['check-errors'] }, `${what}: qemu-img check`).to.deep.equal({ leaks: 0, corruptions: 0, errors: 0 });
  return file;
}

async function newImage(opts: CreateOptions): Promise<{ dev: MemoryDevice; img: Qcow2Image }> {
  const dev = new MemoryDevice();
  await createOnDevice(dev, opts);
  const img = await Qcow2Image.open(dev);
  return { dev, img };
}

describe('qcow2 write engine (memory device)', () => {
  describe('cluster allocation', () => {
    it('reuses clusters freed by discard, so the file stays compact', async () => {
      const { dev, img } = await newImage({ size: 16 * MiB, clusterSize: 64 * KiB });
      await img.write(patternBuffer(4 * MiB, 1), 0);
      await img.flush();
      const sizeAfterFirst = dev.size();
      await img.discard(0, 4 * MiB);
      await img.flush();
      // Different guest offsets, same amount of data: the freed host clusters take it.
      await img.write(patternBuffer(4 * MiB, 2), 8 * MiB);
      await img.flush();
      // At most one more L2 table... none needed here: 16 MiB fits one table.
      expect(dev.size()).to.equal(sizeAfterFirst);
      const back = Buffer.alloc(4 * MiB);
      await img.read(back, 8 * MiB);
      expect(back.equals(patternBuffer(4 * MiB, 2))).to.equal(true);
      await img.close();
      const r = await checkImage(await Qcow2Image.open(new MemoryDevice(dev.contents())));
      expect({ leaks: r.leaks, corruptions: r.corruptions }).to.deep.equal({ leaks: 0, corruptions: 0 });
      const file = expectQemuClean(dev, 'after reuse');
      expect(qemuRaw(file).subarray(8 * MiB, 12 * MiB).equals(patternBuffer(4 * MiB, 2))).to.equal(true);
    });

    it('a write into part of a new cluster past the end of the file writes only its bytes; QEMU reads the rest as zeroes', async () => {
      const { dev, img } = await newImage({ size: 16 * MiB, clusterSize: 64 * KiB });
      await img.write(patternBuffer(64 * KiB, 4), 0); // the L2 table exists from here on
      await img.flush();
      const before = { ...dev.stats };
      const data = patternBuffer(4 * KiB, 5);
      await img.write(data, 10 * 64 * KiB + 8 * KiB);
      expect(dev.stats.bytesWritten - before.bytesWritten).to.equal(4 * KiB);
      expect(dev.stats.reads - before.reads).to.equal(0);
      await img.close();
      // The file ends inside the new cluster, as QEMU allows.
      expect(dev.size() % (64 * KiB)).to.not.equal(0);
      const expected = Buffer.alloc(16 * MiB);
      patternBuffer(64 * KiB, 4).copy(expected, 0);
      data.copy(expected, 10 * 64 * KiB + 8 * KiB);
      const file = expectQemuClean(dev, 'after a partial write past the end');
      expect(qemuRaw(file).equals(expected)).to.equal(true);
    });

    it('a write into part of a reused cluster zeroes the rest of it (the old data must not show through)', async () => {
      const { dev, img } = await newImage({ size: 16 * MiB, clusterSize: 64 * KiB });
      await img.write(patternBuffer(1 * MiB, 1), 0);
      await img.flush();
      await img.discard(0, 1 * MiB);
      await img.flush();
      const size = dev.size();
      const data = patternBuffer(4 * KiB, 6);
      await img.write(data, 8 * MiB + 12 * KiB);
      await img.flush();
      expect(dev.size(), 'a freed cluster was reused').to.equal(size);
      const back = Buffer.alloc(64 * KiB);
      await img.read(back, 8 * MiB);
      const expected = Buffer.alloc(64 * KiB);
      data.copy(expected, 12 * KiB);
      expect(back.equals(expected)).to.equal(true);
      await img.close();
      const file = expectQemuClean(dev, 'after a partial write into a reused cluster');
      expect(qemuRaw(file).subarray(8 * MiB, 8 * MiB + 64 * KiB).equals(expected)).to.equal(true);
    });

    it('a write that ends in a cluster the image owns and goes on into new ones reads nothing back', async () => {
      const { dev, img } = await newImage({ size: 16 * MiB, clusterSize: 64 * KiB });
      await img.write(patternBuffer(64 * KiB, 2), 0);
      await img.flush();
      const before = { ...dev.stats };
      const data = patternBuffer(100 * KiB, 7);
      await img.write(data, 60 * KiB);
      expect(dev.stats.reads - before.reads, 'reads').to.equal(0);
      expect(dev.stats.bytesWritten - before.bytesWritten, 'bytes written').to.equal(100 * KiB);
      await img.close();
      const expected = Buffer.alloc(16 * MiB);
      patternBuffer(64 * KiB, 2).copy(expected, 0);
      data.copy(expected, 60 * KiB);
      const file = expectQemuClean(dev, 'after a straddling write');
      expect(qemuRaw(file).equals(expected)).to.equal(true);
    });

    it('regression: a run of at least one refcount block of clusters where no block exists yet is allocated (it used to loop forever)', async function () {
      this.timeout(10000);
      // 512 B clusters with 64-bit refcounts: one block covers 64 clusters.
      const { dev, img } = await newImage({ size: 4 * MiB, clusterSize: 512, refcountBits: 64 });
      const rc = await img.refcountManager();
      expect(rc.entriesPerBlock).to.equal(64);
      const covered = rc.table.filter((b) => b !== 0).length;
      const start = await rc.allocate(200);
      const first = start / 512;
      for (let c = first; c < first + 200; c++) expect(await rc.get(c), `cluster ${c}`).to.equal(1);
      // The blocks that had to be added sit right after the run, not inside it.
      const added = rc.table.filter((b) => b !== 0).length - covered;
      expect(added).to.be.greaterThan(0);
      for (const b of rc.table) if (b !== 0) expect(b / 512 < first || b / 512 >= first + 200, `block at ${b}`).to.equal(true);
      // Give the run back so the image is consistent, then let QEMU judge.
      for (let c = first; c < first + 200; c++) await rc.set(c, 0);
      await img.write(patternBuffer(100 * KiB, 3), 1 * MiB + 7);
      await img.close();
      expectQemuClean(dev, 'after a long allocation');
    });
  });

  describe('refcount widths', () => {
    for (const order of [0, 1, 2, 3, 4, 5, 6]) {
      const bits = 2 ** order;
      it(`${bits}-bit entries keep their neighbours and hold the maximum`, () => {
        const block = Buffer.alloc(512);
        const max = bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
        const n = (512 * 8) / bits;
        for (let i = 0; i < n; i++) writeRefcountEntry(block, i, order, i % 3 === 0 ? max : i % (max + 1));
        for (let i = 0; i < n; i++) expect(readRefcountEntry(block, i, order), `entry ${i}`).to.equal(i % 3 === 0 ? max : i % (max + 1));
        writeRefcountEntry(block, 5, order, 0);
        expect(readRefcountEntry(block, 4, order)).to.equal(4 % (max + 1));
        expect(readRefcountEntry(block, 6, order)).to.equal(max);
      });

      it(`an image with refcount_bits=${bits} written by the engine passes qemu-img check`, async () => {
        const { dev, img } = await newImage({ size: 8 * MiB, clusterSize: 4 * KiB, refcountBits: bits });
        await img.write(patternBuffer(600 * KiB, bits), 12345);
        await img.writeZeroes(100 * KiB, 200 * KiB, { unmap: true });
        await img.write(patternBuffer(3 * KiB, bits + 1), 5 * MiB - 1000);
        await img.close();
        const file = expectQemuClean(dev, `refcount_bits=${bits}`);
        const info = qemuInfo(file) as { 'format-specific': { data: { 'refcount-bits': number } } };
        expect(info['format-specific'].data['refcount-bits']).to.equal(bits);
        const raw = qemuRaw(file);
        const expected = Buffer.alloc(8 * MiB);
        patternBuffer(600 * KiB, bits).copy(expected, 12345);
        expected.fill(0, 100 * KiB, 300 * KiB);
        patternBuffer(3 * KiB, bits + 1).copy(expected, 5 * MiB - 1000);
        expect(raw.equals(expected)).to.equal(true);
      });
    }
  });

  describe('growth of metadata', () => {
    it('grows the refcount table when the file outgrows it', async () => {
      const { dev, img } = await newImage({ size: 8 * MiB, clusterSize: 512, refcountBits: 64 });
      const before = img.header.refcountTableClusters;
      // One table cluster: 64 blocks x 64 clusters x 512 B = 2 MiB of file.
      await img.write(patternBuffer(3 * MiB, 9), 0);
      await img.close();
      const reopened = await Qcow2Image.open(new MemoryDevice(dev.contents()));
      expect(reopened.header.refcountTableClusters).to.be.greaterThan(before);
      const file = expectQemuClean(dev, 'after refcount table growth');
      expect(qemuRaw(file).subarray(0, 3 * MiB).equals(patternBuffer(3 * MiB, 9))).to.equal(true);
    });

    it('moves the L1 table when a resize needs more entries than it has room for', async () => {
      const { dev, img } = await newImage({ size: 1 * MiB, clusterSize: 512 });
      await img.write(patternBuffer(50 * KiB, 4), 1000);
      const oldOffset = img.l1TableOffset;
      expect(img.l1TableSize).to.equal(32); // 1 MiB / (64 entries x 512 B)
      await img.resize(9 * MiB);
      expect(img.l1TableSize).to.be.at.least(288);
      expect(img.l1TableOffset).to.not.equal(oldOffset);
      await img.write(patternBuffer(4 * KiB, 5), 9 * MiB - 4 * KiB);
      await img.close();
      const file = expectQemuClean(dev, 'after L1 growth');
      const raw = qemuRaw(file);
      expect(raw.length).to.equal(9 * MiB);
      expect(raw.subarray(1000, 1000 + 50 * KiB).equals(patternBuffer(50 * KiB, 4))).to.equal(true);
      expect(raw.subarray(9 * MiB - 4 * KiB).equals(patternBuffer(4 * KiB, 5))).to.equal(true);
    });
  });

  describe('copy-on-write of clusters shared with a snapshot', () => {
    it('gives the written cluster a new host cluster with OFLAG_COPIED and leaves the snapshot alone', async () => {
      const file = path.join(scratch, 'snap.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', file, '1M');
      qemuIo(file, ['write -P 0x11 0 64k']);
      qemuImg('snapshot', '-c', 'S', file);
      const snapBefore = qemuRaw(file, { snapshot: 'S' });
      const dev = new MemoryDevice(fs.readFileSync(file));
      const img = await Qcow2Image.open(dev);
      const l1Before = img.l1Entry(0);
      expect(isCopied(l1Before.hi), 'L2 table shared after the snapshot').to.equal(false);
      const sharedL2 = entryOffset(l1Before.hi, l1Before.lo);
      const oldTable = Buffer.from(await img.l2Table(sharedL2));
      const old3 = readL2Entry(oldTable, 3, false);
      expect(isCopied(old3.hi)).to.equal(false);

      await img.write(Buffer.alloc(100, 0x22), 3 * 4096 + 50);
      await img.flush();
      const l1After = img.l1Entry(0);
      const newL2 = entryOffset(l1After.hi, l1After.lo);
      expect(newL2).to.not.equal(sharedL2);
      expect(isCopied(l1After.hi), 'the copied L2 table is ours').to.equal(true);
      const table = await img.l2Table(newL2);
      const e3 = readL2Entry(table, 3, false);
      expect(isCopied(e3.hi), 'written cluster').to.equal(true);
      expect(entryOffset(e3.hi, e3.lo)).to.not.equal(entryOffset(old3.hi, old3.lo));
      const e4 = readL2Entry(table, 4, false);
      expect(isCopied(e4.hi), 'untouched cluster is still shared').to.equal(false);
      // A second write to the same cluster goes in place now.
      await img.write(Buffer.alloc(10, 0x33), 3 * 4096);
      expect(entryOffset(readL2Entry(await img.l2Table(newL2), 3, false).hi, readL2Entry(await img.l2Table(newL2), 3, false).lo)).to.equal(entryOffset(e3.hi, e3.lo));
      await img.close();
      const r = await checkImage(await Qcow2Image.open(new MemoryDevice(dev.contents()), { readOnly: true }));
      expect({ leaks: r.leaks, corruptions: r.corruptions }).to.deep.equal({ leaks: 0, corruptions: 0 });
      const out = expectQemuClean(dev, 'after copy-on-write');
      expect(qemuRaw(out, { snapshot: 'S' }).equals(snapBefore)).to.equal(true);
      const active = qemuRaw(out);
      const expected = Buffer.alloc(1 * MiB);
      expected.fill(0x11, 0, 64 * KiB);
      expected.fill(0x22, 3 * 4096 + 50, 3 * 4096 + 150);
      expected.fill(0x33, 3 * 4096, 3 * 4096 + 10);
      expect(active.equals(expected)).to.equal(true);
    });
  });

  describe('corruption found while writing', () => {
    async function imageWithBadL2Entry(): Promise<{ dev: MemoryDevice; img: Qcow2Image }> {
      const { dev, img } = await newImage({ size: 4 * MiB, clusterSize: 64 * KiB });
      await img.write(patternBuffer(128 * KiB, 6), 0);
      const l1 = img.l1Entry(0);
      await img.close();
      // Make the second cluster's L2 entry point at an unaligned host offset.
      const l2 = entryOffset(l1.hi, l1.lo);
      const entry = Buffer.alloc(8);
      entry.writeUInt32BE(0x80000000, 0);
      entry.writeUInt32BE(0x00050200, 4);
      await dev.pwrite(entry, l2 + 8);
      return { dev, img: await Qcow2Image.open(dev) };
    }

    for (const [what, len] of [['an in-place write', 100], ['a write that allocates', 3 * 64 * KiB]] as const) {
      it(`${what} sets the corrupt bit and refuses every later write with CorruptImageError`, async () => {
        const { dev, img } = await imageWithBadL2Entry();
        let err: unknown = null;
        try {
          await img.write(Buffer.alloc(len, 1), 64 * KiB + 10);
        } catch (e) {
          err = e;
        }
        expect(err).to.be.instanceOf(CorruptImageError);
        const header = Buffer.alloc(80);
        await dev.pread(header, 0);
        expect(header.readUInt32BE(76) & QCOW2_INCOMPAT_CORRUPT, 'corrupt bit on disk').to.equal(QCOW2_INCOMPAT_CORRUPT);
        let later: unknown = null;
        try {
          await img.write(Buffer.alloc(10, 2), 2 * MiB);
        } catch (e) {
          later = e;
        }
        expect(later, 'a write elsewhere').to.be.instanceOf(CorruptImageError);
        let zero: unknown = null;
        try {
          await img.writeZeroes(3 * MiB, 64 * KiB);
        } catch (e) {
          zero = e;
        }
        expect(zero, 'a zero write').to.be.instanceOf(CorruptImageError);
        await img.close();
        const file = toFile(dev);
        const info = qemuInfo(file) as { 'format-specific': { data: { corrupt: boolean } } };
        expect(info['format-specific'].data.corrupt).to.equal(true);
        // Opening it writable again is refused until repaired.
        let reopen: unknown = null;
        try {
          await Qcow2Image.open(new MemoryDevice(dev.contents()));
        } catch (e) {
          reopen = e;
        }
        expect(reopen).to.be.instanceOf(CorruptImageError);
      });
    }
  });
});

/** A memory device whose next flush, once armed, waits until the test lets it finish. */
class SlowSyncDevice extends MemoryDevice {
  syncing = false;
  private armed = false;
  private release: (() => void) | null = null;

  arm(): void {
    this.armed = true;
  }

  override async flush(): Promise<void> {
    if (this.armed) {
      this.armed = false;
      this.syncing = true;
      await new Promise<void>((r) => { this.release = r; });
      this.syncing = false;
    }
    await super.flush();
  }

  finishSync(): void {
    this.release?.();
    this.release = null;
  }
}

describe('qcow2 write engine: flush', () => {
  it('serves reads and writes while the host syncs; the flush still waits for that sync', async () => {
    const dev = new SlowSyncDevice();
    await createOnDevice(dev, { size: 8 * MiB, clusterSize: 64 * KiB });
    const img = await Qcow2Image.open(dev);
    await img.write(patternBuffer(256 * KiB, 1), 0); // allocates
    let flushed = false;
    dev.arm();
    const flush = img.flush().then(() => { flushed = true; });
    for (let i = 0; i < 100 && !dev.syncing; i++) await new Promise((r) => setImmediate(r));
    expect(dev.syncing, 'the flush reached the host sync').to.equal(true);
    // During the sync: a read, a write in place, and a write that allocates.
    const back = Buffer.alloc(64 * KiB);
    await img.read(back, 64 * KiB);
    expect(back.equals(patternBuffer(256 * KiB, 1).subarray(64 * KiB, 128 * KiB))).to.equal(true);
    await img.write(patternBuffer(4 * KiB, 2), 0);
    await img.write(patternBuffer(64 * KiB, 3), 4 * MiB);
    expect(flushed, 'the flush waits for the host sync').to.equal(false);
    dev.finishSync();
    await flush;
    await img.close();
    const file = expectQemuClean(dev, 'after writes during a sync');
    const raw = qemuRaw(file);
    expect(raw.subarray(0, 4 * KiB).equals(patternBuffer(4 * KiB, 2))).to.equal(true);
    expect(raw.subarray(4 * KiB, 256 * KiB).equals(patternBuffer(256 * KiB, 1).subarray(4 * KiB))).to.equal(true);
    expect(raw.subarray(4 * MiB, 4 * MiB + 64 * KiB).equals(patternBuffer(64 * KiB, 3))).to.equal(true);
  });
});

/**
 * A device that can lose power: writes since the last flush may each be
 * lost, in any combination (a disk cache reorders them).
 */
class PowerLossDevice extends MemoryDevice {
  private pending: Array<{ buf: Buffer; offset: number }> = [];
  private readonly durable = new MemoryDevice();

  override async pwrite(buf: Buffer, offset: number): Promise<void> {
    await super.pwrite(buf, offset);
    this.pending.push({ buf: Buffer.from(buf), offset });
  }

  override async flush(): Promise<void> {
    await super.flush();
    for (const w of this.pending) await this.durable.pwrite(w.buf, w.offset);
    this.pending = [];
  }

  /** The bytes on disk after a power loss now, keeping each unflushed write with probability 1/2. */
  async afterPowerLoss(rng: Rng): Promise<Buffer> {
    const disk = new MemoryDevice(this.durable.contents());
    for (const w of this.pending) if (rng.chance(0.5)) await disk.pwrite(w.buf, w.offset);
    return disk.contents();
  }
}

describe('qcow2 write engine: power loss between flushes', () => {
  for (const opts of [
    { size: 4 * MiB, clusterSize: 4 * KiB },
    { size: 2 * MiB, clusterSize: 512, refcountBits: 64 },
    { size: 4 * MiB, clusterSize: 64 * KiB, compat: '0.10' as const },
  ]) {
    it(`leaves no corruption, whatever unflushed writes are lost (cluster ${opts.clusterSize}, ${opts.compat ?? '1.1'})`, async function () {
      this.timeout(60000);
      const seed = testSeed();
      const rng = new Rng(seed);
      const dev = new PowerLossDevice();
      await createOnDevice(dev, opts);
      await dev.flush();
      const img = await Qcow2Image.open(dev);
      const model = Model.whole(Buffer.alloc(opts.size));
      const mix = { clusterSize: opts.clusterSize, l2Span: (opts.clusterSize / 8) * opts.clusterSize, maxLength: 64 * KiB };
      for (let step = 0; step < 12; step++) {
        for (let i = 0; i < 6; i++) {
          const op = randomOp(rng, model, mix);
          await applyToEngine(img, op);
          model.apply(op);
        }
        if (rng.chance(0.5)) await img.flush();
        for (let k = 0; k < 2; k++) {
          const file = path.join(scratch, `power-${++fileNo}.qcow2`);
          fs.writeFileSync(file, await dev.afterPowerLoss(rng));
          const c = qemuCheck(file);
          expect({ corruptions: c.corruptions ?? 0, errors: c['check-errors'] }, `seed ${seed} step ${step}`).to.deep.equal({ corruptions: 0, errors: 0 });
          fs.rmSync(file);
        }
      }
      await img.close();
    });
  }
});
