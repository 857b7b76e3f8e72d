import { expect } from 'chai';
import {
  SubclusterType, L2Entry, classifyL2Entry, decodeCompressedDescriptor, encodeCompressedDescriptor, encodeOffsetEntry,
  entryOffset, readL2Entry, writeL2Entry, subclusterMask, isAllocatedType, isZeroType, firstNonEmptyL2Entry,
  lastContiguousL2Entry,
} from '../../../src/qcow2/l2-entry';

const COPIED = 0x80000000;
const COMPRESSED = 0x40000000;

function entry(hi: number, lo: number, bitmapHi = 0, bitmapLo = 0): L2Entry {
  return { hi: hi >>> 0, lo: lo >>> 0, bitmapHi: bitmapHi >>> 0, bitmapLo: bitmapLo >>> 0 };
}

const std = { extendedL2: false, hasDataFile: false };
const ext = { extendedL2: true, hasDataFile: false };
const stdData = { extendedL2: false, hasDataFile: true };
const extData = { extendedL2: true, hasDataFile: true };

describe('qcow2 L2 entries', () => {
  describe('classification of standard entries (qcow2_get_cluster_type)', () => {
    const cases: Array<[string, L2Entry, typeof std, SubclusterType]> = [
      ['all zero: unallocated', entry(0, 0), std, SubclusterType.UnallocatedPlain],
      ['offset only (shared with a snapshot): normal', entry(0, 0x50000), std, SubclusterType.Normal],
      ['offset and COPIED: normal', entry(COPIED, 0x50000), std, SubclusterType.Normal],
      ['offset above 4 GiB', entry(COPIED | 0x12, 0x00010000), std, SubclusterType.Normal],
      ['zero flag, no offset: zero plain', entry(0, 1), std, SubclusterType.ZeroPlain],
      ['zero flag and offset: zero alloc', entry(COPIED, 0x50001), std, SubclusterType.ZeroAlloc],
      ['compressed', entry(COMPRESSED | 0x1000, 0x200), std, SubclusterType.Compressed],
      ['compressed with bit 0 set is still compressed', entry(COMPRESSED, 0x201), std, SubclusterType.Compressed],
      ['COPIED alone without a data file: unallocated', entry(COPIED, 0), std, SubclusterType.UnallocatedPlain],
      ['data file: offset 0 with COPIED is a mapping', entry(COPIED, 0), stdData, SubclusterType.Normal],
      ['data file: offset 0 without COPIED is unallocated', entry(0, 0), stdData, SubclusterType.UnallocatedPlain],
      ['data file: zero flag at offset 0 with COPIED is zero plain', entry(COPIED, 1), stdData, SubclusterType.ZeroPlain],
      ['data file: zero flag with an offset is zero alloc', entry(COPIED, 0x10001), stdData, SubclusterType.ZeroAlloc],
    ];
    for (const [what, e, ctx, want] of cases) {
      it(what, () => expect(classifyL2Entry(e, 0, ctx)).to.equal(want));
    }
  });

  describe('classification of extended entries (qcow2_get_subcluster_type)', () => {
    const host = 0x100000;
    it('allocated cluster: each subcluster by its alloc and zero bits', () => {
      // sc 0: alloc, sc 1: zero, sc 2: neither, sc 31: alloc.
      const e = entry(COPIED, host, 0b010, 0x80000001);
      expect(classifyL2Entry(e, 0, ext)).to.equal(SubclusterType.Normal);
      expect(classifyL2Entry(e, 1, ext)).to.equal(SubclusterType.ZeroAlloc);
      expect(classifyL2Entry(e, 2, ext)).to.equal(SubclusterType.UnallocatedAlloc);
      expect(classifyL2Entry(e, 31, ext)).to.equal(SubclusterType.Normal);
    });

    it('unallocated cluster: zero bits make zero plain subclusters', () => {
      const e = entry(0, 0, 0xffff0000, 0);
      expect(classifyL2Entry(e, 0, ext)).to.equal(SubclusterType.UnallocatedPlain);
      expect(classifyL2Entry(e, 16, ext)).to.equal(SubclusterType.ZeroPlain);
      expect(classifyL2Entry(e, 31, ext)).to.equal(SubclusterType.ZeroPlain);
    });

    it('the standard zero flag means nothing with extended L2', () => {
      expect(classifyL2Entry(entry(0, 1), 0, ext)).to.equal(SubclusterType.UnallocatedPlain);
      expect(classifyL2Entry(entry(COPIED, host | 1, 0, 1), 0, ext)).to.equal(SubclusterType.Normal);
    });

    it('invalid: a subcluster both allocated and zero, anywhere in the cluster', () => {
      const e = entry(COPIED, host, 1 << 7, (1 << 7) | 1);
      for (const sc of [0, 7, 20]) expect(classifyL2Entry(e, sc, ext)).to.equal(SubclusterType.Invalid);
    });

    it('invalid: allocation bits on an unallocated cluster', () => {
      const e = entry(0, 0, 0, 1 << 30);
      for (const sc of [0, 30]) expect(classifyL2Entry(e, sc, ext)).to.equal(SubclusterType.Invalid);
    });

    it('invalid: a compressed cluster with a non-zero bitmap (the spec reserves it)', () => {
      expect(classifyL2Entry(entry(COMPRESSED, 0x200, 0, 0), 0, ext)).to.equal(SubclusterType.Compressed);
      expect(classifyL2Entry(entry(COMPRESSED, 0x200, 1, 0), 0, ext)).to.equal(SubclusterType.Invalid);
      expect(classifyL2Entry(entry(COMPRESSED, 0x200, 0, 1), 0, ext)).to.equal(SubclusterType.Invalid);
    });

    it('data file: offset 0 with COPIED is an allocated cluster', () => {
      const e = entry(COPIED, 0, 0b10, 0b01);
      expect(classifyL2Entry(e, 0, extData)).to.equal(SubclusterType.Normal);
      expect(classifyL2Entry(e, 1, extData)).to.equal(SubclusterType.ZeroAlloc);
      expect(classifyL2Entry(e, 2, extData)).to.equal(SubclusterType.UnallocatedAlloc);
      expect(classifyL2Entry(e, 0, ext)).to.equal(SubclusterType.Invalid);
    });

    it('type predicates', () => {
      expect([0, 1, 2, 3, 4, 5, 6].map((t) => isZeroType(t))).to.deep.equal([false, false, true, true, false, false, false]);
      expect([0, 1, 2, 3, 4, 5, 6].map((t) => isAllocatedType(t))).to.deep.equal([false, false, true, true, true, true, false]);
    });
  });

  describe('entry codecs', () => {
    it('offset entries: bits 9..55, COPIED and zero flags', () => {
      const off = 0x00ab_cdef_1234_5600;
      const e = encodeOffsetEntry(off, true, true);
      expect(e.hi).to.equal((0x80000000 | 0x00abcdef) >>> 0);
      expect(e.lo).to.equal(0x12345601);
      expect(entryOffset(e.hi, e.lo)).to.equal(off);
      expect(encodeOffsetEntry(0x200, false)).to.deep.equal({ hi: 0, lo: 0x200 });
    });

    it('read and write standard and extended tables big-endian', () => {
      for (const extended of [false, true]) {
        const t = Buffer.alloc(64);
        const e = entry(COPIED | 1, 0x30000, 0x0000ffff, 0xffff0000);
        writeL2Entry(t, 1, e, extended);
        const sz = extended ? 16 : 8;
        expect(t.readUInt32BE(sz)).to.equal(0x80000001);
        expect(t.readUInt32BE(sz + 4)).to.equal(0x30000);
        const back = readL2Entry(t, 1, extended);
        expect(back).to.deep.equal(extended ? e : { ...e, bitmapHi: 0, bitmapLo: 0 });
        expect(readL2Entry(t, 0, extended)).to.deep.equal(entry(0, 0));
        if (extended) {
          expect(t.readUInt32BE(24)).to.equal(0x0000ffff);
          expect(t.readUInt32BE(28)).to.equal(0xffff0000);
        }
      }
    });

    it('subcluster masks', () => {
      expect(subclusterMask(0, 32)).to.equal(0xffffffff);
      expect(subclusterMask(0, 1)).to.equal(1);
      expect(subclusterMask(31, 1)).to.equal(0x80000000);
      expect(subclusterMask(4, 3)).to.equal(0b1110000);
      expect(subclusterMask(1, 31)).to.equal(0xfffffffe);
    });
  });

  describe('compressed cluster descriptor', () => {
    for (let bits = 9; bits <= 21; bits++) {
      it(`cluster_bits ${bits}: layout and round trip`, () => {
        const x = 62 - (bits - 8);
        const cs = 2 ** bits;
        const maxOffset = Math.min(2 ** x - 1, Number.MAX_SAFE_INTEGER);
        // The largest size the field holds: 2^(bits-8) sectors.
        const maxSectors = 2 ** (bits - 8);
        const cases: Array<[number, number]> = [
          [0x10000, 1],
          [0x10000 + 511, 1],
          [0x10000 + 511, 2],
          [0x123456 * 512 + 17, cs],
          [0x10000, cs + 511 - 1],
          [maxOffset - (maxOffset % 512), maxSectors * 512],
          [2 ** 40 + 3, Math.min(cs, 700)],
        ];
        for (const [hostOffset, size] of cases) {
          const sectors = Math.floor((hostOffset + size - 1) / 512) - Math.floor(hostOffset / 512) + 1;
          if (sectors > maxSectors) continue;
          const { hi, lo } = encodeCompressedDescriptor(hostOffset, size, bits);
          const v = (BigInt(hi) << 32n) | BigInt(lo);
          // Bit 62 flags compression, bits 0..x-1 the offset, x..61 the extra sectors.
          expect(v >> 62n, 'flags').to.equal(1n);
          expect(v & ((1n << BigInt(x)) - 1n), 'offset field').to.equal(BigInt(hostOffset));
          expect((v >> BigInt(x)) & ((1n << BigInt(62 - x)) - 1n), 'sector field').to.equal(BigInt(sectors - 1));
          const d = decodeCompressedDescriptor(hi, lo, bits);
          expect(d.hostOffset).to.equal(hostOffset);
          // The decoded size runs to the end of the last sector.
          expect(d.compressedSize).to.equal(sectors * 512 - (hostOffset % 512));
          expect(d.compressedSize).to.be.at.least(size);
        }
      });
    }

    it('a descriptor from QEMU (64 KiB clusters) decodes as qemu-img would', () => {
      // 0x4000_8000_0005_0400 for cluster_bits 16: x = 54, 2 extra sectors, offset 0x50400.
      const hi = 0x40000000 | (2 << (54 - 32));
      const d = decodeCompressedDescriptor(hi >>> 0, 0x00050400, 16);
      expect(d.hostOffset).to.equal(0x50400);
      expect(d.compressedSize).to.equal(3 * 512);
      expect(classifyL2Entry(entry(hi, 0x00050400), 0, std)).to.equal(SubclusterType.Compressed);
    });

    it('encoding refuses what the fields cannot hold, instead of corrupting the flags', () => {
      // cluster_bits 9: one sector field bit, so at most 2 sectors.
      expect(() => encodeCompressedDescriptor(0x10000, 3 * 512, 9)).to.throw(RangeError);
      expect(() => encodeCompressedDescriptor(0x10000 + 1, 1024, 9)).to.throw(RangeError);
      // cluster_bits 21: 49 offset bits.
      expect(() => encodeCompressedDescriptor(2 ** 49, 512, 21)).to.throw(RangeError);
      expect(() => encodeCompressedDescriptor(0x10000, 0, 16)).to.throw(RangeError);
    });

    it('offsets beyond 2^53 decode as NaN (the caller reports corruption)', () => {
      const d = decodeCompressedDescriptor(0x40000000 | 0x00300000, 0, 9);
      expect(Number.isNaN(d.hostOffset)).to.equal(true);
    });
  });

  describe('firstNonEmptyL2Entry', () => {
    for (const extended of [false, true]) {
      const size = extended ? 16 : 8;
      it(`finds the first entry with any bit set (${extended ? 'extended' : 'standard'} L2)`, () => {
        const entries = 8192;
        const table = Buffer.alloc(entries * size);
        expect(firstNonEmptyL2Entry(table, 0, entries, extended)).to.equal(entries);
        // Just past a 4 KiB block boundary, and one bit at the end of an entry (a subcluster bit when extended).
        table[(4096 / size + 1) * size + size - 1] = 1;
        expect(firstNonEmptyL2Entry(table, 0, entries, extended)).to.equal(4096 / size + 1);
        expect(firstNonEmptyL2Entry(table, 0, 4096 / size + 1, extended)).to.equal(4096 / size + 1);
        expect(firstNonEmptyL2Entry(table, 4096 / size + 2, entries, extended)).to.equal(entries);
        writeL2Entry(table, 7000, entry(COPIED, 0x50000), extended);
        expect(firstNonEmptyL2Entry(table, 4096 / size + 2, entries, extended)).to.equal(7000);
        expect(firstNonEmptyL2Entry(table, 7000, 7001, extended)).to.equal(7000);
        expect(firstNonEmptyL2Entry(table, 7001, entries, extended)).to.equal(entries);
      });
    }
    it('skips only entries that classify as unallocated', () => {
      const table = Buffer.alloc(64);
      expect(classifyL2Entry(readL2Entry(table, 0, false), 0, std)).to.equal(SubclusterType.UnallocatedPlain);
      expect(classifyL2Entry(readL2Entry(table, 0, true), 5, ext)).to.equal(SubclusterType.UnallocatedPlain);
      expect(classifyL2Entry(readL2Entry(table, 0, false), 0, { extendedL2: false, hasDataFile: true })).to.equal(SubclusterType.UnallocatedPlain);
    });
  });
  describe('lastContiguousL2Entry', () => {
    const cs = 64 * 1024;
    const put = (table: Buffer, i: number, hi: number, lo: number) => writeL2Entry(table, i, entry(hi, lo), false);

    it('follows entries one cluster apart with the same flags, and stops at a gap, a flag or the end', () => {
      const table = Buffer.alloc(64 * 8);
      for (let i = 0; i < 10; i++) put(table, i, COPIED, 0x100000 + i * cs);
      put(table, 10, COPIED, 0x100000 + 12 * cs); // a gap on the host
      for (let i = 11; i < 15; i++) put(table, i, COPIED, 0x200000 + (i - 11) * cs);
      put(table, 15, 0, 0x200000 + 4 * cs); // contiguous, but not COPIED
      for (let i = 20; i < 25; i++) put(table, i, 0, 0x400000 + (i - 20) * cs + 1); // zero flag, allocated
      expect(lastContiguousL2Entry(table, 0, 64, cs)).to.equal(9);
      expect(lastContiguousL2Entry(table, 3, 64, cs)).to.equal(9);
      expect(lastContiguousL2Entry(table, 0, 5, cs), 'not past end').to.equal(4);
      expect(lastContiguousL2Entry(table, 10, 64, cs)).to.equal(10);
      expect(lastContiguousL2Entry(table, 11, 64, cs)).to.equal(14);
      expect(lastContiguousL2Entry(table, 20, 64, cs)).to.equal(24);
      expect(lastContiguousL2Entry(table, 63, 64, cs)).to.equal(63);
      // Every entry of a run decodes as the run says: same type, host offsets one cluster apart.
      for (let i = 11; i <= 14; i++) {
        expect(classifyL2Entry(readL2Entry(table, i, false), 0, std)).to.equal(SubclusterType.Normal);
        expect(entryOffset(table.readUInt32BE(i * 8), table.readUInt32BE(i * 8 + 4))).to.equal(0x200000 + (i - 11) * cs);
      }
    });

    it('carries across the 4 GiB boundary of the low word, and stops before an offset too large', () => {
      const table = Buffer.alloc(8 * 8);
      const start = 0x100000000 - 2 * cs;
      for (let i = 0; i < 4; i++) {
        const off = start + i * cs;
        put(table, i, (COPIED | Math.floor(off / 0x100000000)) >>> 0, off % 0x100000000);
      }
      expect(lastContiguousL2Entry(table, 0, 8, cs)).to.equal(3);
      // Offsets up to 2^53 are representable; the next cluster after the last one below it is not.
      const top = 2 ** 53 - cs;
      put(table, 4, COPIED | Math.floor(top / 0x100000000), top % 0x100000000);
      put(table, 5, COPIED | 0x00200000, 0);
      expect(lastContiguousL2Entry(table, 4, 8, cs)).to.equal(4);
    });
  });
});
