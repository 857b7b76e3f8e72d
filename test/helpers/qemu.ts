/** Helpers that drive the real QEMU tools, the oracle of the tests. */
import { execFileSync, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

export function run(cmd: string, args: string[], opts: { input?: Buffer | string; allowFail?: boolean; cwd?: string } = {}): { stdout: string; stderr: string; status: number } {
  const r = spawnSync(cmd, args, { input: opts.input, cwd: opts.cwd, maxBuffer: 256 * 1024 * 1024 });
  const out = { stdout: r.stdout?.toString() ?? '', stderr: r.stderr?.toString() ?? '', status: r.status ?? -1 };
  if (!opts.allowFail && out.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} failed (${out.status}): ${out.stderr || out.stdout}`);
  }
  return out;
}

export function qemuImg(...args: string[]): string {
  return run('qemu-img', args).stdout;
}

/** qemu-io with -c commands, image opened with an explicit format. */
export function qemuIo(image: string, cmds: string[], opts: { format?: string; extra?: string[] } = {}): string {
  const args = ['-f', opts.format ?? 'qcow2', ...(opts.extra ?? [])];
  for (const c of cmds) args.push('-c', c);
  args.push(image);
  return run('qemu-io', args).stdout;
}

/** The raw contents of an image as QEMU sees them. */
export function qemuRaw(image: string, opts: { snapshot?: string; imageOpts?: boolean } = {}): Buffer {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-raw-'));
  try {
    const out = path.join(dir, 'out.raw');
    const args = ['convert'];
    if (opts.snapshot) args.push('-l', `snapshot.name=${opts.snapshot}`);
    if (opts.imageOpts) args.push('--image-opts', image, '-O', 'raw', out);
    else args.push('-O', 'raw', image, out);
    run('qemu-img', args);
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export interface QemuCheck {
  leaks?: number;
  corruptions?: number;
  'check-errors': number;
  'image-end-offset'?: number;
  'allocated-clusters'?: number;
  'total-clusters'?: number;
}

export function qemuCheck(image: string): QemuCheck {
  const r = run('qemu-img', ['check', '--output=json', image], { allowFail: true });
  if (!r.stdout.trim()) throw new Error(`qemu-img check gave no JSON: ${r.stderr}`);
  return JSON.parse(r.stdout) as QemuCheck;
}

/** Assert-friendly: "clean" when no leaks, corruptions or errors. */
export function qemuCheckSummary(image: string): string {
  const c = qemuCheck(image);
  return `leaks=${c.leaks ?? 0} corruptions=${c.corruptions ?? 0} errors=${c['check-errors']}`;
}

export function qemuMap(image: string): Array<Record<string, unknown>> {
  return JSON.parse(qemuImg('map', '--output=json', image)) as Array<Record<string, unknown>>;
}

export function qemuInfo(image: string): Record<string, unknown> {
  return JSON.parse(qemuImg('info', '--output=json', image)) as Record<string, unknown>;
}

export function tmpDir(prefix = 'qcowfs-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function haveCommand(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** A deterministic pseudo-random buffer. */
export function patternBuffer(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i += 4) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    if (i + 4 <= length) b.writeUInt32LE(x, i);
    else for (let j = i; j < length; j++) b[j] = (x >>> ((j - i) * 8)) & 0xff;
  }
  return b;
}
