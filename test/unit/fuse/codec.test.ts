/**
 * The FUSE codec fed with raw byte buffers laid out by hand from the structs
 * of include/uapi/linux/fuse.h — no kernel involved.
 */
import { expect } from 'chai';
import {
  FATTR_ATIME_NOW, FATTR_CTIME, FATTR_FH, FATTR_MODE, FATTR_MTIME, FATTR_SIZE, FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE,
  FUSE_ASYNC_READ, FUSE_DIRECT_IO_ALLOW_MMAP, FUSE_BATCH_FORGET, FUSE_FALLOCATE, FUSE_FORGET, FUSE_GETATTR, FUSE_GETATTR_FH, FUSE_GETXATTR,
  FUSE_INIT, FUSE_INIT_EXT, FUSE_INTERRUPT, FUSE_LOOKUP, FUSE_LSEEK, FUSE_MAX_PAGES, FUSE_OPEN, FUSE_READ,
  FUSE_READDIR, FUSE_RELEASE, FUSE_SETATTR, FUSE_STATFS, FUSE_WRITE, fuseDirentSize, OPCODES, opcodeName,
} from '../../../src/fuse/abi';
import { decodeRequest, FuseProtocolError, type FuseRequest } from '../../../src/fuse/decode';
import {
  direntType, encodeAttr, encodeDirents, encodeDirentsPlus, encodeEmpty, encodeEntry, encodeError, encodeInit,
  encodeLseek, encodeNotifyInvalInode, encodeOpen, encodeReadHeader, encodeStatfs, encodeWrite,
} from '../../../src/fuse/encode';
import type { Attr, DirEntry, Entry } from '../../../src/fuse/filesystem';
import { readI64LE, readU64LE, writeI64LE, writeU64LE } from '../../../src/fuse/wire';

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;

/** A request: fuse_in_header {len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding} + body. */
function request(opcode: number, body: Buffer, { unique = 42, nodeid = 7, uid = 1000, gid = 100, pid = 4321 } = {}): Buffer {
  const h = Buffer.alloc(40);
  h.writeUInt32LE(40 + body.length, 0);
  h.writeUInt32LE(opcode, 4);
  h.writeBigUInt64LE(BigInt(unique), 8);
  h.writeBigUInt64LE(BigInt(nodeid), 16);
  h.writeUInt32LE(uid, 24);
  h.writeUInt32LE(gid, 28);
  h.writeUInt32LE(pid, 32);
  return Buffer.concat([h, body]);
}

function decode(buf: Buffer): FuseRequest {
  return decodeRequest(buf, buf.length);
}

function fault(fn: () => unknown): FuseProtocolError {
  try {
    fn();
  } catch (e) {
    expect(FuseProtocolError.is(e), String(e)).to.equal(true);
    return e as FuseProtocolError;
  }
  throw new Error('expected a FuseProtocolError');
}

function u64s(...values: Array<number | bigint>): Buffer {
  const b = Buffer.alloc(values.length * 8);
  values.forEach((v, i) => b.writeBigUInt64LE(BigInt(v), i * 8));
  return b;
}

function u32s(...values: number[]): Buffer {
  const b = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => b.writeUInt32LE(v >>> 0, i * 4));
  return b;
}

const attr: Attr = {
  ino: 2, size: 2 ** 40 + 5, blocks: 16, atimeMs: 1_700_000_000_123, mtimeMs: 1_700_000_001_500, ctimeMs: -1500,
  mode: S_IFREG | 0o640, nlink: 1, uid: 1000, gid: 100, rdev: 0, blksize: 65536,
};

/** Check a fuse_attr at `o` against `attr`. */
function expectAttr(buf: Buffer, o: number, a: Attr): void {
  expect(buf.readBigUInt64LE(o)).to.equal(BigInt(a.ino));
  expect(buf.readBigUInt64LE(o + 8)).to.equal(BigInt(a.size));
  expect(buf.readBigUInt64LE(o + 16)).to.equal(BigInt(a.blocks));
  expect(buf.readBigInt64LE(o + 24)).to.equal(BigInt(Math.floor(a.atimeMs / 1000)));
  expect(buf.readBigInt64LE(o + 32)).to.equal(BigInt(Math.floor(a.mtimeMs / 1000)));
  expect(buf.readBigInt64LE(o + 40)).to.equal(BigInt(Math.floor(a.ctimeMs / 1000)));
  expect(buf.readUInt32LE(o + 60)).to.equal(a.mode);
  expect(buf.readUInt32LE(o + 64)).to.equal(a.nlink);
  expect(buf.readUInt32LE(o + 68)).to.equal(a.uid);
  expect(buf.readUInt32LE(o + 72)).to.equal(a.gid);
  expect(buf.readUInt32LE(o + 80)).to.equal(a.blksize);
}

function expectHeader(buf: Buffer, len: number, error: number, unique: number): void {
  expect(buf.readUInt32LE(0), 'out.len').to.equal(len);
  expect(buf.readInt32LE(4), 'out.error').to.equal(error);
  expect(buf.readBigUInt64LE(8), 'out.unique').to.equal(BigInt(unique));
}

describe('fuse abi', () => {
  it('names every opcode and keeps in-sizes 8-aligned', () => {
    expect(opcodeName(FUSE_LOOKUP)).to.equal('LOOKUP');
    expect(opcodeName(FUSE_BATCH_FORGET)).to.equal('BATCH_FORGET');
    expect(opcodeName(9999)).to.equal('OP_9999');
    for (const info of OPCODES.values()) expect(info.inSize % 8, info.name).to.equal(0);
    expect(OPCODES.get(FUSE_WRITE)!.inSize).to.equal(40);
    expect(OPCODES.get(FUSE_SETATTR)!.inSize).to.equal(88);
    expect(OPCODES.get(FUSE_FORGET)!.noReply).to.equal(true);
  });

  it('sizes dirents per FUSE_DIRENT_SIZE (24-byte header, 8-byte aligned)', () => {
    expect(fuseDirentSize(1)).to.equal(32);
    expect(fuseDirentSize(8)).to.equal(32);
    expect(fuseDirentSize(9)).to.equal(40);
    expect(fuseDirentSize(0)).to.equal(24);
  });
});

describe('fuse wire 64-bit fields', () => {
  it('reads u64 as two words and refuses values beyond 2^53', () => {
    const b = u64s(2 ** 53 - 1, 2n ** 53n, 0xffffffffn);
    expect(readU64LE(b, 0)).to.equal(2 ** 53 - 1);
    expect(readU64LE(b, 8)).to.be.NaN;
    expect(readU64LE(b, 16)).to.equal(0xffffffff);
  });

  it('round-trips signed values, negative ones included', () => {
    const b = Buffer.alloc(8);
    for (const v of [0, -1, -4096, 2 ** 40 + 3, -(2 ** 45) - 7]) {
      writeI64LE(b, 0, v);
      expect(b.readBigInt64LE(0)).to.equal(BigInt(v));
      expect(readI64LE(b, 0)).to.equal(v);
    }
  });

  it('throws instead of truncating unsafe or negative u64 values', () => {
    const b = Buffer.alloc(8);
    expect(() => writeU64LE(b, 0, 2 ** 53)).to.throw(RangeError);
    expect(() => writeU64LE(b, 0, -1)).to.throw(RangeError);
    writeU64LE(b, 0, 2 ** 52 + 1);
    expect(b.readBigUInt64LE(0)).to.equal(2n ** 52n + 1n);
  });
});

describe('fuse request decoding', () => {
  it('decodes the header into typed fields', () => {
    const r = decode(request(FUSE_STATFS, Buffer.alloc(0), { unique: 2 ** 40, nodeid: 1, uid: 0, gid: 5, pid: 99 }));
    expect(r.kind).to.equal('statfs');
    expect(r.header).to.deep.equal({ len: 40, opcode: FUSE_STATFS, unique: 2 ** 40, nodeid: 1, uid: 0, gid: 5, pid: 99 });
  });

  it('decodes INIT of a pre-7.36 kernel (16-byte body)', () => {
    const r = decode(request(FUSE_INIT, u32s(7, 31, 131072, FUSE_ASYNC_READ | FUSE_MAX_PAGES)));
    expect(r).to.deep.include({ kind: 'init', major: 7, minor: 31, maxReadahead: 131072, flags: FUSE_ASYNC_READ | FUSE_MAX_PAGES, flags2: 0 });
  });

  it('decodes INIT with FUSE_INIT_EXT and flags2 (64-byte body)', () => {
    const body = Buffer.alloc(64);
    u32s(7, 44, 65536, (FUSE_INIT_EXT | FUSE_ASYNC_READ) >>> 0, 0x3).copy(body);
    const r = decode(request(FUSE_INIT, body));
    if (r.kind !== 'init') throw new Error(r.kind);
    expect(r.minor).to.equal(44);
    expect(r.flags).to.equal((FUSE_INIT_EXT | FUSE_ASYNC_READ) >>> 0);
    expect(r.flags2).to.equal(3);
  });

  it('decodes LOOKUP names up to the NUL', () => {
    const r = decode(request(FUSE_LOOKUP, Buffer.from('disk.raw\0', 'utf8'), { nodeid: 1 }));
    expect(r).to.deep.include({ kind: 'lookup', name: 'disk.raw' });
    expect(r.header.nodeid).to.equal(1);
  });

  it('decodes READ (fuse_read_in) with a 64-bit offset', () => {
    const body = Buffer.concat([u64s(9, 2 ** 33 + 4096), u32s(1 << 20, 0), u64s(0), u32s(0o2, 0)]);
    const r = decode(request(FUSE_READ, body));
    expect(r).to.deep.include({ kind: 'read', fh: 9, offset: 2 ** 33 + 4096, size: 1 << 20, flags: 0o2 });
  });

  it('decodes READDIR with the same layout as READ', () => {
    const body = Buffer.concat([u64s(0, 3), u32s(4096, 0), u64s(0), u32s(0, 0)]);
    expect(decode(request(FUSE_READDIR, body))).to.deep.include({ kind: 'readdir', fh: 0, offset: 3, size: 4096 });
  });

  it('decodes WRITE data as a view of the request buffer (no copy)', () => {
    const payload = Buffer.from('0123456789abcdef');
    const body = Buffer.concat([u64s(3, 8192), u32s(payload.length, 1), u64s(0), u32s(0o1, 0), payload]);
    const buf = request(FUSE_WRITE, body);
    const r = decode(buf);
    if (r.kind !== 'write') throw new Error(r.kind);
    expect(r).to.deep.include({ fh: 3, offset: 8192, writeFlags: 1, flags: 0o1 });
    expect(r.data.toString()).to.equal('0123456789abcdef');
    expect(r.data.buffer).to.equal(buf.buffer);
    buf[80] = 0x58; // the first data byte, after the 40-byte header and 40-byte write_in
    expect(r.data.toString()).to.equal('X123456789abcdef');
  });

  it('refuses a WRITE whose size runs past the request', () => {
    const body = Buffer.concat([u64s(3, 0), u32s(100, 0), u64s(0), u32s(0, 0), Buffer.alloc(10)]);
    const e = fault(() => decode(request(FUSE_WRITE, body, { unique: 77 })));
    expect(e.kind).to.equal('short');
    expect(e.unique).to.equal(77);
    expect(e.opcode).to.equal(FUSE_WRITE);
  });

  it('decodes SETATTR valid bits into changes', () => {
    const body = Buffer.alloc(88);
    body.writeUInt32LE(FATTR_SIZE | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_FH | FATTR_MODE | FATTR_CTIME, 0);
    body.writeBigUInt64LE(11n, 8); // fh
    body.writeBigUInt64LE(BigInt(2 ** 41), 16); // size
    body.writeBigInt64LE(1_700_000_000n, 40); // mtime
    body.writeBigInt64LE(-2n, 48); // ctime (before the epoch)
    body.writeUInt32LE(250_000_000, 60); // mtimensec
    body.writeUInt32LE(500_000_000, 64); // ctimensec
    body.writeUInt32LE(S_IFREG | 0o600, 68); // mode
    body.writeUInt32LE(1234, 76); // uid: not in valid, must be ignored
    const r = decode(request(FUSE_SETATTR, body));
    if (r.kind !== 'setattr') throw new Error(r.kind);
    expect(r.changes).to.deep.equal({
      fh: 11, size: 2 ** 41, mode: S_IFREG | 0o600, atimeMs: 'now', mtimeMs: 1_700_000_000_250, ctimeMs: -1500,
    });
  });

  it('decodes GETATTR with and without FUSE_GETATTR_FH', () => {
    expect(decode(request(FUSE_GETATTR, Buffer.concat([u32s(FUSE_GETATTR_FH, 0), u64s(5)])))).to.deep.include({ fh: 5 });
    expect(decode(request(FUSE_GETATTR, Buffer.concat([u32s(0, 0), u64s(5)])))).to.deep.include({ fh: undefined });
  });

  it('decodes LSEEK with a signed offset', () => {
    const body = Buffer.concat([u64s(4), Buffer.alloc(8), u32s(4, 0)]);
    body.writeBigInt64LE(-1n, 8);
    expect(decode(request(FUSE_LSEEK, body))).to.deep.include({ kind: 'lseek', fh: 4, offset: -1, whence: 4 });
    const ok = Buffer.concat([u64s(4, 2 ** 35), u32s(3, 0)]);
    expect(decode(request(FUSE_LSEEK, ok))).to.deep.include({ offset: 2 ** 35, whence: 3 });
  });

  it('decodes FALLOCATE', () => {
    const body = Buffer.concat([u64s(6, 4096, 2 ** 34), u32s(0x3, 0)]);
    expect(decode(request(FUSE_FALLOCATE, body))).to.deep.include({ kind: 'fallocate', fh: 6, offset: 4096, length: 2 ** 34, mode: 3 });
  });

  it('decodes FORGET and BATCH_FORGET', () => {
    expect(decode(request(FUSE_FORGET, u64s(3), { nodeid: 2 }))).to.deep.include({ kind: 'forget', nlookup: 3 });
    const body = Buffer.concat([u32s(2, 0), u64s(2, 5), u64s(9, 1)]);
    const r = decode(request(FUSE_BATCH_FORGET, body));
    expect(r).to.deep.include({ kind: 'batch-forget' });
    if (r.kind !== 'batch-forget') throw new Error(r.kind);
    expect(r.forgets).to.deep.equal([{ nodeid: 2, nlookup: 5 }, { nodeid: 9, nlookup: 1 }]);
  });

  it('refuses a BATCH_FORGET whose count exceeds the body', () => {
    const body = Buffer.concat([u32s(3, 0), u64s(2, 5)]);
    expect(fault(() => decode(request(FUSE_BATCH_FORGET, body))).kind).to.equal('short');
  });

  it('decodes OPEN, RELEASE and INTERRUPT', () => {
    expect(decode(request(FUSE_OPEN, u32s(0o2, 0)))).to.deep.include({ kind: 'open', flags: 0o2 });
    expect(decode(request(FUSE_RELEASE, Buffer.concat([u64s(8), u32s(0o2, 1), u64s(0)])))).to.deep.include({ kind: 'release', fh: 8, flags: 0o2, releaseFlags: 1 });
    expect(decode(request(FUSE_INTERRUPT, u64s(40)))).to.deep.include({ kind: 'interrupt', targetUnique: 40 });
  });

  it('turns a defined but unserved opcode into an ENOSYS-able request', () => {
    expect(decode(request(FUSE_GETXATTR, Buffer.from('user.x\0\0\0\0\0\0\0\0\0')))).to.deep.include({ kind: 'unsupported', name: 'GETXATTR' });
  });

  describe('protocol faults', () => {
    it('a buffer shorter than fuse_in_header', () => {
      const e = fault(() => decodeRequest(Buffer.alloc(39), 39));
      expect(e.kind).to.equal('short');
      expect(e.unique).to.equal(-1);
    });

    it('a header length that disagrees with the bytes read', () => {
      const buf = request(FUSE_STATFS, Buffer.alloc(0), { unique: 5 });
      buf.writeUInt32LE(48, 0);
      const e = fault(() => decode(buf));
      expect(e.kind).to.equal('length-mismatch');
      expect(e.unique).to.equal(5);
    });

    it('an opcode fuse.h does not define', () => {
      const e = fault(() => decode(request(4242, Buffer.alloc(8), { unique: 12 })));
      expect(e.kind).to.equal('unknown-opcode');
      expect(e.unique).to.equal(12);
      expect(e.opcode).to.equal(4242);
    });

    it('a body shorter than the in-struct', () => {
      for (const [opcode, bytes] of [[FUSE_READ, 39], [FUSE_SETATTR, 80], [FUSE_INIT, 12], [FUSE_LSEEK, 16], [FUSE_FALLOCATE, 24]] as const) {
        const e = fault(() => decode(request(opcode, Buffer.alloc(bytes))));
        expect(e.kind, opcodeName(opcode)).to.equal('short');
        expect(e.message).to.contain(opcodeName(opcode));
      }
    });

    it('a name without its NUL', () => {
      expect(fault(() => decode(request(FUSE_LOOKUP, Buffer.from('abc')))).kind).to.equal('bad-value');
    });

    it('a 64-bit file position beyond 2^53: past the end of any file (beyond-any-file), other 64-bit fields a bad value', () => {
      const body = Buffer.concat([u64s(1, 2n ** 60n), u32s(4096, 0), u64s(0), u32s(0, 0)]);
      const e = fault(() => decode(request(FUSE_READ, body)));
      expect(e.kind).to.equal('beyond-any-file');
      expect(e.offset).to.equal(48);
      const dir = fault(() => decode(request(FUSE_READDIR, body)));
      expect(dir.kind).to.equal('bad-value');
      const fh = fault(() => decode(request(FUSE_READ, Buffer.concat([u64s(2n ** 60n, 0), u32s(4096, 0), u64s(0), u32s(0, 0)]))));
      expect(fh.kind).to.equal('bad-value');
      expect(fh.offset).to.equal(40);
    });
  });
});

describe('fuse reply encoding', () => {
  const scratch = Buffer.alloc(4096);

  it('errors: a bare header with -errno', () => {
    expect(encodeError(scratch, 9, 2)).to.equal(16);
    expectHeader(scratch, 16, -2, 9);
    expect(() => encodeError(scratch, 9, 0)).to.throw(RangeError);
    expect(() => encodeError(scratch, 9, -5)).to.throw(RangeError);
  });

  it('empty success and READ header', () => {
    expect(encodeEmpty(scratch, 3)).to.equal(16);
    expectHeader(scratch, 16, 0, 3);
    expect(encodeReadHeader(scratch, 4, 1 << 20)).to.equal(16);
    expectHeader(scratch, 16 + (1 << 20), 0, 4);
  });

  it('entry_out: ids, split timeouts and the attr', () => {
    const entry: Entry = { nodeid: 2, generation: 1, attr, entryTimeoutMs: 1500, attrTimeoutMs: 250 };
    const len = encodeEntry(scratch, 10, entry);
    expect(len).to.equal(16 + 128);
    expectHeader(scratch, 144, 0, 10);
    expect(scratch.readBigUInt64LE(16)).to.equal(2n);
    expect(scratch.readBigUInt64LE(24)).to.equal(1n);
    expect(scratch.readBigUInt64LE(32)).to.equal(1n); // entry_valid sec
    expect(scratch.readBigUInt64LE(40)).to.equal(0n); // attr_valid sec
    expect(scratch.readUInt32LE(48)).to.equal(500_000_000);
    expect(scratch.readUInt32LE(52)).to.equal(250_000_000);
    expectAttr(scratch, 56, attr);
    // ctime -1.5 s: seconds -2, nanoseconds 500000000
    expect(scratch.readUInt32LE(56 + 56)).to.equal(500_000_000);
    expect(scratch.readUInt32LE(56 + 48)).to.equal(123_000_000);
  });

  it('attr_out', () => {
    const len = encodeAttr(scratch, 11, { attr, attrTimeoutMs: 2000 });
    expect(len).to.equal(16 + 104);
    expect(scratch.readBigUInt64LE(16)).to.equal(2n);
    expect(scratch.readUInt32LE(24)).to.equal(0);
    expectAttr(scratch, 32, attr);
  });

  it('open_out with FOPEN flags', () => {
    expect(encodeOpen(scratch, 12, { fh: 77, directIo: true, keepCache: true })).to.equal(32);
    expect(scratch.readBigUInt64LE(16)).to.equal(77n);
    expect(scratch.readUInt32LE(24)).to.equal(FOPEN_DIRECT_IO | FOPEN_KEEP_CACHE);
    encodeOpen(scratch, 12, { fh: 1 });
    expect(scratch.readUInt32LE(24)).to.equal(0);
  });

  it('write_out, lseek_out', () => {
    expect(encodeWrite(scratch, 13, 1 << 20)).to.equal(24);
    expect(scratch.readUInt32LE(16)).to.equal(1 << 20);
    expect(encodeLseek(scratch, 14, 2 ** 45)).to.equal(24);
    expect(scratch.readBigUInt64LE(16)).to.equal(2n ** 45n);
    expect(() => encodeLseek(scratch, 14, -1)).to.throw(RangeError);
  });

  it('notify_inval_inode: unique 0, the notify code where an error would be, then ino, off, len', () => {
    expect(encodeNotifyInvalInode(scratch, 2, 1 << 20, 4096)).to.equal(16 + 24);
    expect(scratch.readUInt32LE(0)).to.equal(40);
    expect(scratch.readInt32LE(4)).to.equal(2); // FUSE_NOTIFY_INVAL_INODE
    expect(scratch.readBigUInt64LE(8)).to.equal(0n);
    expect(scratch.readBigUInt64LE(16)).to.equal(2n);
    expect(scratch.readBigInt64LE(24)).to.equal(1n << 20n);
    expect(scratch.readBigInt64LE(32)).to.equal(4096n);
  });

  it('statfs_out (fuse_kstatfs)', () => {
    const st = { blocks: 2 ** 40, bfree: 5, bavail: 4, files: 3, ffree: 2, bsize: 4096, namelen: 255, frsize: 512 };
    expect(encodeStatfs(scratch, 15, st)).to.equal(16 + 80);
    expect(scratch.readBigUInt64LE(16)).to.equal(2n ** 40n);
    expect(scratch.readBigUInt64LE(48)).to.equal(2n);
    expect(scratch.readUInt32LE(56)).to.equal(4096);
    expect(scratch.readUInt32LE(60)).to.equal(255);
    expect(scratch.readUInt32LE(64)).to.equal(512);
  });

  it('init_out: full 64 bytes from 7.23, 24 bytes before', () => {
    const r = {
      major: 7, minor: 31, maxReadahead: 131072, flags: FUSE_ASYNC_READ | FUSE_MAX_PAGES, maxBackground: 64,
      congestionThreshold: 48, maxWrite: 1 << 20, timeGran: 1, maxPages: 256,
    };
    scratch.fill(0xff);
    expect(encodeInit(scratch, 1, r)).to.equal(16 + 64);
    expect(u32sAt(scratch, 16, 4)).to.deep.equal([7, 31, 131072, FUSE_ASYNC_READ | FUSE_MAX_PAGES]);
    expect(scratch.readUInt16LE(32)).to.equal(64);
    expect(scratch.readUInt16LE(34)).to.equal(48);
    expect(scratch.readUInt32LE(36)).to.equal(1 << 20);
    expect(scratch.readUInt32LE(40)).to.equal(1);
    expect(scratch.readUInt16LE(44)).to.equal(256);
    expect(scratch.subarray(46, 80).every((b) => b === 0)).to.equal(true);
    expect(encodeInit(scratch, 1, { ...r, minor: 22 })).to.equal(16 + 24);
  });

  it('init_out: flags2 at offset 32, after map_alignment', () => {
    const r = {
      major: 7, minor: 39, maxReadahead: 0, flags: FUSE_INIT_EXT, maxBackground: 1,
      congestionThreshold: 1, maxWrite: 4096, timeGran: 1, maxPages: 1, flags2: FUSE_DIRECT_IO_ALLOW_MMAP,
    };
    scratch.fill(0xff);
    expect(encodeInit(scratch, 1, r)).to.equal(16 + 64);
    expect(scratch.readUInt32LE(16 + 12)).to.equal(0x40000000);
    expect(scratch.readUInt16LE(16 + 30)).to.equal(0); // map_alignment
    // fuse.h: FUSE_DIRECT_IO_ALLOW_MMAP is 1ULL << 36, bit 4 of flags2.
    expect(scratch.readUInt32LE(16 + 32)).to.equal(1 << 4);
    expect(scratch.subarray(16 + 36, 80).every((b) => b === 0)).to.equal(true);
  });

  it('dirents: 8-byte aligned records, off = next index, zero padding', () => {
    const entries: DirEntry[] = [
      { name: '.', ino: 1, type: S_IFDIR },
      { name: '..', ino: 1, type: S_IFDIR },
      { name: 'disk.raw', ino: 2, type: S_IFREG },
      { name: 'nine_char', ino: 3, type: S_IFREG },
    ];
    const buf = Buffer.alloc(4096, 0xee);
    const out = encodeDirents(buf, 20, entries, 0, 4096);
    expect(out.count).to.equal(4);
    expect(out.length).to.equal(16 + 32 + 32 + 32 + 40);
    expectHeader(buf, out.length, 0, 20);
    let pos = 16;
    entries.forEach((e, i) => {
      expect(buf.readBigUInt64LE(pos)).to.equal(BigInt(e.ino));
      expect(buf.readBigUInt64LE(pos + 8)).to.equal(BigInt(i + 1));
      const namelen = buf.readUInt32LE(pos + 16);
      expect(namelen).to.equal(e.name.length);
      expect(buf.readUInt32LE(pos + 20)).to.equal(direntType(e.type));
      expect(buf.toString('utf8', pos + 24, pos + 24 + namelen)).to.equal(e.name);
      const rec = fuseDirentSize(namelen);
      expect(rec % 8).to.equal(0);
      expect(buf.subarray(pos + 24 + namelen, pos + rec).every((b) => b === 0)).to.equal(true);
      pos += rec;
    });
    expect(direntType(S_IFDIR)).to.equal(4); // DT_DIR
    expect(direntType(S_IFREG)).to.equal(8); // DT_REG
  });

  it('dirents: stop at the requested size and resume from an offset', () => {
    const entries: DirEntry[] = Array.from({ length: 10 }, (_, i) => ({ name: `file${i}`, ino: 10 + i, type: S_IFREG }));
    const buf = Buffer.alloc(4096);
    const first = encodeDirents(buf, 1, entries, 0, 100); // 32-byte records: 3 fit in 100
    expect(first.count).to.equal(3);
    expect(first.length).to.equal(16 + 96);
    const next = encodeDirents(buf, 2, entries, 3, 4096);
    expect(next.count).to.equal(7);
    expect(buf.readBigUInt64LE(16)).to.equal(13n);
    expect(buf.readBigUInt64LE(24)).to.equal(4n);
    const end = encodeDirents(buf, 3, entries, 10, 4096);
    expect(end).to.deep.equal({ length: 16, count: 0 });
  });

  it('direntplus: entry_out then dirent, 8-byte aligned', () => {
    const entry: Entry = { nodeid: 2, generation: 0, attr, entryTimeoutMs: 0, attrTimeoutMs: 0 };
    const buf = Buffer.alloc(4096);
    const out = encodeDirentsPlus(buf, 5, [{ dirent: { name: 'abc', ino: 2, type: S_IFREG }, entry }], 0, 4096);
    expect(out.count).to.equal(1);
    expect(out.length).to.equal(16 + 128 + 32);
    expect(buf.readBigUInt64LE(16)).to.equal(2n); // entry_out.nodeid
    expect(buf.readUInt32LE(16 + 128 + 16)).to.equal(3); // dirent.namelen
    expect(buf.toString('utf8', 16 + 128 + 24, 16 + 128 + 27)).to.equal('abc');
  });
});

function u32sAt(buf: Buffer, off: number, n: number): number[] {
  return Array.from({ length: n }, (_, i) => buf.readUInt32LE(off + 4 * i));
}
