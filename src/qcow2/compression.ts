/**
 * Compressed cluster codecs: zlib as raw deflate (compression_type 0) and
 * zstd (compression_type 1). The stored range may carry trailing bytes of
 * the next compressed cluster, so both decoders stop at their stream's end.
 */
import * as zlib from 'zlib';
import { Decompress as ZstdStream } from 'fzstd';
import { QCOW2_COMPRESSION_TYPE_ZLIB, QCOW2_COMPRESSION_TYPE_ZSTD } from './constants';
import { loadNative } from '../io/native';

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
    // As qcow2_zstd_decompress: the frame must produce exactly one cluster.
    // fzstd fills a caller's buffer without saying how much it wrote, so
    // count the blocks as they come and stop as soon as there are too many.
    const info = zstdFrameInfo(data);
    if (info.contentSize !== null && info.contentSize !== clusterSize) {
      throw new DecompressionError(`zstd frame holds ${info.contentSize} bytes, expected ${clusterSize}`);
    }
    if (info.windowSize > ZSTD_WINDOW_SIZE_LIMIT) throw new DecompressionError(`zstd window of ${info.windowSize} bytes is too large`);
    const out = Buffer.alloc(clusterSize);
    let got = 0;
    const stream = new ZstdStream((chunk) => {
      if (got + chunk.length > clusterSize) throw new DecompressionError(`zstd stream gave more than ${clusterSize} bytes`);
      out.set(chunk, got);
      got += chunk.length;
    });
    try {
      stream.push(data.subarray(0, info.length), true);
    } catch (err) {
      if (err instanceof DecompressionError) throw err;
      throw new DecompressionError(`zstd stream invalid: ${(err as Error).message}`);
    }
    if (got !== clusterSize) throw new DecompressionError(`zstd stream gave ${got} bytes, expected ${clusterSize}`);
    return out;
  }
  throw new DecompressionError(`unknown compression type ${type}`);
}

/**
 * decompressCluster off the event loop where it can be: zlib clusters are
 * inflated on the threadpool by the native module (so the clusters of one
 * large read inflate in parallel), with QEMU's rule that the stream fills
 * the cluster exactly. zstd, and zlib without the native module, run inline.
 * With `into` (one cluster long) the cluster is decompressed there.
 */
export function decompressClusterAsync(type: number, data: Buffer, clusterSize: number, into?: Buffer): Promise<Buffer> {
  if (into !== undefined && into.length !== clusterSize) throw new RangeError('the output buffer must hold one cluster');
  const native = type === QCOW2_COMPRESSION_TYPE_ZLIB ? loadNative() : null;
  if (native === null) {
    try {
      const out = decompressCluster(type, data, clusterSize);
      if (into === undefined) return Promise.resolve(out);
      out.copy(into);
      return Promise.resolve(into);
    } catch (err) {
      return Promise.reject(err);
    }
  }
  const out = into ?? Buffer.allocUnsafe(clusterSize);
  return new Promise((resolve, reject) => {
    native.inflateCluster(data, out, (ok, message) => (ok ? resolve(out) : reject(new DecompressionError(message))));
  });
}

/** Compress one cluster; null when it does not shrink. */
export function compressCluster(type: number, data: Buffer): Buffer | null {
  if (type !== QCOW2_COMPRESSION_TYPE_ZLIB) return null;
  const out = zlib.deflateRawSync(data, { level: 6, windowBits: 12 });
  return out.length < data.length - 512 ? out : null;
}

/** libzstd's default decompression window limit (ZSTD_WINDOWLOG_LIMIT_DEFAULT = 27). */
export const ZSTD_WINDOW_SIZE_LIMIT = 2 ** 27;

export interface ZstdFrameInfo {
  /** Bytes the frame occupies, checksum included. */
  length: number;
  /** Frame_Content_Size, when the header carries it. */
  contentSize: number | null;
  /** Window size the decoder must provide. */
  windowSize: number;
}

/**
 * The first zstd frame in `buf` (RFC 8878 section 3.1.1): the frame header,
 * then blocks until the last one, then an optional checksum.
 */
export function zstdFrameInfo(buf: Buffer): ZstdFrameInfo {
  if (buf.length < 6 || buf.readUInt32LE(0) !== 0xfd2fb528) throw new DecompressionError('zstd frame magic missing');
  const fhd = buf[4];
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictIdFlag = fhd & 3;
  if (fhd & 8) throw new DecompressionError('zstd frame header reserved bit set');
  const fcsOff = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictIdFlag];
  const fcsSize = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag];
  let off = fcsOff + fcsSize;
  if (off > buf.length) throw new DecompressionError('zstd frame truncated');
  let contentSize: number | null = null;
  if (fcsSize === 1) contentSize = buf[fcsOff];
  else if (fcsSize === 2) contentSize = buf.readUInt16LE(fcsOff) + 256;
  else if (fcsSize === 4) contentSize = buf.readUInt32LE(fcsOff);
  else if (fcsSize === 8) contentSize = buf.readUInt32LE(fcsOff) + buf.readUInt32LE(fcsOff + 4) * 2 ** 32;
  let windowSize: number;
  if (singleSegment) {
    windowSize = contentSize!;
  } else {
    const wd = buf[5];
    const base = 2 ** (10 + (wd >> 3));
    windowSize = base + (base / 8) * (wd & 7);
  }
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
  return { length: off, contentSize, windowSize };
}

/** Length of the first zstd frame in `buf`. */
export function zstdFrameLength(buf: Buffer): number {
  return zstdFrameInfo(buf).length;
}
