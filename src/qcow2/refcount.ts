/**
 * Refcounts (qcow2.txt "Host cluster management"): the refcount table, the
 * refcount blocks it points to (through a TableCache), reading and writing
 * refcounts of any width (1 to 64 bits), and cluster allocation, including
 * adding refcount blocks and growing the table, so the image stays one QEMU
 * accepts. All mutations run under the image's exclusive lock.
 */
import { BlockDevice } from '../io/block-device';
import { TableCache } from './table-cache';
import { CorruptImageError, InvalidRequestError } from './errors';
import { readU64, writeU64 } from './uint64';
import { REFT_RESERVED_LO } from './constants';

export interface RefcountLayout {
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
}

/** Read refcount `index` of a block of `bits`-wide big-endian entries. */
export function readRefcountEntry(block: Buffer, index: number, order: number): number {
  switch (order) {
    case 0: return (block[index >>> 3] >>> (index & 7)) & 1;
    case 1: return (block[index >>> 2] >>> ((index & 3) * 2)) & 3;
    case 2: return (block[index >>> 1] >>> ((index & 1) * 4)) & 15;
    case 3: return block[index];
    case 4: return block.readUInt16BE(index * 2);
    case 5: return block.readUInt32BE(index * 4);
    default: {
      const v = readU64(block, index * 8);
      return Number.isNaN(v) ? Number.MAX_SAFE_INTEGER : v;
    }
  }
}

/** Write refcount `index`; value must fit the width. */
export function writeRefcountEntry(block: Buffer, index: number, order: number, value: number): void {
  switch (order) {
    case 0: case 1: case 2: {
      const bits = 1 << order;
      const per = 8 / bits;
      const byte = Math.floor(index / per);
      const shift = (index % per) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[byte] = (block[byte] & ~mask) | ((value << shift) & mask);
      return;
    }
    case 3: block[index] = value; return;
    case 4: block.writeUInt16BE(value, index * 2); return;
    case 5: block.writeUInt32BE(value >>> 0, index * 4); return;
    default: writeU64(block, index * 8, value);
  }
}

export class RefcountManager {
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly order: number;
  readonly maxRefcount: number;
  /** Refcount entries in one block. */
  readonly entriesPerBlock: number;
  /** Host offsets of refcount blocks (0 = none). */
  table: number[] = [];
  tableOffset: number;
  tableClusters: number;
  readonly cache: TableCache;
  /** Host offsets of the refcount blocks, rebuilt when the table changes. */
  private blockSet: Set<number> | null = null;
  /** Lowest cluster index that may be free. */
  private freeHint = 0;
  /** Rewrites the header's refcount table fields (set by the image). */
  onTableMoved: (offset: number, clusters: number) => Promise<void> = async () => {};

  constructor(private readonly dev: BlockDevice, layout: RefcountLayout, cacheTables: number) {
    this.clusterBits = layout.clusterBits;
    this.clusterSize = 2 ** layout.clusterBits;
    this.order = layout.refcountOrder;
    const bits = 2 ** this.order;
    this.maxRefcount = bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
    this.entriesPerBlock = (this.clusterSize * 8) / bits;
    this.tableOffset = layout.tableOffset;
    this.tableClusters = layout.tableClusters;
    this.cache = new TableCache(dev, this.clusterSize, cacheTables);
  }

  /** Load the refcount table (validated). */
  async load(): Promise<void> {
    const bytes = this.tableClusters * this.clusterSize;
    const buf = Buffer.alloc(bytes);
    await this.dev.pread(buf, this.tableOffset);
    const fileSize = this.dev.size();
    const n = bytes / 8;
    this.table = new Array<number>(n);
    for (let i = 0; i < n; i++) {
      const lo = buf.readUInt32BE(i * 8 + 4);
      const v = readU64(buf, i * 8);
      if (v === 0) {
        this.table[i] = 0;
        continue;
      }
      const where = this.tableOffset + i * 8;
      if (Number.isNaN(v)) throw new CorruptImageError('refcount table', where, 'refcount block offset too large');
      if (lo & REFT_RESERVED_LO) throw new CorruptImageError('refcount table', where, `refcount block offset 0x${v.toString(16)} not cluster aligned`);
      if (v % this.clusterSize !== 0) throw new CorruptImageError('refcount table', where, `refcount block offset 0x${v.toString(16)} not cluster aligned`);
      if (v + this.clusterSize > fileSize) throw new CorruptImageError('refcount table', where, `refcount block at 0x${v.toString(16)} lies past the end of the file`);
      this.table[i] = v;
    }
  }

  /** Whether a refcount block lives at host offset `offset` (cluster aligned). */
  isBlockAt(offset: number): boolean {
    if (!this.blockSet) this.blockSet = new Set(this.table.filter((b) => b !== 0));
    return this.blockSet.has(offset);
  }

  /** Number of clusters the current table can describe. */
  get coveredClusters(): number {
    return this.table.length * this.entriesPerBlock;
  }

  async get(clusterIndex: number): Promise<number> {
    const bi = Math.floor(clusterIndex / this.entriesPerBlock);
    if (bi >= this.table.length || this.table[bi] === 0) return 0;
    const block = await this.cache.get(this.table[bi]);
    return readRefcountEntry(block, clusterIndex % this.entriesPerBlock, this.order);
  }

  /** Set a refcount (the block must exist or is created). */
  async set(clusterIndex: number, value: number): Promise<void> {
    if (value > this.maxRefcount) {
      throw new InvalidRequestError(`refcount overflow: cluster ${clusterIndex} would need ${value} references, more than ${2 ** this.order}-bit refcounts hold`);
    }
    if (value < 0) throw new CorruptImageError('refcount block', -1, `refcount of cluster ${clusterIndex} would be ${value}`);
    const bi = Math.floor(clusterIndex / this.entriesPerBlock);
    await this.ensureBlock(bi);
    const off = this.table[bi];
    const block = await this.cache.get(off);
    writeRefcountEntry(block, clusterIndex % this.entriesPerBlock, this.order, value);
    this.cache.markDirty(off);
    if (value === 0 && clusterIndex < this.freeHint) this.freeHint = clusterIndex;
  }

  async adjust(clusterIndex: number, delta: number): Promise<number> {
    const v = (await this.get(clusterIndex)) + delta;
    if (v < 0) throw new CorruptImageError('refcount block', -1, `refcount of cluster ${clusterIndex} (host offset 0x${(clusterIndex * this.clusterSize).toString(16)}) would drop below zero`);
    await this.set(clusterIndex, v);
    return v;
  }

  /**
   * Allocate `count` contiguous clusters (refcount 1 each) and return the host
   * offset of the first. Freed clusters are reused lowest first.
   *
   * Ranges no refcount block covers count as free. Refcount blocks those
   * clusters need are placed right after the run (where the search made sure
   * there is room), not at the start of their range: a block at every range
   * start would cap contiguous free space at entriesPerBlock - 1 clusters, and
   * a run longer than that could never be found. New blocks reach the disk,
   * with their own refcounts, before the table entries that point at them.
   */
  async allocate(count: number): Promise<number> {
    if (!Number.isSafeInteger(count) || count < 1) throw new RangeError(`cannot allocate ${count} clusters`);
    const epb = this.entriesPerBlock;
    let extra = 0;
    for (;;) {
      const start = await this.findFree(count + extra);
      // Blocks needed for the run and for the blocks themselves (placed after the run).
      let blocks = 0;
      for (;;) {
        const need = this.missingBlocks(start, start + count + blocks).length;
        if (need === blocks) break;
        blocks = need;
      }
      if (blocks > extra) {
        extra = blocks;
        continue;
      }
      const lastBi = Math.floor((start + count + blocks - 1) / epb);
      if (lastBi >= this.table.length) {
        await this.growTable(lastBi);
        continue;
      }
      if (blocks > 0) await this.addBlocks(this.missingBlocks(start, start + count + blocks), start + count);
      for (let c = start; c < start + count; c++) await this.set(c, 1);
      if (start === this.freeHint) this.freeHint = start + count;
      return start * this.clusterSize;
    }
  }

  /** First cluster of a run of `count` clusters with refcount 0 (uncovered ranges count as free). */
  private async findFree(count: number): Promise<number> {
    const epb = this.entriesPerBlock;
    let start = this.freeHint;
    let run = 0;
    for (let i = this.freeHint; ; i++) {
      const bi = Math.floor(i / epb);
      if (bi >= this.table.length || this.table[bi] === 0) {
        // The whole range is free.
        if (run === 0) start = i;
        const rangeEnd = (bi + 1) * epb;
        run += rangeEnd - i;
        if (run >= count) return start;
        i = rangeEnd - 1;
        continue;
      }
      if ((await this.get(i)) === 0) {
        if (run === 0) start = i;
        if (++run === count) return start;
      } else {
        run = 0;
        if (i === this.freeHint) this.freeHint = i + 1;
      }
    }
  }

  /** Refcount block indexes without a block among the ranges clusters [first, end) fall in. */
  private missingBlocks(first: number, end: number): number[] {
    const out: number[] = [];
    for (let bi = Math.floor(first / this.entriesPerBlock); bi <= Math.floor((end - 1) / this.entriesPerBlock); bi++) {
      if (bi >= this.table.length || this.table[bi] === 0) out.push(bi);
    }
    return out;
  }

  /**
   * Create refcount blocks `bis` on the free clusters starting at `at`, each
   * counting the block clusters in its range; blocks that already exist count
   * the rest. All of it is written before the refcount table entries.
   */
  private async addBlocks(bis: number[], at: number): Promise<void> {
    const epb = this.entriesPerBlock;
    const cs = this.clusterSize;
    const fresh = new Map<number, Buffer>();
    for (const bi of bis) fresh.set(bi, Buffer.alloc(cs));
    for (let k = 0; k < bis.length; k++) {
      const c = at + k;
      const bi = Math.floor(c / epb);
      const block = fresh.get(bi);
      if (block) writeRefcountEntry(block, c % epb, this.order, 1);
    }
    for (let k = 0; k < bis.length; k++) {
      const offset = (at + k) * cs;
      const block = fresh.get(bis[k])!;
      await this.dev.pwrite(block, offset);
      await this.cache.install(offset, block, false);
      this.table[bis[k]] = offset;
      this.blockSet = null;
    }
    for (let k = 0; k < bis.length; k++) {
      const c = at + k;
      if (!fresh.has(Math.floor(c / epb))) await this.set(c, 1);
    }
    await this.cache.flush();
    await this.dev.flush();
    const entry = Buffer.alloc(8);
    for (const bi of bis) {
      writeU64(entry, 0, this.table[bi]);
      await this.dev.pwrite(entry, this.tableOffset + bi * 8);
    }
  }

  /** Make sure refcount block `bi` exists, growing the table if needed. */
  private async ensureBlock(bi: number): Promise<void> {
    if (bi < this.table.length && this.table[bi] !== 0) return;
    if (bi >= this.table.length) {
      await this.growTable(bi);
      if (this.table[bi] !== 0) return;
    }
    // Self-describing block: place it on the first free cluster of its own range.
    const first = bi * this.entriesPerBlock;
    const blockOffset = first * this.clusterSize;
    const block = Buffer.alloc(this.clusterSize);
    writeRefcountEntry(block, 0, this.order, 1);
    await this.dev.pwrite(block, blockOffset);
    await this.cache.install(blockOffset, block, false);
    await this.dev.flush();
    this.table[bi] = blockOffset;
    this.blockSet = null;
    const entry = Buffer.alloc(8);
    writeU64(entry, 0, blockOffset);
    await this.dev.pwrite(entry, this.tableOffset + bi * 8);
  }

  /**
   * Grow the refcount table so it has an entry for block `needBi`. The new
   * table goes at the start of the first range no block covers, followed by
   * the refcount blocks that describe it and themselves; once they are on
   * disk the header is switched over and the old table is freed.
   */
  private async growTable(needBi: number): Promise<void> {
    await this.cache.flush();
    const epb = this.entriesPerBlock;
    const cs = this.clusterSize;
    // First cluster index not covered by any block at or after the end of the image file.
    const fileClusters = Math.ceil(this.dev.size() / cs);
    let startCluster = Math.max(fileClusters, this.table.length * epb);
    // Place at a range start so that new blocks can describe themselves.
    startCluster = Math.ceil(startCluster / epb) * epb;
    let entries = Math.max(needBi + 1, this.table.length * 2, Math.floor(startCluster / epb) + 2);
    let tableClusters = Math.ceil((entries * 8) / cs);
    let blocksNeeded = 0;
    for (;;) {
      const end = startCluster + tableClusters + blocksNeeded;
      const firstBi = Math.floor(startCluster / epb);
      const lastBi = Math.floor((end - 1) / epb);
      const needBlocks = lastBi - firstBi + 1;
      const needEntries = Math.max(entries, lastBi + 1);
      const needTableClusters = Math.ceil((needEntries * 8) / cs);
      if (needBlocks === blocksNeeded && needTableClusters === tableClusters) {
        entries = needEntries;
        break;
      }
      blocksNeeded = needBlocks;
      tableClusters = needTableClusters;
      entries = Math.max(entries, needEntries);
    }
    entries = (tableClusters * cs) / 8;
    const newTable = this.table.slice();
    while (newTable.length < entries) newTable.push(0);
    const blocksStart = startCluster + tableClusters;
    const used = tableClusters + blocksNeeded;
    const firstBi = Math.floor(startCluster / epb);
    for (let k = 0; k < blocksNeeded; k++) {
      const bi = firstBi + k;
      const blockOffset = (blocksStart + k) * cs;
      const block = Buffer.alloc(cs);
      for (let c = Math.max(startCluster, bi * epb); c < Math.min(startCluster + used, (bi + 1) * epb); c++) {
        writeRefcountEntry(block, c - bi * epb, this.order, 1);
      }
      await this.dev.pwrite(block, blockOffset);
      await this.cache.install(blockOffset, block, false);
      newTable[bi] = blockOffset;
    }
    const tbuf = Buffer.alloc(tableClusters * cs);
    for (let i = 0; i < newTable.length; i++) writeU64(tbuf, i * 8, newTable[i]);
    await this.dev.pwrite(tbuf, startCluster * cs);
    await this.dev.flush();
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = newTable;
    this.blockSet = null;
    this.tableOffset = startCluster * cs;
    this.tableClusters = tableClusters;
    await this.onTableMoved(this.tableOffset, this.tableClusters);
    for (let c = 0; c < oldClusters; c++) await this.adjust(oldOffset / cs + c, -1);
  }

  /** Write dirty refcount blocks (no sync). */
  async flush(): Promise<void> {
    await this.cache.flush();
  }

  /** Restart the free-cluster search from `clusterIndex` at the lowest. */
  noteFreed(clusterIndex: number): void {
    if (clusterIndex < this.freeHint) this.freeHint = clusterIndex;
  }
}
