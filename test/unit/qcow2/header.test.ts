import { expect } from 'chai';
import { decodeHeader, encodeHeader, encodedHeaderSize, featureName, Qcow2Header } from '../../../src/qcow2/header';
import { CorruptImageError, NotQcow2Error } from '../../../src/qcow2/errors';
import {
  QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_DATA_FILE, QCOW2_EXT_MAGIC_FEATURE_TABLE, QCOW2_INCOMPAT_COMPRESSION,
  QCOW2_INCOMPAT_DATA_FILE, QCOW2_COMPRESSION_TYPE_ZSTD,
} from '../../../src/qcow2/constants';

const CS = 65536;

function featureTable(entries: Array<[number, number, string]>): Buffer {
  const b = Buffer.alloc(48 * entries.length);
  entries.forEach(([type, bit, name], i) => {
    b[i * 48] = type;
    b[i * 48 + 1] = bit;
    b.write(name, i * 48 + 2);
  });
  return b;
}

function v3Header(over: Partial<Qcow2Header> = {}): Qcow2Header {
  return {
    version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: 16, size: 3 * 2 ** 40 + 512,
    cryptMethod: 0, l1Size: 6, l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1,
    nbSnapshots: 2, snapshotsOffset: 0x2_0000_0000_0000, incompatibleFeatures: QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_DATA_FILE,
    incompatibleFeaturesHi: 0, compatibleFeatures: 1, compatibleFeaturesHi: 0, autoclearFeatures: 2, autoclearFeaturesHi: 0,
    refcountOrder: 6, headerLength: 112, compressionType: QCOW2_COMPRESSION_TYPE_ZSTD,
    backingFile: '../base image.qcow2', backingFormat: 'qcow2', dataFile: 'data.raw',
    featureNames: [{ type: 'incompatible', bit: 0, name: 'dirty bit' }, { type: 'autoclear', bit: 1, name: 'raw external data' }],
    hasBitmapsExtension: false, hasCryptoHeader: false,
    extensions: [
      { type: QCOW2_EXT_MAGIC_BACKING_FORMAT, data: Buffer.from('qcow2') },
      { type: QCOW2_EXT_MAGIC_DATA_FILE, data: Buffer.from('data.raw') },
      { type: 0x12345678, data: Buffer.from([1, 2, 3]) },
      { type: QCOW2_EXT_MAGIC_FEATURE_TABLE, data: featureTable([[0, 0, 'dirty bit'], [2, 1, 'raw external data']]) },
    ],
    ...over,
  };
}

function expectError<T extends Error>(fn: () => unknown, type: new (...args: never[]) => T, match: RegExp): T {
  let err: unknown = null;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, 'an error').to.be.instanceOf(type);
  expect((err as Error).message).to.match(match);
  return err as T;
}

describe('qcow2 header', () => {
  describe('encode/decode round trip', () => {
    it('v3 with every extension, 64-bit fields and a backing name', () => {
      const h = v3Header();
      const buf = encodeHeader(h, CS);
      expect(buf.length).to.equal(CS);
      const d = decodeHeader(buf, CS * 4);
      expect(d).to.deep.equal({ ...h, backingFileOffset: d.backingFileOffset, backingFileSize: 19 });
      expect(d.backingFileOffset).to.equal(encodedHeaderSize(h) - 19);
      // Fields at their spec offsets.
      expect(buf.readUInt32BE(0)).to.equal(0x514649fb);
      expect(buf.readUInt32BE(4)).to.equal(3);
      expect(buf.readBigUInt64BE(24)).to.equal(BigInt(h.size));
      expect(buf.readBigUInt64BE(64)).to.equal(0x2_0000_0000_0000n);
      expect(buf.readUInt32BE(96)).to.equal(6);
      expect(buf.readUInt32BE(100)).to.equal(112);
      expect(buf[104]).to.equal(QCOW2_COMPRESSION_TYPE_ZSTD);
      // Re-encoding the decoded header gives the same bytes.
      expect(encodeHeader(d, CS).equals(buf)).to.equal(true);
    });

    it('v2: 72-byte header, v3 fields take their defaults', () => {
      const h = v3Header({
        version: 2, headerLength: 72, refcountOrder: 4, incompatibleFeatures: 0, compatibleFeatures: 0, autoclearFeatures: 0,
        compressionType: 0, dataFile: null, featureNames: [], backingFormat: null, extensions: [], clusterBits: 9, nbSnapshots: 0, snapshotsOffset: 0,
      });
      const buf = encodeHeader(h, 512);
      const d = decodeHeader(buf, 4096);
      expect(d.version).to.equal(2);
      expect(d.headerLength).to.equal(72);
      expect(d.refcountOrder).to.equal(4);
      expect(d.backingFileOffset).to.equal(80);
      expect(d.backingFile).to.equal('../base image.qcow2');
      expect(encodeHeader(d, 512).equals(buf)).to.equal(true);
    });

    it('a header that does not fit the cluster is refused', () => {
      const h = v3Header({ clusterBits: 9, backingFile: 'x'.repeat(300) });
      expect(() => encodeHeader(h, 512)).to.throw(RangeError);
    });
  });

  describe('validation', () => {
    const good = () => encodeHeader(v3Header(), CS);

    it('bad magic', () => {
      const b = good();
      b.writeUInt32BE(0x514649fa, 0);
      expectError(() => decodeHeader(b, CS), NotQcow2Error, /bad magic/);
    });

    it('too short for a header', () => {
      expectError(() => decodeHeader(good().subarray(0, 71), 71), NotQcow2Error, /too short/);
    });

    for (const v of [0, 1, 4, 0xffffffff]) {
      it(`version ${v}`, () => {
        const b = good();
        b.writeUInt32BE(v, 4);
        expectError(() => decodeHeader(b, CS), NotQcow2Error, new RegExp(`version ${v}`));
      });
    }

    for (const bits of [0, 8, 22, 63]) {
      it(`cluster_bits ${bits}`, () => {
        const b = good();
        b.writeUInt32BE(bits, 20);
        const err = expectError(() => decodeHeader(b, CS), CorruptImageError, /cluster_bits/);
        expect(err.hostOffset).to.equal(20);
      });
    }

    it('every cluster_bits from 9 to 21 is accepted', () => {
      for (let bits = 9; bits <= 21; bits++) {
        const h = v3Header({ clusterBits: bits, extensions: [], backingFile: null, backingFormat: null, dataFile: null, featureNames: [] });
        expect(decodeHeader(encodeHeader(h, 2 ** bits), 2 ** bits).clusterBits).to.equal(bits);
      }
    });

    for (const [len, why] of [[103, /below 104/], [72, /below 104/], [CS + 8, /exceeds the cluster size/]] as const) {
      it(`header_length ${len}`, () => {
        const b = good();
        b.writeUInt32BE(len, 100);
        const err = expectError(() => decodeHeader(b, CS), CorruptImageError, why);
        expect(err.hostOffset).to.equal(100);
      });
    }

    it('header_length past the end of the file', () => {
      const b = encodeHeader(v3Header({ extensions: [], backingFile: null, featureNames: [], backingFormat: null, dataFile: null }), CS);
      b.writeUInt32BE(4096, 100);
      expectError(() => decodeHeader(b.subarray(0, 2048), 2048), CorruptImageError, /past the end/);
    });

    it('v3 header cut short', () => {
      expectError(() => decodeHeader(good().subarray(0, 100), 100), CorruptImageError, /version 3 header/);
    });

    it('refcount_order above 6', () => {
      const b = good();
      b.writeUInt32BE(7, 96);
      expectError(() => decodeHeader(b, CS), CorruptImageError, /refcount_order 7/);
    });

    it('a compression type without its feature bit', () => {
      const b = good();
      b.writeUInt32BE(b.readUInt32BE(76) & ~QCOW2_INCOMPAT_COMPRESSION, 76);
      expectError(() => decodeHeader(b, CS), CorruptImageError, /compression_type 1/);
    });

    it('64-bit fields beyond 2^53 are refused, not rounded', () => {
      const b = good();
      b.writeUInt32BE(0x00200000, 24);
      expectError(() => decodeHeader(b, CS), CorruptImageError, /size too large/);
    });

    it('an extension running past the first cluster', () => {
      const b = good();
      b.writeUInt32BE(CS, 112 + 4);
      expectError(() => decodeHeader(b, CS), CorruptImageError, /runs past the first cluster/);
    });

    it('a backing file name that is empty, too long or outside the first cluster', () => {
      for (const [size, off, why] of [[0, 1000, /length 0/], [1024, 1000, /length 1024/], [100, CS - 50, /outside the first cluster/]] as const) {
        const b = good();
        b.writeBigUInt64BE(BigInt(off), 8);
        b.writeUInt32BE(size, 16);
        expectError(() => decodeHeader(b, CS), CorruptImageError, why);
      }
    });

    it('unknown extensions are kept in order; a missing end marker ends the list at the cluster end', () => {
      const h = v3Header({ backingFile: null, clusterBits: 9 });
      h.extensions = [{ type: 0xdeadbeef, data: Buffer.alloc(512 - 112 - 8, 0xee) }];
      h.featureNames = [];
      h.backingFormat = null;
      h.dataFile = null;
      const b = Buffer.alloc(512);
      encodeHeader({ ...h, extensions: [] }, 1024).copy(b, 0, 0, 112);
      b.writeUInt32BE(0xdeadbeef, 112);
      b.writeUInt32BE(512 - 112 - 8, 116);
      const d = decodeHeader(b, 512);
      expect(d.extensions.map((e) => e.type)).to.deep.equal([0xdeadbeef]);
      expect(d.extensions[0].data.length).to.equal(392);
    });
  });

  describe('feature names', () => {
    it('from the image table first, QEMU names otherwise, and unknown bits by number', () => {
      const h = decodeHeader(encodeHeader(v3Header({ featureNames: [], extensions: [{ type: QCOW2_EXT_MAGIC_FEATURE_TABLE, data: featureTable([[0, 0, 'own dirty name']]) }] }), CS), CS);
      expect(featureName(h, 'incompatible', 0)).to.equal('own dirty name');
      expect(featureName(h, 'incompatible', 4)).to.equal('extended L2 entries');
      expect(featureName(h, 'compatible', 0)).to.equal('lazy refcounts');
      expect(featureName(h, 'autoclear', 1)).to.equal('raw external data');
      expect(featureName(h, 'incompatible', 5)).to.equal('unknown incompatible feature bit 5');
      expect(featureName(h, 'incompatible', 40)).to.equal('unknown incompatible feature bit 40');
    });
  });
});
