/**
 * Reads done on the spot (Qcow2Image.readNow) and what they rest on: an
 * image lock that nobody writes under or waits for (RwLock.sharedFree, and
 * tryShared for the hold a read that waits takes without waiting) and L2
 * tables used straight from the cache (TableCache.getCached). readNow must
 * read exactly what read() reads, or read nothing and say so. The same for
 * writes in place (Qcow2Image.writeNow).
 */
import { expect } from 'chai';
import { MemoryDevice } from '../../../src/io/memory-device';
import { Qcow2Image, createOnDevice, checkImage, CorruptImageError, ReadOnlyImageError } from '../../../src/qcow2';
import { RwLock } from '../../../src/qcow2/rwlock';
import { TableCache } from '../../../src/qcow2/table-cache';
import { patternBuffer } from '../../helpers/qemu';

const KiB = 1024;
const MiB = 1024 * 1024;

/**
 * A memory device whose reads on the spot can be refused, as a cold file's
 * are, and whose writes can be held up, so that a writer stays inside.
 */
class ColdableDevice extends MemoryDevice {
  cold = false;
  readonly asked: boolean[] = [];
  /** While set, writes wait for it; `writing` resolves when one does. */
  hold: Promise<void> | null = null;
  private entered: () => void = () => {};
  writing: Promise<void> = Promise.resolve();

  holdWrites(): () => void {
    let open!: () => void;
    this.hold = new Promise((r) => { open = r; });
    this.writing = new Promise((r) => { this.entered = r; });
    return () => {
      this.hold = null;
      open();
    };
  }

  override preadNow(buf: Buffer, offset: number, mayBlock = false): number | null {
    if (this.asked.length < 1000) this.asked.push(mayBlock);
    return this.cold ? null : super.preadNow(buf, offset);
  }

  override async pwrite(buf: Buffer, offset: number): Promise<void> {
    if (this.hold !== null) {
      this.entered();
      await this.hold;
    }
    return super.pwrite(buf, offset);
  }
}

describe('RwLock.tryShared and sharedFree', () => {
  it('takes a shared hold at once when nobody writes, and refuses while a writer holds the lock or waits for it', async () => {
    const lock = new RwLock();
    expect(lock.sharedFree()).to.equal(true);
    const a = lock.tryShared();
    expect(a).to.be.a('function');
    const b = lock.tryShared();
    expect(b, 'readers share').to.be.a('function');
    // A writer queues behind the two readers; from then on, readers must wait (writers are preferred).
    const order: string[] = [];
    const writing = lock.exclusive(async () => { order.push('write'); });
    expect(lock.tryShared(), 'a writer is waiting').to.equal(null);
    expect(lock.sharedFree(), 'a writer is waiting').to.equal(false);
    a!();
    a!(); // releasing twice releases once
    expect(order).to.deep.equal([]);
    b!();
    await writing;
    expect(order).to.deep.equal(['write']);
    // While a writer holds it.
    let inside: (() => void) | null | undefined;
    let freeInside: boolean | undefined;
    await lock.exclusive(async () => {
      inside = lock.tryShared();
      freeInside = lock.sharedFree();
    });
    expect(inside).to.equal(null);
    expect(freeInside).to.equal(false);
    expect(lock.sharedFree(), 'free again').to.equal(true);
    const c = lock.tryShared();
    expect(c, 'free again').to.be.a('function');
    c!();
  });
});

describe('TableCache.getCached', () => {
  it('answers only from memory, counts a hit and makes the table the most recently used', async () => {
    const T = 512;
    const dev = new MemoryDevice(Buffer.alloc(8 * T, 7));
    const cache = new TableCache(dev, T, 2);
    expect(cache.getCached(T), 'not loaded yet').to.equal(undefined);
    expect(dev.stats.reads).to.equal(0);
    await cache.get(T);
    await cache.get(2 * T);
    expect(cache.getCached(T)![0]).to.equal(7);
    expect(cache.stats).to.deep.include({ hits: 1, misses: 2 });
    await cache.get(3 * T); // evicts the least recently used: table 2, not table 1
    expect(cache.peek(T)).to.not.equal(undefined);
    expect(cache.peek(2 * T)).to.equal(undefined);
  });
});

describe('Qcow2Image.readNow', () => {
  const size = 8 * MiB;
  const cs = 64 * KiB;

  /** Data in the first 2 MiB, zero clusters at 3 MiB, the rest unallocated. */
  async function image(): Promise<{ dev: ColdableDevice; img: Qcow2Image; want: Buffer }> {
    const dev = new ColdableDevice();
    await createOnDevice(dev, { size, clusterSize: cs });
    let img = await Qcow2Image.open(dev);
    const data = patternBuffer(2 * MiB, 5);
    await img.write(data, 0);
    await img.write(Buffer.alloc(cs, 9), 3 * MiB);
    await img.writeZeroes(3 * MiB, cs);
    await img.close();
    img = await Qcow2Image.open(dev);
    const want = Buffer.alloc(size);
    data.copy(want, 0);
    return { dev, img, want };
  }

  it('reads what read() reads: data, zero clusters and unallocated space, once the L2 table is cached', async () => {
    const { img, want } = await image();
    // A fresh open has no L2 table cached: nothing can be read without I/O yet.
    expect(img.readNow(Buffer.alloc(4096), 0)).to.equal(false);
    await img.read(Buffer.alloc(4096), 0);
    for (const [offset, length] of [[0, 4096], [12345, 777], [cs - 100, 200], [0, 2 * MiB], [3 * MiB, cs], [3 * MiB + 100, 4000], [5 * MiB, 64 * KiB], [size - 512, 512]]) {
      const now = Buffer.alloc(length, 0xee);
      expect(img.readNow(now, offset), `readNow ${offset}+${length}`).to.equal(true);
      const later = Buffer.alloc(length);
      await img.read(later, offset);
      expect(now.equals(later), `same bytes at ${offset}+${length}`).to.equal(true);
      expect(now.equals(want.subarray(offset, offset + length))).to.equal(true);
    }
  });

  it('reads nothing and says so when the range is more than one run, or the device would have to wait', async () => {
    const { dev, img } = await image();
    await img.read(Buffer.alloc(4096), 0);
    const buf = Buffer.alloc(8192, 0xee);
    // Data, then unallocated space.
    expect(img.readNow(buf, 2 * MiB - 4096)).to.equal(false);
    expect(buf.equals(Buffer.alloc(8192, 0xee))).to.equal(true);
    dev.cold = true;
    expect(img.readNow(buf, 0, true)).to.equal(false);
    expect(dev.asked[dev.asked.length - 1], 'the caller said it may block').to.equal(true);
    // Zeroes and unallocated space need no device.
    expect(img.readNow(buf, 5 * MiB)).to.equal(true);
    expect(buf.equals(Buffer.alloc(8192))).to.equal(true);
  });

  it('does not read while a writer holds the image, nor past the end of the disk', async () => {
    const { dev, img } = await image();
    await img.read(Buffer.alloc(4096), 0);
    const release = dev.holdWrites();
    const writing = img.write(Buffer.alloc(4096, 1), 6 * MiB); // allocates: takes the lock alone
    await dev.writing;
    const during = img.readNow(Buffer.alloc(4096), 0);
    release();
    await writing;
    expect(during, 'read while the writer was inside').to.equal(false);
    expect(img.readNow(Buffer.alloc(4096), 0), 'once it is done').to.equal(true);
    expect(img.readNow(Buffer.alloc(4096), 6 * MiB)).to.equal(true);
    expect(() => img.readNow(Buffer.alloc(4096), size - 2048)).to.throw(/past the virtual disk/);
  });

  it('leaves a backing file\'s space to read()', async () => {
    const base = new MemoryDevice();
    await createOnDevice(base, { size, clusterSize: cs });
    const top = new MemoryDevice();
    await createOnDevice(top, { size, clusterSize: cs, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
    const img = await Qcow2Image.open(top, { baseDir: '/nonexistent', openDevice: async () => base });
    try {
      await img.read(Buffer.alloc(4096), 0);
      expect(img.readNow(Buffer.alloc(4096), 0)).to.equal(false);
    } finally {
      await img.close();
    }
  });

  it('corrupt metadata found on the spot is thrown as it is by read(), and stops writing', async () => {
    const { dev, img } = await image();
    await img.read(Buffer.alloc(4096), 0);
    await img.close();
    // Point the first L2 entry at an unaligned host offset.
    const raw = dev.contents();
    const l1Offset = Number(raw.readBigUInt64BE(40));
    const l2Offset = Number(raw.readBigUInt64BE(l1Offset) & 0x00fffffffffffe00n);
    const bad = Buffer.alloc(8);
    bad.writeBigUInt64BE(raw.readBigUInt64BE(l2Offset) + 512n);
    await dev.pwrite(bad, l2Offset);
    const again = await Qcow2Image.open(dev);
    try {
      await again.read(Buffer.alloc(4096), 1 * MiB); // caches the L2 table (that entry is fine)
      expect(() => again.readNow(Buffer.alloc(4096), 0)).to.throw(CorruptImageError, /not cluster aligned/);
      expect(again.readOnly).to.equal(true);
    } finally {
      await again.close();
    }
  });
});

describe('Qcow2Image.writeNow', () => {
  const size = 8 * MiB;
  const cs = 64 * KiB;

  /** Data in the first 2 MiB, a zero cluster at 3 MiB, the rest unallocated; reopened, so nothing is cached. */
  async function image(): Promise<{ dev: ColdableDevice; img: Qcow2Image }> {
    const dev = new ColdableDevice();
    await createOnDevice(dev, { size, clusterSize: cs });
    let img = await Qcow2Image.open(dev);
    await img.write(patternBuffer(2 * MiB, 5), 0);
    await img.writeZeroes(3 * MiB, cs);
    await img.close();
    img = await Qcow2Image.open(dev);
    return { dev, img };
  }

  async function readBack(img: Qcow2Image, offset: number, length: number): Promise<Buffer> {
    const b = Buffer.alloc(length);
    await img.read(b, offset);
    return b;
  }

  it('writes in place, with one device write and no metadata, once the L2 table is cached', async () => {
    const { dev, img } = await image();
    const data = patternBuffer(200, 7);
    const writes = dev.stats.writes;
    // A fresh open has no L2 table cached.
    expect(img.writeNow(data, 0)).to.equal(false);
    expect(dev.stats.writes).to.equal(writes);
    await readBack(img, 0, 4096);
    for (const offset of [0, cs - 100, 2 * MiB - 200]) {
      expect(img.writeNow(data, offset), `writeNow at ${offset}`).to.equal(true);
      expect((await readBack(img, offset, 200)).equals(data)).to.equal(true);
    }
    expect(dev.stats.writes - writes, 'one device write each').to.equal(3);
    const big = patternBuffer(MiB, 8);
    expect(img.writeNow(big, 512 * KiB)).to.equal(true);
    await img.close();
    const again = await Qcow2Image.open(dev);
    try {
      expect((await readBack(again, 512 * KiB, MiB)).equals(big)).to.equal(true);
      expect((await readBack(again, 2 * MiB - 200, 200)).equals(data)).to.equal(true);
      const r = await checkImage(again);
      expect([r.corruptions, r.leaks, r.checkErrors]).to.deep.equal([0, 0, 0]);
    } finally {
      await again.close();
    }
  });

  it('writes nothing and says so where write() must allocate or copy: holes, zero clusters, shared clusters', async () => {
    const { dev, img } = await image();
    await readBack(img, 0, 4096);
    const data = Buffer.alloc(8192, 0x42);
    const writes = dev.stats.writes;
    expect(img.writeNow(data, 5 * MiB), 'unallocated').to.equal(false);
    expect(img.writeNow(data, 3 * MiB), 'zero cluster').to.equal(false);
    expect(img.writeNow(data, 2 * MiB - 4096), 'data, then unallocated').to.equal(false);
    expect(dev.stats.writes).to.equal(writes);
    // After a snapshot the clusters are shared (OFLAG_COPIED clear): a write must copy them.
    await img.createSnapshot('before');
    await readBack(img, 0, 4096);
    expect(img.writeNow(data, 0), 'shared with a snapshot').to.equal(false);
    await img.write(data, 0);
    expect((await readBack(img, 0, 8192)).equals(data)).to.equal(true);
    expect(img.writeNow(data, 4096), 'the copy is the image\'s own').to.equal(true);
    await img.close();
    const snap = await Qcow2Image.open(dev, { snapshot: 'before', readOnly: true });
    try {
      expect((await readBack(snap, 0, 8192)).equals(patternBuffer(2 * MiB, 5).subarray(0, 8192))).to.equal(true);
    } finally {
      await snap.close();
    }
  });

  it('does not write while a writer holds the image, throws what write() throws, and needs a device that writes on the spot', async () => {
    const { dev, img } = await image();
    await readBack(img, 0, 4096);
    const release = dev.holdWrites();
    const writing = img.write(Buffer.alloc(4096, 1), 6 * MiB); // allocates: takes the lock alone
    await dev.writing;
    const during = img.writeNow(Buffer.alloc(4096, 2), 0);
    release();
    await writing;
    expect(during, 'written while the writer was inside').to.equal(false);
    expect((await readBack(img, 0, 4096)).equals(patternBuffer(2 * MiB, 5).subarray(0, 4096))).to.equal(true);
    expect(img.writeNow(Buffer.alloc(4096, 2), 0), 'once it is done').to.equal(true);
    expect(() => img.writeNow(Buffer.alloc(4096), size - 2048)).to.throw(/past the virtual disk/);
    Object.defineProperty(dev, 'pwriteNow', { value: undefined });
    expect(img.writeNow(Buffer.alloc(4096, 3), 0)).to.equal(false);
    await img.close();
    const ro = await Qcow2Image.open(dev, { readOnly: true });
    try {
      await readBack(ro, 0, 4096);
      expect(() => ro.writeNow(Buffer.alloc(4096), 0)).to.throw(ReadOnlyImageError);
    } finally {
      await ro.close();
    }
  });
});
