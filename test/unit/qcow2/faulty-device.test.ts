/**
 * Host I/O errors under the engine: a device that fails chosen reads, writes
 * or flushes with EIO. The error reaches the caller as the host's error (not
 * a crash, not a corruption), the mount answers EIO, and once the device
 * recovers the image works again and is consistent (leaks allowed).
 */
import { expect } from 'chai';
import { constants } from 'os';
import { BlockDevice } from '../../../src/io/block-device';
import { MemoryDevice } from '../../../src/io/memory-device';
import { Qcow2Image, createOnDevice, checkImage, QcowError } from '../../../src/qcow2';
import { ImageFs } from '../../../src/fs/image-fs';
import { ImageBackend } from '../../../src/fs/backend';
import { errnoOf } from '../../../src/fs/errno';
import { patternBuffer } from '../../helpers/qemu';

const KiB = 1024;
const MiB = 1024 * 1024;
const CLUSTER = 64 * KiB;
const EIO = constants.errno.EIO;

type Fault = (offset: number, length: number) => boolean;

function eio(syscall: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`EIO: i/o error, ${syscall}`), { code: 'EIO', errno: -EIO, syscall });
}

/** A device that fails the reads, writes or flushes its predicates pick, and counts what it failed. */
class FaultyDevice implements BlockDevice {
  failRead: Fault | null = null;
  failWrite: Fault | null = null;
  failFlush = false;
  readonly failed = { reads: 0, writes: 0, flushes: 0 };
  writes: Array<[number, number]> = [];

  constructor(readonly inner: MemoryDevice) {}

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  get name(): string {
    return 'faulty';
  }

  size(): number {
    return this.inner.size();
  }

  async pread(buf: Buffer, offset: number): Promise<number> {
    if (this.failRead?.(offset, buf.length)) {
      this.failed.reads++;
      throw eio('read');
    }
    return this.inner.pread(buf, offset);
  }

  async pwrite(buf: Buffer, offset: number): Promise<void> {
    if (this.failWrite?.(offset, buf.length)) {
      this.failed.writes++;
      throw eio('write');
    }
    this.writes.push([offset, buf.length]);
    return this.inner.pwrite(buf, offset);
  }

  async flush(): Promise<void> {
    if (this.failFlush) {
      this.failed.flushes++;
      throw eio('fdatasync');
    }
    return this.inner.flush();
  }

  truncate(size: number): Promise<void> {
    return this.inner.truncate(size);
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  heal(): void {
    this.failRead = null;
    this.failWrite = null;
    this.failFlush = false;
  }
}

const overlaps = (start: number, len: number): Fault => (offset, length) => offset < start + len && offset + length > start;

/** A 16 MiB image with data at 0 (two clusters) and at 4 MiB, on a faulty device. */
async function makeImage(): Promise<{ dev: FaultyDevice; img: Qcow2Image; data: Buffer }> {
  const mem = new MemoryDevice();
  await createOnDevice(mem, { size: 16 * MiB, clusterSize: CLUSTER });
  const dev = new FaultyDevice(mem);
  const img = await Qcow2Image.open(dev);
  const data = patternBuffer(2 * CLUSTER, 11);
  await img.write(data, 0);
  await img.write(data.subarray(0, CLUSTER), 4 * MiB);
  await img.flush();
  return { dev, img, data };
}

/** Host offset of the data behind a guest offset, from block status. */
async function hostOf(img: Qcow2Image, guest: number): Promise<number> {
  const [e] = await img.blockStatus(guest, 1);
  expect(e.offset, `guest 0x${guest.toString(16)} is mapped`).to.be.a('number');
  return e.offset as number;
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (err) {
    return err;
  }
  throw new Error('expected the operation to fail');
}

function expectEio(err: unknown): void {
  expect(QcowError.is(err), `${String(err)} is a host I/O error, not an image error`).to.equal(false);
  expect((err as NodeJS.ErrnoException).code).to.equal('EIO');
  expect(errnoOf(err)).to.equal(EIO);
}

async function reopenFresh(dev: FaultyDevice): Promise<Qcow2Image> {
  return Qcow2Image.open(new MemoryDevice(dev.inner.contents()));
}

describe('faulty device: host I/O errors surface as EIO and leave the image usable', () => {
  it('a failed data read rejects that read only; the next read is served', async () => {
    const { dev, img, data } = await makeImage();
    const host = await hostOf(img, 0);
    dev.failRead = overlaps(host, CLUSTER);
    expectEio(await rejection(img.read(Buffer.alloc(4 * KiB), 0)));
    expect(dev.failed.reads).to.be.greaterThan(0);
    // Other clusters are still served while the fault lasts.
    const other = Buffer.alloc(CLUSTER);
    await img.read(other, CLUSTER);
    expect(other.equals(data.subarray(CLUSTER))).to.equal(true);
    dev.heal();
    const back = Buffer.alloc(2 * CLUSTER);
    await img.read(back, 0);
    expect(back.equals(data)).to.equal(true);
    expect(img.readOnly, 'an I/O error is not corruption').to.equal(false);
    await img.close();
  });

  it('a failed L2 table read rejects the read and does not poison the table cache', async () => {
    const mem = new MemoryDevice();
    await createOnDevice(mem, { size: 16 * MiB, clusterSize: CLUSTER });
    const writer = await Qcow2Image.open(mem);
    const data = patternBuffer(CLUSTER, 12);
    await writer.write(data, 0);
    await writer.close();
    const dev = new FaultyDevice(new MemoryDevice(mem.contents()));
    const img = await Qcow2Image.open(dev, { readOnly: true });
    const l1 = img.l1Entry(0);
    const l2Offset = (l1.hi & 0x00ffffff) * 2 ** 32 + (l1.lo & 0xfffffe00);
    dev.failRead = overlaps(l2Offset, CLUSTER);
    expectEio(await rejection(img.read(Buffer.alloc(512), 0)));
    expectEio(await rejection(img.blockStatus(0, CLUSTER)));
    dev.heal();
    const back = Buffer.alloc(CLUSTER);
    await img.read(back, 0);
    expect(back.equals(data)).to.equal(true);
    await img.close();
  });

  it('a failed read while opening rejects the open with EIO', async () => {
    const { dev, img } = await makeImage();
    await img.close();
    const again = new FaultyDevice(new MemoryDevice(dev.inner.contents()));
    again.failRead = overlaps(0, 512);
    expectEio(await rejection(Qcow2Image.open(again)));
    again.failRead = overlaps(img.l1TableOffset, 8);
    expectEio(await rejection(Qcow2Image.open(again)));
  });

  it('a failed data write rejects that write; after recovery writes work and the image is consistent', async () => {
    const { dev, img, data } = await makeImage();
    // Any write beyond the current end of the file is a newly allocated cluster.
    const end = dev.size();
    dev.failWrite = (offset) => offset >= end;
    const fresh = patternBuffer(CLUSTER, 13);
    expectEio(await rejection(img.write(fresh, 8 * MiB)));
    expect(img.readOnly, 'an I/O error is not corruption').to.equal(false);
    // The failed range still reads as before (unallocated: zeroes); the old data is intact.
    const hole = Buffer.alloc(CLUSTER, 1);
    await img.read(hole, 8 * MiB);
    expect(hole.equals(Buffer.alloc(CLUSTER))).to.equal(true);
    dev.heal();
    await img.write(fresh, 8 * MiB);
    await img.flush();
    const back = Buffer.alloc(CLUSTER);
    await img.read(back, 8 * MiB);
    expect(back.equals(fresh)).to.equal(true);
    await img.close();
    const check = await checkImage(await reopenFresh(dev));
    expect(check.corruptions, check.problems.map((p) => p.message).join('\n')).to.equal(0);
    const reopened = await reopenFresh(dev);
    const first = Buffer.alloc(2 * CLUSTER);
    await reopened.read(first, 0);
    expect(first.equals(data)).to.equal(true);
    await reopened.close();
  });

  it('a failed in-place write rejects with EIO and the cluster keeps serving reads', async () => {
    const { dev, img, data } = await makeImage();
    const host = await hostOf(img, 0);
    dev.failWrite = overlaps(host, CLUSTER);
    expectEio(await rejection(img.write(Buffer.alloc(4 * KiB, 0xee), 0)));
    const back = Buffer.alloc(2 * CLUSTER);
    await img.read(back, 0);
    expect(back.equals(data)).to.equal(true);
    dev.heal();
    await img.write(Buffer.alloc(4 * KiB, 0xee), 0);
    await img.read(back, 0);
    expect(back.subarray(0, 4 * KiB).equals(Buffer.alloc(4 * KiB, 0xee))).to.equal(true);
    await img.close();
  });

  it('failed metadata writes and flushes reject flush; a later flush completes and nothing is corrupt', async () => {
    const { dev, img } = await makeImage();
    const fresh = patternBuffer(CLUSTER, 14);
    await img.write(fresh, 12 * MiB); // a new L2 entry, dirty in the cache
    dev.failWrite = (offset) => offset < CLUSTER * 8; // header, tables and refcount blocks live low in the file
    dev.failFlush = true;
    expectEio(await rejection(img.flush()));
    expect(dev.failed.writes + dev.failed.flushes).to.be.greaterThan(0);
    dev.heal();
    await img.flush();
    await img.close();
    const reopened = await reopenFresh(dev);
    const back = Buffer.alloc(CLUSTER);
    await reopened.read(back, 12 * MiB);
    expect(back.equals(fresh)).to.equal(true);
    const check = await checkImage(reopened);
    expect(check.corruptions, check.problems.map((p) => p.message).join('\n')).to.equal(0);
    await reopened.close();
  });

  it('through the mounted filesystem, reads, writes and fsync answer EIO', async () => {
    const { dev, img, data } = await makeImage();
    const fsys = new ImageFs([{ name: 'disk.raw', backend: new ImageBackend(img), hostPath: '/' }], { rootIsFile: false, uid: 0, gid: 0 });
    const ctx = { uid: 0, gid: 0, pid: 1 };
    const entry = await fsys.lookup(ctx, 1, 'disk.raw');
    const { fh } = await fsys.open(ctx, entry.nodeid, 2 /* O_RDWR */);
    const host = await hostOf(img, 0);

    dev.failRead = overlaps(host, CLUSTER);
    expect(errnoOf(await rejection(fsys.read(ctx, entry.nodeid, fh, 0, 4096)))).to.equal(EIO);
    dev.heal();
    expect((await fsys.read(ctx, entry.nodeid, fh, 0, 4096)).equals(data.subarray(0, 4096))).to.equal(true);

    dev.failWrite = () => true;
    expect(errnoOf(await rejection(fsys.write(ctx, entry.nodeid, fh, 0, Buffer.alloc(4096, 1))))).to.equal(EIO);
    expect(errnoOf(await rejection(fsys.write(ctx, entry.nodeid, fh, 10 * MiB, Buffer.alloc(4096, 1))))).to.equal(EIO);
    dev.heal();

    await fsys.write(ctx, entry.nodeid, fh, 10 * MiB, Buffer.alloc(4096, 2));
    dev.failFlush = true;
    expect(errnoOf(await rejection(fsys.fsync(ctx, entry.nodeid)))).to.equal(EIO);
    dev.heal();
    await fsys.fsync(ctx, entry.nodeid);
    expect((await fsys.read(ctx, entry.nodeid, fh, 10 * MiB, 4096)).equals(Buffer.alloc(4096, 2))).to.equal(true);
    await fsys.release(ctx, entry.nodeid);
    await img.close();
  });
});
