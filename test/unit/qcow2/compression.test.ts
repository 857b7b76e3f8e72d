import { expect } from 'chai';
import * as zlib from 'zlib';
import { compressCluster, decompressCluster, decompressClusterAsync, DecompressionError, zstdFrameInfo, zstdFrameLength } from '../../../src/qcow2/compression';
import { QCOW2_COMPRESSION_TYPE_ZLIB, QCOW2_COMPRESSION_TYPE_ZSTD } from '../../../src/qcow2/constants';

const MAGIC = [0x28, 0xb5, 0x2f, 0xfd];

/** A zstd block header: 3 bytes little-endian, last flag, type, size. */
function blockHeader(last: boolean, type: number, size: number): number[] {
  const v = (last ? 1 : 0) | (type << 1) | (size << 3);
  return [v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff];
}

/** A frame of raw and RLE blocks built by hand (RFC 8878 section 3.1.1). */
function frame(opts: { fhd: number; headerExtra: number[]; blocks: Array<{ type: 0 | 1; data: number[]; size?: number }>; checksum?: number[] }): Buffer {
  const out = [...MAGIC, opts.fhd, ...opts.headerExtra];
  opts.blocks.forEach((b, i) => {
    out.push(...blockHeader(i === opts.blocks.length - 1, b.type, b.size ?? b.data.length), ...b.data);
  });
  if (opts.checksum) out.push(...opts.checksum);
  return Buffer.from(out);
}

/** "hello\n" x 833 + "he" (5000 bytes) as `zstd` 1.5 writes it: one compressed block and a checksum. */
const REAL = Buffer.from('28b52ffd6488127500003068656c6c6f0a01007f93be1401a849c7bc', 'hex');

describe('qcow2 compression', () => {
  describe('zstd frame length', () => {
    it('a real frame with a compressed block and a checksum, followed by the next cluster', () => {
      expect(zstdFrameLength(REAL)).to.equal(REAL.length);
      expect(zstdFrameInfo(REAL)).to.deep.equal({ length: REAL.length, contentSize: 5000, windowSize: 5000 });
      const withTail = Buffer.concat([REAL, Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4, 5, 6, 7])]);
      expect(zstdFrameLength(withTail)).to.equal(REAL.length);
    });

    it('window descriptor, no content size, raw and RLE blocks', () => {
      // FHD 0: not single segment -> 1-byte window descriptor; no FCS, no dict, no checksum.
      const f = frame({ fhd: 0x00, headerExtra: [0x50], blocks: [{ type: 0, data: [1, 2, 3, 4, 5] }, { type: 1, data: [7], size: 1000 }] });
      expect(zstdFrameLength(Buffer.concat([f, Buffer.alloc(100, 0xaa)]))).to.equal(f.length);
      expect(f.length).to.equal(4 + 1 + 1 + 3 + 5 + 3 + 1);
    });

    for (const [fcsFlag, single, fcsBytes] of [[0, 1, 1], [1, 0, 2], [2, 0, 4], [3, 1, 8]] as const) {
      it(`content size flag ${fcsFlag}, single segment ${single}: ${fcsBytes}-byte content size`, () => {
        const fhd = (fcsFlag << 6) | (single << 5) | (1 << 2) | 2; // checksum, 2-byte dictionary id
        const headerExtra = [...(single ? [] : [0x48]), 0x34, 0x12, ...new Array<number>(fcsBytes).fill(0)];
        const f = frame({ fhd, headerExtra, blocks: [{ type: 0, data: [9, 9, 9] }], checksum: [1, 2, 3, 4] });
        expect(zstdFrameLength(Buffer.concat([f, Buffer.from([0, 0, 0])]))).to.equal(f.length);
      });
    }

    for (const [dictFlag, dictBytes] of [[1, 1], [3, 4]] as const) {
      it(`dictionary id flag ${dictFlag}: ${dictBytes} bytes`, () => {
        const f = frame({ fhd: 0x20 | dictFlag, headerExtra: [...new Array<number>(dictBytes).fill(5), 0x10], blocks: [{ type: 1, data: [0], size: 4096 }] });
        expect(zstdFrameLength(Buffer.concat([f, Buffer.alloc(9)]))).to.equal(f.length);
      });
    }

    it('refuses a missing magic, a truncated frame, a missing checksum and the reserved block type', () => {
      expect(() => zstdFrameLength(Buffer.from([1, 2, 3, 4, 5, 6, 7, 8]))).to.throw(DecompressionError, /magic/);
      expect(() => zstdFrameLength(REAL.subarray(0, 12))).to.throw(DecompressionError, /truncated/);
      expect(() => zstdFrameLength(REAL.subarray(0, REAL.length - 2))).to.throw(DecompressionError, /truncated/);
      const reserved = frame({ fhd: 0x20, headerExtra: [0x10], blocks: [] });
      expect(() => zstdFrameLength(Buffer.concat([reserved, Buffer.from(blockHeader(true, 3, 0))]))).to.throw(DecompressionError, /reserved/);
      const unfinished = frame({ fhd: 0x20, headerExtra: [0x10], blocks: [{ type: 0, data: [1] }] });
      unfinished[4 + 1 + 1] &= ~1; // clear the last-block flag
      expect(() => zstdFrameLength(unfinished)).to.throw(DecompressionError, /truncated/);
    });
  });

  describe('decompressCluster', () => {
    it('zstd: a cluster, ignoring what follows the frame', () => {
      const want = Buffer.from('hello\n'.repeat(834).slice(0, 5000));
      const out = decompressCluster(QCOW2_COMPRESSION_TYPE_ZSTD, Buffer.concat([REAL, Buffer.alloc(300, 0x55)]), 5000);
      expect(out.equals(want)).to.equal(true);
    });

    it('zstd: hand-made raw + RLE frame', () => {
      const f = frame({ fhd: 0x00, headerExtra: [0x50], blocks: [{ type: 0, data: [1, 2, 3] }, { type: 1, data: [7], size: 509 }] });
      const out = decompressCluster(QCOW2_COMPRESSION_TYPE_ZSTD, Buffer.concat([f, Buffer.alloc(20, 1)]), 512);
      expect([...out.subarray(0, 4)]).to.deep.equal([1, 2, 3, 7]);
      expect(out.subarray(3).every((b) => b === 7)).to.equal(true);
    });

    it('zstd: output of the wrong size is an error', () => {
      expect(() => decompressCluster(QCOW2_COMPRESSION_TYPE_ZSTD, REAL, 4096)).to.throw(DecompressionError);
      expect(() => decompressCluster(QCOW2_COMPRESSION_TYPE_ZSTD, REAL, 8192)).to.throw(DecompressionError);
    });

    it('zstd: a frame without a content size must still give exactly one cluster', () => {
      const short = frame({ fhd: 0x00, headerExtra: [0x50], blocks: [{ type: 1, data: [7], size: 500 }] });
      expect(() => decompressCluster(QCOW2_COMPRESSION_TYPE_ZSTD, short, 512)).to.throw(DecompressionError, /gave 500 bytes/);
      const long = frame({ fhd: 0x00, headerExtra: [0x50], blocks: [{ type: 1, data: [7], size: 500 }, { type: 1, data: [8], size: 500 }] });
      expect(() => decompressCluster(QCOW2_COMPRESSION_TYPE_ZSTD, long, 512)).to.throw(DecompressionError, /more than 512/);
    });

    it('zstd: a frame declaring another content size, or a huge window, is refused before decoding', () => {
      // Single segment, 2-byte content size 256 + 0x0100 = 512, cluster of 1024.
      const f = frame({ fhd: 0x60, headerExtra: [0x00, 0x01], blocks: [{ type: 1, data: [1], size: 512 }] });
      expect(zstdFrameInfo(f).contentSize).to.equal(512);
      expect(decompressCluster(QCOW2_COMPRESSION_TYPE_ZSTD, f, 512).every((b) => b === 1)).to.equal(true);
      expect(() => decompressCluster(QCOW2_COMPRESSION_TYPE_ZSTD, f, 1024)).to.throw(DecompressionError, /holds 512 bytes/);
      // Window descriptor exponent 31 - 10: 2 GiB.
      const huge = frame({ fhd: 0x00, headerExtra: [21 << 3], blocks: [{ type: 1, data: [1], size: 512 }] });
      expect(zstdFrameInfo(huge).windowSize).to.equal(2 ** 31);
      expect(() => decompressCluster(QCOW2_COMPRESSION_TYPE_ZSTD, huge, 512)).to.throw(DecompressionError, /window/);
    });

    it('zlib: raw deflate followed by garbage, as QEMU stores it', () => {
      const data = Buffer.alloc(65536);
      for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
      const c = zlib.deflateRawSync(data, { windowBits: 12 });
      const out = decompressCluster(QCOW2_COMPRESSION_TYPE_ZLIB, Buffer.concat([c, Buffer.alloc(511, 0xff)]), 65536);
      expect(out.equals(data)).to.equal(true);
      expect(() => decompressCluster(QCOW2_COMPRESSION_TYPE_ZLIB, c.subarray(0, c.length >> 1), 65536)).to.throw(DecompressionError);
      expect(() => decompressCluster(QCOW2_COMPRESSION_TYPE_ZLIB, c, 32768)).to.throw(DecompressionError);
    });

    it('compressCluster round trips with zlib and declines what does not shrink', () => {
      const data = Buffer.alloc(4096, 'abc');
      const c = compressCluster(QCOW2_COMPRESSION_TYPE_ZLIB, data);
      expect(c).to.not.equal(null);
      expect(decompressCluster(QCOW2_COMPRESSION_TYPE_ZLIB, c!, 4096).equals(data)).to.equal(true);
      const noise = Buffer.alloc(4096);
      for (let i = 0, x = 1; i < noise.length; i++) { x = (x * 1103515245 + 12345) >>> 0; noise[i] = x >>> 24; }
      expect(compressCluster(QCOW2_COMPRESSION_TYPE_ZLIB, noise)).to.equal(null);
    });

    it('an unknown compression type is an error', () => {
      expect(() => decompressCluster(2, Buffer.alloc(10), 512)).to.throw(DecompressionError, /type 2/);
    });
  });
});

describe('qcow2 compression off the event loop (decompressClusterAsync)', () => {
  const cluster = Buffer.alloc(65536);
  for (let i = 0; i < cluster.length; i++) cluster[i] = (i * 7 + (i >> 9)) & 0xff;
  // As QEMU writes them: raw deflate, 4 KiB window, padded to the sector.
  const stream = Buffer.concat([zlib.deflateRawSync(cluster, { windowBits: 12 }), Buffer.alloc(300, 0xaa)]);

  it('gives what the inline decoder gives, into a fresh buffer or one passed in', async () => {
    const a = await decompressClusterAsync(QCOW2_COMPRESSION_TYPE_ZLIB, stream, cluster.length);
    expect(a.equals(cluster)).to.equal(true);
    expect(a.equals(decompressCluster(QCOW2_COMPRESSION_TYPE_ZLIB, stream, cluster.length))).to.equal(true);
    const into = Buffer.alloc(cluster.length);
    const b = await decompressClusterAsync(QCOW2_COMPRESSION_TYPE_ZLIB, stream, cluster.length, into);
    expect(b).to.equal(into);
    expect(into.equals(cluster)).to.equal(true);
  });

  it('inflates many clusters at once, each into its own place', async () => {
    const outs = await Promise.all(Array.from({ length: 32 }, () => decompressClusterAsync(QCOW2_COMPRESSION_TYPE_ZLIB, stream, cluster.length)));
    for (const o of outs) expect(o.equals(cluster)).to.equal(true);
  });

  it('refuses a stream that stops short of the cluster, garbage, and a stream longer than the cluster', async () => {
    const short = zlib.deflateRawSync(cluster.subarray(0, 30000), { windowBits: 12 });
    for (const bad of [short, Buffer.alloc(64, 0xff)]) {
      const err = await decompressClusterAsync(QCOW2_COMPRESSION_TYPE_ZLIB, bad, cluster.length).then(() => null, (e: unknown) => e);
      expect(err).to.be.instanceOf(DecompressionError);
    }
    // A 64 KiB stream read as a 32 KiB cluster: QEMU fills the cluster and ignores the rest.
    const half = await decompressClusterAsync(QCOW2_COMPRESSION_TYPE_ZLIB, stream, 32768);
    expect(half.equals(cluster.subarray(0, 32768))).to.equal(true);
  });
});
