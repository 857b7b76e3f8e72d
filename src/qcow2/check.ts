/**
 * Consistency check and refcount rebuild, in the terms of `qemu-img check`:
 * every cluster's refcount is compared with the references the metadata
 * makes to it (refcount > references: a leak; refcount < references: a
 * corruption), and OFLAG_COPIED in the active tables must say "refcount is 1".
 * Repair rebuilds the whole refcount structure after the last used cluster.
 */
import { Qcow2Image } from './image';
import { readRefcountEntry, writeRefcountEntry } from './refcount';
import {
  classifyL2Entry, decodeCompressedDescriptor, entryOffset, isCompressed, isCopied, SubclusterType, writeL2Entry,
  encodeOffsetEntry, L2Entry, readL2Entry,
} from './l2-entry';
import { readU64, writeU64 } from './uint64';
import { alignDown } from './layout';
import { readFull } from '../io/block-device';
import { snapshotTableSize } from './snapshot';
import { QCOW_MAX_L1_SIZE_BYTES } from './constants';

export interface CheckProblem {
  severity: 'leak' | 'corruption' | 'error';
  message: string;
}

export interface CheckResult {
  filename: string;
  format: 'qcow2';
  checkErrors: number;
  leaks: number;
  corruptions: number;
  /** Clusters that were leaked and freed, or corruptions repaired. */
  leaksFixed: number;
  corruptionsFixed: number;
  totalClusters: number;
  allocatedClusters: number;
  compressedClusters: number;
  fragmentedClusters: number;
  imageEndOffset: number;
  problems: CheckProblem[];
}

/** Growable per-cluster reference counts. */
class RefCounter {
  counts = new Uint32Array(1024);
  highest = -1;

  add(cluster: number, n = 1): void {
    if (cluster >= this.counts.length) {
      let len = this.counts.length;
      while (len <= cluster) len *= 2;
      const next = new Uint32Array(len);
      next.set(this.counts);
      this.counts = next;
    }
    this.counts[cluster] += n;
    if (cluster > this.highest) this.highest = cluster;
  }

  get(cluster: number): number {
    return cluster < this.counts.length ? this.counts[cluster] : 0;
  }
}

interface Walk {
  refs: RefCounter;
  problems: CheckProblem[];
  allocated: number;
  compressed: number;
  fragmented: number;
}

/**
 * Count one reference to every cluster of [offset, offset+bytes). As QEMU's
 * qcow2_inc_refcounts_imrt, a range that ends a cluster or more past the end
 * of the file is a corruption and is not counted: its offset comes from the
 * image, and counting it would size the reference table by it.
 */
function addRange(w: Walk, img: Qcow2Image, offset: number, bytes: number, what: string): boolean {
  const cs = img.clusterSize;
  const fileEnd = img.dev.size();
  if (offset + bytes - fileEnd >= cs) {
    w.problems.push({ severity: 'corruption', message: `ERROR ${what} at offset 0x${offset.toString(16)} (0x${bytes.toString(16)} bytes) exceeds the end of the image file by one cluster or more` });
    return false;
  }
  const first = Math.floor(offset / cs);
  const last = Math.floor((offset + Math.max(bytes, 1) - 1) / cs);
  for (let c = first; c <= last; c++) w.refs.add(c);
  return true;
}

/** Count every reference the metadata makes (QEMU's calculate_refcounts), except the refcount structures' own. */
async function calculateReferences(img: Qcow2Image, includeRefcountStructures: boolean): Promise<Walk> {
  const w: Walk = { refs: new RefCounter(), problems: [], allocated: 0, compressed: 0, fragmented: 0 };
  const h = img.header;
  const cs = img.clusterSize;
  addRange(w, img, 0, cs, 'header');
  addRange(w, img, img.header.l1TableOffset, h.l1Size * 8, 'L1 table');
  await walkL1(img, w, h.l1TableOffset, h.l1Size, true);
  for (const s of img.snapshots) {
    if (s.l1TableOffset % cs !== 0) {
      w.problems.push({ severity: 'corruption', message: `ERROR snapshot '${s.name}' L1 table offset 0x${s.l1TableOffset.toString(16)} not cluster aligned` });
      continue;
    }
    if (s.l1Size * 8 > QCOW_MAX_L1_SIZE_BYTES) {
      w.problems.push({ severity: 'corruption', message: `ERROR snapshot '${s.name}' l1_size=${s.l1Size}: L1 table is too large; snapshot table entry corrupted` });
      continue;
    }
    if (!addRange(w, img, s.l1TableOffset, s.l1Size * 8, `snapshot '${s.name}' L1 table`)) continue;
    await walkL1(img, w, s.l1TableOffset, s.l1Size, false);
  }
  if (h.nbSnapshots > 0) addRange(w, img, h.snapshotsOffset, snapshotTableSize(img.snapshots), 'snapshot table');
  if (includeRefcountStructures) {
    const rc = await img.refcountManager();
    addRange(w, img, rc.tableOffset, rc.tableClusters * cs, 'refcount table');
    for (const b of rc.table) if (b !== 0) addRange(w, img, b, cs, 'refcount block');
  }
  return w;
}

async function walkL1(img: Qcow2Image, w: Walk, l1Offset: number, l1Size: number, active: boolean): Promise<void> {
  const cs = img.clusterSize;
  const ctx = { extendedL2: img.extendedL2, hasDataFile: img.hasDataFile };
  let lastHost = -1;
  await img.forEachL2Entry(
    l1Offset,
    l1Size,
    (e, at) => {
      if (isCompressed(e.hi)) {
        const d = decodeCompressedDescriptor(e.hi, e.lo, img.clusterBits);
        const start = alignDown(d.hostOffset, 512);
        const bytes = Math.ceil((d.compressedSize + (d.hostOffset % 512)) / 512) * 512;
        addRange(w, img, start, bytes, 'compressed cluster');
        if (active) {
          w.allocated++;
          w.compressed++;
        }
        return;
      }
      const t = classifyL2Entry(e, 0, ctx);
      const off = entryOffset(e.hi, e.lo);
      if (t === SubclusterType.Invalid) {
        w.problems.push({ severity: 'corruption', message: `ERROR invalid L2 entry at offset 0x${at.toString(16)}` });
        return;
      }
      const hasHost = off !== 0 || (img.hasDataFile && isCopied(e.hi));
      if (!hasHost) return;
      if (off % cs !== 0) {
        w.problems.push({ severity: 'corruption', message: `ERROR offset=${off.toString(16)}: Cluster is not properly aligned; L2 entry corrupted.` });
        return;
      }
      if (active) {
        w.allocated++;
        if (lastHost >= 0 && off !== lastHost + cs) w.fragmented++;
        lastHost = off;
      }
      if (!img.hasDataFile) addRange(w, img, off, cs, 'data cluster');
    },
    (l2Offset) => {
      if (l2Offset % cs !== 0) {
        w.problems.push({ severity: 'corruption', message: `ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted` });
        return;
      }
      addRange(w, img, l2Offset, cs, 'L2 table');
    },
  );
}

/** Run the consistency check (read-only). */
export async function checkImage(img: Qcow2Image): Promise<CheckResult> {
  const cs = img.clusterSize;
  const w = await calculateReferences(img, true);
  const rc = await img.refcountManager();
  let leaks = 0;
  let corruptions = w.problems.filter((p) => p.severity === 'corruption').length;
  const fileClusters = Math.ceil(img.dev.size() / cs);
  const upTo = Math.max(fileClusters, w.refs.highest + 1);
  let highestUsed = -1;
  for (let c = 0; c < upTo; c++) {
    const actual = await rc.get(c);
    const expected = w.refs.get(c);
    if (actual > 0 || expected > 0) highestUsed = c;
    if (actual === expected) continue;
    if (actual < expected) {
      corruptions++;
      w.problems.push({ severity: 'corruption', message: `ERROR cluster ${c} refcount=${actual} reference=${expected}` });
    } else {
      leaks++;
      w.problems.push({ severity: 'leak', message: `Leaked cluster ${c} refcount=${actual} reference=${expected}` });
    }
  }
  // Refcount blocks past the end of the file count as their own references; check the rest of the table's reach.
  // OFLAG_COPIED in the active tables.
  const l1Size = img.header.l1Size;
  const l1 = Buffer.alloc(l1Size * 8);
  await readFull(img.dev, l1, img.header.l1TableOffset);
  for (let i = 0; i < l1Size; i++) {
    const hi = l1.readUInt32BE(i * 8);
    const lo = l1.readUInt32BE(i * 8 + 4);
    const l2Offset = entryOffset(hi, lo);
    if (l2Offset === 0 || l2Offset % cs !== 0) continue;
    const refcount = await rc.get(l2Offset / cs);
    if ((refcount === 1) !== isCopied(hi)) {
      corruptions++;
      w.problems.push({ severity: 'corruption', message: `ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${l2Offset.toString(16)} refcount=${refcount}` });
    }
    if (l2Offset + cs > img.dev.size()) continue;
    const table = await img.l2Table(l2Offset);
    for (let j = 0; j < img.l2Entries; j++) {
      const e = readL2Entry(table, j, img.extendedL2);
      if (isCompressed(e.hi)) continue;
      const off = entryOffset(e.hi, e.lo);
      if (off === 0 || off % cs !== 0 || img.hasDataFile) continue;
      const r = await rc.get(off / cs);
      if ((r === 1) !== isCopied(e.hi)) {
        corruptions++;
        w.problems.push({ severity: 'corruption', message: `ERROR OFLAG_COPIED data cluster: l2_entry=${off.toString(16)} refcount=${r}` });
      }
    }
  }
  return {
    filename: img.filename,
    format: 'qcow2',
    checkErrors: w.problems.filter((p) => p.severity === 'error').length,
    leaks,
    corruptions,
    leaksFixed: 0,
    corruptionsFixed: 0,
    totalClusters: Math.ceil(img.virtualSize / cs),
    allocatedClusters: w.allocated,
    compressedClusters: w.compressed,
    fragmentedClusters: w.fragmented,
    imageEndOffset: (highestUsed + 1) * cs,
    problems: w.problems,
  };
}

/**
 * Rebuild the refcount structure from the references (QEMU's
 * rebuild_refcount_structure): a new table and blocks after the last used
 * cluster, then the header switched over, then OFLAG_COPIED fixed in the
 * active tables. Old refcount structures become free space.
 */
export async function rebuildRefcounts(img: Qcow2Image): Promise<void> {
  const dev = img.dev;
  const cs = img.clusterSize;
  const order = img.header.refcountOrder;
  const bits = 2 ** order;
  const maxRef = bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
  const epb = (cs * 8) / bits;
  const w = await calculateReferences(img, false);
  const fileClusters = Math.ceil(dev.size() / cs);
  const start = Math.max(fileClusters, w.refs.highest + 1);
  // Fixed point: the table and blocks must cover everything including themselves.
  let tableClusters = 1;
  let blocks = 0;
  for (;;) {
    const end = start + tableClusters + blocks;
    const needBlocks = Math.ceil(end / epb);
    const needTable = Math.ceil((needBlocks * 8) / cs);
    if (needBlocks === blocks && needTable === tableClusters) break;
    blocks = needBlocks;
    tableClusters = needTable;
  }
  // Blocks are only written for ranges that hold a used cluster; their slots still sit after the table.
  const tableOffset = start * cs;
  for (let c = start; c < start + tableClusters + blocks; c++) w.refs.add(c);
  const table = Buffer.alloc(tableClusters * cs);
  for (let b = 0; b < blocks; b++) {
    const blockOffset = (start + tableClusters + b) * cs;
    const block = Buffer.alloc(cs);
    for (let i = 0; i < epb; i++) {
      const v = w.refs.get(b * epb + i);
      if (v === 0) continue;
      if (v > maxRef) throw new Error(`cluster ${b * epb + i} has ${v} references, more than ${bits}-bit refcounts hold`);
      writeRefcountEntry(block, i, order, v);
    }
    await dev.pwrite(block, blockOffset);
    writeU64(table, b * 8, blockOffset);
  }
  await dev.pwrite(table, tableOffset);
  await dev.flush();
  img.header.refcountTableOffset = tableOffset;
  img.header.refcountTableClusters = tableClusters;
  await img.writeHeader();
  await dev.flush();
  // OFLAG_COPIED in the active L1 and L2 tables now follows the rebuilt refcounts.
  const refOf = (offset: number): number => w.refs.get(Math.floor(offset / cs));
  const l1Size = img.header.l1Size;
  const l1 = Buffer.alloc(l1Size * 8);
  await readFull(dev, l1, img.header.l1TableOffset);
  let l1Changed = false;
  for (let i = 0; i < l1Size; i++) {
    const hi = l1.readUInt32BE(i * 8);
    const lo = l1.readUInt32BE(i * 8 + 4);
    const l2Offset = entryOffset(hi, lo);
    if (l2Offset === 0 || l2Offset % cs !== 0 || l2Offset + cs > dev.size()) continue;
    const wantCopied = refOf(l2Offset) === 1;
    if (wantCopied !== isCopied(hi)) {
      const e = encodeOffsetEntry(l2Offset, wantCopied);
      l1.writeUInt32BE(e.hi, i * 8);
      l1.writeUInt32BE(e.lo, i * 8 + 4);
      l1Changed = true;
    }
    const table = Buffer.alloc(cs);
    await readFull(dev, table, l2Offset);
    let changed = false;
    for (let j = 0; j < img.l2Entries; j++) {
      const e: L2Entry = readL2Entry(table, j, img.extendedL2);
      if (isCompressed(e.hi) || img.hasDataFile) continue;
      const off = entryOffset(e.hi, e.lo);
      if (off === 0 || off % cs !== 0) continue;
      const want = refOf(off) === 1;
      if (want !== isCopied(e.hi)) {
        e.hi = want ? (e.hi | 0x80000000) >>> 0 : (e.hi & 0x7fffffff) >>> 0;
        writeL2Entry(table, j, e, img.extendedL2);
        changed = true;
      }
    }
    if (changed) await dev.pwrite(table, l2Offset);
  }
  if (l1Changed) await dev.pwrite(l1, img.header.l1TableOffset);
  await dev.flush();
  await img.reloadMetadata();
}

/** Check, and with `repair` rebuild refcounts when anything is off; returns the state after. */
export async function checkAndRepair(img: Qcow2Image, repair: boolean): Promise<CheckResult> {
  const before = await checkImage(img);
  if (!repair || (before.leaks === 0 && before.corruptions === 0)) return before;
  await rebuildRefcounts(img);
  const after = await checkImage(img);
  after.leaksFixed = Math.max(0, before.leaks - after.leaks);
  after.corruptionsFixed = Math.max(0, before.corruptions - after.corruptions);
  return after;
}

export { readRefcountEntry, readU64 };
