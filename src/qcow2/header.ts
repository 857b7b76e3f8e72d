/**
 * The qcow2 header and its extensions (qcow2.txt "Header" and "Header
 * extensions"): one decode and one encode, each field at its stated offset.
 */
import {
  QCOW_MAGIC, QCOW2_V2_HEADER_SIZE, QCOW2_V3_HEADER_SIZE, QCOW2_VERSION_2, QCOW2_VERSION_3,
  MIN_CLUSTER_BITS, MAX_CLUSTER_BITS, QCOW2_EXT_MAGIC_END, QCOW2_EXT_MAGIC_BACKING_FORMAT,
  QCOW2_EXT_MAGIC_FEATURE_TABLE, QCOW2_EXT_MAGIC_DATA_FILE, QCOW2_EXT_MAGIC_BITMAPS,
  QCOW2_EXT_MAGIC_CRYPTO_HEADER, MAX_BACKING_FILE_NAME, QCOW2_COMPRESSION_TYPE_ZLIB,
  QCOW2_INCOMPAT_COMPRESSION, QCOW2_V3_HEADER_SIZE_WITH_COMPRESSION,
} from './constants';
import { CorruptImageError, NotQcow2Error } from './errors';
import { readU64, writeU64 } from './uint64';

export interface FeatureName {
  type: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
}

export interface HeaderExtension {
  type: number;
  /** Raw payload (unpadded). */
  data: Buffer;
}

export interface Qcow2Header {
  version: number;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** Feature bitmaps, low 32 bits (all defined bits are below 32); the high words are kept apart. */
  incompatibleFeatures: number;
  incompatibleFeaturesHi: number;
  compatibleFeatures: number;
  compatibleFeaturesHi: number;
  autoclearFeatures: number;
  autoclearFeaturesHi: number;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;

  /** Decoded extensions. */
  backingFile: string | null;
  backingFormat: string | null;
  dataFile: string | null;
  featureNames: FeatureName[];
  hasBitmapsExtension: boolean;
  hasCryptoHeader: boolean;
  /** Every extension in order, known or not, for rewriting the header unchanged. */
  extensions: HeaderExtension[];
}

function corrupt(offset: number, reason: string): never {
  throw new CorruptImageError('header', offset, reason);
}

/**
 * Decode the header from the image's first cluster (at least the first 4 KiB,
 * more when the cluster is larger; extensions live in cluster 0).
 */
export function decodeHeader(buf: Buffer, fileSize: number, name = 'image'): Qcow2Header {
  if (buf.length < QCOW2_V2_HEADER_SIZE) throw new NotQcow2Error(name, `file too short for a header (${fileSize} bytes)`);
  if (buf.readUInt32BE(0) !== QCOW_MAGIC) throw new NotQcow2Error(name, 'bad magic');
  const version = buf.readUInt32BE(4);
  if (version !== QCOW2_VERSION_2 && version !== QCOW2_VERSION_3) {
    throw new NotQcow2Error(name, `unsupported qcow2 version ${version}`);
  }
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    corrupt(20, `cluster_bits ${clusterBits} out of range ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`);
  }
  const clusterSize = 2 ** clusterBits;
  const u64 = (off: number, what: string): number => {
    const v = readU64(buf, off);
    if (Number.isNaN(v)) corrupt(off, `${what} too large`);
    return v;
  };
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(8, 'backing_file_offset'),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits,
    size: u64(24, 'size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: u64(40, 'l1_table_offset'),
    refcountTableOffset: u64(48, 'refcount_table_offset'),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: u64(64, 'snapshots_offset'),
    incompatibleFeatures: 0,
    incompatibleFeaturesHi: 0,
    compatibleFeatures: 0,
    compatibleFeaturesHi: 0,
    autoclearFeatures: 0,
    autoclearFeaturesHi: 0,
    refcountOrder: 4,
    headerLength: QCOW2_V2_HEADER_SIZE,
    compressionType: QCOW2_COMPRESSION_TYPE_ZLIB,
    backingFile: null,
    backingFormat: null,
    dataFile: null,
    featureNames: [],
    hasBitmapsExtension: false,
    hasCryptoHeader: false,
    extensions: [],
  };
  if (version >= QCOW2_VERSION_3) {
    if (buf.length < QCOW2_V3_HEADER_SIZE) corrupt(0, 'file too short for a version 3 header');
    h.incompatibleFeaturesHi = buf.readUInt32BE(72);
    h.incompatibleFeatures = buf.readUInt32BE(76);
    h.compatibleFeaturesHi = buf.readUInt32BE(80);
    h.compatibleFeatures = buf.readUInt32BE(84);
    h.autoclearFeaturesHi = buf.readUInt32BE(88);
    h.autoclearFeatures = buf.readUInt32BE(92);
    h.refcountOrder = buf.readUInt32BE(96);
    h.headerLength = buf.readUInt32BE(100);
    if (h.refcountOrder > 6) corrupt(96, `refcount_order ${h.refcountOrder} out of range 0..6`);
    if (h.headerLength < QCOW2_V3_HEADER_SIZE) corrupt(100, `header_length ${h.headerLength} below ${QCOW2_V3_HEADER_SIZE}`);
    if (h.headerLength > clusterSize) corrupt(100, `header_length ${h.headerLength} exceeds the cluster size`);
    if (h.headerLength > buf.length) corrupt(100, `header_length ${h.headerLength} runs past the end of the file`);
    if (h.headerLength >= 105) h.compressionType = buf.readUInt8(104);
    if ((h.incompatibleFeatures & QCOW2_INCOMPAT_COMPRESSION) === 0 && h.compressionType !== QCOW2_COMPRESSION_TYPE_ZLIB) {
      corrupt(104, `compression_type ${h.compressionType} set without the compression type feature bit`);
    }
  }
  // Header extensions: between the header and the end of cluster 0 (or the backing name).
  const extEnd = Math.min(buf.length, clusterSize);
  let off = h.headerLength;
  for (;;) {
    if (off + 8 > extEnd) {
      // QEMU tolerates a missing end marker when the area is exhausted.
      break;
    }
    const type = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    if (type === QCOW2_EXT_MAGIC_END) break;
    const dataOff = off + 8;
    if (len > extEnd - dataOff) corrupt(off, `header extension 0x${type.toString(16)} (${len} bytes) runs past the first cluster`);
    const data = Buffer.from(buf.subarray(dataOff, dataOff + len));
    h.extensions.push({ type, data });
    switch (type) {
      case QCOW2_EXT_MAGIC_BACKING_FORMAT:
        h.backingFormat = data.toString('utf8');
        break;
      case QCOW2_EXT_MAGIC_DATA_FILE:
        h.dataFile = data.toString('utf8');
        break;
      case QCOW2_EXT_MAGIC_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const t = data.readUInt8(i);
          const bit = data.readUInt8(i + 1);
          const nm = data.subarray(i + 2, i + 48);
          const z = nm.indexOf(0);
          h.featureNames.push({
            type: t === 0 ? 'incompatible' : t === 1 ? 'compatible' : 'autoclear',
            bit,
            name: nm.subarray(0, z < 0 ? nm.length : z).toString('utf8'),
          });
        }
        break;
      case QCOW2_EXT_MAGIC_BITMAPS:
        h.hasBitmapsExtension = true;
        break;
      case QCOW2_EXT_MAGIC_CRYPTO_HEADER:
        h.hasCryptoHeader = true;
        break;
      default:
        break; // unknown extensions are skipped (and kept for rewriting)
    }
    off = dataOff + ((len + 7) & ~7);
  }
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_FILE_NAME || h.backingFileSize === 0) {
      corrupt(16, `backing file name length ${h.backingFileSize} invalid`);
    }
    if (h.backingFileOffset + h.backingFileSize > Math.min(clusterSize, buf.length)) {
      corrupt(8, 'backing file name lies outside the first cluster');
    }
    h.backingFile = buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize).toString('utf8');
  }
  return h;
}

/** Size of the header's encoding with its extensions and backing file name. */
export function encodedHeaderSize(h: Qcow2Header): number {
  let n = h.version >= 3 ? h.headerLength : QCOW2_V2_HEADER_SIZE;
  for (const e of h.extensions) n += 8 + ((e.data.length + 7) & ~7);
  n += 8; // end marker
  if (h.backingFile !== null) n += Buffer.byteLength(h.backingFile);
  return n;
}

/**
 * Encode the header, its extensions (in their original order, unknown ones
 * included) and the backing file name into a buffer of `clusterSize` bytes.
 * `h.backingFileOffset`/`backingFileSize` are recomputed.
 */
export function encodeHeader(h: Qcow2Header, clusterSize: number): Buffer {
  const need = encodedHeaderSize(h);
  if (need > clusterSize) throw new RangeError(`header with extensions (${need} bytes) does not fit one cluster`);
  const buf = Buffer.alloc(clusterSize);
  buf.writeUInt32BE(QCOW_MAGIC, 0);
  buf.writeUInt32BE(h.version, 4);
  buf.writeUInt32BE(h.clusterBits, 20);
  writeU64(buf, 24, h.size);
  buf.writeUInt32BE(h.cryptMethod, 32);
  buf.writeUInt32BE(h.l1Size, 36);
  writeU64(buf, 40, h.l1TableOffset);
  writeU64(buf, 48, h.refcountTableOffset);
  buf.writeUInt32BE(h.refcountTableClusters, 56);
  buf.writeUInt32BE(h.nbSnapshots, 60);
  writeU64(buf, 64, h.snapshotsOffset);
  let off = QCOW2_V2_HEADER_SIZE;
  if (h.version >= 3) {
    buf.writeUInt32BE(h.incompatibleFeaturesHi >>> 0, 72);
    buf.writeUInt32BE(h.incompatibleFeatures >>> 0, 76);
    buf.writeUInt32BE(h.compatibleFeaturesHi >>> 0, 80);
    buf.writeUInt32BE(h.compatibleFeatures >>> 0, 84);
    buf.writeUInt32BE(h.autoclearFeaturesHi >>> 0, 88);
    buf.writeUInt32BE(h.autoclearFeatures >>> 0, 92);
    buf.writeUInt32BE(h.refcountOrder, 96);
    buf.writeUInt32BE(h.headerLength, 100);
    if (h.headerLength >= QCOW2_V3_HEADER_SIZE_WITH_COMPRESSION) buf.writeUInt8(h.compressionType, 104);
    off = h.headerLength;
  }
  for (const e of h.extensions) {
    buf.writeUInt32BE(e.type >>> 0, off);
    buf.writeUInt32BE(e.data.length, off + 4);
    e.data.copy(buf, off + 8);
    off += 8 + ((e.data.length + 7) & ~7);
  }
  buf.writeUInt32BE(QCOW2_EXT_MAGIC_END, off);
  buf.writeUInt32BE(0, off + 4);
  off += 8;
  if (h.backingFile !== null) {
    const name = Buffer.from(h.backingFile, 'utf8');
    name.copy(buf, off);
    h.backingFileOffset = off;
    h.backingFileSize = name.length;
  } else {
    h.backingFileOffset = 0;
    h.backingFileSize = 0;
  }
  writeU64(buf, 8, h.backingFileOffset);
  buf.writeUInt32BE(h.backingFileSize, 16);
  return buf;
}

/** The QEMU name of a feature bit, from the image's own table or the spec. */
export function featureName(h: Qcow2Header, type: FeatureName['type'], bit: number): string {
  const own = h.featureNames.find((f) => f.type === type && f.bit === bit);
  if (own) return own.name;
  const known: Record<string, string[]> = {
    incompatible: ['dirty bit', 'corrupt bit', 'external data file', 'compression type', 'extended L2 entries'],
    compatible: ['lazy refcounts'],
    autoclear: ['bitmaps', 'raw external data'],
  };
  return known[type][bit] ?? `unknown ${type} feature bit ${bit}`;
}
