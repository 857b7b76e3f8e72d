/**
 * Randomized differential tests of the write engine against a plain buffer
 * model, with QEMU as the judge: after every batch of random writes, zero
 * writes, discards and resizes the engine's view must equal the model, and
 * after close `qemu-img convert` must show the model, `qemu-img check` must
 * find nothing, internal snapshots and backing files must be unchanged.
 *
 * Every scenario prints its seed on failure; QCOWFS_SEED=<n> replays a run.
 */
import { expect } from 'chai';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { Qcow2Image, createImageFile } from '../../../src/qcow2';
import { qemuImg, qemuIo, qemuRaw, qemuCheck, run, tmpDir } from '../../helpers/qemu';
import { Rng, Model, Op, testSeed, randomOp, applyToEngine, describeOp, engineMismatch, firstDifference, headerFields } from './write-harness';

const KiB = 1024;
const MiB = 1024 * 1024;

interface Scenario {
  name: string;
  clusterSize: number;
  compat?: '0.10' | '1.1';
  refcountBits?: number;
  extendedL2?: boolean;
  lazyRefcounts?: boolean;
  size: number;
  /** Sparse model: windows of `windowBytes` at these guest offsets (no backing, no resize). */
  windows?: number[];
  windowBytes?: number;
  backing?: { format: 'qcow2' | 'raw'; size: number };
  /** qemu-io writes, then `qemu-img snapshot -c S`, then more qemu-io writes. */
  snapshot?: boolean;
  /** The image is made by `qemu-img convert -c` (compressed clusters), then gets zero and data writes from qemu-io. */
  qemuData?: boolean;
  batches: number;
  ops: number;
  resize?: { minSize: number; maxSize: number; growOnly?: boolean };
  maxLength?: number;
}

function sha256(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

function l2Span(s: Scenario): number {
  return (s.clusterSize / (s.extendedL2 ? 16 : 8)) * s.clusterSize;
}

function qemuCreateOpts(s: Scenario): string {
  const o = [`cluster_size=${s.clusterSize}`, `compat=${s.compat ?? '1.1'}`];
  if (s.refcountBits) o.push(`refcount_bits=${s.refcountBits}`);
  if (s.extendedL2) o.push('extended_l2=on');
  if (s.lazyRefcounts) o.push('lazy_refcounts=on');
  return o.join(',');
}

/** A few qemu-io writes of fixed patterns at random places. */
function qemuWrites(rng: Rng, file: string, size: number, format: string, count: number, opts: { zeroes?: boolean } = {}): void {
  const cmds: string[] = [];
  for (let i = 0; i < count; i++) {
    const len = rng.int(1, 64) * 512 * rng.pick([1, 1, 8]);
    const off = Math.min(rng.int(0, Math.floor(size / 512) - 1) * 512, size - len);
    if (off < 0) continue;
    if (opts.zeroes && rng.chance(0.35)) cmds.push(`write -z${rng.chance(0.5) ? ' -u' : ''} ${off} ${len}`);
    else cmds.push(`write -P 0x${rng.int(1, 255).toString(16)} ${off} ${len}`);
  }
  if (cmds.length) qemuIo(file, cmds, { format });
}

interface Prepared {
  image: string;
  model: Model;
  backingFile?: string;
  backingSum?: string;
  snapshotRaw?: Buffer;
}

async function prepare(s: Scenario, dir: string, rng: Rng): Promise<Prepared> {
  const image = path.join(dir, 'img.qcow2');
  const out: Prepared = { image, model: new Model(0, []) };
  if (s.backing) {
    const base = path.join(dir, `base.${s.backing.format}`);
    qemuImg('create', '-q', '-f', s.backing.format, base, String(s.backing.size));
    qemuWrites(rng, base, s.backing.size, s.backing.format, 12);
    out.backingFile = base;
    out.backingSum = sha256(base);
  }
  if (s.qemuData) {
    // Random data in a raw file, compressed into the image by QEMU, then zeroed and overwritten in places by QEMU.
    const src = path.join(dir, 'src.raw');
    const data = Buffer.alloc(s.size);
    for (let i = 0; i < 10; i++) {
      const len = rng.int(1, 300 * KiB);
      const off = rng.int(0, s.size - len);
      (rng.chance(0.5) ? rng.bytes(len) : Buffer.alloc(len, rng.int(1, 255))).copy(data, off);
    }
    fs.writeFileSync(src, data);
    qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', qemuCreateOpts(s), src, image);
    fs.rmSync(src);
    qemuWrites(rng, image, s.size, 'qcow2', 10, { zeroes: true });
  } else {
    await createImageFile(image, {
      size: s.size,
      clusterSize: s.clusterSize,
      refcountBits: s.refcountBits,
      compat: s.compat,
      lazyRefcounts: s.lazyRefcounts,
      extendedL2: s.extendedL2,
      backingFile: s.backing ? path.basename(out.backingFile!) : undefined,
      backingFormat: s.backing?.format,
    });
  }
  if (s.snapshot) {
    qemuWrites(rng, image, s.size, 'qcow2', 12, { zeroes: s.compat !== '0.10' });
    qemuImg('snapshot', '-c', 'S', image);
    qemuWrites(rng, image, s.size, 'qcow2', 6, { zeroes: s.compat !== '0.10' });
    out.snapshotRaw = qemuRaw(image, { snapshot: 'S' });
  }
  if (s.windows) {
    const wb = s.windowBytes!;
    out.model = new Model(s.size, s.windows.map((start) => ({ start, data: Buffer.alloc(Math.min(wb, s.size - start)) })));
  } else {
    const raw = qemuRaw(image);
    expect(raw.length, 'scenario sizes are multiples of 512').to.equal(s.size);
    out.model = Model.whole(raw);
  }
  const c = qemuCheck(image);
  expect(c.leaks ?? 0, 'image as prepared').to.equal(0);
  expect(c.corruptions ?? 0, 'image as prepared').to.equal(0);
  return out;
}

/** Compare with QEMU's view of the closed image. */
function qemuMismatch(p: Prepared, dir: string, viaCompare: boolean): string | null {
  const shown = Math.floor(p.model.size / 512) * 512;
  if (viaCompare || !p.model.isWhole) {
    const rawModel = path.join(dir, 'model.raw');
    p.model.writeRaw(rawModel);
    const r = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', p.image, rawModel], { allowFail: true });
    fs.rmSync(rawModel);
    if (r.status !== 0) return `qemu-img compare: ${r.stdout.trim()} ${r.stderr.trim()}`;
    return null;
  }
  const raw = qemuRaw(p.image);
  if (raw.length !== shown) return `qemu-img convert gave ${raw.length} bytes, expected ${shown}`;
  const d = firstDifference(raw, p.model.windows[0].data.subarray(0, shown));
  return d >= 0 ? `qemu-img convert differs from the model at guest offset ${d}` : null;
}

async function runScenario(s: Scenario, seed: number, root: string): Promise<void> {
  const dir = fs.mkdtempSync(path.join(root, 'case-'));
  const rng = new Rng(seed);
  const log: string[] = [];
  const fail = (batch: number, what: string): never => {
    throw new Error(`[${s.name}] seed=${seed} batch=${batch}: ${what}\nlast operations:\n  ${log.slice(-12).join('\n  ')}`);
  };
  const p = await prepare(s, dir, rng);
  const mix = { clusterSize: s.clusterSize, l2Span: l2Span(s), resize: s.resize, maxLength: s.maxLength };
  for (let batch = 0; batch < s.batches; batch++) {
    const img = await Qcow2Image.openFile(p.image);
    try {
      for (let i = 0; i < s.ops; i++) {
        const op: Op = randomOp(rng, p.model, mix);
        log.push(describeOp(op));
        try {
          await applyToEngine(img, op);
        } catch (err) {
          fail(batch, `engine threw on ${describeOp(op)}: ${(err as Error).stack}`);
        }
        p.model.apply(op);
      }
      const m = await engineMismatch(img, p.model);
      if (m) fail(batch, m);
    } finally {
      await img.close();
    }
    const c = qemuCheck(p.image);
    if ((c.leaks ?? 0) !== 0 || (c.corruptions ?? 0) !== 0 || c['check-errors'] !== 0) {
      fail(batch, `qemu-img check: ${JSON.stringify(c)}\n${run('qemu-img', ['check', p.image], { allowFail: true }).stdout}`);
    }
    const q = qemuMismatch(p, dir, !!s.qemuData);
    if (q) fail(batch, q);
    if (p.snapshotRaw) {
      // QEMU shows a snapshot at the active disk's size; what lies past the snapshot's own size reads as zeroes.
      const snap = qemuRaw(p.image, { snapshot: 'S' });
      const d = firstDifference(snap.subarray(0, p.snapshotRaw.length), p.snapshotRaw);
      if (d >= 0) fail(batch, `snapshot S changed at offset ${d}`);
      if (snap.length > p.snapshotRaw.length && snap.subarray(p.snapshotRaw.length).some((b) => b !== 0)) fail(batch, 'snapshot S shows data past its size');
    }
    if (p.backingFile && sha256(p.backingFile) !== p.backingSum) fail(batch, 'the backing file changed');
  }
}

const v3Matrix: Scenario[] = [];
for (const clusterSize of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
  for (const refcountBits of [1, 2, 8, 16, 64]) {
    const size = clusterSize === 512 ? 3 * MiB : clusterSize === 4 * KiB ? 6 * MiB : 24 * MiB;
    v3Matrix.push({
      name: `v3 cluster ${clusterSize} refcount_bits ${refcountBits}`,
      clusterSize,
      refcountBits,
      size,
      batches: 3,
      ops: clusterSize === 2 * MiB ? 15 : 25,
      resize: { minSize: Math.floor(size / 3), maxSize: size + 4 * clusterSize },
    });
  }
}

const v2Matrix: Scenario[] = [512, 4 * KiB, 64 * KiB, 2 * MiB].map((clusterSize) => ({
  name: `v2 cluster ${clusterSize}`,
  compat: '0.10' as const,
  clusterSize,
  size: clusterSize <= 4 * KiB ? 4 * MiB : 24 * MiB,
  batches: 3,
  ops: 25,
  resize: { minSize: 1 * MiB, maxSize: clusterSize <= 4 * KiB ? 5 * MiB : 26 * MiB },
}));

const backingScenarios: Scenario[] = [
  { name: 'qcow2 backing, overlay larger', clusterSize: 64 * KiB, size: 12 * MiB, backing: { format: 'qcow2', size: 8 * MiB }, batches: 3, ops: 25, resize: { minSize: 4 * MiB, maxSize: 14 * MiB } },
  { name: 'qcow2 backing, overlay smaller', clusterSize: 64 * KiB, size: 6 * MiB, backing: { format: 'qcow2', size: 10 * MiB }, batches: 3, ops: 25, resize: { minSize: 3 * MiB, maxSize: 12 * MiB } },
  { name: 'raw backing, overlay larger', clusterSize: 4 * KiB, size: 6 * MiB, backing: { format: 'raw', size: 4 * MiB }, batches: 3, ops: 25, resize: { minSize: 2 * MiB, maxSize: 7 * MiB } },
  { name: 'raw backing, overlay smaller', clusterSize: 512, size: 2 * MiB, backing: { format: 'raw', size: 3 * MiB }, batches: 3, ops: 25, resize: { minSize: 1 * MiB, maxSize: 4 * MiB } },
  { name: 'v2 with qcow2 backing', compat: '0.10', clusterSize: 4 * KiB, size: 6 * MiB, backing: { format: 'qcow2', size: 5 * MiB }, batches: 3, ops: 25, resize: { minSize: 2 * MiB, maxSize: 7 * MiB } },
  { name: 'v2 with raw backing', compat: '0.10', clusterSize: 64 * KiB, size: 8 * MiB, backing: { format: 'raw', size: 8 * MiB }, batches: 3, ops: 25 },
  { name: 'refcount_bits 1 with backing, 2M clusters', clusterSize: 2 * MiB, refcountBits: 1, size: 16 * MiB, backing: { format: 'qcow2', size: 12 * MiB }, batches: 2, ops: 15 },
];

const extL2Scenarios: Scenario[] = [
  { name: 'extended L2, 64K clusters', clusterSize: 64 * KiB, extendedL2: true, size: 16 * MiB, batches: 3, ops: 25, resize: { minSize: 4 * MiB, maxSize: 18 * MiB } },
  { name: 'extended L2, 16K clusters, qcow2 backing', clusterSize: 16 * KiB, extendedL2: true, size: 8 * MiB, backing: { format: 'qcow2', size: 6 * MiB }, batches: 3, ops: 25, resize: { minSize: 2 * MiB, maxSize: 9 * MiB } },
  { name: 'extended L2, 2M clusters, raw backing', clusterSize: 2 * MiB, extendedL2: true, size: 12 * MiB, backing: { format: 'raw', size: 10 * MiB }, batches: 2, ops: 20 },
  { name: 'extended L2, 32K clusters, refcount_bits 2', clusterSize: 32 * KiB, extendedL2: true, refcountBits: 2, size: 8 * MiB, batches: 3, ops: 25 },
];

const snapshotScenarios: Scenario[] = [
  { name: 'internal snapshot, v3 64K', clusterSize: 64 * KiB, size: 12 * MiB, snapshot: true, batches: 3, ops: 25, resize: { minSize: 12 * MiB, maxSize: 16 * MiB, growOnly: true } },
  { name: 'internal snapshot, v2 4K', compat: '0.10', clusterSize: 4 * KiB, size: 6 * MiB, snapshot: true, batches: 3, ops: 25 },
  { name: 'internal snapshot, v3 512, refcount_bits 2', clusterSize: 512, refcountBits: 2, size: 2 * MiB, snapshot: true, batches: 3, ops: 25 },
  { name: 'internal snapshot, extended L2, qcow2 backing', clusterSize: 32 * KiB, extendedL2: true, size: 8 * MiB, backing: { format: 'qcow2', size: 8 * MiB }, snapshot: true, batches: 3, ops: 25 },
];

const lazyScenarios: Scenario[] = [
  { name: 'lazy refcounts, 64K', clusterSize: 64 * KiB, lazyRefcounts: true, size: 12 * MiB, batches: 3, ops: 25, resize: { minSize: 4 * MiB, maxSize: 14 * MiB } },
  { name: 'lazy refcounts, 4K, snapshot', clusterSize: 4 * KiB, lazyRefcounts: true, size: 4 * MiB, snapshot: true, batches: 3, ops: 25 },
];

const qemuDataScenarios: Scenario[] = [
  { name: 'QEMU-written compressed and zero clusters, v3 64K', clusterSize: 64 * KiB, size: 12 * MiB, qemuData: true, batches: 3, ops: 25 },
  { name: 'QEMU-written compressed clusters, v2 4K', compat: '0.10', clusterSize: 4 * KiB, size: 4 * MiB, qemuData: true, batches: 3, ops: 25 },
  { name: 'QEMU-written compressed and zero clusters, extended L2 64K', clusterSize: 64 * KiB, extendedL2: true, size: 8 * MiB, qemuData: true, batches: 3, ops: 25 },
  { name: 'QEMU-written compressed clusters, 512 B, snapshot', clusterSize: 512, size: 2 * MiB, qemuData: true, snapshot: true, batches: 3, ops: 25 },
];

const sparseScenarios: Scenario[] = [
  // 64K clusters: one L2 table maps 512 MiB; windows straddle the first two table boundaries.
  { name: 'sparse 1.5 GiB, 64K clusters, across L2 tables', clusterSize: 64 * KiB, size: 1536 * MiB, windows: [0, 512 * MiB - MiB, 1024 * MiB - MiB, 1536 * MiB - 2 * MiB], windowBytes: 2 * MiB, batches: 2, ops: 30 },
  { name: 'sparse 300 MiB, extended L2 64K, across L2 tables', clusterSize: 64 * KiB, extendedL2: true, size: 300 * MiB, windows: [256 * MiB - MiB], windowBytes: 2 * MiB, batches: 2, ops: 30 },
];

const seed = testSeed();

describe(`qcow2 write engine: randomized against QEMU (QCOWFS_SEED=${seed})`, function () {
  this.timeout(300000);
  let root: string;
  before(() => {
    root = tmpDir('qcowfs-wr-');
  });
  after(() => {
    fs.rmSync(root, { recursive: true, force: true });
  });

  const groups: Array<[string, Scenario[]]> = [
    ['v3 cluster sizes x refcount widths', v3Matrix],
    ['v2 cluster sizes', v2Matrix],
    ['backing files', backingScenarios],
    ['extended L2', extL2Scenarios],
    ['internal snapshots', snapshotScenarios],
    ['lazy refcounts', lazyScenarios],
    ['data QEMU wrote first', qemuDataScenarios],
    ['large sparse disks', sparseScenarios],
  ];
  let index = 0;
  for (const [title, scenarios] of groups) {
    describe(title, () => {
      for (const s of scenarios) {
        const caseSeed = (seed + Math.imul(++index, 0x9e3779b1)) >>> 0;
        it(`${s.name} (seed ${caseSeed})`, async () => {
          await runScenario(s, caseSeed, root);
        });
      }
    });
  }

  describe('structural growth', () => {
    it('refcount table grows with 512 B clusters and 64-bit refcounts', async () => {
      const caseSeed = (seed ^ 0x5bd1e995) >>> 0;
      const dir = fs.mkdtempSync(path.join(root, 'reftable-'));
      const image = path.join(dir, 'img.qcow2');
      const size = 6 * MiB;
      await createImageFile(image, { size, clusterSize: 512, refcountBits: 64 });
      const before = headerFields(image);
      const rng = new Rng(caseSeed);
      const model = Model.whole(Buffer.alloc(size));
      const img = await Qcow2Image.openFile(image);
      try {
        // Fill most of the disk in shuffled chunks so allocation is scattered.
        const chunks = [];
        for (let off = 0; off < 4 * MiB; off += 64 * KiB) chunks.push(off);
        for (let i = chunks.length - 1; i > 0; i--) {
          const j = rng.int(0, i);
          [chunks[i], chunks[j]] = [chunks[j], chunks[i]];
        }
        for (const off of chunks) {
          const op: Op = { kind: 'write', offset: off + rng.int(0, 511), data: rng.bytes(rng.int(32 * KiB, 64 * KiB)) };
          await applyToEngine(img, op);
          model.apply(op);
        }
        expect(await engineMismatch(img, model), `seed ${caseSeed}`).to.equal(null);
      } finally {
        await img.close();
      }
      const after = headerFields(image);
      // One 512 B table holds 64 entries; one 64-bit block covers 64 clusters: 4096 clusters = 2 MiB of file.
      expect(after.refcountTableClusters, `seed ${caseSeed}`).to.be.greaterThan(before.refcountTableClusters);
      const c = qemuCheck(image);
      expect({ leaks: c.leaks ?? 0, corruptions: c.corruptions ?? 0, errors: c['check-errors'] }, `seed ${caseSeed}`).to.deep.equal({ leaks: 0, corruptions: 0, errors: 0 });
      expect(firstDifference(qemuRaw(image), model.windows[0].data), `seed ${caseSeed}`).to.equal(-1);
    });

    it('growing the disk moves the L1 table, keeping data and leaving no leak', async () => {
      const caseSeed = (seed ^ 0x27d4eb2f) >>> 0;
      const dir = fs.mkdtempSync(path.join(root, 'l1-'));
      const image = path.join(dir, 'img.qcow2');
      await createImageFile(image, { size: 1 * MiB, clusterSize: 512 });
      const rng = new Rng(caseSeed);
      const model = Model.whole(Buffer.alloc(1 * MiB));
      const before = headerFields(image);
      const img = await Qcow2Image.openFile(image);
      const newSize = 9 * MiB + 777;
      try {
        for (let i = 0; i < 20; i++) {
          const op = randomOp(rng, model, { clusterSize: 512, l2Span: 32 * KiB, maxLength: 64 * KiB });
          await applyToEngine(img, op);
          model.apply(op);
        }
        const grow: Op = { kind: 'resize', size: newSize };
        await applyToEngine(img, grow);
        model.apply(grow);
        for (let i = 0; i < 20; i++) {
          const op = randomOp(rng, model, { clusterSize: 512, l2Span: 32 * KiB, maxLength: 64 * KiB });
          await applyToEngine(img, op);
          model.apply(op);
        }
        const tail: Op = { kind: 'write', offset: newSize - 3000, data: rng.bytes(3000) };
        await applyToEngine(img, tail);
        model.apply(tail);
        expect(await engineMismatch(img, model), `seed ${caseSeed}`).to.equal(null);
      } finally {
        await img.close();
      }
      const after = headerFields(image);
      // 1 MiB at 512 B clusters needs 32 L1 entries (one cluster); 9 MiB needs 289 (five clusters).
      expect(before.l1Size).to.equal(32);
      expect(after.l1Size).to.be.at.least(289);
      expect(after.l1TableOffset).to.not.equal(before.l1TableOffset);
      expect(after.size).to.equal(newSize);
      const c = qemuCheck(image);
      expect({ leaks: c.leaks ?? 0, corruptions: c.corruptions ?? 0, errors: c['check-errors'] }, `seed ${caseSeed}`).to.deep.equal({ leaks: 0, corruptions: 0, errors: 0 });
      const raw = qemuRaw(image);
      expect(raw.length).to.equal(Math.floor(newSize / 512) * 512);
      expect(firstDifference(raw, model.windows[0].data.subarray(0, raw.length)), `seed ${caseSeed}`).to.equal(-1);
    });
  });
});
