/**
 * Partition tables (MBR with extended/logical partitions, and GPT) read from
 * the start of a disk, and partitions served as files: a window onto the
 * disk's backend that refuses I/O once the table it was cut from changes.
 */
import { constants } from 'os';
import { FuseErrno } from '../fuse/filesystem';
import type { HostExtents } from '../qcow2/layer';
import { FileBackend } from './backend';

const SECTOR = 512;

export interface Partition {
  /** Linux numbering: MBR primaries 1-4, logicals from 5; GPT entry index + 1. */
  number: number;
  start: number;
  length: number;
}

export interface PartitionTable {
  scheme: 'mbr' | 'gpt';
  partitions: Partition[];
  /** The bytes that define the table, to notice when it changes. */
  fingerprint: Buffer;
  /** Byte ranges of the disk the table lives in. */
  ranges: Array<[number, number]>;
}

type Reader = (offset: number, length: number) => Promise<Buffer>;

const EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
const MAX_LOGICAL = 128;

/** Read the partition table of a disk of `size` bytes, or null when it has none. */
export async function readPartitionTable(read: Reader, size: number): Promise<PartitionTable | null> {
  if (size < SECTOR) return null;
  const mbr = await read(0, SECTOR);
  if (mbr[510] !== 0x55 || mbr[511] !== 0xaa) return null;
  const entries = [0, 1, 2, 3].map((i) => {
    const o = 446 + i * 16;
    return { type: mbr[o + 4], start: mbr.readUInt32LE(o + 8) * SECTOR, length: mbr.readUInt32LE(o + 12) * SECTOR };
  });
  if (entries.some((e) => e.type === 0xee)) return readGpt(read, size, mbr);
  const parts: Partition[] = [];
  const fingerprint: Buffer[] = [mbr.subarray(446, 512)];
  const ranges: Array<[number, number]> = [[0, SECTOR]];
  entries.forEach((e, i) => {
    if (e.type !== 0 && e.length > 0 && !EXTENDED_TYPES.has(e.type)) parts.push({ number: i + 1, start: e.start, length: e.length });
  });
  const ext = entries.find((e) => EXTENDED_TYPES.has(e.type) && e.length > 0);
  if (ext) {
    // Logical partitions: a chain of EBRs, each relative to the extended partition's start.
    let ebrOffset = ext.start;
    for (let n = 5; n < 5 + MAX_LOGICAL && ebrOffset + SECTOR <= size; n++) {
      const ebr = await read(ebrOffset, SECTOR);
      if (ebr[510] !== 0x55 || ebr[511] !== 0xaa) break;
      fingerprint.push(ebr.subarray(446, 512));
      ranges.push([ebrOffset, ebrOffset + SECTOR]);
      const len = ebr.readUInt32LE(446 + 12) * SECTOR;
      if (ebr[446 + 4] !== 0 && len > 0) parts.push({ number: n, start: ebrOffset + ebr.readUInt32LE(446 + 8) * SECTOR, length: len });
      const next = ebr.readUInt32LE(462 + 8) * SECTOR;
      if (ebr[462 + 4] === 0 || next === 0) break;
      ebrOffset = ext.start + next;
    }
  }
  return { scheme: 'mbr', partitions: clip(parts, size), fingerprint: Buffer.concat(fingerprint), ranges };
}

async function readGpt(read: Reader, size: number, mbr: Buffer): Promise<PartitionTable | null> {
  const hdr = await read(SECTOR, SECTOR);
  if (hdr.toString('latin1', 0, 8) !== 'EFI PART') return null;
  const entriesLba = Number(hdr.readBigUInt64LE(72));
  const count = hdr.readUInt32LE(80);
  const entrySize = hdr.readUInt32LE(84);
  if (entrySize < 128 || entrySize > 4096 || count > 1024) return null;
  const bytes = count * entrySize;
  const at = entriesLba * SECTOR;
  if (at + bytes > size) return null;
  const table = await read(at, bytes);
  const parts: Partition[] = [];
  for (let i = 0; i < count; i++) {
    const e = table.subarray(i * entrySize, (i + 1) * entrySize);
    if (e.subarray(0, 16).every((b) => b === 0)) continue;
    const first = Number(e.readBigUInt64LE(32));
    const last = Number(e.readBigUInt64LE(40));
    if (last < first) continue;
    parts.push({ number: i + 1, start: first * SECTOR, length: (last - first + 1) * SECTOR });
  }
  return {
    scheme: 'gpt',
    partitions: clip(parts, size),
    fingerprint: Buffer.concat([mbr.subarray(446, 512), hdr.subarray(0, 92), table]),
    ranges: [[0, 2 * SECTOR], [at, at + bytes]],
  };
}

function clip(parts: Partition[], size: number): Partition[] {
  return parts.filter((p) => p.start < size).map((p) => ({ ...p, length: Math.min(p.length, size - p.start) }));
}

/**
 * Watches a disk's partition table: the disk's writes go through here, and
 * once a write lands on the table and changes it, the partitions are stale.
 */
export class PartitionWatch {
  stale = false;

  constructor(
    private readonly disk: FileBackend,
    private readonly table: PartitionTable,
  ) {}

  /** Call after a write to [offset, offset+length) of the disk. */
  async afterWrite(offset: number, length: number): Promise<void> {
    if (this.stale) return;
    const end = offset + length;
    if (!this.table.ranges.some(([a, b]) => offset < b && end > a)) return;
    const now = await readPartitionTable(async (o, l) => {
      const b = Buffer.alloc(l);
      await this.disk.read(b, o);
      return b;
    }, this.disk.size());
    if (!now || !now.fingerprint.equals(this.table.fingerprint)) this.stale = true;
  }
}

/** The whole disk, passing its writes by the partition watch. */
export class WatchedDisk implements FileBackend {
  constructor(private readonly disk: FileBackend, private readonly watch: PartitionWatch) {}
  get readOnly(): boolean { return this.disk.readOnly; }
  get readOnlyReason(): string | null { return this.disk.readOnlyReason; }
  size(): number { return this.disk.size(); }
  read(buf: Buffer, offset: number): Promise<void> { return this.disk.read(buf, offset); }
  readNow(buf: Buffer, offset: number, mayBlock: boolean): boolean { return this.disk.readNow?.(buf, offset, mayBlock) ?? false; }
  async mapForRead(offset: number, length: number): Promise<HostExtents | null> {
    return this.disk.mapForRead ? this.disk.mapForRead(offset, length) : null;
  }
  async write(data: Buffer, offset: number): Promise<void> {
    await this.disk.write(data, offset);
    await this.watch.afterWrite(offset, data.length);
  }
  async resize(size: number): Promise<void> {
    await this.disk.resize(size);
    // GPT keeps a backup at the end of the disk; any resize invalidates the layout we cut.
    this.watch.stale = true;
  }
  async writeZeroes(offset: number, length: number, unmap: boolean): Promise<void> {
    await this.disk.writeZeroes(offset, length, unmap);
    await this.watch.afterWrite(offset, length);
  }
  seekData(offset: number): Promise<number> { return this.disk.seekData(offset); }
  seekHole(offset: number): Promise<number> { return this.disk.seekHole(offset); }
  flush(): Promise<void> { return this.disk.flush(); }
  allocatedBytes(): Promise<number> { return this.disk.allocatedBytes(); }
}

/** One partition as a file: offsets shifted into the partition's window. */
export class PartitionBackend implements FileBackend {
  constructor(
    private readonly disk: FileBackend,
    private readonly watch: PartitionWatch,
    readonly partition: Partition,
  ) {}

  private check(): void {
    if (this.watch.stale) {
      throw new FuseErrno(constants.errno.ESTALE, `partition ${this.partition.number}: the partition table changed since the mount started; remount to see the new partitions`);
    }
  }

  get readOnly(): boolean { return this.disk.readOnly; }
  get readOnlyReason(): string | null { return this.disk.readOnlyReason; }
  get withdrawn(): boolean { return this.watch.stale; }
  size(): number { return this.partition.length; }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.check();
    await this.disk.read(buf, this.partition.start + offset);
  }

  async mapForRead(offset: number, length: number): Promise<HostExtents | null> {
    this.check();
    return this.disk.mapForRead ? this.disk.mapForRead(this.partition.start + offset, length) : null;
  }

  async write(data: Buffer, offset: number): Promise<void> {
    this.check();
    if (offset + data.length > this.partition.length) throw new FuseErrno(constants.errno.ENOSPC, 'write past the end of the partition');
    await this.disk.write(data, this.partition.start + offset);
  }

  async resize(size: number): Promise<void> {
    this.check();
    if (size !== this.partition.length) throw new FuseErrno(constants.errno.EPERM, 'a partition file cannot be resized; change the partition table instead');
  }

  async writeZeroes(offset: number, length: number, unmap: boolean): Promise<void> {
    this.check();
    await this.disk.writeZeroes(this.partition.start + offset, Math.min(length, this.partition.length - offset), unmap);
  }

  async seekData(offset: number): Promise<number> {
    this.check();
    if (offset >= this.partition.length) throw new FuseErrno(constants.errno.ENXIO);
    let found: number;
    try {
      found = (await this.disk.seekData(this.partition.start + offset)) - this.partition.start;
    } catch (err) {
      if ((err as { kind?: string }).kind === 'out-of-range') throw new FuseErrno(constants.errno.ENXIO);
      throw err;
    }
    if (found >= this.partition.length) throw new FuseErrno(constants.errno.ENXIO);
    return found;
  }

  async seekHole(offset: number): Promise<number> {
    this.check();
    if (offset >= this.partition.length) throw new FuseErrno(constants.errno.ENXIO);
    const found = (await this.disk.seekHole(this.partition.start + offset)) - this.partition.start;
    return Math.min(found, this.partition.length);
  }

  flush(): Promise<void> {
    return this.disk.flush();
  }

  async allocatedBytes(): Promise<number> {
    return Math.min(await this.disk.allocatedBytes(), this.partition.length);
  }
}
