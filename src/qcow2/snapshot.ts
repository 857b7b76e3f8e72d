/**
 * The internal snapshot table (qcow2.txt "Snapshots"): entries of a fixed
 * 40-byte part, extra data, id string and name, each padded to 8 bytes.
 */
import { SNAPSHOT_HEADER_SIZE, QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOTS_SIZE, SNAPSHOT_EXTRA_DATA_SIZE } from './constants';
import { CorruptImageError } from './errors';
import { readU64, writeU64 } from './uint64';

export interface Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  /** Virtual disk size when the snapshot was taken (extra data), or null. */
  diskSize: number | null;
  icount: number | null;
  /** Extra data beyond what we understand, kept for rewriting. */
  extraData: Buffer;
}

function corrupt(off: number, reason: string): never {
  throw new CorruptImageError('snapshot table', off, reason);
}

/** Decode `count` snapshot entries from `buf` (read from `tableOffset`). */
export function decodeSnapshotTable(buf: Buffer, count: number, tableOffset: number): Snapshot[] {
  if (count > QCOW_MAX_SNAPSHOTS) corrupt(tableOffset, `${count} snapshots exceed the limit of ${QCOW_MAX_SNAPSHOTS}`);
  const out: Snapshot[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + SNAPSHOT_HEADER_SIZE > buf.length) corrupt(tableOffset + off, `snapshot entry ${i} runs past the table`);
    const l1TableOffset = readU64(buf, off);
    if (Number.isNaN(l1TableOffset)) corrupt(tableOffset + off, `snapshot ${i} L1 table offset too large`);
    const l1Size = buf.readUInt32BE(off + 8);
    const idSize = buf.readUInt16BE(off + 12);
    const nameSize = buf.readUInt16BE(off + 14);
    const dateSec = buf.readUInt32BE(off + 16);
    const dateNsec = buf.readUInt32BE(off + 20);
    const vmClockNsec = readU64(buf, off + 24);
    const vmStateSize32 = buf.readUInt32BE(off + 32);
    const extraSize = buf.readUInt32BE(off + 36);
    const bodyEnd = off + SNAPSHOT_HEADER_SIZE + extraSize + idSize + nameSize;
    if (bodyEnd > buf.length) corrupt(tableOffset + off, `snapshot entry ${i} runs past the table`);
    let p = off + SNAPSHOT_HEADER_SIZE;
    const extra = Buffer.from(buf.subarray(p, p + extraSize));
    p += extraSize;
    const id = buf.subarray(p, p + idSize).toString('utf8');
    p += idSize;
    const name = buf.subarray(p, p + nameSize).toString('utf8');
    let vmStateSize = vmStateSize32;
    let diskSize: number | null = null;
    let icount: number | null = null;
    if (extraSize >= 8) {
      const v = readU64(extra, 0);
      if (!Number.isNaN(v)) vmStateSize = v;
    }
    if (extraSize >= 16) {
      const v = readU64(extra, 8);
      if (Number.isNaN(v)) corrupt(tableOffset + off, `snapshot ${i} disk size too large`);
      diskSize = v;
    }
    if (extraSize >= 24) {
      const v = readU64(extra, 16);
      icount = Number.isNaN(v) ? null : v;
    }
    out.push({ l1TableOffset, l1Size, id, name, dateSec, dateNsec, vmClockNsec: Number.isNaN(vmClockNsec) ? 0 : vmClockNsec, vmStateSize, diskSize, icount, extraData: extra });
    off = (bodyEnd + 7) & ~7;
    if (off > QCOW_MAX_SNAPSHOTS_SIZE) corrupt(tableOffset, 'snapshot table too large');
  }
  return out;
}

/** Size in bytes of the encoded snapshot table. */
export function snapshotTableSize(snaps: Snapshot[]): number {
  let n = 0;
  for (const s of snaps) {
    const extra = Math.max(s.extraData.length, SNAPSHOT_EXTRA_DATA_SIZE);
    n += (SNAPSHOT_HEADER_SIZE + extra + Buffer.byteLength(s.id) + Buffer.byteLength(s.name) + 7) & ~7;
  }
  return n;
}

/** Encode the snapshot table (extra data always carries disk_size, as QEMU writes it). */
export function encodeSnapshotTable(snaps: Snapshot[]): Buffer {
  const buf = Buffer.alloc(snapshotTableSize(snaps));
  let off = 0;
  for (const s of snaps) {
    const extra = Buffer.alloc(Math.max(s.extraData.length, SNAPSHOT_EXTRA_DATA_SIZE));
    s.extraData.copy(extra);
    writeU64(extra, 0, s.vmStateSize);
    writeU64(extra, 8, s.diskSize ?? 0);
    if (s.icount !== null) writeU64(extra, 16, s.icount);
    else { extra.writeUInt32BE(0xffffffff, 16); extra.writeUInt32BE(0xffffffff, 20); }
    const id = Buffer.from(s.id, 'utf8');
    const name = Buffer.from(s.name, 'utf8');
    writeU64(buf, off, s.l1TableOffset);
    buf.writeUInt32BE(s.l1Size, off + 8);
    buf.writeUInt16BE(id.length, off + 12);
    buf.writeUInt16BE(name.length, off + 14);
    buf.writeUInt32BE(s.dateSec >>> 0, off + 16);
    buf.writeUInt32BE(s.dateNsec >>> 0, off + 20);
    writeU64(buf, off + 24, s.vmClockNsec);
    buf.writeUInt32BE(Math.min(s.vmStateSize, 0xffffffff), off + 32);
    buf.writeUInt32BE(extra.length, off + 36);
    let p = off + SNAPSHOT_HEADER_SIZE;
    extra.copy(buf, p);
    p += extra.length;
    id.copy(buf, p);
    p += id.length;
    name.copy(buf, p);
    p += name.length;
    off = (p + 7) & ~7;
  }
  return buf;
}
