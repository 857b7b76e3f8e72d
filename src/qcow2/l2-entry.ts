/**
 * L1 and L2 table entries (qcow2.txt "Cluster mapping"): the one classifier
 * of L2 entries and the encoders that build them. Entries are handled as
 * (hi, lo) 32-bit words; extended L2 entries add a 64-bit subcluster bitmap
 * whose hi word holds the "reads as zero" bits and lo word the allocation bits.
 */
import {
  QCOW_OFLAG_COPIED_HI, QCOW_OFLAG_COMPRESSED_HI, QCOW_OFLAG_ZERO_LO, OFFSET_MASK_HI, OFFSET_MASK_LO,
} from './constants';
import { fromWords, hiWord, loWord } from './uint64';

/** What one (sub)cluster of the guest disk is, in this layer. */
export const enum SubclusterType {
  /** Not allocated here: read from the backing file, or zeroes. */
  UnallocatedPlain = 0,
  /** Host cluster allocated but this subcluster not (extended L2 only). */
  UnallocatedAlloc = 1,
  /** Reads as zeroes, no host cluster. */
  ZeroPlain = 2,
  /** Reads as zeroes, host cluster still allocated. */
  ZeroAlloc = 3,
  /** Data at the host offset. */
  Normal = 4,
  /** Compressed cluster. */
  Compressed = 5,
  /** The entry contradicts itself (caller reports corruption). */
  Invalid = 6,
}

/** A decoded L2 entry (8 or 16 bytes). */
export interface L2Entry {
  hi: number;
  lo: number;
  /** Subcluster bitmap words (0 for standard L2). */
  bitmapHi: number;
  bitmapLo: number;
}

/** Host cluster offset of a standard (non-compressed) L1/L2 entry: bits 9..55. */
export function entryOffset(hi: number, lo: number): number {
  return fromWords(hi & OFFSET_MASK_HI, lo & OFFSET_MASK_LO);
}

/** True if the offset part uses bits above 2^53 (not representable: corrupt). */
export function entryOffsetTooLarge(hi: number): boolean {
  return (hi & 0x00e00000) !== 0;
}

export function isCopied(hi: number): boolean {
  return (hi & QCOW_OFLAG_COPIED_HI) !== 0;
}

export function isCompressed(hi: number): boolean {
  return (hi & QCOW_OFLAG_COMPRESSED_HI) !== 0;
}

export interface ClassifyContext {
  extendedL2: boolean;
  /** External data file: offset 0 with OFLAG_COPIED is a valid mapping. */
  hasDataFile: boolean;
}

/** The type of subcluster `sc` (0 for standard L2) of an entry, as QEMU's qcow2_get_subcluster_type. */
export function classifyL2Entry(e: L2Entry, sc: number, ctx: ClassifyContext): SubclusterType {
  if (isCompressed(e.hi)) {
    if (ctx.extendedL2 && (e.bitmapHi !== 0 || e.bitmapLo !== 0)) return SubclusterType.Invalid;
    return SubclusterType.Compressed;
  }
  const offset = entryOffset(e.hi, e.lo);
  const allocated = offset !== 0 || (ctx.hasDataFile && isCopied(e.hi));
  if (!ctx.extendedL2) {
    // QEMU's qcow2_get_cluster_type tests the zero flag before the data file
    // rule: a zero entry at offset 0 is ZERO_PLAIN even with OFLAG_COPIED.
    if (e.lo & QCOW_OFLAG_ZERO_LO) return offset !== 0 ? SubclusterType.ZeroAlloc : SubclusterType.ZeroPlain;
    return allocated ? SubclusterType.Normal : SubclusterType.UnallocatedPlain;
  }
  const zeroBit = (e.bitmapHi >>> sc) & 1;
  const allocBit = (e.bitmapLo >>> sc) & 1;
  if (allocated) {
    if ((e.bitmapHi & e.bitmapLo) !== 0) return SubclusterType.Invalid;
    if (zeroBit) return SubclusterType.ZeroAlloc;
    if (allocBit) return SubclusterType.Normal;
    return SubclusterType.UnallocatedAlloc;
  }
  if (e.bitmapLo !== 0) return SubclusterType.Invalid;
  return zeroBit ? SubclusterType.ZeroPlain : SubclusterType.UnallocatedPlain;
}

/** Whether a type reads as zeroes in this layer. */
export function isZeroType(t: SubclusterType): boolean {
  return t === SubclusterType.ZeroPlain || t === SubclusterType.ZeroAlloc;
}

/** Whether the guest range is decided in this layer (not passed to the backing file). */
export function isAllocatedType(t: SubclusterType): boolean {
  return t === SubclusterType.Normal || t === SubclusterType.Compressed || isZeroType(t);
}

/**
 * The compressed cluster descriptor (qcow2.txt "Compressed Clusters
 * Descriptor"): with x = 62 - (cluster_bits - 8), bits 0..x-1 hold the host
 * offset and bits x..61 the number of additional 512-byte sectors.
 */
export function decodeCompressedDescriptor(hi: number, lo: number, clusterBits: number): { hostOffset: number; compressedSize: number } {
  const v = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
  const x = BigInt(62 - (clusterBits - 8));
  const offsetMask = (1n << x) - 1n;
  const sizeMask = (1n << BigInt(clusterBits - 8)) - 1n;
  const hostOffset = v & offsetMask;
  const nbSectors = ((v >> x) & sizeMask) + 1n;
  const compressedSize = Number(nbSectors) * 512 - Number(hostOffset & 511n);
  return { hostOffset: hostOffset > BigInt(Number.MAX_SAFE_INTEGER) ? NaN : Number(hostOffset), compressedSize };
}

/** Encode a compressed descriptor (flags bit 62 included). */
export function encodeCompressedDescriptor(hostOffset: number, compressedSize: number, clusterBits: number): { hi: number; lo: number } {
  const x = BigInt(62 - (clusterBits - 8));
  const first = Math.floor(hostOffset / 512);
  const last = Math.floor((hostOffset + compressedSize - 1) / 512);
  const additional = BigInt(last - first);
  // Out-of-range values would spill into the sector field or the flag bits.
  if (!Number.isSafeInteger(hostOffset) || hostOffset < 0 || BigInt(hostOffset) >> x !== 0n) {
    throw new RangeError(`compressed cluster offset 0x${hostOffset.toString(16)} does not fit ${x} bits`);
  }
  if (compressedSize <= 0 || additional >= 1n << BigInt(clusterBits - 8)) {
    throw new RangeError(`compressed size ${compressedSize} at offset 0x${hostOffset.toString(16)} needs more than ${2 ** (clusterBits - 8)} sectors`);
  }
  const v = (1n << 62n) | (additional << x) | BigInt(hostOffset);
  return { hi: Number(v >> 32n) >>> 0, lo: Number(v & 0xffffffffn) >>> 0 };
}

/** A standard entry pointing at `hostOffset`, with OFLAG_COPIED when `copied`. */
export function encodeOffsetEntry(hostOffset: number, copied: boolean, zero = false): { hi: number; lo: number } {
  const hi = (hiWord(hostOffset) & OFFSET_MASK_HI) | (copied ? QCOW_OFLAG_COPIED_HI : 0);
  const lo = (loWord(hostOffset) & OFFSET_MASK_LO) | (zero ? QCOW_OFLAG_ZERO_LO : 0);
  return { hi: hi >>> 0, lo: lo >>> 0 };
}

/** Read entry `index` of an L2 table buffer. */
export function readL2Entry(table: Buffer, index: number, extendedL2: boolean): L2Entry {
  if (extendedL2) {
    const o = index * 16;
    return { hi: table.readUInt32BE(o), lo: table.readUInt32BE(o + 4), bitmapHi: table.readUInt32BE(o + 8), bitmapLo: table.readUInt32BE(o + 12) };
  }
  const o = index * 8;
  return { hi: table.readUInt32BE(o), lo: table.readUInt32BE(o + 4), bitmapHi: 0, bitmapLo: 0 };
}

/** 4 KiB of zero bytes, what runs of empty entries are compared with. */
const ZERO_ENTRIES = Buffer.alloc(4096);

/**
 * The first entry in [from, end) of an L2 table whose bytes are not all zero,
 * or `end`. An all-zero entry is an unallocated cluster in every format
 * (classifyL2Entry: no offset, no flags, no subcluster bits), so a run of them
 * is skipped by comparing whole blocks of the table (memcmp) rather than
 * decoding entries one by one: a 512 MiB hole is one 64 KiB table of zeroes.
 */
export function firstNonEmptyL2Entry(table: Buffer, from: number, end: number, extendedL2: boolean): number {
  const size = extendedL2 ? 16 : 8;
  let o = from * size;
  const stop = end * size;
  while (o < stop) {
    const n = Math.min(ZERO_ENTRIES.length, stop - o);
    if (table.compare(ZERO_ENTRIES, 0, n, o, o + n) === 0) {
      o += n;
      continue;
    }
    for (let i = o; i < o + n; i += size) {
      if (table.compare(ZERO_ENTRIES, 0, size, i, i + size) !== 0) return i / size;
    }
  }
  return end;
}

/**
 * Standard (not extended) entries: the last index of the run that begins at
 * `from` and ends before `end`, in which every entry is the one before it
 * with its offset one cluster further on and the same flags (so the same
 * type, contiguous on the host, equally COPIED). The run stops short of an
 * entry whose offset would be too large, for the caller to decode and refuse.
 * This compares raw words instead of decoding each entry: a SEEK_HOLE through
 * 16 MiB of data is 256 such steps.
 */
export function lastContiguousL2Entry(table: Buffer, from: number, end: number, clusterSize: number): number {
  let hi = table.readUInt32BE(from * 8);
  let lo = table.readUInt32BE(from * 8 + 4);
  let i = from;
  while (i + 1 < end) {
    let nextLo = lo + clusterSize;
    let nextHi = hi;
    if (nextLo > 0xffffffff) {
      nextLo -= 0x100000000;
      nextHi = (hi + 1) >>> 0;
    }
    const o = (i + 1) * 8;
    if (table.readUInt32BE(o) !== nextHi || table.readUInt32BE(o + 4) !== nextLo || entryOffsetTooLarge(nextHi)) break;
    hi = nextHi;
    lo = nextLo;
    i++;
  }
  return i;
}

/** Write entry `index` of an L2 table buffer. */
export function writeL2Entry(table: Buffer, index: number, e: L2Entry, extendedL2: boolean): void {
  if (extendedL2) {
    const o = index * 16;
    table.writeUInt32BE(e.hi >>> 0, o);
    table.writeUInt32BE(e.lo >>> 0, o + 4);
    table.writeUInt32BE(e.bitmapHi >>> 0, o + 8);
    table.writeUInt32BE(e.bitmapLo >>> 0, o + 12);
  } else {
    const o = index * 8;
    table.writeUInt32BE(e.hi >>> 0, o);
    table.writeUInt32BE(e.lo >>> 0, o + 4);
  }
}

/** Bitmask of subclusters [first, first+count) in a 32-bit word. */
export function subclusterMask(first: number, count: number): number {
  if (count >= 32) return 0xffffffff;
  return (((1 << count) - 1) << first) >>> 0;
}
