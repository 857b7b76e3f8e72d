/**
 * Encoding of replies: fuse_out_header followed by the reply struct of
 * fuse.h. Every encoder writes into a caller-provided buffer from offset 0
 * and returns the number of bytes of the whole reply, so the session can
 * reuse one scratch buffer for all fixed-size replies. Pure: no I/O.
 *
 * Values that do not fit their field (negative sizes, 64-bit values beyond
 * 2^53) throw RangeError; the session answers such a request with EIO.
 */
import {
  FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FUSE_ATTR_OUT_SIZE, FUSE_COMPAT_22_INIT_OUT_SIZE,
  FUSE_DIRENT_HEADER_SIZE, FUSE_ENTRY_OUT_SIZE, FUSE_INIT_OUT_SIZE, FUSE_LSEEK_OUT_SIZE,
  FUSE_OPEN_OUT_SIZE, FUSE_OUT_HEADER_SIZE, FUSE_STATFS_OUT_SIZE, FUSE_WRITE_OUT_SIZE,
  FUSE_NOTIFY_INVAL_INODE, FUSE_NOTIFY_INVAL_INODE_OUT_SIZE,
  fuseDirentplusSize, fuseDirentSize,
} from './abi';
import type { Attr, AttrReply, DirEntry, Entry, OpenReply, Statfs } from './filesystem';
import { writeI64LE, writeU64LE } from './wire';

/** struct fuse_out_header: len, error (negative errno or 0), unique. */
export function encodeOutHeader(buf: Buffer, len: number, error: number, unique: number): void {
  buf.writeUInt32LE(len, 0);
  buf.writeInt32LE(error, 4);
  writeU64LE(buf, 8, unique);
}

/**
 * FUSE_NOTIFY_INVAL_INODE: the kernel drops its cached pages of
 * [offset, offset+length) of the inode (length 0: to the end of the file).
 * A notification has unique 0 and the notify code in the error field.
 */
export function encodeNotifyInvalInode(buf: Buffer, nodeid: number, offset: number, length: number): number {
  const len = FUSE_OUT_HEADER_SIZE + FUSE_NOTIFY_INVAL_INODE_OUT_SIZE;
  encodeOutHeader(buf, len, FUSE_NOTIFY_INVAL_INODE, 0);
  writeU64LE(buf, FUSE_OUT_HEADER_SIZE, nodeid);
  writeI64LE(buf, FUSE_OUT_HEADER_SIZE + 8, offset);
  writeI64LE(buf, FUSE_OUT_HEADER_SIZE + 16, length);
  return len;
}

/** An error reply: a bare header with error = -errno. */
export function encodeError(buf: Buffer, unique: number, errno: number): number {
  if (!Number.isInteger(errno) || errno <= 0 || errno > 4095) throw new RangeError(`not an errno: ${errno}`);
  encodeOutHeader(buf, FUSE_OUT_HEADER_SIZE, -errno, unique);
  return FUSE_OUT_HEADER_SIZE;
}

/** A success reply without body (SETATTR-less ops: FLUSH, RELEASE, FSYNC, ACCESS, ...). */
export function encodeEmpty(buf: Buffer, unique: number): number {
  encodeOutHeader(buf, FUSE_OUT_HEADER_SIZE, 0, unique);
  return FUSE_OUT_HEADER_SIZE;
}

/** The header of a READ reply whose `dataLength` bytes are written after it (writev). */
export function encodeReadHeader(buf: Buffer, unique: number, dataLength: number): number {
  encodeOutHeader(buf, FUSE_OUT_HEADER_SIZE + dataLength, 0, unique);
  return FUSE_OUT_HEADER_SIZE;
}

/** Split milliseconds into whole seconds and nanoseconds (nsec in [0, 1e9)). */
function splitMs(ms: number): [number, number] {
  const sec = Math.floor(ms / 1000);
  const nsec = Math.min(999_999_999, Math.round((ms - sec * 1000) * 1e6));
  return [sec, nsec];
}

/** struct fuse_attr at `off`. */
export function writeAttr(buf: Buffer, off: number, attr: Attr): void {
  // ino@0 size@8 blocks@16 atime@24 mtime@32 ctime@40 atimensec@48 mtimensec@52
  // ctimensec@56 mode@60 nlink@64 uid@68 gid@72 rdev@76 blksize@80 flags@84
  writeU64LE(buf, off, attr.ino);
  writeU64LE(buf, off + 8, attr.size);
  writeU64LE(buf, off + 16, attr.blocks);
  const [as, ans] = splitMs(attr.atimeMs);
  const [ms, mns] = splitMs(attr.mtimeMs);
  const [cs, cns] = splitMs(attr.ctimeMs);
  writeI64LE(buf, off + 24, as);
  writeI64LE(buf, off + 32, ms);
  writeI64LE(buf, off + 40, cs);
  buf.writeUInt32LE(ans, off + 48);
  buf.writeUInt32LE(mns, off + 52);
  buf.writeUInt32LE(cns, off + 56);
  buf.writeUInt32LE(attr.mode >>> 0, off + 60);
  buf.writeUInt32LE(attr.nlink >>> 0, off + 64);
  buf.writeUInt32LE(attr.uid >>> 0, off + 68);
  buf.writeUInt32LE(attr.gid >>> 0, off + 72);
  buf.writeUInt32LE(attr.rdev >>> 0, off + 76);
  buf.writeUInt32LE(attr.blksize >>> 0, off + 80);
  buf.writeUInt32LE(0, off + 84);
}

/** A cache timeout (entry_valid/attr_valid + _nsec); negative means 0. */
function writeValid(buf: Buffer, secOff: number, nsecOff: number, ms: number): void {
  const [sec, nsec] = splitMs(Math.max(0, ms));
  writeU64LE(buf, secOff, sec);
  buf.writeUInt32LE(nsec, nsecOff);
}

/** struct fuse_entry_out at `off` (no header). */
export function writeEntryOut(buf: Buffer, off: number, entry: Entry): void {
  // nodeid@0 generation@8 entry_valid@16 attr_valid@24 entry_valid_nsec@32 attr_valid_nsec@36 attr@40
  writeU64LE(buf, off, entry.nodeid);
  writeU64LE(buf, off + 8, entry.generation);
  writeValid(buf, off + 16, off + 32, entry.entryTimeoutMs);
  writeValid(buf, off + 24, off + 36, entry.attrTimeoutMs);
  writeAttr(buf, off + 40, entry.attr);
}

/** LOOKUP reply: fuse_entry_out. */
export function encodeEntry(buf: Buffer, unique: number, entry: Entry): number {
  const len = FUSE_OUT_HEADER_SIZE + FUSE_ENTRY_OUT_SIZE;
  encodeOutHeader(buf, len, 0, unique);
  writeEntryOut(buf, FUSE_OUT_HEADER_SIZE, entry);
  return len;
}

/** GETATTR/SETATTR reply: fuse_attr_out {attr_valid, attr_valid_nsec, dummy, attr}. */
export function encodeAttr(buf: Buffer, unique: number, reply: AttrReply): number {
  const len = FUSE_OUT_HEADER_SIZE + FUSE_ATTR_OUT_SIZE;
  const o = FUSE_OUT_HEADER_SIZE;
  encodeOutHeader(buf, len, 0, unique);
  writeValid(buf, o, o + 8, reply.attrTimeoutMs);
  buf.writeUInt32LE(0, o + 12);
  writeAttr(buf, o + 16, reply.attr);
  return len;
}

/** OPEN/OPENDIR reply: fuse_open_out {fh, open_flags, backing_id}. */
export function encodeOpen(buf: Buffer, unique: number, reply: OpenReply): number {
  const len = FUSE_OUT_HEADER_SIZE + FUSE_OPEN_OUT_SIZE;
  const o = FUSE_OUT_HEADER_SIZE;
  encodeOutHeader(buf, len, 0, unique);
  writeU64LE(buf, o, reply.fh);
  buf.writeUInt32LE((reply.directIo ? FOPEN_DIRECT_IO : 0) | (reply.keepCache ? FOPEN_KEEP_CACHE : 0), o + 8);
  buf.writeInt32LE(0, o + 12);
  return len;
}

/** WRITE reply: fuse_write_out {size, padding}. */
export function encodeWrite(buf: Buffer, unique: number, written: number): number {
  if (!Number.isInteger(written) || written < 0 || written > 0xffffffff) throw new RangeError(`bad write size ${written}`);
  const len = FUSE_OUT_HEADER_SIZE + FUSE_WRITE_OUT_SIZE;
  encodeOutHeader(buf, len, 0, unique);
  buf.writeUInt32LE(written, FUSE_OUT_HEADER_SIZE);
  buf.writeUInt32LE(0, FUSE_OUT_HEADER_SIZE + 4);
  return len;
}

/** STATFS reply: fuse_statfs_out = fuse_kstatfs. */
export function encodeStatfs(buf: Buffer, unique: number, st: Statfs): number {
  // blocks@0 bfree@8 bavail@16 files@24 ffree@32 bsize@40 namelen@44 frsize@48 padding@52 spare[6]@56
  const len = FUSE_OUT_HEADER_SIZE + FUSE_STATFS_OUT_SIZE;
  const o = FUSE_OUT_HEADER_SIZE;
  encodeOutHeader(buf, len, 0, unique);
  writeU64LE(buf, o, st.blocks);
  writeU64LE(buf, o + 8, st.bfree);
  writeU64LE(buf, o + 16, st.bavail);
  writeU64LE(buf, o + 24, st.files);
  writeU64LE(buf, o + 32, st.ffree);
  buf.writeUInt32LE(st.bsize >>> 0, o + 40);
  buf.writeUInt32LE(st.namelen >>> 0, o + 44);
  buf.writeUInt32LE(st.frsize >>> 0, o + 48);
  buf.fill(0, o + 52, o + FUSE_STATFS_OUT_SIZE);
  return len;
}

/** LSEEK reply: fuse_lseek_out {offset}. */
export function encodeLseek(buf: Buffer, unique: number, offset: number): number {
  const len = FUSE_OUT_HEADER_SIZE + FUSE_LSEEK_OUT_SIZE;
  encodeOutHeader(buf, len, 0, unique);
  writeU64LE(buf, FUSE_OUT_HEADER_SIZE, offset);
  return len;
}

/** The fields of fuse_init_out this implementation sets. */
export interface InitReply {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  /** Timestamp granularity in ns (7.23+). */
  timeGran: number;
  /** Max pages per request when FUSE_MAX_PAGES is set (7.28+). */
  maxPages: number;
  /** Flags 32 and up (7.36+); read by the kernel only when flags has FUSE_INIT_EXT. */
  flags2?: number;
}

/**
 * INIT reply: fuse_init_out. Kernels before 7.23 know only its first 24
 * bytes (FUSE_COMPAT_22_INIT_OUT_SIZE), so the reply is cut to what the
 * negotiated minor understands.
 */
export function encodeInit(buf: Buffer, unique: number, r: InitReply): number {
  // major@0 minor@4 max_readahead@8 flags@12 max_background@16 congestion_threshold@18
  // max_write@20 time_gran@24 max_pages@28 map_alignment@30 flags2@32 max_stack_depth@36
  // request_timeout@40 unused[11]@42
  const size = r.minor < 23 ? FUSE_COMPAT_22_INIT_OUT_SIZE : FUSE_INIT_OUT_SIZE;
  const len = FUSE_OUT_HEADER_SIZE + size;
  const o = FUSE_OUT_HEADER_SIZE;
  encodeOutHeader(buf, len, 0, unique);
  buf.fill(0, o, o + size);
  buf.writeUInt32LE(r.major, o);
  buf.writeUInt32LE(r.minor, o + 4);
  buf.writeUInt32LE(r.maxReadahead >>> 0, o + 8);
  buf.writeUInt32LE(r.flags >>> 0, o + 12);
  buf.writeUInt16LE(r.maxBackground, o + 16);
  buf.writeUInt16LE(r.congestionThreshold, o + 18);
  buf.writeUInt32LE(r.maxWrite >>> 0, o + 20);
  if (size > FUSE_COMPAT_22_INIT_OUT_SIZE) {
    buf.writeUInt32LE(r.timeGran >>> 0, o + 24);
    buf.writeUInt16LE(r.maxPages, o + 28);
    buf.writeUInt32LE((r.flags2 ?? 0) >>> 0, o + 32);
  }
  return len;
}

/** d_type of a dirent from the S_IFMT bits of st_mode (DT_REG = S_IFREG >> 12, ...). */
export function direntType(mode: number): number {
  return (mode & 0o170000) >>> 12;
}

/** The result of packing directory entries into a READDIR reply. */
export interface DirentsEncoded {
  /** Bytes of the whole reply, header included. */
  length: number;
  /** Entries packed, starting at the requested index. */
  count: number;
}

/**
 * READDIR reply: as many fuse_dirent records as fit in `maxBytes` of
 * payload, starting at entry index `start`. Each record's `off` is the
 * index of the next entry, which the kernel sends back as the offset of
 * the next READDIR. Records are padded with zeros to 8 bytes.
 */
export function encodeDirents(buf: Buffer, unique: number, entries: readonly DirEntry[], start: number, maxBytes: number): DirentsEncoded {
  let pos = FUSE_OUT_HEADER_SIZE;
  const limit = FUSE_OUT_HEADER_SIZE + Math.min(maxBytes, buf.length - FUSE_OUT_HEADER_SIZE);
  let i = start;
  for (; i < entries.length; i++) {
    const e = entries[i]!;
    const nameBytes = Buffer.byteLength(e.name, 'utf8');
    const recLen = fuseDirentSize(nameBytes);
    if (pos + recLen > limit) break;
    // struct fuse_dirent: ino@0 off@8 namelen@16 type@20 name@24
    writeU64LE(buf, pos, e.ino);
    writeU64LE(buf, pos + 8, i + 1);
    buf.writeUInt32LE(nameBytes, pos + 16);
    buf.writeUInt32LE(direntType(e.type), pos + 20);
    buf.write(e.name, pos + FUSE_DIRENT_HEADER_SIZE, nameBytes, 'utf8');
    buf.fill(0, pos + FUSE_DIRENT_HEADER_SIZE + nameBytes, pos + recLen);
    pos += recLen;
  }
  encodeOutHeader(buf, pos, 0, unique);
  return { length: pos, count: i - start };
}

/** One READDIRPLUS record: the dirent and the entry a LOOKUP of it would return. */
export interface DirEntryPlus {
  dirent: DirEntry;
  entry: Entry;
}

/**
 * READDIRPLUS reply: fuse_direntplus records {fuse_entry_out, fuse_dirent},
 * padded to 8 bytes. Not negotiated by the session today (FUSE_DO_READDIRPLUS
 * is off); kept so a filesystem with costly lookups can switch it on.
 */
export function encodeDirentsPlus(buf: Buffer, unique: number, entries: readonly DirEntryPlus[], start: number, maxBytes: number): DirentsEncoded {
  let pos = FUSE_OUT_HEADER_SIZE;
  const limit = FUSE_OUT_HEADER_SIZE + Math.min(maxBytes, buf.length - FUSE_OUT_HEADER_SIZE);
  let i = start;
  for (; i < entries.length; i++) {
    const { dirent, entry } = entries[i]!;
    const nameBytes = Buffer.byteLength(dirent.name, 'utf8');
    const recLen = fuseDirentplusSize(nameBytes);
    if (pos + recLen > limit) break;
    writeEntryOut(buf, pos, entry);
    const d = pos + FUSE_ENTRY_OUT_SIZE;
    writeU64LE(buf, d, dirent.ino);
    writeU64LE(buf, d + 8, i + 1);
    buf.writeUInt32LE(nameBytes, d + 16);
    buf.writeUInt32LE(direntType(dirent.type), d + 20);
    buf.write(dirent.name, d + FUSE_DIRENT_HEADER_SIZE, nameBytes, 'utf8');
    buf.fill(0, d + FUSE_DIRENT_HEADER_SIZE + nameBytes, pos + recLen);
    pos += recLen;
  }
  encodeOutHeader(buf, pos, 0, unique);
  return { length: pos, count: i - start };
}
