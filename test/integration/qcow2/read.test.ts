/**
 * The read engine against QEMU: every fixture is made by qemu-img/qemu-io in
 * a temporary directory, then read back through the engine and compared
 * byte for byte with `qemu-img convert -O raw`, its block status with
 * `qemu-img map --output=json`, and its SEEK_DATA/SEEK_HOLE walk with the
 * data extents of that map.
 */
import { expect } from 'chai';
import * as fs from 'fs';
import * as path from 'path';
import { Qcow2Image } from '../../../src/qcow2/image';
import { HostSlice, MapExtent } from '../../../src/qcow2/layer';
import { BackingChainError, OutOfRangeError, UnsupportedImageError } from '../../../src/qcow2/errors';
import { patternBuffer, qemuImg, qemuInfo, qemuIo, qemuMap, qemuRaw, run, tmpDir } from '../../helpers/qemu';

const KiB = 1024;
const MiB = 1024 * 1024;

let dir = '';
/** Pattern files for `qemu-io write -s`; odd lengths so a misplaced read shows. */
let src: string[] = [];

function p(name: string): string {
  return path.join(dir, name);
}

function create(name: string, size: number | string, options: string[] = [], extra: string[] = []): string {
  const file = p(name);
  const args = ['create', '-q', '-f', 'qcow2'];
  if (options.length > 0) args.push('-o', options.join(','));
  args.push(...extra, file, String(size));
  qemuImg(...args);
  return file;
}

function io(file: string, cmds: string[], format = 'qcow2'): void {
  qemuIo(file, cmds.map((c) => c.replace(/^write /, 'write -q ').replace(/^discard /, 'discard -q ')), { format });
}

/** `write -s` with one of the pattern files. */
function w(n: number, offset: number, length: number): string {
  return `write -s ${src[n % src.length]} ${offset} ${length}`;
}

/** qemu-img map without the keys QEMU 7.2 does not print, in the engine's shape. */
function expectedMap(file: string): Array<Record<string, unknown>> {
  return qemuMap(file).map((e) => {
    const o: Record<string, unknown> = { ...e };
    if (!('offset' in o)) o.offset = null;
    delete o.compressed;
    return o;
  });
}

function shape(extents: MapExtent[]): Array<Record<string, unknown>> {
  return extents.map((e) => ({ start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data, offset: e.offset }));
}

/** The data ranges of a map, adjacent ones joined (what SEEK_DATA/SEEK_HOLE walk). */
function dataRanges(map: Array<Record<string, unknown>>): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const e of map) {
    if (!e.data) continue;
    const s = e.start as number;
    const end = s + (e.length as number);
    const last = out[out.length - 1];
    if (last && last[1] === s) last[1] = end;
    else out.push([s, end]);
  }
  return out;
}

async function seekWalk(img: Qcow2Image): Promise<Array<[number, number]>> {
  const out: Array<[number, number]> = [];
  let pos = 0;
  while (pos < img.virtualSize) {
    let d: number;
    try {
      d = await img.seekData(pos);
    } catch (err) {
      expect(err).to.be.instanceOf(OutOfRangeError);
      break;
    }
    expect(d).to.be.at.least(pos);
    const h = await img.seekHole(d);
    expect(h).to.be.above(d);
    out.push([d, h]);
    pos = h;
  }
  return out;
}

/** Bytes at [offset, offset+length) as qemu-io reads them (`read -v` hex dump). */
function qemuReadRange(file: string, offset: number, length: number): Buffer {
  const out = run('qemu-io', ['-f', 'qcow2', '-r', '-c', `read -v ${offset} ${length}`, file]).stdout;
  const bytes: number[] = [];
  for (const line of out.split('\n')) {
    const m = /^[0-9a-f]+:\s+(.*)$/.exec(line);
    if (!m) continue;
    const n = Math.min(16, length - bytes.length);
    const tokens = m[1].trim().split(/\s+/).slice(0, n);
    for (const t of tokens) bytes.push(parseInt(t, 16));
  }
  expect(bytes.length).to.equal(length);
  return Buffer.from(bytes);
}

/** SEEK_DATA and SEEK_HOLE from inside and at the edges of every range, and past the end. */
async function seekFromInside(img: Qcow2Image, ranges: Array<[number, number]>): Promise<void> {
  const size = img.virtualSize;
  const probes = new Set<number>([0, size - 1]);
  for (const [s, e] of ranges) for (const o of [s - 1, s, s + 1, (s + e) >> 1, e - 1, e, e + 1]) if (o >= 0 && o < size) probes.add(o);
  for (const o of probes) {
    const inData = ranges.find(([s, e]) => o >= s && o < e);
    const next = ranges.find(([s]) => s > o);
    const wantData = inData ? o : next ? next[0] : null;
    const gotData = await img.seekData(o).catch((err: unknown) => {
      expect(err).to.be.instanceOf(OutOfRangeError);
      return null;
    });
    expect(gotData, `SEEK_DATA from ${o}`).to.equal(wantData);
    expect(await img.seekHole(o), `SEEK_HOLE from ${o}`).to.equal(inData ? inData[1] : o);
  }
  for (const o of [size, size + 1]) {
    for (const seek of [(x: number) => img.seekData(x), (x: number) => img.seekHole(x)]) {
      const err = await seek(o).then(() => null, (e: unknown) => e);
      expect(err, `seek from ${o}`).to.be.instanceOf(OutOfRangeError);
    }
  }
}

function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

function expectSameBytes(got: Buffer, want: Buffer, what: string): void {
  if (!got.equals(want)) {
    const at = firstDifference(got, want);
    expect.fail(`${what}: first difference at byte ${at} (0x${at.toString(16)}): got ${got[at]}, want ${want[at]}`);
  }
}

/** Read the whole disk in chunks of assorted sizes, then around cluster and L2-table boundaries. */
/** The bytes mapForRead's host slices hold (fd -1: zeroes). */
function sliceBytes(slices: HostSlice[]): Buffer {
  return Buffer.concat(slices.map((s) => {
    const b = Buffer.alloc(s.length);
    if (s.fd >= 0) fs.readSync(s.fd, b, 0, s.length, s.position);
    return b;
  }));
}

/**
 * mapForRead, as zero-copy readers use it: the host slices of every range
 * hold the guest's bytes. Only compressed clusters may make it say null.
 */
async function compareMapped(img: Qcow2Image, want: Buffer): Promise<void> {
  const size = img.virtualSize;
  const step = Math.max(img.clusterSize, 256 * KiB) + 4097;
  const compressed = (await img.blockStatus(0, size)).some((e) => e.compressed);
  for (let pos = 0; pos < size; pos += step) {
    const n = Math.min(step, size - pos);
    const m = await img.mapForRead(pos, n);
    if (m === null) {
      expect(compressed, `mapForRead(${pos}, ${n}) said null on an image without compressed clusters`).to.equal(true);
      continue;
    }
    try {
      expect(m.slices.reduce((a, s) => a + s.length, 0)).to.equal(n);
      expectSameBytes(sliceBytes(m.slices), want.subarray(pos, pos + n), `mapped read of ${pos}+${n}`);
    } finally {
      m.release();
    }
  }
}

async function compareReads(img: Qcow2Image, want: Buffer): Promise<void> {
  const size = img.virtualSize;
  const cs = img.clusterSize;
  const sizes = [1, 7, 511, 512, 4096, 4097, cs - 1, cs, cs + 1, 3 * cs + 5, 65536, 12345];
  const got = Buffer.alloc(size);
  let pos = 0;
  for (let i = 0; pos < size; i++) {
    const n = Math.min(sizes[i % sizes.length], size - pos);
    await img.read(got.subarray(pos, pos + n), pos);
    pos += n;
  }
  expectSameBytes(got, want, 'sequential read');
  await compareMapped(img, want);
  const l2Span = img.l2Entries * cs;
  const bounds = new Set<number>();
  for (let k = 1; k < 48 && k * cs < size; k++) bounds.add(k * cs);
  for (let k = 1; k < 8 && k * l2Span < size; k++) bounds.add(k * l2Span);
  bounds.add(size - 1);
  for (const b of bounds) {
    for (const [before, after] of [[1, 1], [333, 700], [Math.floor(cs / 2) + 1, cs + 3]]) {
      const s = Math.max(0, b - before);
      const e = Math.min(size, b + after);
      const buf = Buffer.alloc(e - s);
      await img.read(buf, s);
      expectSameBytes(buf, want.subarray(s, e), `read of ${s}+${e - s}`);
    }
  }
}

interface VerifyOptions {
  snapshot?: string;
  /** Path to open by (default: the file); lets a test open by a relative path. */
  openAs?: string;
  /** Compare the map and the seek walk (not for snapshots: qemu-img map shows the active image). */
  map?: boolean;
  /** Expected contents (default: `qemu-img convert -O raw` of the file). */
  want?: Buffer;
}

/** Open `file` and compare it with QEMU in every way; returns the image's map for further checks. */
async function verify(file: string, opts: VerifyOptions = {}): Promise<MapExtent[]> {
  const want = opts.want ?? qemuRaw(file, { snapshot: opts.snapshot });
  const img = await Qcow2Image.openFile(opts.openAs ?? file, { readOnly: true, snapshot: opts.snapshot });
  try {
    expect(img.virtualSize).to.equal(want.length);
    await compareReads(img, want);
    const extents = await img.blockStatus(0, img.virtualSize);
    if (opts.map !== false && opts.snapshot === undefined) {
      const map = expectedMap(file);
      expect(shape(extents)).to.deep.equal(map);
      const ranges = dataRanges(map);
      expect(await seekWalk(img)).to.deep.equal(ranges);
      await seekFromInside(img, ranges);
    }
    return extents;
  } finally {
    await img.close();
  }
}

/**
 * A mix of everything a layer can hold, laid out by cluster: whole and
 * partial data clusters, zero clusters kept allocated and unmapped, zeroes
 * written on unallocated space, a discarded cluster, holes, a partial
 * write at the unaligned end of the disk and writes across L2 tables.
 */
function populate(file: string, cs: number, size: number, l2Span: number): void {
  const cmds = [
    w(0, 0, 3 * cs),
    w(1, 3 * cs + 100, cs + 37),
    w(2, 5 * cs, cs),
    'write -z ' + `${5 * cs} ${cs}`,
    w(0, 6 * cs, cs),
    'write -z -u ' + `${6 * cs} ${cs}`,
    `write -z ${7 * cs} ${cs}`,
    w(1, 8 * cs, cs),
    `discard ${8 * cs} ${cs}`,
    w(2, size - 700, 700),
  ];
  for (let b = l2Span; b + cs < size; b += l2Span) cmds.push(w(b / l2Span, b - 1000, 3000));
  io(file, cmds);
}

/** The disk size for populate(): a dozen clusters and an unaligned tail, or two L2 tables when small. */
function layoutSize(cs: number, l2Span: number): number {
  let size = 12 * cs + 1536;
  if (2 * l2Span + 4 * cs <= 4 * MiB) size = Math.max(size, 2 * l2Span + 3 * cs + 1536);
  return size;
}

describe('qcow2 read engine against QEMU', function () {
  this.timeout(120000);

  before(() => {
    dir = tmpDir('qcowfs-read-');
    src = [];
    for (const [n, len] of [[1, 12347], [2, 65521], [3, 4099]]) {
      const f = p(`src${n}.bin`);
      fs.writeFileSync(f, patternBuffer(len, n));
      src.push(f);
    }
  });

  after(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('versions and cluster sizes', () => {
    for (const compat of ['0.10', '1.1']) {
      for (const cs of [512, 1 * KiB, 4 * KiB, 8 * KiB, 64 * KiB, 2 * MiB]) {
        it(`compat=${compat}, cluster_size=${cs}`, async () => {
          const l2Span = (cs / 8) * cs;
          const size = layoutSize(cs, l2Span);
          const file = create(`c-${compat}-${cs}.qcow2`, size, [`compat=${compat}`, `cluster_size=${cs}`]);
          populate(file, cs, size, l2Span);
          await verify(file);
        });
      }
    }
  });

  describe('refcount widths', () => {
    for (const bits of [1, 8, 16, 64]) {
      it(`refcount_bits=${bits}: reads, and every mapped cluster has refcount 1`, async () => {
        const cs = 4 * KiB;
        const size = layoutSize(cs, (cs / 8) * cs);
        const file = create(`rc-${bits}.qcow2`, size, [`refcount_bits=${bits}`, `cluster_size=${cs}`]);
        populate(file, cs, size, (cs / 8) * cs);
        const extents = await verify(file);
        const img = await Qcow2Image.openFile(file, { readOnly: true });
        try {
          const rc = await img.refcountManager();
          expect(rc.order).to.equal(Math.log2(bits));
          expect(await rc.get(0)).to.equal(1);
          let checked = 0;
          for (const e of extents) {
            if (e.offset === null) continue;
            for (let off = e.offset; off < e.offset + e.length; off += cs) {
              expect(await rc.get(Math.floor(off / cs)), `refcount of host cluster at 0x${off.toString(16)}`).to.equal(1);
              checked++;
            }
          }
          expect(checked).to.be.above(3);
          // Past the end of the image: no block, refcount 0.
          expect(await rc.get(Math.ceil(fs.statSync(file).size / cs) + 100)).to.equal(0);
        } finally {
          await img.close();
        }
      });
    }
  });

  describe('zero clusters', () => {
    it('write -z with and without -u, over data, over holes, partial clusters', async () => {
      const cs = 64 * KiB;
      const file = create('zero.qcow2', 2 * MiB);
      io(file, [
        w(0, 0, 16 * cs),
        `write -z ${cs} ${2 * cs}`,
        `write -z -u ${4 * cs} ${2 * cs}`,
        `write -z ${7 * cs + 512} ${cs}`,
        `write -z -u ${10 * cs - 4096} ${2 * cs + 8192}`,
        `write -z ${20 * cs} ${3 * cs}`,
        `write -z -u ${24 * cs} ${cs}`,
      ]);
      const extents = await verify(file);
      expect(extents.some((e) => e.zero && e.present && e.offset !== null), 'a zero cluster that keeps its host cluster').to.equal(true);
      expect(extents.some((e) => e.zero && e.present && e.offset === null), 'a zero cluster without a host cluster').to.equal(true);
    });

    it('zero clusters over a backing file hide it', async () => {
      const base = create('zb-base.qcow2', 1 * MiB);
      io(base, [w(0, 0, 1 * MiB)]);
      const top = create('zb-top.qcow2', 1 * MiB, [], ['-b', 'zb-base.qcow2', '-F', 'qcow2']);
      io(top, [`write -z ${64 * KiB} ${128 * KiB}`, `write -z -u ${512 * KiB} ${64 * KiB}`, `write -z ${700 * KiB} 3000`]);
      await verify(top);
    });
  });

  describe('compressed clusters', () => {
    /** Half compressible text, half noise, some zeroes: convert -c keeps the noise uncompressed. */
    function compressibleRaw(name: string, size: number): string {
      const buf = Buffer.alloc(size);
      const text = Buffer.from('qcow2 compressed cluster test line; the quick brown fox jumps over the lazy dog. ');
      for (let i = 0; i < size / 2; i++) buf[i] = text[i % text.length] ^ (i >> 13 & 7);
      patternBuffer(size / 4, 9).copy(buf, size / 2);
      const file = p(name);
      fs.writeFileSync(file, buf);
      return file;
    }

    for (const type of ['zlib', 'zstd']) {
      for (const cs of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
        it(`convert -c, compression_type=${type}, cluster_size=${cs}`, async () => {
          const size = Math.max(1 * MiB, 4 * cs);
          const raw = compressibleRaw(`comp-${type}-${cs}.raw`, size);
          const file = p(`comp-${type}-${cs}.qcow2`);
          qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs},compression_type=${type}`, raw, file);
          const extents = await verify(file);
          expect(extents.some((e) => e.compressed), 'some compressed clusters').to.equal(true);
          expectSameBytes(qemuRaw(file), fs.readFileSync(raw), 'qemu-img sees the source');
        });
      }

      it(`qemu-io write -c and partial overwrites, compression_type=${type}, several cluster sizes`, async () => {
        for (const cs of [1 * KiB, 16 * KiB, 128 * KiB]) {
          const size = 24 * cs;
          const file = create(`wc-${type}-${cs}.qcow2`, size, [`cluster_size=${cs}`, `compression_type=${type}`]);
          io(file, [
            `write -c -P 0x5a 0 ${4 * cs}`,
            `write -c -P 0x11 ${6 * cs} ${cs}`,
            `write -c -P 0x22 ${7 * cs} ${cs}`,
            w(0, 6 * cs + 100, 200),
            `write -c -P 0x33 ${size - cs} ${cs}`,
            `write -z ${2 * cs} ${cs}`,
          ]);
          await verify(file);
        }
      });
    }
  });

  describe('extended L2 entries', () => {
    for (const cs of [32 * KiB, 64 * KiB, 512 * KiB, 2 * MiB]) {
      it(`cluster_size=${cs}: partial subcluster writes and zero subclusters`, async () => {
        const sc = cs / 32;
        const size = 8 * cs;
        const file = create(`xl2-${cs}.qcow2`, size, ['extended_l2=on', `cluster_size=${cs}`]);
        io(file, [
          w(0, 0, 3 * sc),
          w(1, 5 * sc + 17, 2 * sc),
          w(2, cs - sc, 2 * sc + 1),
          `write -z ${2 * cs + 4 * sc} ${6 * sc}`,
          w(0, 3 * cs, cs),
          `write -z ${3 * cs + sc} ${3 * sc}`,
          `write -z -u ${4 * cs} ${cs}`,
          w(1, 5 * cs + 7 * sc, 1),
          w(2, size - 3000, 3000),
        ]);
        await verify(file);
      });
    }

    it('compressed clusters in an extended L2 image', async () => {
      const cs = 64 * KiB;
      const buf = Buffer.alloc(1 * MiB);
      buf.fill('extended L2 and compression ', 0, 512 * KiB);
      patternBuffer(256 * KiB, 7).copy(buf, 512 * KiB);
      fs.writeFileSync(p('xl2c.raw'), buf);
      for (const type of ['zlib', 'zstd']) {
        const file = p(`xl2c-${type}.qcow2`);
        qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `extended_l2=on,cluster_size=${cs},compression_type=${type}`, p('xl2c.raw'), file);
        io(file, [w(0, 2 * cs + 3 * 2048, 100), `write -z ${4 * cs} ${2048 * 3}`]);
        const extents = await verify(file);
        expect(extents.some((e) => e.compressed)).to.equal(true);
      }
    });

    it('with an external data file', async () => {
      const cs = 32 * KiB;
      const file = create('xl2df.qcow2', 1 * MiB, ['extended_l2=on', `cluster_size=${cs}`, `data_file=${p('xl2df.data')}`]);
      io(file, [w(0, 1024 + 5, 3000), w(1, 3 * cs, 2 * cs), `write -z ${3 * cs + 1024} ${2048}`, `write -z -u ${10 * cs} ${cs}`]);
      await verify(file);
    });

    it('over a backing file: unallocated subclusters show the backing data', async () => {
      const cs = 64 * KiB;
      const sc = cs / 32;
      const base = create('xl2-base.qcow2', 1 * MiB);
      io(base, [w(0, 0, 1 * MiB)]);
      const top = create('xl2-top.qcow2', 1 * MiB, ['extended_l2=on', `cluster_size=${cs}`], ['-b', 'xl2-base.qcow2', '-F', 'qcow2']);
      io(top, [
        w(1, 3 * sc, 2 * sc),
        w(2, cs + 100, 50),
        `write -z ${2 * cs + 8 * sc} ${4 * sc}`,
        `write -z -u ${3 * cs} ${cs}`,
        w(1, 4 * cs - sc, 2 * sc),
      ]);
      await verify(top);
    });
  });

  describe('backing chains', () => {
    it('qcow2 on qcow2 on qcow2 with relative names, opened from another directory', async () => {
      const size = 2 * MiB;
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', p('ch-base.qcow2'), String(size));
      io(p('ch-base.qcow2'), [w(0, 0, size), `write -z ${100 * KiB} ${64 * KiB}`]);
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'ch-base.qcow2', '-F', 'qcow2', 'ch-mid.qcow2'], { cwd: dir });
      io(p('ch-mid.qcow2'), [w(1, 64 * KiB + 5, 300 * KiB), `write -z -u ${1 * MiB} ${128 * KiB}`]);
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16384', '-b', 'ch-mid.qcow2', '-F', 'qcow2', 'ch-top.qcow2'], { cwd: dir });
      io(p('ch-top.qcow2'), [w(2, 200 * KiB, 200 * KiB + 1), `write -z ${1 * MiB + 64 * KiB} ${32 * KiB}`, `discard ${1536 * KiB} ${64 * KiB}`]);
      expect(process.cwd()).to.not.equal(dir);
      const info = qemuInfo(p('ch-top.qcow2'));
      expect(info['backing-filename']).to.equal('ch-mid.qcow2');
      const extents = await verify(p('ch-top.qcow2'), { openAs: path.relative(process.cwd(), p('ch-top.qcow2')) });
      expect(new Set(extents.map((e) => e.depth))).to.deep.equal(new Set([0, 1, 2]));
      await verify(p('ch-top.qcow2'));
    });

    it('raw backing file', async () => {
      // Written in full: QEMU reports holes of a sparse raw file from the host file system.
      fs.writeFileSync(p('rb.raw'), patternBuffer(1 * MiB + 4096, 5));
      const top = create('rb-top.qcow2', 2 * MiB, [], ['-b', 'rb.raw', '-F', 'raw']);
      io(top, [w(0, 300 * KiB, 100 * KiB), `write -z ${600 * KiB} ${64 * KiB}`, w(1, 1 * MiB, 8192)]);
      await verify(top);
    });

    it('sparse raw backing file: its holes map as zero, as QEMU finds them with SEEK_HOLE', async () => {
      const raw = p('rbs.raw');
      fs.writeFileSync(raw, Buffer.alloc(0));
      fs.truncateSync(raw, 3 * MiB);
      const fd = fs.openSync(raw, 'r+');
      try {
        fs.writeSync(fd, patternBuffer(128 * KiB, 8), 0, 128 * KiB, 640 * KiB);
        fs.writeSync(fd, patternBuffer(64 * KiB, 9), 0, 64 * KiB, 2 * MiB);
      } finally {
        fs.closeSync(fd);
      }
      const top = create('rbs-top.qcow2', 4 * MiB, [], ['-b', 'rbs.raw', '-F', 'raw']);
      io(top, [w(0, 0, 64 * KiB), w(1, 700 * KiB, 8 * KiB)]);
      const extents = await verify(top);
      expect(extents.some((e) => e.depth === 1 && e.zero && !e.data)).to.equal(true);
      expect(extents.some((e) => e.depth === 1 && e.data)).to.equal(true);
    });

    it('raw backing file without a backing format (probed)', async () => {
      fs.writeFileSync(p('rbp.raw'), patternBuffer(512 * KiB, 6));
      const top = p('rbp-top.qcow2');
      // qemu-img insists on -F; turn the backing format extension into an unknown one afterwards.
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'rbp.raw', '-F', 'raw', top, String(512 * KiB));
      const buf = fs.readFileSync(top);
      const at = buf.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]), 104);
      expect(at).to.be.above(0);
      buf.writeUInt32BE(0x7ead0001, at);
      fs.writeFileSync(top, buf);
      const img = await Qcow2Image.openFile(top, { readOnly: true });
      try {
        expect(img.header.backingFormat).to.equal(null);
        expect(img.backing?.format).to.equal('raw');
      } finally {
        await img.close();
      }
      expectSameBytes(qemuRaw(top), fs.readFileSync(p('rbp.raw')), 'qemu-img probes raw too');
      await verify(top);
    });

    it('overlay larger than its backing file: the tail reads as zeroes', async () => {
      const base = create('big-base.qcow2', 1 * MiB);
      io(base, [w(0, 0, 1 * MiB)]);
      const top = create('big-top.qcow2', 3 * MiB + 512, [], ['-b', 'big-base.qcow2', '-F', 'qcow2']);
      io(top, [w(1, 1 * MiB - 1000, 3000), w(2, 2 * MiB, 4096)]);
      await verify(top);
    });

    it('overlay smaller than its backing file', async () => {
      const base = create('small-base.qcow2', 3 * MiB);
      io(base, [w(0, 0, 3 * MiB)]);
      const top = create('small-top.qcow2', 1 * MiB + 1536, [], ['-b', 'small-base.qcow2', '-F', 'qcow2']);
      io(top, [w(1, 4096, 3000)]);
      await verify(top);
    });

    it('a missing backing file is a BackingChainError', async () => {
      const base = create('gone-base.qcow2', 1 * MiB);
      const top = create('gone-top.qcow2', 1 * MiB, [], ['-b', 'gone-base.qcow2', '-F', 'qcow2']);
      fs.rmSync(base);
      expect(run('qemu-io', ['-r', '-c', 'read 0 512', top], { allowFail: true }).status).to.not.equal(0);
      const err = await Qcow2Image.openFile(top, { readOnly: true }).then(() => null, (e: unknown) => e);
      expect(err).to.be.instanceOf(BackingChainError);
      expect((err as BackingChainError).path).to.equal(base);
      // Without the chain it opens, and unallocated space reads as zeroes.
      const img = await Qcow2Image.openFile(top, { readOnly: true, openBacking: false });
      try {
        const buf = Buffer.alloc(4096, 1);
        await img.read(buf, 0);
        expect(buf.equals(Buffer.alloc(4096))).to.equal(true);
      } finally {
        await img.close();
      }
    });

    it('a backing loop is a BackingChainError', async () => {
      const a = create('loop-a.qcow2', 1 * MiB);
      create('loop-b.qcow2', 1 * MiB, [], ['-b', 'loop-a.qcow2', '-F', 'qcow2']);
      qemuImg('rebase', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', a);
      // (qemu-io hangs on such a chain; qemu-img info names the loop.)
      expect(run('qemu-img', ['info', '--backing-chain', a], { allowFail: true }).stderr).to.match(/infinite loop/);
      for (const f of [a, p('loop-b.qcow2')]) {
        const err = await Qcow2Image.openFile(f, { readOnly: true }).then(() => null, (e: unknown) => e);
        expect(err, f).to.be.instanceOf(BackingChainError);
        expect((err as Error).message).to.match(/loop/);
      }
      // An image naming itself.
      const self = create('loop-self.qcow2', 1 * MiB);
      qemuImg('rebase', '-u', '-b', 'loop-self.qcow2', '-F', 'qcow2', self);
      const err = await Qcow2Image.openFile(self, { readOnly: true }).then(() => null, (e: unknown) => e);
      expect(err).to.be.instanceOf(BackingChainError);
    });
  });

  describe('external data file', () => {
    it('data_file', async () => {
      const file = create('df.qcow2', 2 * MiB, [`data_file=${p('df.data')}`]);
      io(file, [w(0, 0, 200 * KiB), w(1, 500 * KiB + 3, 70 * KiB), `write -z ${64 * KiB} ${64 * KiB}`, `discard ${1 * MiB} ${64 * KiB}`]);
      const img = await Qcow2Image.openFile(file, { readOnly: true });
      try {
        expect(img.header.dataFile).to.equal(p('df.data'));
        expect(img.dataFileRaw).to.equal(false);
      } finally {
        await img.close();
      }
      await verify(file);
    });

    it('data_file with data_file_raw=on', async () => {
      const file = create('dfr.qcow2', 2 * MiB, [`data_file=${p('dfr.data')}`, 'data_file_raw=on']);
      // Zeroes over guest cluster 0 keep host offset 0: QEMU calls that entry ZERO_PLAIN.
      io(file, [w(0, 4096, 200 * KiB), w(1, 1 * MiB + 3, 70 * KiB), `write -z ${1536 * KiB} ${64 * KiB}`, `write -z 0 ${64 * KiB}`]);
      const img = await Qcow2Image.openFile(file, { readOnly: true });
      try {
        expect(img.dataFileRaw).to.equal(true);
      } finally {
        await img.close();
      }
      await verify(file);
      expectSameBytes(fs.readFileSync(p('dfr.data')).subarray(64 * KiB, 200 * KiB), qemuRaw(file).subarray(64 * KiB, 200 * KiB), 'raw data file holds the guest bytes in place');
    });

    it('a relative data file name resolves against the image directory', async () => {
      // QEMU 7.2 resolves it against its working directory; run from the image directory, both agree.
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'data_file=dfrel.data', 'dfrel.qcow2', String(1 * MiB)], { cwd: dir });
      run('qemu-io', ['-c', `write -q -s ${src[0]} 1000 100000`, 'dfrel.qcow2'], { cwd: dir });
      run('qemu-img', ['convert', '-O', 'raw', 'dfrel.qcow2', 'dfrel.raw'], { cwd: dir });
      expect(process.cwd()).to.not.equal(dir);
      const img = await Qcow2Image.openFile(p('dfrel.qcow2'), { readOnly: true });
      try {
        expect(img.header.dataFile).to.equal('dfrel.data');
        await compareReads(img, fs.readFileSync(p('dfrel.raw')));
      } finally {
        await img.close();
      }
    });
  });

  describe('internal snapshots', () => {
    for (const compat of ['0.10', '1.1']) it(`compat=${compat}: reads the image as of each snapshot and lists them as QEMU does`, async () => {
      const file = create(`snap-${compat}.qcow2`, 1 * MiB, ['cluster_size=4096', `compat=${compat}`]);
      io(file, [w(0, 0, 300 * KiB)]);
      qemuImg('snapshot', '-c', 'first', file);
      io(file, [w(1, 100 * KiB, 50 * KiB), `write -z ${200 * KiB} ${8 * KiB}`]);
      qemuImg('snapshot', '-c', 'second one', file);
      // QEMU resizes no v2 image that has snapshots.
      const grown = compat === '0.10' ? 1 * MiB : 2 * MiB;
      if (grown !== 1 * MiB) qemuImg('resize', '-q', file, String(grown));
      io(file, [w(2, grown - 20 * KiB + 7, 12 * KiB), `discard 0 ${64 * KiB}`]);
      qemuImg('snapshot', '-c', '3', file);
      io(file, [w(0, 5 * KiB, 1)]);

      const info = qemuInfo(file);
      const want = (info.snapshots as Array<Record<string, unknown>>);
      expect(want).to.have.length(3);
      const img = await Qcow2Image.openFile(file, { readOnly: true });
      try {
        expect(img.snapshots.map((s) => ({
          id: s.id, name: s.name, 'vm-state-size': s.vmStateSize, 'date-sec': s.dateSec, 'date-nsec': s.dateNsec,
          'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9), 'vm-clock-nsec': s.vmClockNsec % 1e9,
        }))).to.deep.equal(want.map((s) => ({
          id: s.id, name: s.name, 'vm-state-size': s['vm-state-size'], 'date-sec': s['date-sec'], 'date-nsec': s['date-nsec'],
          'vm-clock-sec': s['vm-clock-sec'], 'vm-clock-nsec': s['vm-clock-nsec'],
        })));
        expect(img.snapshots.map((s) => s.diskSize)).to.deep.equal([1 * MiB, 1 * MiB, grown]);
      } finally {
        await img.close();
      }
      // `qemu-img snapshot -l` lists the same ids and names.
      const listed = qemuImg('snapshot', '-l', file).split('\n').slice(2).filter((l) => l.trim()).map((l) => l.trim().split(/\s{2,}/).slice(0, 2));
      expect(listed).to.deep.equal([['1', 'first'], ['2', 'second one'], ['3', '3']]);

      for (const s of want) {
        // The disk as QEMU restores it (`snapshot -a`), size included.
        const applied = p(`snap-applied-${compat}-${s.id}.qcow2`);
        fs.copyFileSync(file, applied);
        qemuImg('snapshot', '-a', s.name as string, applied);
        const restored = qemuRaw(applied);
        await verify(file, { snapshot: s.name as string, want: restored });
        // `convert -l` reads the snapshot at the active image's size: the same bytes, then zeroes.
        const loaded = qemuRaw(file, { snapshot: s.name as string });
        expectSameBytes(loaded.subarray(0, restored.length), restored, `convert -l snapshot.name=${s.name}`);
        expect(loaded.subarray(restored.length).every((b) => b === 0)).to.equal(true);
      }
      // By id too; a name that is also an id picks the id first, as QEMU does.
      const byId = await Qcow2Image.openFile(file, { readOnly: true, snapshot: '2' });
      try {
        expect(byId.snapshot?.name).to.equal('second one');
      } finally {
        await byId.close();
      }
      await verify(file);
    });
  });

  describe('header', () => {
    /** Offset of the end-of-extensions marker in a header cluster. */
    function extensionsEnd(buf: Buffer): number {
      let off = buf.readUInt32BE(4) >= 3 ? buf.readUInt32BE(100) : 72;
      while (buf.readUInt32BE(off) !== 0) off += 8 + ((buf.readUInt32BE(off + 4) + 7) & ~7);
      return off;
    }

    it('feature name table and backing format extensions', async () => {
      create('hx-base.qcow2', 1 * MiB);
      const file = create('hx.qcow2', 1 * MiB, [], ['-b', 'hx-base.qcow2', '-F', 'qcow2']);
      const img = await Qcow2Image.openFile(file, { readOnly: true });
      try {
        expect(img.header.backingFile).to.equal(qemuInfo(file)['backing-filename']);
        expect(img.header.backingFormat).to.equal(qemuInfo(file)['backing-filename-format']);
        const names = img.header.featureNames.map((f) => `${f.type}:${f.bit}:${f.name}`);
        // QEMU 7.2 writes this table (see `strings` on any image it creates).
        expect(names).to.include.members([
          'incompatible:0:dirty bit', 'incompatible:1:corrupt bit', 'incompatible:2:external data file',
          'incompatible:3:compression type', 'incompatible:4:extended L2 entries',
          'compatible:0:lazy refcounts', 'autoclear:0:bitmaps', 'autoclear:1:raw external data',
        ]);
      } finally {
        await img.close();
      }
      const raw = fs.readFileSync(file).subarray(0, 64 * KiB);
      for (const n of ['dirty bit', 'lazy refcounts', 'raw external data']) expect(raw.includes(Buffer.from(n))).to.equal(true);
    });

    it('an unknown header extension is skipped', async () => {
      const base = create('ux-base.qcow2', 1 * MiB);
      io(base, [w(0, 0, 1 * MiB)]);
      const orig = create('ux.qcow2', 1 * MiB, [], ['-b', 'ux-base.qcow2', '-F', 'qcow2']);
      io(orig, [w(1, 4096, 100 * KiB)]);
      const copy = p('ux-patched.qcow2');
      const buf = fs.readFileSync(orig);
      const start = buf.readUInt32BE(100);
      const payload = Buffer.from('not an extension QEMU knows');
      const ext = Buffer.alloc(8 + ((payload.length + 7) & ~7));
      ext.writeUInt32BE(0x12345678, 0);
      ext.writeUInt32BE(payload.length, 4);
      payload.copy(ext, 8);
      const backingOff = Number(buf.readBigUInt64BE(8));
      const backingLen = buf.readUInt32BE(16);
      expect(backingOff).to.be.above(extensionsEnd(buf));
      const cluster0 = Buffer.alloc(64 * KiB);
      buf.copy(cluster0, 0, 0, start);
      ext.copy(cluster0, start);
      buf.copy(cluster0, start + ext.length, start, backingOff + backingLen);
      cluster0.writeBigUInt64BE(BigInt(backingOff + ext.length), 8);
      cluster0.copy(buf, 0);
      fs.writeFileSync(copy, buf);
      expect(qemuInfo(copy)['backing-filename']).to.equal('ux-base.qcow2');
      const img = await Qcow2Image.openFile(copy, { readOnly: true });
      try {
        expect(img.header.extensions.map((e) => e.type)).to.include(0x12345678);
        expect(img.header.backingFile).to.equal('ux-base.qcow2');
        expect(img.header.backingFormat).to.equal('qcow2');
      } finally {
        await img.close();
      }
      await verify(copy);
      expectSameBytes(qemuRaw(copy), qemuRaw(orig), 'the patched copy reads as the original');
    });

    it('an unknown incompatible feature bit refuses the image, naming the bit', async () => {
      const file = create('incompat.qcow2', 1 * MiB);
      for (const [bit, what] of [[5, 'unknown incompatible feature bit 5'], [40, 'unknown incompatible feature bit 40']] as const) {
        const copy = p(`incompat-${bit}.qcow2`);
        const buf = fs.readFileSync(file);
        buf.writeBigUInt64BE(buf.readBigUInt64BE(72) | (1n << BigInt(bit)), 72);
        fs.writeFileSync(copy, buf);
        const q = run('qemu-img', ['info', copy], { allowFail: true });
        expect(q.status).to.not.equal(0);
        expect(q.stderr).to.match(/Unsupported/i);
        const err = await Qcow2Image.openFile(copy, { readOnly: true }).then(() => null, (e: unknown) => e);
        expect(err).to.be.instanceOf(UnsupportedImageError);
        expect((err as Error).message).to.include(what);
      }
    });

    it('the dirty bit and unknown compatible and autoclear bits still allow a read-only open', async () => {
      const file = create('bits.qcow2', 1 * MiB, ['lazy_refcounts=on']);
      io(file, [w(0, 1000, 200 * KiB)]);
      const buf = fs.readFileSync(file);
      buf.writeUInt32BE(buf.readUInt32BE(76) | 1, 76); // dirty
      buf.writeUInt32BE(buf.readUInt32BE(84) | (1 << 9), 84); // compatible bit 9
      buf.writeUInt32BE(buf.readUInt32BE(92) | (1 << 7), 92); // autoclear bit 7
      fs.writeFileSync(file, buf);
      const before = fs.readFileSync(file);
      await verify(file);
      expect(fs.readFileSync(file).equals(before), 'a read-only open writes nothing').to.equal(true);
    });

    it('the corrupt bit still allows a read-only open', async () => {
      const file = create('corrupt.qcow2', 1 * MiB);
      io(file, [w(0, 0, 300 * KiB), `write -z ${400 * KiB} ${64 * KiB}`]);
      const want = qemuRaw(file);
      const buf = fs.readFileSync(file);
      buf.writeUInt32BE(buf.readUInt32BE(76) | 2, 76);
      fs.writeFileSync(file, buf);
      expect(run('qemu-io', ['-c', 'write 0 512', file], { allowFail: true }).stderr).to.match(/corrupt/i);
      await verify(file);
      expectSameBytes(qemuRaw(file), want, 'contents unchanged');
      const img = await Qcow2Image.openFile(file, { readOnly: true });
      try {
        expect(img.readOnly).to.equal(true);
      } finally {
        await img.close();
      }
    });
  });

  describe('host ranges for zero-copy readers (mapForRead)', () => {
    it('holds the clusters it lent until release: a discard waits, then the range reads as zeroes', async () => {
      const cs = 64 * KiB;
      const file = create('lend.qcow2', 8 * cs);
      io(file, [w(0, 0, 4 * cs)]);
      const want = qemuRaw(file);
      const img = await Qcow2Image.openFile(file);
      try {
        const m = (await img.mapForRead(cs, 2 * cs))!;
        expect(m).to.not.equal(null);
        let discarded = false;
        const discard = img.writeZeroes(cs, 2 * cs, { unmap: true }).then(() => { discarded = true; });
        await new Promise((r) => setTimeout(r, 50));
        expect(discarded, 'the discard waited for the lent range').to.equal(false);
        expectSameBytes(sliceBytes(m.slices), want.subarray(cs, 3 * cs), 'lent range');
        m.release();
        m.release(); // a second release changes nothing
        await discard;
        const after = (await img.mapForRead(0, 4 * cs))!;
        try {
          expect(after.slices.map((x) => [x.fd < 0, x.length])).to.deep.equal([[false, cs], [true, 2 * cs], [false, cs]]);
        } finally {
          after.release();
        }
      } finally {
        await img.close();
      }
      expect(run('qemu-img', ['check', file]).status).to.equal(0);
    });

    it('follows a backing chain into qcow2 and raw files; compressed clusters say null', async () => {
      const cs = 64 * KiB;
      const base = p('lend-base.raw');
      fs.writeFileSync(base, patternBuffer(3 * cs + 100, 5));
      const mid = create('lend-mid.qcow2', 4 * cs, [], ['-b', base, '-F', 'raw']);
      io(mid, [w(1, cs, cs)]);
      const top = create('lend-top.qcow2', 4 * cs, [], ['-b', mid, '-F', 'qcow2']);
      io(top, [w(2, 2 * cs, 1000)]);
      const want = qemuRaw(top);
      const img = await Qcow2Image.openFile(top, { readOnly: true });
      try {
        const m = (await img.mapForRead(0, 4 * cs))!;
        try {
          expectSameBytes(sliceBytes(m.slices), want, 'the whole chain');
          expect(new Set(m.slices.filter((x) => x.fd >= 0).map((x) => x.fd)).size).to.equal(3);
        } finally {
          m.release();
        }
      } finally {
        await img.close();
      }
      const packed = create('lend-c.qcow2', 4 * cs);
      io(packed, [`write -c -P 0x11 ${cs} ${cs}`]);
      const c = await Qcow2Image.openFile(packed, { readOnly: true });
      try {
        const plain = (await c.mapForRead(0, cs))!;
        plain.release();
        expect(plain.slices).to.deep.equal([{ fd: -1, position: 0, length: cs }]);
        expect(await c.mapForRead(cs - 512, 1024)).to.equal(null);
      } finally {
        await c.close();
      }
    });
  });

  describe('large sparse images', () => {
    it('a 1 TiB image opens and reads at assorted offsets', async () => {
      const TiB = 1024 * 1024 * MiB;
      const file = create('huge.qcow2', '1T');
      const spots = [0, 512 * 1024 * MiB - 1000, TiB / 2 + 12345, TiB - 8192];
      io(file, spots.map((o, i) => w(i, o, 4096)));
      const img = await Qcow2Image.openFile(file, { readOnly: true });
      try {
        expect(img.virtualSize).to.equal(TiB);
        for (const o of [...spots, 3 * 1024 * MiB, TiB - 1]) {
          const start = Math.max(0, Math.min(o - 700, TiB - 8192));
          const len = Math.min(8192, TiB - start);
          const got = Buffer.alloc(len);
          await img.read(got, start);
          expectSameBytes(got, qemuReadRange(file, start, len), `read of ${start}+${len}`);
        }
        expect(shape(await img.blockStatus(0, TiB))).to.deep.equal(expectedMap(file));
        expect(await seekWalk(img)).to.deep.equal(dataRanges(expectedMap(file)));
      } finally {
        await img.close();
      }
    });
  });
});
