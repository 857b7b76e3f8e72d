import { expect } from 'chai';
import { readRefcountEntry, writeRefcountEntry, RefcountManager } from '../../../src/qcow2/refcount';
import { MemoryDevice } from '../../../src/io/memory-device';
import { CorruptImageError, InvalidRequestError } from '../../../src/qcow2/errors';

describe('qcow2 refcounts', () => {
  describe('entries of every width', () => {
    for (let order = 0; order <= 6; order++) {
      const bits = 2 ** order;
      it(`refcount_bits=${bits}: writes land in their own bits, reads give them back`, () => {
        const block = Buffer.alloc(512);
        const n = (512 * 8) / bits;
        const max = bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
        const value = (i: number) => (i * 2654435761) % (max + 1);
        for (let i = 0; i < n; i++) writeRefcountEntry(block, i, order, value(i));
        for (let i = 0; i < n; i++) expect(readRefcountEntry(block, i, order), `entry ${i}`).to.equal(value(i));
        // Changing one entry leaves its neighbours alone.
        writeRefcountEntry(block, 5, order, max);
        expect(readRefcountEntry(block, 4, order)).to.equal(value(4));
        expect(readRefcountEntry(block, 5, order)).to.equal(max);
        expect(readRefcountEntry(block, 6, order)).to.equal(value(6));
        writeRefcountEntry(block, 5, order, 0);
        expect(readRefcountEntry(block, 5, order)).to.equal(0);
      });
    }

    it('byte layout: sub-byte entries start at the least significant bit, wider ones are big-endian', () => {
      const layouts: Array<[number, number, number, number[]]> = [
        [0, 1, 1, [0x02]],
        [1, 1, 3, [0x0c]],
        [2, 1, 0xa, [0xa0]],
        [3, 1, 0x7f, [0x00, 0x7f]],
        [4, 1, 0x1234, [0x00, 0x00, 0x12, 0x34]],
        [5, 0, 0x89abcdef, [0x89, 0xab, 0xcd, 0xef]],
        [6, 0, 0x12_3456_789a, [0, 0, 0, 0x12, 0x34, 0x56, 0x78, 0x9a]],
      ];
      for (const [order, index, value, bytes] of layouts) {
        const b = Buffer.alloc(16);
        writeRefcountEntry(b, index, order, value);
        expect([...b.subarray(0, bytes.length)], `order ${order}`).to.deep.equal(bytes);
        expect(readRefcountEntry(b, index, order)).to.equal(value);
      }
    });

    it('64-bit refcounts beyond 2^53 read as the largest safe integer', () => {
      const b = Buffer.alloc(8, 0xff);
      expect(readRefcountEntry(b, 0, 6)).to.equal(Number.MAX_SAFE_INTEGER);
    });
  });

  describe('RefcountManager over a memory device', () => {
    /** A 512-byte-cluster image: refcount table at cluster 1, one block at cluster 2. */
    function image(order: number, tableEntry = 1024): MemoryDevice {
      const dev = new MemoryDevice(8 * 512);
      const table = Buffer.alloc(512);
      table.writeBigUInt64BE(BigInt(tableEntry), 0);
      const block = Buffer.alloc(512);
      for (let c = 0; c < 3; c++) writeRefcountEntry(block, c, order, 1);
      writeRefcountEntry(block, 6, order, order === 0 ? 1 : 3);
      void dev.pwrite(table, 512);
      void dev.pwrite(block, 1024);
      return dev;
    }

    for (let order = 0; order <= 6; order++) {
      it(`refcount_order ${order}: get, set, allocate`, async () => {
        const dev = image(order);
        const rc = new RefcountManager(dev, { clusterBits: 9, refcountOrder: order, tableOffset: 512, tableClusters: 1 }, 4);
        await rc.load();
        expect(rc.entriesPerBlock).to.equal(4096 / 2 ** order);
        expect(await rc.get(0)).to.equal(1);
        expect(await rc.get(2)).to.equal(1);
        expect(await rc.get(3)).to.equal(0);
        expect(await rc.get(6)).to.equal(order === 0 ? 1 : 3);
        // Beyond the table: 0.
        expect(await rc.get(rc.coveredClusters + 5)).to.equal(0);
        expect(await rc.allocate(3)).to.equal(3 * 512);
        expect(await rc.allocate(1)).to.equal(7 * 512);
        await rc.flush();
        const onDisk = Buffer.alloc(512);
        await dev.pread(onDisk, 1024);
        for (const c of [3, 4, 5, 7]) expect(readRefcountEntry(onDisk, c, order), `cluster ${c}`).to.equal(1);
        if (order > 0) {
          await rc.set(6, rc.maxRefcount);
          expect(await rc.get(6)).to.equal(rc.maxRefcount);
          let err: unknown = null;
          await rc.adjust(6, 1).catch((e: unknown) => { err = e; });
          expect(err, 'overflow').to.be.instanceOf(InvalidRequestError);
          err = null;
          await rc.adjust(8, -1).catch((e: unknown) => { err = e; });
          expect(err, 'below zero').to.be.instanceOf(CorruptImageError);
        }
      });
    }

    it('a misaligned or out-of-file refcount block is corruption', async () => {
      for (const [entry, why] of [[1000, /not cluster aligned/], [64 * 512, /past the end/]] as const) {
        const rc = new RefcountManager(image(4, entry), { clusterBits: 9, refcountOrder: 4, tableOffset: 512, tableClusters: 1 }, 4);
        let err: unknown = null;
        await rc.load().catch((e: unknown) => { err = e; });
        expect(err).to.be.instanceOf(CorruptImageError);
        expect((err as Error).message).to.match(why);
        expect((err as CorruptImageError).hostOffset).to.equal(512);
      }
    });
  });
});
