/**
 * Compressed cluster codecs: zlib as raw deflate (compression_type 0) and
 * zstd (compression_type 1). The stored range may carry trailing bytes of
 * the next compressed cluster, so both decoders stop at their stream's end.
 */
import * as zlib from 'zlib';
import { decompress as zstdDecompress } from 'fzstd';
import { QCOW2_COMPRESSION_TYPE_ZLIB, QCOW2_COMPRESSION_TYPE_ZSTD } from './constants';

export class DecompressionError extends Error {}

/** Decompress one cluster; the output must be exactly `clusterSize` bytes. */
export function decompressCluster(type: number, data: Buffer, clusterSize: number): Buffer {
  if (type === QCOW2_COMPRESSION_TYPE_ZLIB) {
    let out: Buffer;
    try {
      out = zlib.inflateRawSync(data, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
    } catch (err) {
      throw new DecompressionError(`deflate stream invalid: ${(err as Error).message}`);
    }
    if (out.length !== clusterSize) throw new DecompressionError(`deflate stream gave ${out.length} bytes, expected ${clusterSize}`);
    return out;
  }
  if (type === QCOW2_COMPRESSION_TYPE_ZSTD) {
    const len = zstdFrameLength(data);
    const out = Buffer.alloc(clusterSize);
    let got: Uint8Array;
    try {
      got = zstdDecompress(data.subarray(0, len), out);
    } catch (err) {
      throw new DecompressionError(`zstd stream invalid: ${(err as Error).message}`);
    }
    if (got.length !== clusterSize) throw new DecompressionError(`zstd stream gave ${got.length} bytes, expected ${clusterSize}`);
    return got === out ? out : Buffer.from(got.buffer, got.byteOffset, got.byteLength);
  }
  throw new DecompressionError(`unknown compression type ${type}`);
}

/** Compress one cluster; null when it does not shrink. */
export function compressCluster(type: number, data: Buffer): Buffer | null {
  if (type !== QCOW2_COMPRESSION_TYPE_ZLIB) return null;
  const out = zlib.deflateRawSync(data, { level: 6, windowBits: 12 });
  return out.length < data.length - 512 ? out : null;
}

/**
 * Length of the first zstd frame in `buf` (RFC 8878 section 3.1.1): the
 * frame header, then blocks until the last one, then an optional checksum.
 */
export function zstdFrameLength(buf: Buffer): number {
  if (buf.length < 6 || buf.readUInt32LE(0) !== 0xfd2fb528) throw new DecompressionError('zstd frame magic missing');
  const fhd = buf[4];
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictIdFlag = fhd & 3;
  let off = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictIdFlag] + [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag];
  for (;;) {
    if (off + 3 > buf.length) throw new DecompressionError('zstd frame truncated');
    const bh = buf[off] | (buf[off + 1] << 8) | (buf[off + 2] << 16);
    const last = bh & 1;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    off += 3 + (type === 1 ? 1 : size);
    if (type === 3) throw new DecompressionError('zstd reserved block type');
    if (last) break;
  }
  if (checksum) off += 4;
  if (off > buf.length) throw new DecompressionError('zstd frame truncated');
  return off;
}
