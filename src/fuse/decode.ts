/**
 * Decoding of kernel requests: a buffer holding one fuse_in_header and its
 * body (fuse.h) becomes a typed request object. Pure: no I/O, no state.
 *
 * A request the kernel could not have sent well-formed — too short, a length
 * that disagrees with the header, an opcode fuse.h does not define, a 64-bit
 * value JavaScript cannot hold exactly — is a FuseProtocolError, a type apart
 * from the errno replies a filesystem produces. Opcodes fuse.h defines but the
 * session does not serve decode to `{ kind: 'unsupported' }` and are answered
 * with ENOSYS.
 *
 * Field offsets are those of the structs in fuse.h, stated at each read.
 */
import {
  FUSE_ACCESS, FUSE_BATCH_FORGET, FUSE_DESTROY, FUSE_FALLOCATE, FUSE_FLUSH, FUSE_FORGET,
  FUSE_FORGET_ONE_SIZE, FUSE_FSYNC, FUSE_FSYNC_FDATASYNC, FUSE_GETATTR, FUSE_GETATTR_FH,
  FUSE_IN_HEADER_SIZE, FUSE_INIT, FUSE_INIT_EXT, FUSE_INTERRUPT, FUSE_LOOKUP, FUSE_LSEEK,
  FUSE_OPEN, FUSE_OPENDIR, FUSE_READ, FUSE_READDIR, FUSE_READDIRPLUS, FUSE_RELEASE,
  FUSE_RELEASEDIR, FUSE_SETATTR, FUSE_STATFS, FUSE_WRITE, FUSE_WRITE_IN_SIZE,
  FATTR_ATIME, FATTR_ATIME_NOW, FATTR_CTIME, FATTR_FH, FATTR_GID, FATTR_MODE, FATTR_MTIME,
  FATTR_MTIME_NOW, FATTR_SIZE, FATTR_UID, OPCODES, opcodeName,
} from './abi';
import type { FileHandle, NodeId, SetattrChanges } from './filesystem';
import { readI64LE, readU64LE } from './wire';

const BRAND = Symbol.for('qcowfs.FuseProtocolError');

export type ProtocolFaultKind =
  /** Fewer bytes than fuse_in_header, or than the opcode's in-struct. */
  | 'short'
  /** fuse_in_header.len disagrees with the bytes read. */
  | 'length-mismatch'
  /** An opcode fuse.h does not define. */
  | 'unknown-opcode'
  /** A field whose value cannot be right (a name without NUL, a 64-bit value beyond 2^53). */
  | 'bad-value'
  /**
   * A file position or size beyond 2^53 (READ, WRITE, LSEEK and FALLOCATE
   * offsets, FALLOCATE lengths, SETATTR sizes): a well-formed request, past
   * the end of any file this transport serves, and answered as such.
   */
  | 'beyond-any-file';

/** A request that is not a well-formed FUSE message. */
export class FuseProtocolError extends Error {
  readonly [BRAND] = true;
  constructor(
    readonly kind: ProtocolFaultKind,
    readonly reason: string,
    /** The request's unique id when the header could be read (a reply is then possible), else -1. */
    readonly unique: number,
    /** The opcode when the header could be read, else -1. */
    readonly opcode: number,
    /** Byte offset in the request of the offending field. */
    readonly offset: number,
  ) {
    super(`FUSE protocol fault (${kind})${opcode >= 0 ? ` in ${opcodeName(opcode)}` : ''} at byte ${offset}: ${reason}`);
    this.name = 'FuseProtocolError';
  }

  static is(err: unknown): err is FuseProtocolError {
    return typeof err === 'object' && err !== null && (err as Record<symbol, unknown>)[BRAND] === true;
  }
}

/** struct fuse_in_header. */
export interface RequestHeader {
  /** Total length of the request, header included. */
  len: number;
  opcode: number;
  /** Request id echoed in the reply (fuse_out_header.unique). */
  unique: number;
  nodeid: NodeId;
  uid: number;
  gid: number;
  pid: number;
}

export interface InitRequest { kind: 'init'; header: RequestHeader; major: number; minor: number; maxReadahead: number; flags: number; flags2: number }
export interface LookupRequest { kind: 'lookup'; header: RequestHeader; name: string }
export interface ForgetRequest { kind: 'forget'; header: RequestHeader; nlookup: number }
export interface ForgetOne { nodeid: NodeId; nlookup: number }
export interface BatchForgetRequest { kind: 'batch-forget'; header: RequestHeader; forgets: ForgetOne[] }
export interface GetattrRequest { kind: 'getattr'; header: RequestHeader; fh: FileHandle | undefined }
export interface SetattrRequest { kind: 'setattr'; header: RequestHeader; valid: number; changes: SetattrChanges }
export interface OpenRequest { kind: 'open' | 'opendir'; header: RequestHeader; flags: number }
export interface ReadRequest { kind: 'read' | 'readdir' | 'readdirplus'; header: RequestHeader; fh: FileHandle; offset: number; size: number; flags: number }
export interface WriteRequest {
  kind: 'write'; header: RequestHeader; fh: FileHandle; offset: number; writeFlags: number; flags: number;
  /** A view of the request buffer: valid only while the buffer is not reused. */
  data: Buffer;
}
export interface ReleaseRequest { kind: 'release' | 'releasedir'; header: RequestHeader; fh: FileHandle; flags: number; releaseFlags: number }
export interface FlushRequest { kind: 'flush'; header: RequestHeader; fh: FileHandle }
export interface FsyncRequest { kind: 'fsync'; header: RequestHeader; fh: FileHandle; datasync: boolean }
export interface StatfsRequest { kind: 'statfs'; header: RequestHeader }
export interface AccessRequest { kind: 'access'; header: RequestHeader; mask: number }
export interface InterruptRequest { kind: 'interrupt'; header: RequestHeader; targetUnique: number }
export interface DestroyRequest { kind: 'destroy'; header: RequestHeader }
export interface LseekRequest { kind: 'lseek'; header: RequestHeader; fh: FileHandle; offset: number; whence: number }
export interface FallocateRequest { kind: 'fallocate'; header: RequestHeader; fh: FileHandle; offset: number; length: number; mode: number }
/** An opcode fuse.h defines that this session does not serve (ENOSYS). */
export interface UnsupportedRequest { kind: 'unsupported'; header: RequestHeader; name: string }

export type FuseRequest =
  | InitRequest | LookupRequest | ForgetRequest | BatchForgetRequest | GetattrRequest
  | SetattrRequest | OpenRequest | ReadRequest | WriteRequest | ReleaseRequest | FlushRequest
  | FsyncRequest | StatfsRequest | AccessRequest | InterruptRequest | DestroyRequest
  | LseekRequest | FallocateRequest | UnsupportedRequest;

/**
 * Read the fuse_in_header of `buf[0, length)`. Throws FuseProtocolError when
 * fewer than 40 bytes are present or the header disagrees with `length`.
 */
export function decodeHeader(buf: Buffer, length: number): RequestHeader {
  if (length < FUSE_IN_HEADER_SIZE || buf.length < length) {
    throw new FuseProtocolError('short', `${length} bytes cannot hold fuse_in_header (${FUSE_IN_HEADER_SIZE})`, -1, -1, 0);
  }
  const len = buf.readUInt32LE(0);
  const opcode = buf.readUInt32LE(4);
  const unique = readU64LE(buf, 8);
  if (Number.isNaN(unique)) throw new FuseProtocolError('bad-value', 'unique beyond 2^53', -1, opcode, 8);
  if (len !== length) {
    throw new FuseProtocolError('length-mismatch', `header says ${len} bytes, ${length} were read`, unique, opcode, 0);
  }
  const nodeid = readU64LE(buf, 16);
  if (Number.isNaN(nodeid)) throw new FuseProtocolError('bad-value', 'nodeid beyond 2^53', unique, opcode, 16);
  return {
    len,
    opcode,
    unique,
    nodeid,
    uid: buf.readUInt32LE(24),
    gid: buf.readUInt32LE(28),
    pid: buf.readUInt32LE(32),
    // 36: total_extlen (u16), 38: padding — extensions are never negotiated.
  };
}

/**
 * Decode one request from `buf[0, length)`. The returned object copies every
 * field out of the buffer except WriteRequest.data, which is a view: the
 * buffer must not be reused until the write has been handled.
 */
export function decodeRequest(buf: Buffer, length: number): FuseRequest {
  const header = decodeHeader(buf, length);
  const { opcode, unique } = header;
  const info = OPCODES.get(opcode);
  if (info === undefined) {
    throw new FuseProtocolError('unknown-opcode', `opcode ${opcode} is not defined by fuse.h`, unique, opcode, 4);
  }
  const body = FUSE_IN_HEADER_SIZE;
  const bodyLen = length - body;

  const need = (bytes: number): void => {
    if (bodyLen < bytes) {
      throw new FuseProtocolError('short', `${info.name} body has ${bodyLen} bytes, needs ${bytes}`, unique, opcode, body);
    }
  };
  /** A 64-bit field; beyond 2^53 it is a fault of `kind`. */
  const word64 = (off: number, field: string, signed: boolean, kind: ProtocolFaultKind): number => {
    const v = signed ? readI64LE(buf, body + off) : readU64LE(buf, body + off);
    if (Number.isNaN(v)) throw new FuseProtocolError(kind, `${info.name}.${field} beyond 2^53`, unique, opcode, body + off);
    return v;
  };
  const u64 = (off: number, field: string): number => word64(off, field, false, 'bad-value');
  const i64 = (off: number, field: string): number => word64(off, field, true, 'bad-value');
  /** A file position or size (see 'beyond-any-file'). */
  const position = (off: number, field: string, signed = false): number => word64(off, field, signed, 'beyond-any-file');
  const u32 = (off: number): number => buf.readUInt32LE(body + off);

  switch (opcode) {
    case FUSE_INIT: {
      // struct fuse_init_in: major, minor, max_readahead, flags, [flags2, unused[11]] (7.36)
      need(16);
      const flags = u32(12);
      const flags2 = bodyLen >= 20 && flags & FUSE_INIT_EXT ? u32(16) : 0;
      return { kind: 'init', header, major: u32(0), minor: u32(4), maxReadahead: u32(8), flags, flags2 };
    }
    case FUSE_LOOKUP:
      return { kind: 'lookup', header, name: readName(buf, body, length, header, info.name) };
    case FUSE_FORGET:
      // struct fuse_forget_in: nlookup
      need(8);
      return { kind: 'forget', header, nlookup: u64(0, 'nlookup') };
    case FUSE_BATCH_FORGET: {
      // struct fuse_batch_forget_in: count, dummy; then count x fuse_forget_one {nodeid, nlookup}
      need(8);
      const count = u32(0);
      need(8 + count * FUSE_FORGET_ONE_SIZE);
      const forgets: ForgetOne[] = new Array(count);
      for (let i = 0; i < count; i++) {
        const at = 8 + i * FUSE_FORGET_ONE_SIZE;
        forgets[i] = { nodeid: u64(at, `forgets[${i}].nodeid`), nlookup: u64(at + 8, `forgets[${i}].nlookup`) };
      }
      return { kind: 'batch-forget', header, forgets };
    }
    case FUSE_GETATTR: {
      // struct fuse_getattr_in: getattr_flags, dummy, fh
      need(16);
      const fh = u32(0) & FUSE_GETATTR_FH ? u64(8, 'fh') : undefined;
      return { kind: 'getattr', header, fh };
    }
    case FUSE_SETATTR:
      need(88);
      return decodeSetattr(header, u32, u64, i64, position);
    case FUSE_OPEN:
    case FUSE_OPENDIR:
      // struct fuse_open_in: flags, open_flags
      need(8);
      return { kind: opcode === FUSE_OPEN ? 'open' : 'opendir', header, flags: u32(0) };
    case FUSE_READ:
    case FUSE_READDIR:
    case FUSE_READDIRPLUS:
      // struct fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
      need(40);
      return {
        kind: opcode === FUSE_READ ? 'read' : opcode === FUSE_READDIR ? 'readdir' : 'readdirplus',
        header, fh: u64(0, 'fh'), offset: opcode === FUSE_READ ? position(8, 'offset') : u64(8, 'offset'), size: u32(16), flags: u32(32),
      };
    case FUSE_WRITE: {
      // struct fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding; then data
      need(FUSE_WRITE_IN_SIZE);
      const size = u32(16);
      need(FUSE_WRITE_IN_SIZE + size);
      const dataStart = body + FUSE_WRITE_IN_SIZE;
      return {
        kind: 'write', header, fh: u64(0, 'fh'), offset: position(8, 'offset'), writeFlags: u32(20), flags: u32(32),
        data: buf.subarray(dataStart, dataStart + size),
      };
    }
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
      // struct fuse_release_in: fh, flags, release_flags, lock_owner
      need(24);
      return { kind: opcode === FUSE_RELEASE ? 'release' : 'releasedir', header, fh: u64(0, 'fh'), flags: u32(8), releaseFlags: u32(12) };
    case FUSE_FLUSH:
      // struct fuse_flush_in: fh, unused, padding, lock_owner
      need(24);
      return { kind: 'flush', header, fh: u64(0, 'fh') };
    case FUSE_FSYNC:
      // struct fuse_fsync_in: fh, fsync_flags, padding
      need(16);
      return { kind: 'fsync', header, fh: u64(0, 'fh'), datasync: (u32(8) & FUSE_FSYNC_FDATASYNC) !== 0 };
    case FUSE_STATFS:
      return { kind: 'statfs', header };
    case FUSE_ACCESS:
      // struct fuse_access_in: mask, padding
      need(8);
      return { kind: 'access', header, mask: u32(0) };
    case FUSE_INTERRUPT:
      // struct fuse_interrupt_in: unique
      need(8);
      return { kind: 'interrupt', header, targetUnique: u64(0, 'unique') };
    case FUSE_DESTROY:
      return { kind: 'destroy', header };
    case FUSE_LSEEK:
      // struct fuse_lseek_in: fh, offset (loff_t, signed), whence, padding
      need(24);
      return { kind: 'lseek', header, fh: u64(0, 'fh'), offset: position(8, 'offset', true), whence: u32(16) };
    case FUSE_FALLOCATE:
      // struct fuse_fallocate_in: fh, offset, length, mode, padding
      need(32);
      return { kind: 'fallocate', header, fh: u64(0, 'fh'), offset: position(8, 'offset'), length: position(16, 'length'), mode: u32(24) };
    default:
      return { kind: 'unsupported', header, name: info.name };
  }
}

function decodeSetattr(
  header: RequestHeader,
  u32: (off: number) => number,
  u64: (off: number, field: string) => number,
  i64: (off: number, field: string) => number,
  position: (off: number, field: string) => number,
): SetattrRequest {
  // struct fuse_setattr_in: valid@0, padding@4, fh@8, size@16, lock_owner@24, atime@32,
  // mtime@40, ctime@48, atimensec@56, mtimensec@60, ctimensec@64, mode@68, unused4@72,
  // uid@76, gid@80, unused5@84
  const valid = u32(0);
  const changes: SetattrChanges = {};
  if (valid & FATTR_FH) changes.fh = u64(8, 'fh');
  if (valid & FATTR_SIZE) changes.size = position(16, 'size');
  if (valid & FATTR_MODE) changes.mode = u32(68);
  if (valid & FATTR_UID) changes.uid = u32(76);
  if (valid & FATTR_GID) changes.gid = u32(80);
  if (valid & FATTR_ATIME_NOW) changes.atimeMs = 'now';
  else if (valid & FATTR_ATIME) changes.atimeMs = toMs(i64(32, 'atime'), u32(56));
  if (valid & FATTR_MTIME_NOW) changes.mtimeMs = 'now';
  else if (valid & FATTR_MTIME) changes.mtimeMs = toMs(i64(40, 'mtime'), u32(60));
  if (valid & FATTR_CTIME) changes.ctimeMs = toMs(i64(48, 'ctime'), u32(64));
  return { kind: 'setattr', header, valid, changes };
}

function toMs(sec: number, nsec: number): number {
  return sec * 1000 + Math.floor(nsec / 1e6);
}

/** A NUL-terminated name filling the rest of the body. */
function readName(buf: Buffer, start: number, end: number, header: RequestHeader, op: string): string {
  const nul = buf.indexOf(0, start);
  if (nul < 0 || nul >= end) {
    throw new FuseProtocolError('bad-value', `${op} name is not NUL-terminated`, header.unique, header.opcode, start);
  }
  return buf.toString('utf8', start, nul);
}
