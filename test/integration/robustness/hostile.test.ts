import { expect } from 'chai';
import { spawnSync, SpawnSyncReturns } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { tmpDir, run, qemuImg, qemuIo } from '../../helpers/qemu';
import { Bases, CASES, H, HostileCase, layoutOf, makeBases, sha256 } from './corpus';
import { Qcow2Image } from '../../../src/qcow2/image';
import { checkImage } from '../../../src/qcow2/check';
import { CorruptImageError, QcowError } from '../../../src/qcow2/errors';
import { MemoryDevice } from '../../../src/io/memory-device';

const BIN = path.resolve(__dirname, '../../../../bin/qcowfs');
/** No command may take longer than this on an 8 MiB image; beyond it, it hangs. */
const COMMAND_TIMEOUT_MS = 30000;
/**
 * Address space for each command (KiB). Node starts well within it; any
 * allocation sized by an unvalidated field (gigabytes) fails and shows up as
 * a crash instead of passing unnoticed on a machine with overcommit.
 */
const ADDRESS_SPACE_KB = 1536 * 1024;

interface Result {
  status: number | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

function limited(cmd: string, args: string[]): Result {
  const r: SpawnSyncReturns<string> = spawnSync('sh', ['-c', `ulimit -v ${ADDRESS_SPACE_KB}; exec "$0" "$@"`, cmd, ...args], {
    encoding: 'utf8',
    timeout: COMMAND_TIMEOUT_MS,
    killSignal: 'SIGKILL',
  });
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '', timedOut: (r.error as NodeJS.ErrnoException | undefined)?.code === 'ETIMEDOUT' };
}

function qcowfs(...args: string[]): Result {
  return limited(process.execPath, [BIN, ...args]);
}

function describeRun(what: string, r: Result): string {
  return `${what}: status ${r.status}${r.timedOut ? ' (timed out)' : ''}\nstderr: ${r.stderr}\nstdout: ${r.stdout.slice(0, 500)}`;
}

function expectNoCrash(what: string, r: Result): void {
  expect(r.timedOut, `${what} hung`).to.equal(false);
  expect(r.stderr, describeRun(what, r)).to.not.match(/internal error|\n\s+at |RangeError|TypeError|heap out of memory|Allocation failed/);
}

/** Refused: exit 3 and one line on stderr that names the problem. */
function expectRefused(what: string, r: Result, message: RegExp, code = 3): void {
  expectNoCrash(what, r);
  expect(r.status, describeRun(what, r)).to.equal(code);
  const lines = r.stderr.trim().split('\n');
  expect(lines, describeRun(what, r)).to.have.length(1);
  expect(lines[0], describeRun(what, r)).to.match(/^qcowfs: /);
  expect(lines[0], describeRun(what, r)).to.match(message);
}

function expectOk(what: string, r: Result): void {
  expectNoCrash(what, r);
  expect(r.status, describeRun(what, r)).to.equal(0);
}

function isMounted(dir: string): boolean {
  return fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === dir);
}

/** Checksums of every file the case made (the image and what it refers to). */
function checksums(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const n of fs.readdirSync(dir)) {
    const p = path.join(dir, n);
    if (fs.statSync(p).isFile()) out[n] = sha256(p);
  }
  return out;
}

describe('hostile images: info, map, check and mount refuse or serve them, never hang, crash or write', function () {
  this.timeout(120000);
  let root: string;
  let bases: Bases;
  let mnt: string;

  before(() => {
    root = tmpDir('qcowfs-hostile-');
    bases = makeBases(root);
    mnt = path.join(root, 'mnt');
    fs.mkdirSync(mnt);
  });

  afterEach(() => {
    if (!isMounted(mnt)) return;
    const r = qcowfs('unmount', mnt);
    if (r.status !== 0 && isMounted(mnt)) run('umount', ['-l', mnt], { allowFail: true });
  });

  after(() => {
    if (isMounted(mnt)) run('umount', ['-l', mnt], { allowFail: true });
    fs.rmSync(root, { recursive: true, force: true });
  });

  CASES.forEach((c: HostileCase, i: number) => {
    it(c.name, () => {
      const caseDir = path.join(root, `case-${i}`);
      fs.mkdirSync(caseDir);
      const img = c.make(bases, path.join(caseDir, 'img.qcow2'));
      const before = checksums(caseDir);

      const info = qcowfs('info', img);
      if (c.refuse) expectRefused('info', info, c.refuse);
      else expectOk('info', info);

      const map = qcowfs('map', '--json', img);
      const mapWant = c.map ?? c.refuse ?? 'ok';
      if (mapWant === 'ok') {
        expectOk('map', map);
        expect(() => JSON.parse(map.stdout), map.stdout).to.not.throw();
      } else {
        expectRefused('map', map, mapWant);
      }

      const check = qcowfs('check', img);
      const checkWant = c.check ?? c.refuse ?? 'clean';
      expectNoCrash('check', check);
      if (checkWant === 'clean') {
        expect(check.status, describeRun('check', check)).to.equal(0);
      } else if (checkWant === 'corrupt') {
        expect(check.status, describeRun('check', check)).to.equal(2);
        expect(check.stdout, describeRun('check', check)).to.match(/\d+ errors were found on the image/);
      } else {
        expectRefused('check', check, checkWant);
      }

      const mount = qcowfs('mount', img, mnt);
      if (c.refuse) {
        expectRefused('mount', mount, c.refuse);
        expect(isMounted(mnt), 'a refused mount left a mount behind').to.equal(false);
      } else {
        expectOk('mount', mount);
        expect(isMounted(mnt)).to.equal(true);
        if (c.mountWarning) {
          expect(mount.stderr.trim().split('\n'), describeRun('mount', mount)).to.have.length(1);
          expect(mount.stderr, describeRun('mount', mount)).to.match(c.mountWarning);
        } else {
          expect(mount.stderr, describeRun('mount', mount)).to.equal('');
        }
        const raw = path.join(mnt, 'img.raw');
        const read = limited('dd', [`if=${raw}`, 'of=/dev/null', 'bs=1M']);
        expect(read.timedOut, 'reading through the mount hung').to.equal(false);
        if ((c.read ?? 'ok') === 'ok') {
          expect(read.status, describeRun('dd', read)).to.equal(0);
        } else {
          expect(read.status, describeRun('dd', read)).to.not.equal(0);
          expect(read.stderr, describeRun('dd', read)).to.match(/Input\/output error/);
        }
        if (c.mountWarning) {
          const w = limited('dd', ['if=/dev/zero', `of=${raw}`, 'bs=512', 'count=1', 'conv=notrunc']);
          expect(w.status, describeRun('dd write', w)).to.not.equal(0);
          expect(w.stderr).to.match(/Read-only file system/);
        }
        const un = qcowfs('unmount', mnt);
        expectOk('unmount', un);
        expect(isMounted(mnt)).to.equal(false);
      }

      expect(checksums(caseDir), 'the commands changed the image').to.deep.equal(before);
    });
  });
});

// ---------------------------------------------------------------- fuzzing the engine

/** xorshift32: the same mutations on every run for a given seed. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x;
  };
}

/** Byte ranges of a base image worth mutating: the header cluster's used part and every metadata table. */
function metadataRanges(buf: Buffer): Array<[number, number]> {
  const l = layoutOf(buf);
  const cs = 2 ** buf.readUInt32BE(H.clusterBits);
  const l1Size = buf.readUInt32BE(H.l1Size);
  const ranges: Array<[number, number]> = [[0, 512], [l.l1, l1Size * 8], [l.l2, cs], [l.refcountTable, 64], [l.refcountBlock, 256]];
  if (buf.readUInt32BE(H.nbSnapshots) > 0) ranges.push([l.snapshots, 128], [l.snapshotL1, 8]);
  return ranges;
}

const INTERESTING32 = [0, 1, 0x7fffffff, 0x80000000, 0xffffffff, 0x200, 0x10000, 0x00ffffff, 0x40000000, 0x3f];

function mutate(base: Buffer, next: () => number): { buf: Buffer; what: string[] } {
  const buf = Buffer.from(base);
  const ranges = metadataRanges(buf);
  const what: string[] = [];
  const n = 1 + (next() % 4);
  for (let i = 0; i < n; i++) {
    const [start, len] = ranges[next() % ranges.length];
    const at = start + (next() % len);
    switch (next() % 3) {
      case 0: {
        const bit = next() % 8;
        buf[at] ^= 1 << bit;
        what.push(`flip bit ${bit} at 0x${at.toString(16)}`);
        break;
      }
      case 1: {
        const v = next() & 0xff;
        buf[at] = v;
        what.push(`byte 0x${v.toString(16)} at 0x${at.toString(16)}`);
        break;
      }
      default: {
        const w = at & ~3;
        const v = INTERESTING32[next() % INTERESTING32.length];
        if (w + 4 <= buf.length) buf.writeUInt32BE(v, w);
        what.push(`word 0x${v.toString(16)} at 0x${w.toString(16)}`);
      }
    }
  }
  return { buf, what };
}

/** Fail any single allocation above `limit` bytes while `fn` runs. */
async function withAllocationLimit<T>(limit: number, fn: () => Promise<T>): Promise<T> {
  const origAlloc = Buffer.alloc;
  const origUnsafe = Buffer.allocUnsafe;
  const guard = (size: number) => {
    if (size > limit) throw new Error(`allocation of ${size} bytes (limit ${limit})`);
  };
  (Buffer as { alloc: typeof Buffer.alloc }).alloc = ((size: number, ...rest: unknown[]) => {
    guard(size);
    return (origAlloc as (...a: unknown[]) => Buffer)(size, ...rest);
  }) as typeof Buffer.alloc;
  (Buffer as { allocUnsafe: typeof Buffer.allocUnsafe }).allocUnsafe = ((size: number) => {
    guard(size);
    return origUnsafe(size);
  }) as typeof Buffer.allocUnsafe;
  try {
    return await fn();
  } finally {
    (Buffer as { alloc: typeof Buffer.alloc }).alloc = origAlloc;
    (Buffer as { allocUnsafe: typeof Buffer.allocUnsafe }).allocUnsafe = origUnsafe;
  }
}

/** Reject if `p` does not settle within `ms` (a hang in an async loop). */
function within<T>(ms: number, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p, new Promise<T>((_r, reject) => { timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms); })]).finally(() => clearTimeout(timer));
}

/** Everything a reader does with an image: open, map, read a few ranges, check. Only typed errors may come out. */
async function exercise(dev: MemoryDevice): Promise<string> {
  let img: Qcow2Image;
  try {
    img = await Qcow2Image.open(dev, { readOnly: true, openBacking: false, allowCorrupt: true, filename: 'fuzz.qcow2' });
  } catch (err) {
    if (QcowError.is(err)) return `open: ${err.kind}`;
    throw err;
  }
  const outcomes: string[] = [];
  const step = async (name: string, fn: () => Promise<unknown>) => {
    try {
      await fn();
      outcomes.push(`${name}: ok`);
    } catch (err) {
      if (!QcowError.is(err)) throw err;
      outcomes.push(`${name}: ${err.kind}`);
    }
  };
  try {
    const size = img.virtualSize;
    await step('map', () => img.blockStatus(0, size));
    for (const [off, len] of [[0, 131072], [1 << 20, 65536], [3 << 20, 4096], [Math.max(0, size - 65536), 65536]]) {
      const start = Math.min(off, size);
      const n = Math.min(len, size - start);
      await step(`read ${start}+${n}`, () => img.read(Buffer.alloc(n), start));
    }
    await step('check', () => checkImage(img));
  } finally {
    await img.close();
  }
  return outcomes.join(', ');
}

/**
 * The write path on a mutated image: writes may fail only with typed errors;
 * once one fails on corrupt metadata the image refuses further writes, and
 * reads are still answered (data or a typed error).
 */
async function exerciseWrites(dev: MemoryDevice): Promise<string> {
  let img: Qcow2Image;
  try {
    img = await Qcow2Image.open(dev, { openBacking: false, filename: 'fuzz.qcow2' });
  } catch (err) {
    if (QcowError.is(err)) return `open: ${err.kind}`;
    throw err;
  }
  let outcome = 'write: ok';
  try {
    const size = img.virtualSize;
    let corrupt = false;
    for (const [off, len] of [[0, 4096], [65536, 131072], [1 << 20, 512], [2 << 20, 65536], [3 << 20, 8192]]) {
      if (off + len > size) continue;
      try {
        await img.write(Buffer.alloc(len, 0xa5), off);
      } catch (err) {
        if (!QcowError.is(err)) throw err;
        outcome = `write: ${err.kind}`;
        if (err instanceof CorruptImageError) corrupt = true;
      }
    }
    if (corrupt) {
      let refused: unknown = null;
      await img.write(Buffer.alloc(512), 0).catch((err: unknown) => { refused = err; });
      expect(QcowError.is(refused), 'a write after corruption was found must be refused').to.equal(true);
    }
    for (const off of [0, 1 << 20, 3 << 20]) {
      if (off + 4096 > size) continue;
      await img.read(Buffer.alloc(4096), off).catch((err: unknown) => { if (!QcowError.is(err)) throw err; });
    }
  } finally {
    await img.close().catch((err: unknown) => { if (!QcowError.is(err)) throw err; });
  }
  return outcome;
}

describe('fuzzing the engine with mutated metadata: typed errors only, no hang, no writes', function () {
  this.timeout(180000);
  let root: string;
  const bases: Array<{ name: string; buf: Buffer }> = [];

  before(() => {
    root = tmpDir('qcowfs-fuzz-');
    const b = makeBases(root);
    bases.push({ name: 'rich (64 KiB clusters, snapshot, compressed)', buf: fs.readFileSync(b.rich) });
    const small = path.join(root, 'small.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', small, '8M');
    qemuIo(small, ['write -P 0x55 0 64k', 'write -c -P 0x66 1M 4k', 'write -z 2M 8k', 'write -P 0x77 3M 4k']);
    qemuImg('snapshot', '-c', 'before', small);
    qemuIo(small, ['write -P 0x88 4k 4k']);
    bases.push({ name: 'small (4 KiB clusters)', buf: fs.readFileSync(small) });
  });
  after(() => fs.rmSync(root, { recursive: true, force: true }));

  for (const seed of [1, 2, 3]) {
    it(`100 mutations, seed ${seed}`, async () => {
      const next = prng(seed * 7919);
      const seen = new Map<string, number>();
      for (let i = 0; i < 100; i++) {
        const base = bases[i % bases.length];
        const { buf, what } = mutate(base.buf, next);
        const dev = new MemoryDevice(buf, { readOnly: true, name: 'fuzz.qcow2' });
        let outcome: string;
        try {
          outcome = await withAllocationLimit(80 * 1024 * 1024, () => within(20000, exercise(dev)));
        } catch (err) {
          throw new Error(`seed ${seed} iteration ${i} on ${base.name} (${what.join('; ')}): ${(err as Error).stack}`);
        }
        expect(dev.contents().equals(buf), `seed ${seed} iteration ${i}: the image changed`).to.equal(true);
        seen.set(outcome.split(',')[0], (seen.get(outcome.split(',')[0]) ?? 0) + 1);
      }
      // The mutations must reach past open, or the fuzzing tests nothing but the header decoder.
      expect(seen.get('map: ok') ?? 0, JSON.stringify([...seen])).to.be.greaterThan(20);
    });
  }

  it('100 mutations written to, seed 4', async () => {
    const next = prng(4 * 7919);
    const seen = new Map<string, number>();
    for (let i = 0; i < 100; i++) {
      const base = bases[i % bases.length];
      const { buf, what } = mutate(base.buf, next);
      const dev = new MemoryDevice(buf, { name: 'fuzz.qcow2' });
      let outcome: string;
      try {
        outcome = await withAllocationLimit(80 * 1024 * 1024, () => within(20000, exerciseWrites(dev)));
      } catch (err) {
        throw new Error(`seed 4 iteration ${i} on ${base.name} (${what.join('; ')}): ${(err as Error).stack}`);
      }
      seen.set(outcome, (seen.get(outcome) ?? 0) + 1);
    }
    expect(seen.get('write: ok') ?? 0, JSON.stringify([...seen])).to.be.greaterThan(20);
  });
});

// ---------------------------------------------------------------- corruption found by a write

describe('a write through the mount onto metadata: EIO, the image is marked corrupt, reads go on', function () {
  this.timeout(120000);
  let root: string;
  let bases: Bases;
  let mnt: string;

  before(() => {
    root = tmpDir('qcowfs-overlap-');
    bases = makeBases(root);
    mnt = path.join(root, 'mnt');
    fs.mkdirSync(mnt);
  });
  afterEach(() => {
    if (isMounted(mnt) && qcowfs('unmount', mnt).status !== 0) run('umount', ['-l', mnt], { allowFail: true });
  });
  after(() => fs.rmSync(root, { recursive: true, force: true }));

  /** The data cluster of guest offset 0 is made to be this metadata cluster (OFLAG_COPIED, so it is written in place). */
  const targets: Array<[string, (l: ReturnType<typeof layoutOf>) => number]> = [
    ['the active L1 table', (l) => l.l1],
    ['the L2 table mapping it', (l) => l.l2],
    ['the refcount table', (l) => l.refcountTable],
    ['a refcount block', (l) => l.refcountBlock],
    ['the snapshot table', (l) => l.snapshots],
    ["the snapshot's L1 table", (l) => l.snapshotL1],
  ];
  for (const [what, where] of targets) {
    it(`guest data mapped onto ${what}`, () => {
      const img = path.join(root, `onto-${where.name}-${what.replace(/\W+/g, '-')}.qcow2`);
      const original = fs.readFileSync(bases.rich);
      const l = layoutOf(original);
      const patchedBuf = Buffer.from(original);
      patchedBuf.writeBigUInt64BE((1n << 63n) | BigInt(where(l)), l.l2Data);
      fs.writeFileSync(img, patchedBuf);

      expectOk('mount', qcowfs('mount', img, mnt));
      const raw = path.join(mnt, path.basename(img).replace(/\.qcow2$/, '.raw'));
      const w = limited('dd', ['if=/dev/zero', `of=${raw}`, 'bs=4096', 'count=1', 'conv=notrunc,fsync']);
      expect(w.timedOut).to.equal(false);
      expect(w.status, describeRun('dd write', w)).to.not.equal(0);
      expect(w.stderr, describeRun('dd write', w)).to.match(/Input\/output error/);
      // Every later write is refused; reads are still served.
      const w2 = limited('dd', ['if=/dev/zero', `of=${raw}`, 'bs=4096', 'count=1', 'seek=1280', 'conv=notrunc,fsync']);
      expect(w2.status, describeRun('second dd write', w2)).to.not.equal(0);
      const r = limited('dd', [`if=${raw}`, 'of=/dev/null', 'bs=1M']);
      expect(r.status, describeRun('dd read', r)).to.equal(0);
      expectOk('unmount', qcowfs('unmount', mnt));

      // Nothing changed but QEMU's corrupt bit (incompatible feature bit 1).
      const after = fs.readFileSync(img);
      const expected = Buffer.from(patchedBuf);
      expected.writeUInt32BE(expected.readUInt32BE(H.incompatible + 4) | 2, H.incompatible + 4);
      expect(after.equals(expected), 'only the corrupt bit may change').to.equal(true);
      const info = qcowfs('info', '--json', img);
      expectOk('info', info);
      expect(JSON.parse(info.stdout)['format-specific'].data.corrupt).to.equal(true);
    });
  }
});

// ---------------------------------------------------------------- broken internal snapshots

describe('a broken internal snapshot: refused by snapshot commands, skipped by mount --snapshots', function () {
  this.timeout(120000);
  let root: string;
  let bases: Bases;
  let mnt: string;

  before(() => {
    root = tmpDir('qcowfs-badsnap-');
    bases = makeBases(root);
    mnt = path.join(root, 'mnt');
    fs.mkdirSync(mnt);
  });
  afterEach(() => {
    if (isMounted(mnt) && qcowfs('unmount', mnt).status !== 0) run('umount', ['-l', mnt], { allowFail: true });
  });
  after(() => fs.rmSync(root, { recursive: true, force: true }));

  const broken: Array<[string, (buf: Buffer, l: ReturnType<typeof layoutOf>) => void, RegExp]> = [
    ['L1 table of 2^31 entries', (buf, l) => buf.writeUInt32BE(0x80000000, l.snapshots + 8), /snapshot 's1' L1 table of 2147483648 entries is too large/],
    ['L1 table past the end of the file', (buf, l) => buf.writeBigUInt64BE(1n << 40n, l.snapshots), /snapshot 's1' L1 table.*runs past the end of the file/],
  ];
  broken.forEach(([what, patch, message], i) => {
    it(`snapshot ${what}`, () => {
      const img = path.join(root, `bad-${i}.qcow2`);
      const buf = fs.readFileSync(bases.rich);
      patch(buf, layoutOf(buf));
      fs.writeFileSync(img, buf);

      for (const op of ['-d', '-a']) {
        const r = qcowfs('snapshot', op, 's1', img);
        expectRefused(`snapshot ${op}`, r, op === '-d' ? message : /corrupt/);
        // The refusal happens before anything moves; at most the corrupt bit is set.
        const now = fs.readFileSync(img);
        now.writeUInt32BE(now.readUInt32BE(H.incompatible + 4) & ~2, H.incompatible + 4);
        expect(now.equals(buf), `snapshot ${op} changed the image`).to.equal(true);
      }

      fs.writeFileSync(img, buf);
      const m = qcowfs('mount', '--snapshots', '--read-only', img, mnt);
      expectOk('mount --snapshots', m);
      expect(m.stderr).to.match(/warning: .*snapshot 's1' is not served/);
      expect(fs.readdirSync(mnt)).to.deep.equal([`bad-${i}.raw`]);
      const r = limited('dd', [`if=${path.join(mnt, `bad-${i}.raw`)}`, 'of=/dev/null', 'bs=1M']);
      expect(r.status, describeRun('dd', r)).to.equal(0);
      expectOk('unmount', qcowfs('unmount', mnt));
      expect(fs.readFileSync(img).equals(buf)).to.equal(true);
    });
  });
});
