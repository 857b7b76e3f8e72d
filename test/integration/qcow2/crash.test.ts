/**
 * Crash tests: a child process writes with periodic flushes and is killed
 * with SIGKILL at a random moment. Afterwards `qemu-img check` may find
 * leaks but nothing else, every write acknowledged by a completed flush
 * reads back, writes after it are each either there or not, and the
 * engine's repair leaves an image qemu-img check finds clean.
 *
 * QCOWFS_SEED=<n> replays a run.
 */
import { expect } from 'chai';
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { Qcow2Image, createImageFile, checkAndRepair, CreateOptions } from '../../../src/qcow2';
import { qemuImg, qemuIo, qemuRaw, qemuCheck, tmpDir } from '../../helpers/qemu';
import { Rng, Model, Op, OpMix, testSeed, describeOp, firstDifference } from './write-harness';
import { crashEpochOps } from './crash-writer';

const KiB = 1024;
const MiB = 1024 * 1024;
const WRITER = path.join(__dirname, 'crash-writer.js');

interface CrashConfig {
  name: string;
  create: Omit<CreateOptions, 'backingFile' | 'backingFormat'>;
  backing?: boolean;
  rounds: number;
}

const configs: CrashConfig[] = [
  { name: 'v3, 64K clusters', create: { size: 8 * MiB, clusterSize: 64 * KiB }, rounds: 4 },
  { name: 'v2, 4K clusters', create: { size: 4 * MiB, clusterSize: 4 * KiB, compat: '0.10' }, rounds: 4 },
  { name: 'v3, 512 B clusters, refcount_bits 2', create: { size: 2 * MiB, clusterSize: 512, refcountBits: 2 }, rounds: 4 },
  { name: 'extended L2, 32K clusters, qcow2 backing', create: { size: 6 * MiB, clusterSize: 32 * KiB, extendedL2: true }, backing: true, rounds: 3 },
  { name: 'lazy refcounts, 4K clusters', create: { size: 4 * MiB, clusterSize: 4 * KiB, lazyRefcounts: true }, rounds: 3 },
];

interface ChildRun {
  flushed: number[];
  signal: NodeJS.Signals | null;
  code: number | null;
  stderr: string;
}

/** Start the writer, kill it `delayMs` after it has opened the image. */
function runAndKill(image: string, seed: number, firstEpoch: number, mix: OpMix, delayMs: number): Promise<ChildRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [WRITER, image, String(seed), String(firstEpoch), JSON.stringify(mix)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let timer: NodeJS.Timeout | null = null;
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (timer === null && out.includes('ready\n')) timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
    });
    child.stderr.on('data', (d: Buffer) => {
      err += d.toString();
    });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      const flushed = out.split('\n').filter((l) => l.startsWith('flushed ')).map((l) => Number(l.slice(8)));
      resolve({ flushed, signal, code, stderr: err });
    });
  });
}

/**
 * Check `actual` against the model as of the last acknowledged flush; bytes
 * that un-acknowledged operations touch may instead hold what one of them wrote.
 */
function verifyDurable(actual: Buffer, acked: Buffer, pending: Op[]): string | null {
  if (actual.length !== acked.length) return `QEMU shows ${actual.length} bytes, expected ${acked.length}`;
  let pos = 0;
  while (pos < actual.length) {
    const d = firstDifference(actual.subarray(pos), acked.subarray(pos));
    if (d < 0) return null;
    const at = pos + d;
    const ok = pending.some((op) => {
      if (op.kind === 'write') return at >= op.offset && at < op.offset + op.data.length && op.data[at - op.offset] === actual[at];
      if (op.kind === 'zero' || op.kind === 'discard') return at >= op.offset && at < op.offset + op.length && actual[at] === 0;
      return false;
    });
    if (!ok) return `byte at guest offset ${at} is 0x${actual[at].toString(16)}, acknowledged 0x${acked[at].toString(16)}; un-acknowledged: ${pending.map(describeOp).join(', ') || 'none'}`;
    pos = at + 1;
  }
  return null;
}

describe(`qcow2 write engine: crash consistency under SIGKILL (QCOWFS_SEED=${testSeed()})`, function () {
  this.timeout(300000);
  const seed = testSeed();
  let root: string;
  before(() => {
    root = tmpDir('qcowfs-crash-');
  });
  after(() => {
    fs.rmSync(root, { recursive: true, force: true });
  });

  configs.forEach((cfg, index) => {
    const caseSeed = (seed + Math.imul(index + 1, 0x9e3779b1)) >>> 0;
    it(`${cfg.name} (seed ${caseSeed})`, async () => {
      const dir = fs.mkdtempSync(path.join(root, 'case-'));
      const image = path.join(dir, 'img.qcow2');
      const rng = new Rng(caseSeed);
      const size = cfg.create.size;
      if (cfg.backing) {
        const base = path.join(dir, 'base.qcow2');
        qemuImg('create', '-q', '-f', 'qcow2', base, String(size));
        qemuIo(base, [`write -P 0x5a 0 ${size / 2}`, `write -P 0xa5 ${size / 2 + 4096} 65536`]);
        await createImageFile(image, { ...cfg.create, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
      } else {
        await createImageFile(image, cfg.create);
      }
      const cs = cfg.create.clusterSize!;
      const mix: OpMix = { clusterSize: cs, l2Span: (cs / (cfg.create.extendedL2 ? 16 : 8)) * cs, maxLength: 200 * KiB };
      let acked = qemuRaw(image);
      let epoch = 0;
      const ctx = (round: number, extra: string): string => `seed=${caseSeed} round=${round}: ${extra}`;
      for (let round = 0; round < cfg.rounds; round++) {
        const run = await runAndKill(image, caseSeed, epoch, mix, rng.int(20, 400));
        if (run.signal !== 'SIGKILL') throw new Error(ctx(round, `writer ended by itself (code ${run.code}): ${run.stderr}`));
        const last = run.flushed.length ? run.flushed[run.flushed.length - 1] : epoch - 1;
        const model = Model.whole(acked);
        for (let e = epoch; e <= last; e++) for (const op of crashEpochOps(caseSeed, e, size, mix)) model.apply(op);
        const pending = crashEpochOps(caseSeed, last + 1, size, mix);

        const c = qemuCheck(image);
        expect(c.corruptions ?? 0, ctx(round, `qemu-img check after the kill: ${JSON.stringify(c)}`)).to.equal(0);
        expect(c['check-errors'], ctx(round, `qemu-img check after the kill: ${JSON.stringify(c)}`)).to.equal(0);
        const actual = qemuRaw(image);
        const bad = verifyDurable(actual, model.windows[0].data, pending);
        expect(bad, ctx(round, `after ${run.flushed.length} acknowledged flushes (last epoch ${last})`)).to.equal(null);

        const img = await Qcow2Image.openFile(image);
        try {
          const r = await checkAndRepair(img, true);
          expect({ leaks: r.leaks, corruptions: r.corruptions }, ctx(round, 'engine check after repair')).to.deep.equal({ leaks: 0, corruptions: 0 });
        } finally {
          await img.close();
        }
        const after = qemuCheck(image);
        expect({ leaks: after.leaks ?? 0, corruptions: after.corruptions ?? 0, errors: after['check-errors'] }, ctx(round, 'qemu-img check after repair')).to.deep.equal({ leaks: 0, corruptions: 0, errors: 0 });
        expect(firstDifference(qemuRaw(image), actual), ctx(round, 'repair changed guest data')).to.equal(-1);
        acked = actual;
        epoch = last + 2;
      }
    });
  });
});
