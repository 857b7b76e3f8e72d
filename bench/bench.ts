/**
 * The benchmark: qcowfs against qemu-storage-daemon's FUSE export of the same
 * image, and a plain raw file as the upper bound, measured in one run on one
 * machine. Every figure is the median of several runs; compare the ratios,
 * not the absolute numbers, on a shared machine.
 *
 *   npm run bench [-- --quick] [-- --runs N] [-- --size-gib N] [-- --out FILE]
 *                 [-- --only seqread,randread,seqwrite,ddwrite,randwrite,sparse,compressed,ext4,memory]
 *
 * --only runs just the named workloads (a partial run is printed, never
 * written to RESULTS.md).
 *
 * Needs root (drop_caches, losetup, mounts), qemu-img, qemu-io,
 * qemu-storage-daemon and fio (scripts/install-deps.sh installs them).
 */
import { spawn, spawnSync, ChildProcess } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

const ROOT = path.resolve(__dirname, '../..');
const BIN = path.join(ROOT, 'bin/qcowfs');
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

const tibName = '1 TiB sparse image, mount + 64 MiB read';

/**
 * The rows timed in seconds (cp --sparse, the ext4 workload) take about a
 * second a round, and one slow round of the machine moves the median of five:
 * in a full run with five rounds, qcowfs was ahead in 4 rounds of the ext4 row
 * and still had the larger median (0.92 s against 0.88, its three slow rounds
 * against QEMU's two). They run this many times more rounds.
 */
const SHORT_ROUNDS = 3;
const WORKLOADS = ['seqread', 'randread', 'seqwrite', 'ddwrite', 'randwrite', 'sparse', 'compressed', 'ext4', 'memory'] as const;
type Workload = (typeof WORKLOADS)[number];

interface Args { quick: boolean; runs: number; sizeGiB: number; out: string; seconds: number; only: Set<Workload> | null }

function parseArgs(argv: string[]): Args {
  const a: Args = { quick: false, runs: 5, sizeGiB: 4, out: path.join(ROOT, 'bench/RESULTS.md'), seconds: 8, only: null };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    if (k === '--quick') { a.quick = true; a.runs = 1; a.sizeGiB = 0.25; a.seconds = 2; }
    else if (k === '--runs') a.runs = Number(argv[++i]);
    else if (k === '--size-gib') a.sizeGiB = Number(argv[++i]);
    else if (k === '--seconds') a.seconds = Number(argv[++i]);
    else if (k === '--out') a.out = path.resolve(argv[++i]);
    else if (k === '--only') {
      const names = (argv[++i] ?? '').split(',').filter(Boolean);
      const bad = names.filter((n) => !(WORKLOADS as readonly string[]).includes(n));
      if (bad.length > 0 || names.length === 0) throw new Error(`--only takes a list of: ${WORKLOADS.join(', ')}`);
      a.only = new Set(names as Workload[]);
    }
    else throw new Error(`unknown option ${k}`);
  }
  return a;
}

/**
 * The commands each workload ran, as RESULTS.md lists them: recorded as they
 * run (not written out by hand beside the code), each once per workload, with
 * the run's scratch directory written $WORK and its random names XXXXXX.
 */
const commands = {
  /** The workload now running ("" before any: making the images). */
  section: '',
  /** True while a timed stretch runs: its commands are marked. */
  timing: false,
  /** The run's scratch directory, written $WORK. */
  work: '',
  /** The file being measured (a server's file, or the raw twin), written $FILE. */
  file: '',
  bySection: new Map<string, string[]>(),
};

function quote(arg: string): string {
  return /^[\w@%+=:,./$-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'\\''`)}'`;
}

/** Note a command line of the current workload (once, however many runs repeat it). */
function record(line: string): void {
  let l = line;
  if (commands.file !== '') l = l.split(commands.file).join('$FILE');
  if (commands.work !== '') l = l.split(commands.work).join('$WORK');
  l = l.split(`${process.execPath} ${BIN}`).join('bin/qcowfs').replace(/\b(qcowfs-mnt|qsd-mnt|ext4)-[A-Za-z0-9]{6}\b/g, '$1-XXXXXX').replace(/\/dev\/loop\d+/g, '/dev/loopN');
  if (commands.timing) l += '    # timed';
  let list = commands.bySection.get(commands.section);
  if (list === undefined) commands.bySection.set(commands.section, (list = []));
  if (!list.includes(l)) list.push(l);
}

function sh(cmd: string, args: string[], opts: { input?: string; allowFail?: boolean; quiet?: boolean } = {}): string {
  if (!opts.quiet) record([cmd, ...args].map(quote).join(' '));
  const r = spawnSync(cmd, args, { input: opts.input, encoding: 'utf8', maxBuffer: 64 * MiB });
  if (r.status !== 0 && !opts.allowFail) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr || r.error?.message}`);
  return r.stdout;
}

function dropCaches(): void {
  record('sync; echo 3 > /proc/sys/vm/drop_caches');
  spawnSync('sync');
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
}

function seconds(fn: () => void): number {
  commands.timing = true;
  try {
    const t = process.hrtime.bigint();
    fn();
    return Number(process.hrtime.bigint() - t) / 1e9;
  } finally {
    commands.timing = false;
  }
}

/** Which server goes first alternates from run to run, so neither always inherits the other's after-effects. */
function order(run: number): readonly ('qcowfs' | 'qemu')[] {
  return run % 2 === 0 ? ['qcowfs', 'qemu'] : ['qemu', 'qcowfs'];
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function sleep(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function isMounted(p: string): boolean {
  return fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === p);
}

/** Whether process pid still runs (an exited child waiting to be reaped does not). */
function running(pid: number): boolean {
  try {
    // "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ')'.
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat[stat.lastIndexOf(')') + 2] !== 'Z';
  } catch {
    return false;
  }
}

/** A served view of an image: the file to use and how to stop it. */
interface Served { file: string; pid: number; stop(): void }

function serveQcowfs(image: string, dir: string, extra: string[] = []): Served {
  const mnt = fs.mkdtempSync(path.join(dir, 'qcowfs-mnt-'));
  sh(process.execPath, [BIN, 'mount', ...extra, image, mnt]);
  const rec = JSON.parse(sh(process.execPath, ['-e', `const s=require(${JSON.stringify(path.join(ROOT, 'dist/src/cli/state.js'))});process.stdout.write(JSON.stringify(s.readRecord(${JSON.stringify(mnt)})))`], { quiet: true })) as { pid: number };
  const base = path.basename(image).replace(/\.[^.]*$/, '');
  return {
    file: path.join(mnt, `${base}.raw`),
    pid: rec.pid,
    stop: () => {
      sh(process.execPath, [BIN, 'unmount', mnt], { allowFail: true });
      if (isMounted(mnt)) sh('umount', ['-l', mnt], { allowFail: true });
      fs.rmSync(mnt, { recursive: true, force: true });
    },
  };
}

function serveQemu(image: string, dir: string): Served {
  const file = path.join(fs.mkdtempSync(path.join(dir, 'qsd-mnt-')), 'disk.raw');
  fs.writeFileSync(file, '');
  const args = [
    '--blockdev', `driver=file,node-name=file0,filename=${image},cache.direct=off`,
    '--blockdev', 'driver=qcow2,node-name=fmt0,file=file0',
    '--export', `type=fuse,id=exp0,node-name=fmt0,mountpoint=${file},writable=on,growable=off`,
  ];
  record(`touch ${file}; ${['qemu-storage-daemon', ...args].map(quote).join(' ')} &`);
  const child: ChildProcess = spawn('qemu-storage-daemon', args, { stdio: ['ignore', 'ignore', 'inherit'] });
  for (let i = 0; i < 200 && !isMounted(file); i++) sleep(50);
  if (!isMounted(file)) throw new Error('qemu-storage-daemon did not mount its export');
  return {
    file,
    pid: child.pid!,
    stop: () => {
      record('kill -TERM $QSD_PID');
      child.kill('SIGTERM');
      for (let i = 0; i < 200 && isMounted(file); i++) sleep(50);
      if (isMounted(file)) sh('umount', ['-l', file], { allowFail: true });
      // The export goes before the process does: until it has exited it holds the image's
      // lock, and the next server of that image would fail to take it.
      for (let i = 0; i < 200 && running(child.pid!); i++) sleep(50);
      fs.rmSync(path.dirname(file), { recursive: true, force: true });
    },
  };
}

/** Run fn, measuring `s`: its file is written $FILE in the commands recorded meanwhile. */
function measuring<T>(s: Served, fn: () => T): T {
  commands.file = s.file;
  try {
    return fn();
  } finally {
    commands.file = '';
  }
}

function serveRaw(rawFile: string): Served {
  return { file: rawFile, pid: 0, stop: () => {} };
}

function peakRssMiB(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

function fio(file: string, opts: string[]): { iops: number; bw: number } {
  const out = sh('fio', ['--output-format=json', `--filename=${file}`, '--name=job', ...opts]);
  const j = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ read: { iops: number; bw_bytes: number }; write: { iops: number; bw_bytes: number } }> };
  const job = j.jobs[0];
  return { iops: job.read.iops + job.write.iops, bw: job.read.bw_bytes + job.write.bw_bytes };
}

interface Row {
  name: string; unit: string; qcowfs: number; qemu: number; raw?: number; higherIsBetter: boolean;
  /** Every run's figure, in run order: the spread behind each median. */
  runs: Record<string, number[]>;
}

/** Stop early, with one line, when a tool the benchmark runs is missing. */
function preflight(): void {
  if (process.getuid?.() !== 0) fail('the benchmark needs root (drop_caches, losetup, mounts)');
  const missing = ['qemu-img', 'qemu-io', 'qemu-storage-daemon', 'fio', 'losetup', 'mkfs.ext4', 'dd', 'tar']
    .filter((t) => spawnSync('sh', ['-c', `command -v ${t}`]).status !== 0);
  if (missing.length > 0) fail(`missing tools: ${missing.join(', ')} (scripts/install-deps.sh installs them)`);
  if (!fs.existsSync(path.join(ROOT, 'dist/src/cli/main.js'))) fail('qcowfs is not built (npm run build)');
}

function fail(message: string): never {
  process.stderr.write(`bench: ${message}\n`);
  process.exit(2);
}

function main(): void {
  let a: Args;
  try {
    a = parseArgs(process.argv.slice(2));
  } catch (e) {
    fail((e as Error).message);
  }
  preflight();
  const want = (w: Workload): boolean => a.only === null || a.only.has(w);
  const work = fs.mkdtempSync(path.join('/var/tmp', 'qcowfs-bench-'));
  commands.work = work;
  commands.section = 'images';
  const rows: Row[] = [];
  const log = (s: string) => process.stderr.write(`${s}\n`);
  const size = Math.round(a.sizeGiB * GiB / MiB) * MiB;
  const running: Served[] = [];
  const serve = (kind: 'qcowfs' | 'qemu', image: string, qcowfsArgs: string[] = []): Served => {
    const s = kind === 'qcowfs' ? serveQcowfs(image, work, qcowfsArgs) : serveQemu(image, work);
    running.push(s);
    return s;
  };
  const stop = (s: Served) => { s.stop(); running.splice(running.indexOf(s), 1); };
  try {
    // Images: a fully allocated one, its raw twin, and a compressed one.
    log(`images in ${work} (${size / MiB} MiB)`);
    const full = path.join(work, 'full.qcow2');
    const raw = path.join(work, 'full.raw');
    sh('fio', ['--name=fill', `--filename=${raw}`, `--size=${size}`, '--rw=write', '--bs=1M', '--refill_buffers=1', '--buffer_compress_percentage=50', '--output=/dev/null']);
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, full]);
    const compressed = path.join(work, 'compressed.qcow2');
    if (want('compressed')) sh('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, compressed]);

    // `image` is a path, or a function making a fresh image for every server and run;
    // `withRaw` as a function makes a fresh raw file for every run.
    const measure = (name: string, unit: string, higherIsBetter: boolean, withRaw: boolean | (() => string), run: (s: Served, kind: string) => number, image: string | (() => string) = full, qcowfsArgs: string[] = [], rounds = a.runs) => {
      const res: Record<string, number[]> = { qcowfs: [], qemu: [], raw: [] };
      commands.section = name;
      for (let r = 0; r < rounds; r++) {
        for (const kind of order(r)) {
          const s = serve(kind, typeof image === 'string' ? image : image(), qcowfsArgs);
          try {
            res[kind].push(measuring(s, () => run(s, kind)));
          } finally {
            stop(s);
          }
        }
        if (withRaw) {
          const s = serveRaw(typeof withRaw === 'function' ? withRaw() : raw);
          res.raw.push(measuring(s, () => run(s, 'raw')));
        }
      }
      const row: Row = { name, unit, qcowfs: median(res.qcowfs), qemu: median(res.qemu), higherIsBetter, ...(withRaw ? { raw: median(res.raw) } : {}), runs: res };
      rows.push(row);
      log(`${name}: qcowfs ${row.qcowfs.toFixed(1)} ${unit}, qemu ${row.qemu.toFixed(1)} ${unit}${withRaw ? `, raw ${row.raw!.toFixed(1)} ${unit}` : ''}`);
    };

    // 1. Sequential read, 1 MiB requests, cold cache.
    const peak: Record<string, number> = {};
    // `ddFlags` empty: through the page cache, dropped first; ['iflag=direct']: past it.
    const seqRead = (ddFlags: string[]) => (s: Served, kind: string): number => {
      dropCaches();
      const t = seconds(() => sh('dd', [`if=${s.file}`, 'of=/dev/null', 'bs=1M', `count=${size / MiB}`, ...ddFlags]));
      if (s.pid && ddFlags.length === 0) peak[`seqread-${kind}`] = Math.max(peak[`seqread-${kind}`] ?? 0, peakRssMiB(s.pid));
      return size / t / 1e6;
    };
    if (want('seqread')) measure('sequential read 1M (cold)', 'MB/s', true, true, seqRead([]));
    // The same with `mount --direct-io` (no kernel page cache above the daemon).
    if (want('seqread')) measure('sequential read 1M (cold), qcowfs --direct-io', 'MB/s', true, true, seqRead([]), full, ['--direct-io']);
    // The same read with O_DIRECT (the issue's other way to a cold cache): no server fills a
    // page cache, and every reader's data lands in dd's one reused buffer.
    if (want('seqread')) measure('sequential read 1M, O_DIRECT (dd iflag=direct)', 'MB/s', true, true, seqRead(['iflag=direct']));
    // 2. Random 4 KiB reads.
    if (want('randread')) measure('random read 4K, iodepth 1', 'IOPS', true, true, (s) => {
      dropCaches();
      return fio(s.file, ['--rw=randread', '--bs=4k', '--ioengine=psync', '--direct=1', '--time_based', `--runtime=${a.seconds}`]).iops;
    });
    if (want('randread')) measure('random read 4K, iodepth 16', 'IOPS', true, true, (s) => {
      dropCaches();
      return fio(s.file, ['--rw=randread', '--bs=4k', '--ioengine=libaio', '--iodepth=16', '--direct=1', '--time_based', `--runtime=${a.seconds}`]).iops;
    });
    // 3. Sequential write of 1 GiB into a fresh image, ending with fsync.
    const writeSize = Math.min(GiB, size);
    const fresh = (): string => {
      const p = path.join(work, 'fresh.qcow2');
      fs.rmSync(p, { force: true });
      sh('qemu-img', ['create', '-q', '-f', 'qcow2', p, String(size)]);
      return p;
    };
    const seqWriteName = `sequential write ${writeSize / MiB} MiB + fsync`;
    const ddWriteName = `dd ${writeSize / MiB} MiB into a fresh image, conv=fsync (write-only open)`;
    const randWriteName = 'random write 4K + fsync';
    // Listed in the order of their rows, though dd's source is made first.
    for (const [w, name] of [['seqwrite', seqWriteName], ['ddwrite', ddWriteName], ['randwrite', randWriteName]] as const) {
      if (want(w)) commands.bySection.set(name, []);
    }
    const res3: Record<string, number[]> = { qcowfs: [], qemu: [] };
    const res4: Record<string, number[]> = { qcowfs: [], qemu: [] };
    const res3dd: Record<string, number[]> = { qcowfs: [], qemu: [] };
    // dd's source: random bytes, read once so that the page cache serves them to every run.
    const ddSource = path.join(work, 'dd-source.bin');
    commands.section = ddWriteName;
    if (want('ddwrite')) {
      sh('fio', ['--name=src', `--filename=${ddSource}`, `--size=${writeSize}`, '--rw=write', '--bs=1M', '--refill_buffers=1', '--output=/dev/null']);
      sh('dd', [`if=${ddSource}`, 'of=/dev/null', 'bs=1M', 'status=none']);
    }
    const once = (kind: 'qcowfs' | 'qemu', run: (s: Served) => void): void => {
      const s = serve(kind, fresh());
      try {
        measuring(s, () => run(s));
      } finally {
        stop(s);
      }
    };
    for (let r = 0; r < a.runs; r++) {
      for (const kind of order(r)) {
        commands.section = seqWriteName;
        if (want('seqwrite')) once(kind, (s) => {
          const t = seconds(() => sh('fio', ['--name=w', `--filename=${s.file}`, '--rw=write', '--bs=1M', `--size=${writeSize}`, '--end_fsync=1', '--ioengine=psync', '--output=/dev/null']));
          res3[kind].push(writeSize / t / 1e6);
          peak[`seqwrite-${kind}`] = Math.max(peak[`seqwrite-${kind}`] ?? 0, peakRssMiB(s.pid));
        });
        // The same write as a user copies an image in: dd opens the file write-only.
        commands.section = ddWriteName;
        if (want('ddwrite')) once(kind, (s) => {
          const t = seconds(() => sh('dd', [`if=${ddSource}`, `of=${s.file}`, 'bs=1M', 'conv=notrunc,fsync', 'status=none']));
          res3dd[kind].push(writeSize / t / 1e6);
        });
        commands.section = randWriteName;
        if (want('randwrite')) once(kind, (s) => {
          res4[kind].push(fio(s.file, ['--rw=randwrite', '--bs=4k', '--ioengine=psync', `--size=${Math.min(256 * MiB, size)}`, '--time_based', `--runtime=${a.seconds}`, '--end_fsync=1']).iops);
        });
      }
    }
    if (want('seqwrite')) rows.push({ name: seqWriteName, unit: 'MB/s', qcowfs: median(res3.qcowfs), qemu: median(res3.qemu), higherIsBetter: true, runs: res3 });
    if (want('ddwrite')) rows.push({ name: ddWriteName, unit: 'MB/s', qcowfs: median(res3dd.qcowfs), qemu: median(res3dd.qemu), higherIsBetter: true, runs: res3dd });
    if (want('randwrite')) rows.push({ name: randWriteName, unit: 'IOPS', qcowfs: median(res4.qcowfs), qemu: median(res4.qemu), higherIsBetter: true, runs: res4 });
    log(`writes: ${JSON.stringify({ res3, res3dd, res4 })}`);
    fs.rmSync(ddSource, { force: true });
    // 5. cp --sparse=always of a 64 GiB image holding 256 MiB of data.
    if (want('sparse')) {
      const sparseName = 'cp --sparse=always, 64 GiB with 256 MiB data';
      commands.section = sparseName;
      const sparse = path.join(work, 'sparse.qcow2');
      sh('qemu-img', ['create', '-q', '-f', 'qcow2', sparse, '64G']);
      const cmds: string[] = [];
      for (let i = 0; i < 16; i++) cmds.push('-c', `write -P ${i + 1} ${i * 4}G 16M`);
      sh('qemu-io', ['-f', 'qcow2', ...cmds, sparse]);
      const copy = (s: Served): number => {
        const out = path.join(work, 'copy.raw');
        fs.rmSync(out, { force: true });
        dropCaches();
        const t = seconds(() => sh('cp', ['--sparse=always', s.file, out]));
        fs.rmSync(out, { force: true });
        return t;
      };
      measure(sparseName, 's', false, false, copy, sparse, [], a.runs * SHORT_ROUNDS);
      // The same copy with no kernel page cache above qcowfs (QEMU's export keeps its cache).
      measure(`${sparseName}, qcowfs --direct-io`, 's', false, false, copy, sparse, ['--direct-io'], a.runs * SHORT_ROUNDS);
    }
    // 6. Sequential read of a compressed image.
    if (want('compressed')) measure('sequential read, zlib-compressed image', 'MB/s', true, false, (s) => {
      dropCaches();
      const t = seconds(() => sh('dd', [`if=${s.file}`, 'of=/dev/null', 'bs=1M']));
      return size / t / 1e6;
    }, compressed);
    // 7. Loop-mounted ext4: untar a tree of small files, sync, read it back.
    if (want('ext4')) {
      const tree = path.join(work, 'tree');
      const files = a.quick ? 500 : 3000;
      const ext4Name = `ext4 on loop: untar ${files} files, sync, read back`;
      commands.section = ext4Name;
      for (let d = 0; d < files / 100; d++) {
        fs.mkdirSync(path.join(tree, `d${d}`), { recursive: true });
        for (let f = 0; f < 100; f++) fs.writeFileSync(path.join(tree, `d${d}`, `f${f}`), Buffer.alloc(1024 + ((d * 100 + f) % 16) * 512, d + f));
      }
      const tarball = path.join(work, 'tree.tar');
      sh('tar', ['cf', tarball, '-C', tree, '.']);
      sh('sync', []); // the first run's sync must not also write out the tree made here
      // The raw column: the same on a loop device over a sparse raw file, with no FUSE between.
      const freshRaw = (): string => {
        const p = path.join(work, 'fresh.raw');
        fs.rmSync(p, { force: true });
        fs.writeFileSync(p, '');
        fs.truncateSync(p, size);
        return p;
      };
      measure(ext4Name, 's', false, freshRaw, (s) => {
        const loop = sh('losetup', ['--find', '--show', s.file]).trim();
        const m = fs.mkdtempSync(path.join(work, 'ext4-'));
        try {
          sh('mkfs.ext4', ['-q', '-F', loop]);
          sh('mount', [loop, m]);
          const t = seconds(() => {
            sh('tar', ['xf', tarball, '-C', m]);
            sh('sync', []);
            dropCaches();
            // Through a pipe: GNU tar writing to /dev/null skips reading the files at all.
            sh('bash', ['-o', 'pipefail', '-c', 'tar cf - -C "$1" . | cat > /dev/null', 'bash', m]);
          });
          return t;
        } finally {
          sh('umount', [m], { allowFail: true });
          sh('losetup', ['-d', loop], { allowFail: true });
          fs.rmSync(m, { recursive: true, force: true });
        }
      }, fresh, [], a.runs * SHORT_ROUNDS);
    }
    // 8. Peak memory on a 1 TiB sparse image.
    if (want('memory')) {
      commands.section = tibName;
      const tib = path.join(work, 'tib.qcow2');
      sh('qemu-img', ['create', '-q', '-f', 'qcow2', tib, '1T']);
      for (const kind of ['qcowfs', 'qemu'] as const) {
        const s = serve(kind, tib);
        try {
          measuring(s, () => sh('dd', [`if=${s.file}`, 'of=/dev/null', 'bs=1M', 'count=64', 'skip=500000']));
          peak[`tib-${kind}`] = peakRssMiB(s.pid);
        } finally {
          stop(s);
        }
      }
    }
    const text = report(a, rows, peak, touchSpeed());
    process.stdout.write(text);
    if (!a.quick && a.only === null) fs.writeFileSync(a.out, text);
  } finally {
    for (const s of [...running]) s.stop();
    fs.rmSync(work, { recursive: true, force: true });
  }
}

/**
 * How fast this machine's CPU writes into memory it has just been given, and
 * into the same memory again (GB/s). Cold reads through any FUSE server fill
 * fresh page-cache pages with the CPU, where a raw file's are filled by the
 * disk: on a virtual machine that hands freed memory back to its host, every
 * such page pays the first figure's price.
 */
function touchSpeed(): { first: number; again: number } {
  const n = 512 * MiB;
  const buf = Buffer.allocUnsafeSlow(n);
  const first = seconds(() => buf.fill(1));
  const again = seconds(() => buf.fill(2));
  return { first: n / first / 1e9, again: n / again / 1e9 };
}

/** In how many rounds qcowfs beat QEMU (each round runs both, one after the other), as "k of n". */
function ahead(r: Row): string {
  const n = Math.min(r.runs.qcowfs.length, r.runs.qemu.length);
  let k = 0;
  for (let i = 0; i < n; i++) {
    const [q, m] = [r.runs.qcowfs[i], r.runs.qemu[i]];
    if (r.higherIsBetter ? q > m : q < m) k++;
  }
  return `${k} of ${n}`;
}

function report(a: Args, rows: Row[], peak: Record<string, number>, touch: { first: number; again: number }): string {
  const v = (cmd: string, args: string[]) => sh(cmd, args, { allowFail: true, quiet: true }).split('\n')[0].trim();
  const fmt = (n: number) => (n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2));
  const lines = [
    '# qcowfs benchmark',
    '',
    `Run ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC on ${os.cpus().length} cores, ${Math.round(os.totalmem() / GiB)} GiB, Linux ${os.release()};`,
    `node ${process.version}, ${v('qemu-storage-daemon', ['--version'])}, ${v('fio', ['--version'])}.`,
    `Image ${a.sizeGiB} GiB, median of ${a.runs} runs (${a.runs * SHORT_ROUNDS} for the rows timed in seconds, which take about one), fio runs of ${a.seconds} s.`,
    'The machine is shared: read the ratios, taken in the same run.',
    `Memory written for the first time: ${touch.first.toFixed(2)} GB/s; the same memory again: ${touch.again.toFixed(1)} GB/s (see "cold reads" below).`,
    '',
    'qcowfs: `qcowfs mount` (kernel transport). QEMU: `qemu-storage-daemon --export type=fuse` of the same image.',
    'raw: the same bytes as a plain raw file on the same disk (the upper bound).',
    '',
    '| workload | unit | qcowfs | QEMU FUSE | raw | qcowfs / QEMU | qcowfs ahead in | qcowfs / raw |',
    '|---|---|---:|---:|---:|---:|---:|---:|',
  ];
  for (const r of rows) {
    const ratio = r.higherIsBetter ? r.qcowfs / r.qemu : r.qemu / r.qcowfs;
    const rawRatio = r.raw === undefined ? '' : (r.higherIsBetter ? r.qcowfs / r.raw : r.raw / r.qcowfs).toFixed(2);
    lines.push(`| ${r.name} | ${r.unit} | ${fmt(r.qcowfs)} | ${fmt(r.qemu)} | ${r.raw === undefined ? '' : fmt(r.raw)} | ${ratio.toFixed(2)} | ${ahead(r)} | ${rawRatio} |`);
  }
  lines.push(
    '',
    'Ratios are "how many times better qcowfs is" (for times: QEMU time / qcowfs time). "qcowfs ahead in":',
    'of the runs, in how many qcowfs did better than QEMU in the same round (a ratio near 1.0 with about',
    'half the rounds each way is a tie on this machine).',
    '',
  );
  lines.push(
    'Cold reads: the disk fills a raw file\'s page cache; a FUSE server\'s is filled by the CPU, which copies',
    'each reply into fresh pages (and the reader then copies it out again). Each of those pages pays the price',
    'of memory written for the first time (the figure above, low on a virtual machine that hands freed memory',
    'back to its host); the raw file\'s do not. The O_DIRECT row fills no fresh pages, for any reader.',
    '',
  );
  lines.push('Every run, in run order (the spread behind each median; the two servers alternate who goes first):', '');
  lines.push('| workload | qcowfs | QEMU FUSE | raw |', '|---|---|---|---|');
  const list = (xs: number[] | undefined) => (xs ?? []).map(fmt).join(' / ');
  for (const r of rows) lines.push(`| ${r.name} | ${list(r.runs.qcowfs)} | ${list(r.runs.qemu)} | ${list(r.runs.raw)} |`);
  lines.push('');
  lines.push('| daemon peak RSS (VmHWM) | qcowfs MiB | QEMU MiB |', '|---|---:|---:|');
  for (const [label, key] of [['sequential read', 'seqread'], ['sequential write', 'seqwrite'], [tibName, 'tib']]) {
    if (peak[`${key}-qcowfs`] === undefined) continue; // not run (--only)
    lines.push(`| ${label} | ${fmt(peak[`${key}-qcowfs`])} | ${fmt(peak[`${key}-qemu`] ?? NaN)} |`);
  }
  lines.push('');
  lines.push(
    '## Commands',
    '',
    'As run, for each workload, each command once, where it first ran: every run repeats them, the two',
    'servers alternating who goes first, and the commands on $FILE run for each server and the raw column.',
    '$FILE is the file measured: the raw file of the qcowfs mount, the file QEMU\'s export mounts over, or',
    'for the raw column the same bytes as a raw file ($WORK/full.raw; for ext4 a new sparse $WORK/fresh.raw).',
    '$WORK is the run\'s scratch directory under /var/tmp, XXXXXX a random name; `# timed` marks what the',
    'figure times (fio reports its own IOPS). The peak RSS is VmHWM of the daemon\'s /proc/PID/status.',
    '',
  );
  for (const [section, list] of commands.bySection) {
    lines.push(`### ${section}`, '', '```', ...list, '```', '');
  }
  return lines.join('\n').replace(/\n+$/, '') + '\n';
}

main();
