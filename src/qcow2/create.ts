/**
 * Creating images QEMU opens: header (+ feature name table and backing
 * format extensions), refcount table and blocks that describe themselves,
 * and an empty L1 table, laid out as qemu-img lays them out.
 */
import * as fs from 'fs';
import * as path from 'path';
import { BlockDevice } from '../io/block-device';
import {
  QCOW2_VERSION_2, QCOW2_VERSION_3, QCOW2_V3_HEADER_SIZE_WITH_COMPRESSION, QCOW2_V2_HEADER_SIZE,
  QCOW2_EXT_MAGIC_FEATURE_TABLE, QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_INCOMPAT_EXTL2, QCOW2_INCOMPAT_COMPRESSION,
  QCOW2_COMPAT_LAZY_REFCOUNTS, QCOW2_COMPRESSION_TYPE_ZLIB, QCOW2_COMPRESSION_TYPE_ZSTD, MIN_CLUSTER_BITS,
  MAX_CLUSTER_BITS, QCOW_MAX_L1_SIZE_BYTES, QCOW_MAX_VIRTUAL_SIZE, QCOW_CRYPT_NONE,
} from './constants';
import { encodeHeader, encodedHeaderSize, Qcow2Header } from './header';
import { writeRefcountEntry } from './refcount';
import { l1EntriesFor } from './layout';
import { writeU64 } from './uint64';
import { InvalidRequestError, BackingChainError } from './errors';

export interface CreateOptions {
  size: number;
  clusterSize?: number;
  refcountBits?: number;
  /** "0.10" (version 2) or "1.1" (version 3, default). */
  compat?: '0.10' | '1.1';
  lazyRefcounts?: boolean;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  backingFile?: string;
  backingFormat?: 'qcow2' | 'raw';
}

/** The features QEMU names in its feature table extension (type, bit, name). */
const FEATURE_TABLE: Array<[number, number, string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

function featureTable(): Buffer {
  const buf = Buffer.alloc(FEATURE_TABLE.length * 48);
  FEATURE_TABLE.forEach(([type, bit, name], i) => {
    buf.writeUInt8(type, i * 48);
    buf.writeUInt8(bit, i * 48 + 1);
    buf.write(name, i * 48 + 2, 46, 'utf8');
  });
  return buf;
}

/** Validate options as qemu-img does and fill defaults. */
export function normalizeCreateOptions(o: CreateOptions): Required<Omit<CreateOptions, 'backingFile' | 'backingFormat'>> & Pick<CreateOptions, 'backingFile' | 'backingFormat'> {
  const clusterSize = o.clusterSize ?? 65536;
  const bits = Math.log2(clusterSize);
  if (!Number.isInteger(bits) || bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) {
    throw new InvalidRequestError('cluster size must be a power of two between 512 and 2M');
  }
  const compat = o.compat ?? '1.1';
  if (compat !== '0.10' && compat !== '1.1') throw new InvalidRequestError(`invalid compat level '${compat as string}' (0.10 or 1.1)`);
  const refcountBits = o.refcountBits ?? 16;
  if (![1, 2, 4, 8, 16, 32, 64].includes(refcountBits)) throw new InvalidRequestError('refcount_bits must be a power of two up to 64');
  const v2 = compat === '0.10';
  if (v2 && refcountBits !== 16) throw new InvalidRequestError('different refcount widths than 16 bits require compat=1.1 or greater');
  if (v2 && o.lazyRefcounts) throw new InvalidRequestError('lazy refcounts only supported with compatibility level 1.1 and above');
  if (v2 && o.extendedL2) throw new InvalidRequestError('extended L2 entries are only supported with compatibility level 1.1 and above');
  if (v2 && o.compressionType === 'zstd') throw new InvalidRequestError('compression type zstd requires compat=1.1 or greater');
  if (o.extendedL2 && clusterSize < 16384) throw new InvalidRequestError('extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  if (!Number.isSafeInteger(o.size) || o.size < 0 || o.size > QCOW_MAX_VIRTUAL_SIZE) throw new InvalidRequestError(`invalid image size ${o.size}`);
  if (l1EntriesFor(o.size, bits, !!o.extendedL2) * 8 > QCOW_MAX_L1_SIZE_BYTES) {
    throw new InvalidRequestError(`image size ${o.size} is too large for cluster size ${clusterSize}`);
  }
  return {
    size: o.size,
    clusterSize,
    refcountBits,
    compat,
    lazyRefcounts: !!o.lazyRefcounts,
    extendedL2: !!o.extendedL2,
    compressionType: o.compressionType ?? 'zlib',
    backingFile: o.backingFile,
    backingFormat: o.backingFormat,
  };
}

/** Write a new, empty image onto `dev` (which should be empty). */
export async function createOnDevice(dev: BlockDevice, options: CreateOptions): Promise<void> {
  const o = normalizeCreateOptions(options);
  const cs = o.clusterSize;
  const clusterBits = Math.log2(cs);
  const order = Math.log2(o.refcountBits);
  const epb = (cs * 8) / o.refcountBits;
  const v3 = o.compat === '1.1';
  const l1Size = l1EntriesFor(o.size, clusterBits, o.extendedL2);
  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
  // Refcount table and blocks big enough to describe everything, themselves included.
  let tableClusters = 1;
  let blocks = 1;
  for (;;) {
    const total = 1 + tableClusters + blocks + l1Clusters;
    const needBlocks = Math.ceil(total / epb);
    const needTable = Math.ceil((needBlocks * 8) / cs);
    if (needBlocks === blocks && needTable === tableClusters) break;
    blocks = Math.max(needBlocks, 1);
    tableClusters = Math.max(needTable, 1);
  }
  const tableOffset = cs;
  const blocksOffset = tableOffset + tableClusters * cs;
  const l1Offset = blocksOffset + blocks * cs;
  const total = 1 + tableClusters + blocks + l1Clusters;

  const h: Qcow2Header = {
    version: v3 ? QCOW2_VERSION_3 : QCOW2_VERSION_2,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits,
    size: o.size,
    cryptMethod: QCOW_CRYPT_NONE,
    l1Size,
    l1TableOffset: l1Offset,
    refcountTableOffset: tableOffset,
    refcountTableClusters: tableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: (o.extendedL2 ? QCOW2_INCOMPAT_EXTL2 : 0) | (o.compressionType === 'zstd' ? QCOW2_INCOMPAT_COMPRESSION : 0),
    incompatibleFeaturesHi: 0,
    compatibleFeatures: o.lazyRefcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0,
    compatibleFeaturesHi: 0,
    autoclearFeatures: 0,
    autoclearFeaturesHi: 0,
    refcountOrder: order,
    headerLength: v3 ? QCOW2_V3_HEADER_SIZE_WITH_COMPRESSION : QCOW2_V2_HEADER_SIZE,
    compressionType: o.compressionType === 'zstd' ? QCOW2_COMPRESSION_TYPE_ZSTD : QCOW2_COMPRESSION_TYPE_ZLIB,
    backingFile: o.backingFile ?? null,
    backingFormat: o.backingFormat ?? null,
    dataFile: null,
    featureNames: [],
    hasBitmapsExtension: false,
    hasCryptoHeader: false,
    extensions: [],
  };
  if (o.backingFormat) h.extensions.push({ type: QCOW2_EXT_MAGIC_BACKING_FORMAT, data: Buffer.from(o.backingFormat) });
  if (v3) {
    // The feature name table is optional; QEMU leaves it out when it does not fit the
    // header cluster (512 B clusters with a backing file), and so do we.
    h.extensions.push({ type: QCOW2_EXT_MAGIC_FEATURE_TABLE, data: featureTable() });
    if (encodedHeaderSize(h) > cs) h.extensions.pop();
  }
  const header = encodeHeader(h, cs);

  const table = Buffer.alloc(tableClusters * cs);
  for (let b = 0; b < blocks; b++) writeU64(table, b * 8, blocksOffset + b * cs);
  const blockBuf = Buffer.alloc(blocks * cs);
  for (let c = 0; c < total; c++) {
    const b = Math.floor(c / epb);
    writeRefcountEntry(blockBuf.subarray(b * cs, (b + 1) * cs), c % epb, order, 1);
  }
  await dev.pwrite(header, 0);
  await dev.pwrite(table, tableOffset);
  await dev.pwrite(blockBuf, blocksOffset);
  await dev.pwrite(Buffer.alloc(l1Clusters * cs), l1Offset);
  await dev.flush();
}

/**
 * Create an image file. A backing file is checked to exist; its size is the
 * default size and its format is probed when not given.
 */
export async function createImageFile(file: string, options: Omit<CreateOptions, 'size'> & { size?: number }): Promise<void> {
  let size = options.size;
  let backingFormat = options.backingFormat;
  if (options.backingFile) {
    const p = path.isAbsolute(options.backingFile) ? options.backingFile : path.resolve(path.dirname(path.resolve(file)), options.backingFile);
    let fd: number;
    try {
      fd = fs.openSync(p, 'r');
    } catch (err) {
      throw new BackingChainError(p, (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message);
    }
    try {
      const head = Buffer.alloc(32);
      fs.readSync(fd, head, 0, 32, 0);
      const isQcow2 = head.readUInt32BE(0) === 0x514649fb;
      if (!backingFormat) backingFormat = isQcow2 ? 'qcow2' : 'raw';
      if (size === undefined) {
        size = isQcow2 && backingFormat === 'qcow2' ? Number(head.readBigUInt64BE(24)) : fs.fstatSync(fd).size;
      }
    } finally {
      fs.closeSync(fd);
    }
  }
  if (size === undefined) throw new InvalidRequestError('an image size is required');
  const { FileDevice } = await import('../io/file-device');
  const opts = normalizeCreateOptions({ ...options, size, backingFormat });
  const fd = fs.openSync(file, 'wx');
  fs.closeSync(fd);
  const dev = await FileDevice.open(file);
  try {
    await createOnDevice(dev, opts);
  } catch (err) {
    await dev.close();
    fs.rmSync(file, { force: true });
    throw err;
  }
  await dev.close();
}

