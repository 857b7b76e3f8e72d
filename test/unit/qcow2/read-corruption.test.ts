import { expect } from 'chai';
import { MemoryDevice } from '../../../src/io/memory-device';
import { createOnDevice } from '../../../src/qcow2/create';
import { Qcow2Image } from '../../../src/qcow2/image';
import { CorruptImageError } from '../../../src/qcow2/errors';

/** Expect a promise to reject with CorruptImageError. */
async function rejectsCorrupt(p: Promise<unknown>): Promise<void> {
  let err: unknown;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  expect(err).to.be.instanceOf(CorruptImageError);
}

describe('corruption met while reading a writable image', () => {
  it('fails that read, stops writing, keeps serving other reads and changes no byte', async () => {
    const dev = new MemoryDevice();
    await createOnDevice(dev, { size: 2 * 1024 * 1024 * 1024, clusterSize: 65536 });
    let img = await Qcow2Image.open(dev, { openBacking: false, lock: false });
    await img.write(Buffer.alloc(65536, 1), 0); // L2 table of L1 entry 0
    await img.write(Buffer.alloc(65536, 2), 1024 * 1024 * 1024); // L2 table of L1 entry 2
    await img.close();
    // Point L1 entry 2 at an unaligned offset.
    const l1Offset = Number(dev.contents().readBigUInt64BE(40));
    const bytes = dev.contents();
    bytes.writeUInt32BE(bytes.readUInt32BE(l1Offset + 16 + 4) + 512, l1Offset + 16 + 4);
    const corrupted = new MemoryDevice(bytes);
    img = await Qcow2Image.open(corrupted, { openBacking: false, lock: false });
    const before = corrupted.contents();
    await rejectsCorrupt(img.read(Buffer.alloc(4096), 1024 * 1024 * 1024));
    const good = Buffer.alloc(4096);
    await img.read(good, 0);
    expect(good.equals(Buffer.alloc(4096, 1))).to.equal(true);
    await rejectsCorrupt(img.write(Buffer.alloc(512, 9), 0));
    await rejectsCorrupt(img.write(Buffer.alloc(512, 9), 512 * 1024 * 1024));
    expect(img.readOnly).to.equal(true);
    await img.close();
    expect(corrupted.contents().equals(before)).to.equal(true);
  });
});
