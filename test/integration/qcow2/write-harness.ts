/**
 * Shared pieces of the write-engine tests: a seeded PRNG, a plain-buffer
 * model of the guest disk, random operations applied to both the engine and
 * the model, and header fields read straight from the image file.
 */
import * as fs from 'fs';
import { Qcow2Image } from '../../../src/qcow2';

/** mulberry32: small, fast, reproducible from one 32-bit seed. */
export class Rng {
  private s: number;
  constructor(readonly seed: number) {
    this.s = seed >>> 0;
  }

  next(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let t = this.s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }

  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.next() * xs.length)];
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i += 4) {
      const v = Math.floor(this.next() * 4294967296) >>> 0;
      for (let j = 0; j < 4 && i + j < n; j++) b[i + j] = (v >>> (j * 8)) & 0xff;
    }
    return b;
  }
}

/** A seed from QCOWFS_SEED, or a fresh one. */
export function testSeed(): number {
  const env = process.env.QCOWFS_SEED;
  if (env) return Number(env) >>> 0;
  return (Date.now() ^ (process.pid << 16)) >>> 0;
}

export type Op =
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'zero'; offset: number; length: number; unmap: boolean }
  | { kind: 'discard'; offset: number; length: number }
  | { kind: 'resize'; size: number };

export function describeOp(op: Op): string {
  switch (op.kind) {
    case 'write': return `write ${op.offset}+${op.data.length}`;
    case 'zero': return `zero ${op.offset}+${op.length} unmap=${op.unmap}`;
    case 'discard': return `discard ${op.offset}+${op.length}`;
    case 'resize': return `resize ${op.size}`;
  }
}

/**
 * The guest disk as the engine should show it: a set of windows holding
 * bytes, zeroes everywhere else. Small disks use one window covering all of
 * it; large sparse disks use a few windows around interesting offsets.
 */
export class Model {
  windows: Array<{ start: number; data: Buffer }>;
  constructor(public size: number, windows: Array<{ start: number; data: Buffer }>) {
    this.windows = windows;
  }

  static whole(content: Buffer): Model {
    return new Model(content.length, [{ start: 0, data: Buffer.from(content) }]);
  }

  get isWhole(): boolean {
    return this.windows.length === 1 && this.windows[0].start === 0 && this.windows[0].data.length === this.size;
  }

  private window(offset: number, length: number): { start: number; data: Buffer } {
    const w = this.windows.find((x) => offset >= x.start && offset + length <= x.start + x.data.length);
    if (!w) throw new Error(`model: range ${offset}+${length} lies outside every window`);
    return w;
  }

  apply(op: Op): void {
    switch (op.kind) {
      case 'write': {
        const w = this.window(op.offset, op.data.length);
        op.data.copy(w.data, op.offset - w.start);
        return;
      }
      case 'zero':
      case 'discard': {
        const w = this.window(op.offset, op.length);
        w.data.fill(0, op.offset - w.start, op.offset - w.start + op.length);
        return;
      }
      case 'resize': {
        if (!this.isWhole) throw new Error('model: resize needs a whole-disk model');
        const next = Buffer.alloc(op.size);
        this.windows[0].data.copy(next, 0, 0, Math.min(op.size, this.size));
        this.windows[0].data = next;
        this.size = op.size;
      }
    }
  }

  /** The model as a raw file of `floor512(size)` bytes (sparse outside windows). */
  writeRaw(file: string): void {
    const size = Math.floor(this.size / 512) * 512;
    const fd = fs.openSync(file, 'w');
    try {
      fs.ftruncateSync(fd, size);
      for (const w of this.windows) {
        const n = Math.min(w.data.length, size - w.start);
        if (n > 0) fs.writeSync(fd, w.data, 0, n, w.start);
      }
    } finally {
      fs.closeSync(fd);
    }
  }
}

export async function applyToEngine(img: Qcow2Image, op: Op): Promise<void> {
  switch (op.kind) {
    case 'write': return img.write(op.data, op.offset);
    case 'zero': return img.writeZeroes(op.offset, op.length, { unmap: op.unmap });
    case 'discard': return img.discard(op.offset, op.length);
    case 'resize': return img.resize(op.size);
  }
}

export interface OpMix {
  clusterSize: number;
  /** Bytes of guest space one L2 table maps. */
  l2Span: number;
  /** Allow resizes (whole-disk models only); sizes stay within [minSize, maxSize]. */
  resize?: { minSize: number; maxSize: number; growOnly?: boolean };
  maxLength?: number;
}

/** An offset near an interesting boundary (cluster, L2 table, window edge), or anywhere. */
function pickOffset(rng: Rng, start: number, end: number, mix: OpMix): number {
  const r = rng.next();
  let off: number;
  if (r < 0.3) {
    const c = rng.int(Math.ceil(start / mix.clusterSize), Math.floor(end / mix.clusterSize));
    off = c * mix.clusterSize + rng.int(-16, 16) * rng.pick([1, 512]);
  } else if (r < 0.45) {
    const t = rng.int(Math.ceil(start / mix.l2Span), Math.floor(end / mix.l2Span));
    off = t * mix.l2Span + rng.int(-3 * mix.clusterSize, 3 * mix.clusterSize);
  } else if (r < 0.55) {
    off = rng.int(start, end) & ~511;
  } else {
    off = rng.int(start, end);
  }
  return Math.max(start, Math.min(off, end - 1));
}

function pickLength(rng: Rng, mix: OpMix): number {
  const max = mix.maxLength ?? 300 * 1024;
  const r = rng.next();
  if (r < 0.3) return rng.int(1, 4096);
  if (r < 0.5) return mix.clusterSize * rng.int(1, Math.max(1, Math.floor(max / mix.clusterSize)));
  if (r < 0.6) return rng.int(1, 8) * 512;
  return rng.int(1, max);
}

/** One random operation inside the model's windows. */
export function randomOp(rng: Rng, model: Model, mix: OpMix): Op {
  if (mix.resize && model.isWhole && rng.chance(0.06)) {
    const { minSize, maxSize } = mix.resize;
    let size: number;
    const r = rng.next();
    if (r < 0.4) size = rng.int(minSize, maxSize);
    else if (r < 0.7) size = Math.max(minSize, Math.min(maxSize, model.size + rng.int(-3, 3) * mix.clusterSize + rng.int(-700, 700)));
    else size = Math.max(minSize, Math.min(maxSize, Math.round(rng.int(minSize, maxSize) / mix.clusterSize) * mix.clusterSize));
    if (size !== model.size && !(mix.resize.growOnly && size < model.size)) return { kind: 'resize', size };
  }
  const w = rng.pick(model.windows);
  const wEnd = Math.min(w.start + w.data.length, model.size);
  const offset = pickOffset(rng, w.start, wEnd, mix);
  const length = Math.min(pickLength(rng, mix), wEnd - offset);
  const r = rng.next();
  if (r < 0.65) return { kind: 'write', offset, data: rng.bytes(length) };
  if (r < 0.85) return { kind: 'zero', offset, length, unmap: rng.chance(0.5) };
  return { kind: 'discard', offset, length };
}

/** The engine's view of every model window, compared byte for byte. */
export async function engineMismatch(img: Qcow2Image, model: Model): Promise<string | null> {
  if (img.virtualSize !== model.size) return `virtual size ${img.virtualSize}, model ${model.size}`;
  for (const w of model.windows) {
    const n = Math.min(w.data.length, model.size - w.start);
    const chunk = 4 * 1024 * 1024;
    for (let done = 0; done < n; done += chunk) {
      const len = Math.min(chunk, n - done);
      const got = Buffer.alloc(len);
      await img.read(got, w.start + done);
      const d = firstDifference(got, w.data.subarray(done, done + len));
      if (d >= 0) return `engine reads differ from the model at guest offset ${w.start + done + d}`;
    }
  }
  return null;
}

export function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  if (a.subarray(0, n).equals(b.subarray(0, n))) return a.length === b.length ? -1 : n;
  let lo = 0;
  let hi = n;
  while (hi - lo > 4096) {
    const mid = (lo + hi) >> 1;
    if (a.subarray(lo, mid).equals(b.subarray(lo, mid))) lo = mid;
    else hi = mid;
  }
  for (let i = lo; i < hi; i++) if (a[i] !== b[i]) return i;
  return n;
}

/** Header fields read from the file itself (qcow2.txt "Header"). */
export function headerFields(file: string): { l1Size: number; l1TableOffset: number; refcountTableOffset: number; refcountTableClusters: number; incompatibleFeatures: bigint; size: number } {
  const fd = fs.openSync(file, 'r');
  try {
    const h = Buffer.alloc(104);
    fs.readSync(fd, h, 0, 104, 0);
    const version = h.readUInt32BE(4);
    return {
      size: Number(h.readBigUInt64BE(24)),
      l1Size: h.readUInt32BE(36),
      l1TableOffset: Number(h.readBigUInt64BE(40)),
      refcountTableOffset: Number(h.readBigUInt64BE(48)),
      refcountTableClusters: h.readUInt32BE(56),
      incompatibleFeatures: version >= 3 ? h.readBigUInt64BE(72) : 0n,
    };
  } finally {
    fs.closeSync(fd);
  }
}
