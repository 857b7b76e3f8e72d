/**
 * Malformed qcow2 images, made by byte-patching copies of valid images that
 * qemu-img and qemu-io wrote. Each case says what a user must see: the
 * commands refuse with a message naming the problem, or serve the image.
 */
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, run, patternBuffer } from '../../helpers/qemu';

export const CLUSTER = 65536;

/** Header fields by byte offset (qcow2.txt "Header"). */
export const H = {
  magic: 0, version: 4, backingFileOffset: 8, backingFileSize: 16, clusterBits: 20, size: 24, cryptMethod: 32,
  l1Size: 36, l1TableOffset: 40, refcountTableOffset: 48, refcountTableClusters: 56, nbSnapshots: 60,
  snapshotsOffset: 64, incompatible: 72, compatible: 80, autoclear: 88, refcountOrder: 96, headerLength: 100,
} as const;

export function u64(buf: Buffer, off: number): number {
  return Number(buf.readBigUInt64BE(off));
}

export function setU64(buf: Buffer, off: number, v: bigint | number): void {
  buf.writeBigUInt64BE(BigInt(v), off);
}

export function sha256(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** Where the interesting structures of the rich base image are. */
export interface Layout {
  l1: number;
  l2: number;
  refcountTable: number;
  refcountBlock: number;
  snapshots: number;
  snapshotL1: number;
  /** Byte offset (in the file) of the L2 entries for guest 0, 1 MiB (compressed), 2 MiB (zero), 3 MiB. */
  l2Data: number;
  l2Compressed: number;
  l2Zero: number;
}

export function layoutOf(buf: Buffer): Layout {
  const l1 = u64(buf, H.l1TableOffset);
  const l2 = u64(buf, l1) & 0x00fffffffffffe00;
  const refcountTable = u64(buf, H.refcountTableOffset);
  const snapshots = u64(buf, H.snapshotsOffset);
  return {
    l1,
    l2,
    refcountTable,
    refcountBlock: u64(buf, refcountTable),
    snapshots,
    snapshotL1: u64(buf, snapshots),
    l2Data: l2,
    l2Compressed: l2 + 16 * 8,
    l2Zero: l2 + 32 * 8,
  };
}

/** The valid images everything is made from. */
export interface Bases {
  dir: string;
  /** v3, 64 KiB clusters, 8 MiB: data at 0 (128 KiB), compressed at 1 MiB, zero at 2 MiB, a snapshot, data at 3 MiB. */
  rich: string;
  /** v2 (compat=0.10), 64 KiB clusters, 4 MiB, data at 0. */
  v2: string;
}

export function makeBases(dir: string): Bases {
  const rich = path.join(dir, 'rich.base');
  qemuImg('create', '-q', '-f', 'qcow2', rich, '8M');
  qemuIo(rich, ['write -P 0x11 0 128k', 'write -c -P 0x22 1M 64k', 'write -z 2M 64k']);
  qemuImg('snapshot', '-c', 's1', rich);
  qemuIo(rich, ['write -P 0x33 3M 64k']);
  const v2 = path.join(dir, 'v2.base');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '4M');
  qemuIo(v2, ['write -P 0x44 0 64k']);
  return { dir, rich, v2 };
}

export type Outcome = 'ok' | RegExp;

export interface HostileCase {
  name: string;
  /** Write the image (and whatever it refers to); return its path. */
  make(b: Bases, file: string): string;
  /** info, map and mount (and check, unless `check` says otherwise) refuse with this message, exit 3. */
  refuse?: RegExp;
  /** Default: `refuse` if given, else 'clean'. 'corrupt': exit 2 with corruptions counted. */
  check?: 'clean' | 'corrupt' | RegExp;
  /** Default: `refuse` if given, else 'ok'. */
  map?: Outcome;
  /** Default 'ok' when the image is served: the whole raw file reads back, or the read fails with EIO. */
  read?: 'ok' | 'eio';
  /** Mount serves the image read-only with a warning matching this (instead of read-write). */
  mountWarning?: RegExp;
}

/** Copy `base` to `file` and let `fn` patch its bytes. */
export function patched(base: string, file: string, fn: (buf: Buffer, l: Layout) => Buffer | void): string {
  const buf = fs.readFileSync(base);
  const out = fn(buf, layoutOf(buf)) ?? buf;
  fs.writeFileSync(file, out);
  return file;
}

/** A compressed cluster descriptor for 64 KiB clusters (x = 54): flag bit 62, sectors-1 in bits 54..61. */
function compressedEntry(hostOffset: bigint, additionalSectors: bigint): bigint {
  return (1n << 62n) | (additionalSectors << 54n) | hostOffset;
}

export const CASES: HostileCase[] = [
  // ---- not a qcow2 image at all
  { name: 'zero-length file', make: (_b, f) => { fs.writeFileSync(f, ''); return f; }, refuse: /not a qcow2 image.*too short/ },
  { name: 'random bytes', make: (_b, f) => { fs.writeFileSync(f, patternBuffer(1 << 20, 7)); return f; }, refuse: /not a qcow2 image: bad magic/ },
  { name: 'truncated header (40 bytes)', make: (b, f) => patched(b.rich, f, (buf) => buf.subarray(0, 40)), refuse: /not a qcow2 image.*too short/ },
  { name: 'truncated v3 header (80 bytes)', make: (b, f) => patched(b.rich, f, (buf) => buf.subarray(0, 80)), refuse: /too short for a version 3 header/ },
  { name: 'bad magic', make: (b, f) => patched(b.rich, f, (buf) => { buf.write('QFI\xfa', 0, 'latin1'); }), refuse: /bad magic/ },
  { name: 'unknown version 4', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(4, H.version); }), refuse: /version 4/ },
  { name: 'version 1', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(1, H.version); }), refuse: /version 1/ },
  // ---- header fields out of range
  { name: 'cluster_bits 8', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(8, H.clusterBits); }), refuse: /cluster_bits 8 out of range/ },
  { name: 'cluster_bits 22', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(22, H.clusterBits); }), refuse: /cluster_bits 22 out of range/ },
  { name: 'cluster_bits 2^31', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(0x80000000, H.clusterBits); }), refuse: /cluster_bits 2147483648 out of range/ },
  { name: 'virtual size 2^63 (overflow)', make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.size, 1n << 63n); }), refuse: /size too large/ },
  { name: 'virtual size 2^52 with a one-entry L1', make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.size, 1n << 52n); }), refuse: /L1 table of 1 entries is too small/ },
  { name: 'refcount_order 7', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(7, H.refcountOrder); }), refuse: /refcount_order 7 out of range/ },
  { name: 'header_length past the cluster', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(CLUSTER + 8, H.headerLength); }), refuse: /header_length \d+ exceeds the cluster size/ },
  {
    name: 'header extension running past its cluster',
    make: (b, f) => patched(b.rich, f, (buf) => {
      const at = buf.readUInt32BE(H.headerLength);
      buf.writeUInt32BE(0x12345678, at);
      buf.writeUInt32BE(0x7fffffff, at + 4);
    }),
    refuse: /header extension 0x12345678 \(2147483647 bytes\) runs past the first cluster/,
  },
  { name: 'unknown incompatible feature bit 5', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(1 << 5, H.incompatible + 4); }), refuse: /unsupported image: incompatible feature .*bit 5/ },
  { name: 'unknown incompatible feature bit 40', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(1 << 8, H.incompatible); }), refuse: /unsupported image: incompatible feature .*bit 40/ },
  { name: 'unknown encryption method 7', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(7, H.cryptMethod); }), refuse: /encryption method 7/ },
  // ---- the L1 table
  { name: 'L1 table unaligned', make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, H.l1TableOffset, l.l1 + 8); }), refuse: /L1 table.*not cluster aligned/ },
  { name: 'L1 table past the end of the file', make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.l1TableOffset, 1n << 40n); }), refuse: /L1 table.*runs past the end of the file/ },
  { name: 'L1 table overlapping the header', make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.l1TableOffset, 0); }), refuse: /L1 table.*overlaps the header/ },
  { name: 'L1 table of 2^31 entries', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(0x80000000, H.l1Size); }), refuse: /L1 table of 2147483648 entries is too large/ },
  { name: 'L1 table of 2^32-1 entries', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(0xffffffff, H.l1Size); }), refuse: /L1 table of 4294967295 entries is too large/ },
  { name: 'L1 table offset above 2^53', make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.l1TableOffset, (1n << 60n)); }), refuse: /l1_table_offset too large/ },
  // ---- the refcount table
  { name: 'refcount table unaligned', make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, H.refcountTableOffset, l.refcountTable + 512); }), refuse: /refcount table.*not cluster aligned/ },
  { name: 'refcount table past the end of the file', make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.refcountTableOffset, 1n << 45n); }), refuse: /refcount table.*runs past the end of the file/ },
  { name: 'refcount table overlapping the header', make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.refcountTableOffset, 0); }), refuse: /refcount table.*overlaps the header/ },
  { name: 'refcount table of 2^31 clusters', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(0x80000000, H.refcountTableClusters); }), refuse: /refcount table of 2147483648 clusters is too large/ },
  // ---- the snapshot table
  { name: 'snapshot table unaligned', make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, H.snapshotsOffset, l.snapshots + 8); }), refuse: /snapshot table.*not cluster aligned/ },
  { name: 'snapshot table past the end of the file', make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.snapshotsOffset, 1n << 44n); }), refuse: /snapshot table.*runs past the end of the file/ },
  { name: 'snapshot table overlapping the header', make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.snapshotsOffset, 0); }), refuse: /snapshot table.*overlaps the header/ },
  { name: '2^32-1 snapshots', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(0xffffffff, H.nbSnapshots); }), refuse: /4294967295 snapshots exceed the limit/ },
  { name: '65536 snapshots in a one-entry table', make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(65536, H.nbSnapshots); }), refuse: /snapshot entry \d+ runs past the table/ },
  {
    name: 'snapshot L1 table of 2^31 entries',
    make: (b, f) => patched(b.rich, f, (buf, l) => { buf.writeUInt32BE(0x80000000, l.snapshots + 8); }),
    check: 'corrupt',
  },
  {
    name: 'snapshot L1 table past the end of the file',
    make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, l.snapshots, 1n << 40n); }),
    check: 'corrupt',
  },
  // ---- tables that overlap each other (found when the metadata is used)
  {
    name: 'L1 table overlapping the refcount table',
    make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, H.l1TableOffset, l.refcountTable); }),
    check: 'corrupt',
  },
  {
    name: 'L2 table is the L1 table',
    make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, l.l1, (1n << 63n) | BigInt(l.l1)); }),
    check: 'corrupt',
  },
  // ---- L1 and L2 entries
  { name: 'L2 table offset unaligned', make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, l.l1, (1n << 63n) | BigInt(l.l2 + 512)); }), map: /L2 table offset 0x[0-9a-f]+ not cluster aligned/, check: 'corrupt', read: 'eio' },
  { name: 'L2 table past the end of the file', make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, u64(buf, H.l1TableOffset), (1n << 63n) | (1n << 40n)); }), map: /L2 table at 0x[0-9a-f]+ lies past the end of the file/, check: 'corrupt', read: 'eio' },
  { name: 'data cluster unaligned', make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, l.l2Data, (1n << 63n) | BigInt(u64(buf, l.l2Data) % 2 ** 56 + 512)); }), map: /cluster offset 0x[0-9a-f]+ not cluster aligned/, check: 'corrupt', read: 'eio' },
  { name: 'data cluster far past the end of the file', make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, l.l2Data, (1n << 63n) | (1n << 50n)); }), check: 'corrupt' },
  { name: 'data cluster offset with bits above 2^53', make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, l.l2Data, (1n << 63n) | (1n << 54n)); }), map: /cluster offset too large/, check: 'corrupt', read: 'eio' },
  { name: 'refcount block unaligned', make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, l.refcountTable, l.refcountBlock + 512); }), check: /refcount table.*not cluster aligned/, mountWarning: /refcount table.*not cluster aligned.*serving it read-only/ },
  { name: 'refcount block past the end of the file', make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, l.refcountTable, 1n << 42n); }), check: /refcount block at 0x[0-9a-f]+ lies past the end of the file/, mountWarning: /lies past the end of the file.*serving it read-only/ },
  // ---- compressed clusters
  {
    name: 'compressed cluster longer than the file',
    make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, l.l2Compressed, compressedEntry(BigInt(buf.length - 1024), 255n)); }),
    check: 'corrupt', read: 'eio',
  },
  {
    name: 'compressed cluster far past the end of the file',
    make: (b, f) => patched(b.rich, f, (buf, l) => { setU64(buf, l.l2Compressed, compressedEntry(1n << 52n, 255n)); }),
    check: 'corrupt', read: 'eio',
  },
  // ---- the image says it is corrupt, or is encrypted
  {
    name: 'corrupt bit set',
    make: (b, f) => patched(b.rich, f, (buf) => { buf.writeUInt32BE(2, H.incompatible + 4); }),
    mountWarning: /is marked corrupt; serving it read-only/,
  },
  {
    name: 'LUKS encrypted',
    make: (_b, f) => {
      const args = ['create', '-q', '--object', 'secret,id=sec0,data=hunter2', '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0', f, '4M'];
      // qemu-img times PBKDF by the thread's CPU clock to pick an iteration count; on a loaded
      // virtual machine it now and then reads no progress and gives up ("Unable to get accurate
      // CPU usage"), sometimes several times in a row (7 of 10 under two busy loops). That says
      // nothing about us: make the fixture again, after a pause.
      for (let attempt = 1; ; attempt++) {
        const r = run('qemu-img', args, { allowFail: true });
        if (r.status === 0) return f;
        if (attempt === 10 || !/Unable to get accurate CPU usage/.test(r.stderr)) {
          throw new Error(`qemu-img ${args.join(' ')} failed (${r.status}): ${r.stderr.trim()}`);
        }
        run('sleep', ['1']);
      }
    },
    refuse: /unsupported image: LUKS encryption/,
  },
  {
    name: 'AES encrypted (crypt_method 1)',
    make: (b, f) => patched(b.v2, f, (buf) => { buf.writeUInt32BE(1, H.cryptMethod); }),
    refuse: /unsupported image: AES encryption/,
  },
  // ---- backing chains
  {
    name: 'backing file missing',
    make: (b, f) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', f, '4M');
      return f;
    },
    refuse: /backing file .*gone\.qcow2: no such file/, check: 'clean',
  },
  {
    name: 'backing chain loops on itself',
    make: (b, f) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', path.basename(f), '-F', 'qcow2', f, '4M');
      return f;
    },
    refuse: /backing chain loops/, check: 'clean',
  },
  {
    name: 'backing chain loops through a second image',
    make: (b, f) => {
      const other = `${f}.other`;
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', path.basename(f), '-F', 'qcow2', other, '4M');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', path.basename(other), '-F', 'qcow2', f, '4M');
      return f;
    },
    refuse: /backing chain loops/, check: 'clean',
  },
  {
    name: 'backing file name longer than 1023 bytes',
    make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.backingFileOffset, 512); buf.writeUInt32BE(2000, H.backingFileSize); }),
    refuse: /backing file name length 2000 invalid/,
  },
  {
    name: 'backing file name outside the first cluster',
    make: (b, f) => patched(b.rich, f, (buf) => { setU64(buf, H.backingFileOffset, CLUSTER - 8); buf.writeUInt32BE(100, H.backingFileSize); }),
    refuse: /backing file name lies outside the first cluster/,
  },
];
