/**
 * Compaction: copy an image into a new file holding only the clusters its
 * metadata references, packed from the front, so freed space goes back to
 * the host. Sharing is kept exactly: a host cluster (or L2 table) that the
 * active disk and snapshots share stays one cluster in the copy. Snapshots,
 * the backing link and header extensions (but persistent bitmaps) are kept;
 * refcounts are then rebuilt from the references.
 */
import * as fs from 'fs';
import * as path from 'path';
import { BlockDevice, readFull } from '../io/block-device';
import { FileDevice } from '../io/file-device';
import { Qcow2Image } from './image';
import { encodeHeader, Qcow2Header } from './header';
import { encodeSnapshotTable, Snapshot } from './snapshot';
import {
  decodeCompressedDescriptor, encodeCompressedDescriptor, encodeOffsetEntry, entryOffset, isCompressed, isCopied,
  readL2Entry, writeL2Entry,
} from './l2-entry';
import { QCOW2_EXT_MAGIC_BITMAPS, QCOW2_AUTOCLEAR_BITMAPS } from './constants';
import { InvalidRequestError } from './errors';
import { rebuildRefcounts } from './check';

export interface CompactResult {
  bytesBefore: number;
  bytesAfter: number;
}

/** Appends clusters (and sector-packed compressed data) to the new file. */
class Appender {
  next: number;
  private compressedAt = -1;
  constructor(readonly dev: BlockDevice, readonly clusterSize: number, firstCluster: number) {
    this.next = firstCluster * clusterSize;
  }

  clusters(n: number): number {
    const at = this.next;
    this.next += n * this.clusterSize;
    this.compressedAt = -1;
    return at;
  }

  /** Room for compressed bytes, packed 512-aligned, never crossing into a full cluster we hand out later. */
  compressed(bytes: number): number {
    if (this.compressedAt < 0 || this.compressedAt + bytes > this.next) {
      const need = Math.ceil(bytes / this.clusterSize);
      this.compressedAt = this.next;
      this.next += need * this.clusterSize;
    }
    const at = this.compressedAt;
    this.compressedAt = Math.ceil((at + bytes) / 512) * 512;
    if (this.compressedAt >= this.next) this.compressedAt = -1;
    return at;
  }
}

/** Compact `src` into `dst` (a new file). */
export async function compactImage(src: string, dst: string): Promise<CompactResult> {
  const old = await Qcow2Image.openFile(src, { readOnly: true, openBacking: false });
  let dev: FileDevice | null = null;
  try {
    if (old.hasDataFile) throw new InvalidRequestError('images with an external data file hold no data to compact');
    const cs = old.clusterSize;
    fs.closeSync(fs.openSync(dst, 'wx'));
    dev = await FileDevice.open(dst);
    // Cluster 0: header (written last); cluster 1: a placeholder refcount table until the rebuild.
    const out = new Appender(dev, cs, 2);
    const dataMap = new Map<number, number>();
    const compressedMap = new Map<string, { hi: number; lo: number }>();
    const l2Map = new Map<number, number>();
    const buf = Buffer.alloc(cs);

    const copyL2 = async (oldL2: number): Promise<number> => {
      const known = l2Map.get(oldL2);
      if (known !== undefined) return known;
      const newL2 = out.clusters(1);
      l2Map.set(oldL2, newL2);
      const table = Buffer.from(await old.l2Table(oldL2));
      for (let j = 0; j < old.l2Entries; j++) {
        const e = readL2Entry(table, j, old.extendedL2);
        if (isCompressed(e.hi)) {
          const key = `${e.hi}:${e.lo}`;
          let ne = compressedMap.get(key);
          if (!ne) {
            const d = decodeCompressedDescriptor(e.hi, e.lo, old.clusterBits);
            const data = Buffer.alloc(d.compressedSize);
            await readFull(old.dev, data, d.hostOffset);
            const at = out.compressed(data.length);
            await dev!.pwrite(data, at);
            ne = encodeCompressedDescriptor(at, data.length, old.clusterBits);
            compressedMap.set(key, ne);
          }
          writeL2Entry(table, j, { ...e, hi: ne.hi, lo: ne.lo }, old.extendedL2);
          continue;
        }
        const off = entryOffset(e.hi, e.lo);
        if (off === 0) continue;
        let noff = dataMap.get(off);
        if (noff === undefined) {
          noff = out.clusters(1);
          dataMap.set(off, noff);
          await readFull(old.dev, buf, off);
          await dev!.pwrite(buf, noff);
        }
        const ne = encodeOffsetEntry(noff, isCopied(e.hi), (e.lo & 1) === 1);
        writeL2Entry(table, j, { ...e, hi: ne.hi, lo: ne.lo }, old.extendedL2);
      }
      await dev!.pwrite(table, newL2);
      return newL2;
    };

    const copyL1 = async (l1Offset: number, l1Size: number): Promise<number> => {
      const l1 = Buffer.alloc(l1Size * 8);
      await readFull(old.dev, l1, l1Offset);
      const outL1 = Buffer.alloc(Math.max(1, Math.ceil((l1Size * 8) / cs)) * cs);
      for (let i = 0; i < l1Size; i++) {
        const hi = l1.readUInt32BE(i * 8);
        const l2 = entryOffset(hi, l1.readUInt32BE(i * 8 + 4));
        if (l2 === 0) continue;
        const n = encodeOffsetEntry(await copyL2(l2), isCopied(hi));
        outL1.writeUInt32BE(n.hi, i * 8);
        outL1.writeUInt32BE(n.lo, i * 8 + 4);
      }
      const at = out.clusters(outL1.length / cs);
      await dev!.pwrite(outL1, at);
      return at;
    };

    const h: Qcow2Header = { ...old.header, extensions: old.header.extensions.filter((e) => e.type !== QCOW2_EXT_MAGIC_BITMAPS) };
    h.autoclearFeatures &= ~QCOW2_AUTOCLEAR_BITMAPS;
    h.l1TableOffset = await copyL1(old.header.l1TableOffset, old.header.l1Size);
    const snaps: Snapshot[] = [];
    for (const s of old.snapshots) snaps.push({ ...s, l1TableOffset: await copyL1(s.l1TableOffset, s.l1Size) });
    if (snaps.length > 0) {
      const table = encodeSnapshotTable(snaps);
      h.snapshotsOffset = out.clusters(Math.ceil(table.length / cs));
      await dev.pwrite(table, h.snapshotsOffset);
    } else {
      h.snapshotsOffset = 0;
    }
    h.refcountTableOffset = cs;
    h.refcountTableClusters = 1;
    await dev.pwrite(Buffer.alloc(cs), cs);
    if (out.next > dev.size()) await dev.truncate(out.next);
    await dev.pwrite(encodeHeader(h, cs), 0);
    await dev.flush();
    const devForRebuild = dev;
    dev = null;
    const img = await Qcow2Image.open(devForRebuild, {
      readOnly: true,
      openBacking: false,
      filename: dst,
      baseDir: path.dirname(path.resolve(dst)),
    });
    try {
      await rebuildRefcounts(img);
    } finally {
      await img.close();
    }
    return { bytesBefore: fs.statSync(src).size, bytesAfter: fs.statSync(dst).size };
  } catch (err) {
    if (dev) await dev.close().catch(() => {});
    fs.rmSync(dst, { force: true });
    throw err;
  } finally {
    await old.close();
  }
}

