import { spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { OptionSpec, Parsed, flag, value, UsageError } from '../args';
import { Command, writeErr } from '../command';
import { CliError, describeError, EXIT_FAILURE } from '../exit';
import { Qcow2Image } from '../../qcow2/image';
import { CorruptImageError } from '../../qcow2/errors';
import { parseSize } from '../../qcow2/layout';
import { ImageFs, MountedFile } from '../../fs/image-fs';
import { ImageBackend } from '../../fs/backend';
import { readPartitionTable, PartitionWatch, WatchedDisk, PartitionBackend } from '../../fs/partitions';
import { errnoOf } from '../../fs/errno';
import { FuseMount, MountOptions } from '../../fuse/filesystem';
import { mountKernel, canMountKernel } from '../../fuse/mount';
import { ensureThreadpool } from '../../fuse/session';
import { IDLE_POLL_MAX_US } from '../../fuse/idle-poll';
import { FuseFilesystem } from '../../fuse/filesystem';
import { writeRecord, removeRecord, logPath, ensureStateDir, readRecord, processAlive } from '../state';

const options: OptionSpec[] = [
  { name: 'read-only', short: 'r', help: 'serve the images read-only' },
  { name: 'snapshot', short: 's', value: true, meta: 'NAME', help: 'serve the image as of this internal snapshot (id or name); implies --read-only' },
  { name: 'partitions', help: 'also serve each partition of an MBR or GPT disk as IMAGE-pN.raw' },
  { name: 'snapshots', help: 'also serve every internal snapshot, read-only, as IMAGE@NAME.raw' },
  { name: 'allow-other', help: 'let other users access the mount (libfuse: needs user_allow_other in /etc/fuse.conf)' },
  { name: 'foreground', short: 'f', help: 'stay in the foreground; by default the daemon detaches once the mount is usable' },
  { name: 'transport', value: true, meta: 'kernel|libfuse', help: 'kernel: the FUSE protocol over /dev/fuse (needs root); libfuse: through fusermount (unprivileged). Default: kernel when allowed' },
  { name: 'l2-cache', value: true, meta: 'SIZE', help: 'bytes of L2 tables cached per image (default 32M)' },
  { name: 'refcount-cache', value: true, meta: 'SIZE', help: 'bytes of refcount blocks cached per image (default 4M)' },
  { name: 'direct-io', help: 'bypass the kernel page cache: faster big sequential transfers, far slower small reads; shared mmap needs Linux 6.6+ (kernel transport only)' },
  { name: 'max-request', value: true, meta: 'SIZE', help: 'largest read/write request to negotiate (default 1M)' },
  { name: 'idle-poll', value: true, meta: 'USEC', help: `once every request is answered, keep polling for the next for up to USEC microseconds, adapting to the gaps seen (default ${IDLE_POLL_MAX_US}; 0: sleep at once; kernel transport only)` },
  { name: 'debug', short: 'd', help: 'print one line per FUSE request to stderr (implies --foreground)' },
  { name: 'ready-fd', value: true, meta: 'FD', help: '(internal) report readiness on this descriptor' },
  { name: 'help', short: 'h', help: 'show this help' },
];

/** The libfuse transport, loaded only when used (it brings a native module). */
function libfuse(): { mountLibfuse(fs: FuseFilesystem, opts: MountOptions): Promise<FuseMount>; libfuseAvailable(): boolean } {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return require('../../fuse/libfuse');
}

/** `img.qcow2` -> `img` */
function stem(image: string): string {
  const base = path.basename(image);
  const ext = path.extname(base);
  return ext ? base.slice(0, -ext.length) : base;
}

/** `img.qcow2` -> `img.raw`. */
export function rawName(image: string): string {
  return `${stem(image)}.raw`;
}

/**
 * The file name of a snapshot view: `img@NAME.raw`, with '/', '%', NUL and
 * other control characters written as %XX so every name is a valid file name.
 */
export function snapshotFileName(image: string, snapshotName: string): string {
  const escaped = snapshotName.replace(/[%/\x00-\x1f\x7f]/g, (c) => `%${c.charCodeAt(0).toString(16).padStart(2, '0').toUpperCase()}`);
  return `${stem(image)}@${escaped}.raw`;
}

interface MountPlan {
  images: string[];
  mountpoint: string;
  rootIsFile: boolean;
  readOnly: boolean;
  snapshot?: string;
  transport: 'kernel' | 'libfuse';
  l2CacheBytes?: number;
  refcountCacheBytes?: number;
  maxRequestBytes: number;
  allowOther: boolean;
  debug: boolean;
  snapshots: boolean;
  partitions: boolean;
  directIo: boolean;
  idlePollUs: number;
}

function sizeOption(p: Parsed, name: string): number | undefined {
  const v = value(p, name);
  if (v === undefined) return undefined;
  try {
    return parseSize(v);
  } catch {
    throw new UsageError(`--${name}: invalid size '${v}'`);
  }
}

function plan(p: Parsed): MountPlan {
  if (p.positional.length < 2) throw new UsageError('mount takes one or more images and a mountpoint');
  const images = p.positional.slice(0, -1).map((i) => path.resolve(i));
  const mountpoint = path.resolve(p.positional[p.positional.length - 1]);
  for (const img of images) {
    if (!fs.existsSync(img)) throw new CliError(`${img}: no such image`);
  }
  let st: fs.Stats;
  try {
    st = fs.statSync(mountpoint);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTCONN') throw new CliError(`${mountpoint}: a dead mount is still there; run \`qcowfs unmount ${mountpoint}\` first`);
    throw new CliError(`mountpoint ${mountpoint} does not exist`);
  }
  const rec = readRecord(mountpoint);
  if (rec && processAlive(rec.pid)) throw new CliError(`${mountpoint} is already a qcowfs mount (daemon pid ${rec.pid}); unmount it first`);
  const rootIsFile = st.isFile();
  if (!rootIsFile && !st.isDirectory()) throw new CliError(`mountpoint ${mountpoint} is neither a directory nor a regular file`);
  if (rootIsFile && images.length !== 1) throw new UsageError('a regular file as mountpoint takes exactly one image');
  if (rootIsFile && (flag(p, 'snapshots') || flag(p, 'partitions'))) throw new UsageError('--snapshots and --partitions need a directory as mountpoint');
  if (!rootIsFile) {
    const names = new Map<string, string>();
    for (const img of images) {
      const n = rawName(img);
      const other = names.get(n);
      if (other) throw new UsageError(`${other} and ${img} would both appear as ${n}`);
      names.set(n, img);
    }
  }
  const t = value(p, 'transport');
  if (t !== undefined && t !== 'kernel' && t !== 'libfuse') throw new UsageError(`unknown transport '${t}' (kernel or libfuse)`);
  const transport = (t as 'kernel' | 'libfuse' | undefined) ?? (canMountKernel() ? 'kernel' : 'libfuse');
  if (flag(p, 'direct-io') && transport === 'libfuse') throw new UsageError('--direct-io needs the kernel transport (libfuse 2 cannot set it per file)');
  const snapshot = value(p, 'snapshot');
  const idlePoll = value(p, 'idle-poll');
  if (idlePoll !== undefined && !/^\d{1,7}$/.test(idlePoll)) throw new UsageError(`--idle-poll: invalid number of microseconds '${idlePoll}'`);
  return {
    images,
    mountpoint,
    rootIsFile,
    readOnly: flag(p, 'read-only') || snapshot !== undefined,
    snapshot,
    transport,
    l2CacheBytes: sizeOption(p, 'l2-cache'),
    refcountCacheBytes: sizeOption(p, 'refcount-cache'),
    maxRequestBytes: Math.min(sizeOption(p, 'max-request') ?? 1024 * 1024, 1024 * 1024),
    allowOther: flag(p, 'allow-other'),
    debug: flag(p, 'debug'),
    snapshots: flag(p, 'snapshots'),
    partitions: flag(p, 'partitions'),
    directIo: flag(p, 'direct-io'),
    idlePollUs: idlePoll === undefined ? IDLE_POLL_MAX_US : Number(idlePoll),
  };
}

async function openImages(pl: MountPlan, blockingReads: (() => boolean) | undefined): Promise<Qcow2Image[]> {
  const out: Qcow2Image[] = [];
  try {
    for (const file of pl.images) {
      // What sequential reads and writes have moved of the image leaves the host's cache a few
      // MiB behind them (FileDevice, STREAM_LAG). Through the kernel's page cache, the mount keeps
      // what it serves in the raw file's pages. With --direct-io nothing keeps it, and it is still
      // dropped: each read is a round trip to the daemon, which bounds a re-read however it reads
      // the image (cp of 256 MiB: 0.46-0.64 s read again from the disk, 0.46-0.52 s from the host's
      // cache), while a stream that reuses its pages does not fill fresh ones (the first, cold cp
      // 0.54-0.65 s against 0.84-1.03 s; a 1 GiB sequential write 608-669 MB/s against 253-260).
      const opts = {
        readOnly: pl.readOnly, snapshot: pl.snapshot, l2CacheBytes: pl.l2CacheBytes, refcountCacheBytes: pl.refcountCacheBytes,
        dropBehind: true, blockingReads,
      };
      let img: Qcow2Image;
      try {
        img = await Qcow2Image.openFile(file, opts);
      } catch (err) {
        if (!(err instanceof CorruptImageError) || pl.readOnly) throw err;
        // Corruption in what only writing uses (QEMU's corrupt bit, the refcount
        // structure): the data is still readable, so serve it read-only and say why.
        img = await Qcow2Image.openFile(file, { ...opts, readOnly: true, allowCorrupt: true }).catch(() => { throw err; });
        if (err.structure === 'header' && err.hostOffset === 72) {
          writeErr(`qcowfs: warning: ${file} is marked corrupt; serving it read-only (repair with \`qcowfs check --repair\`)\n`);
        } else {
          writeErr(`qcowfs: warning: ${file}: ${err.message}; serving it read-only\n`);
        }
      }
      out.push(img);
    }
    return out;
  } catch (err) {
    for (const img of out) await img.close().catch(() => {});
    throw err;
  }
}

/** Serve the mount in this process until it is unmounted. */
async function serve(pl: MountPlan, readyFd: number | null): Promise<number> {
  ensureThreadpool();
  // A small read of the image is made on the spot while the request it serves is the
  // only one the mount has: nothing else waits for the event loop meanwhile.
  // QCOWFS_NO_BLOCKING_READS=1 turns it off.
  let filesystem: ImageFs | undefined;
  const blockingReads = process.env.QCOWFS_NO_BLOCKING_READS === '1'
    ? undefined
    : (): boolean => filesystem?.connection?.soleRequest?.() ?? false;
  const images = await openImages(pl, blockingReads);
  const files: MountedFile[] = images.map((img, i) => ({
    name: rawName(pl.images[i]),
    backend: new ImageBackend(img),
    hostPath: pl.images[i],
    directIo: pl.directIo,
  }));
  if (pl.partitions) {
    for (let i = 0; i < images.length; i++) {
      const disk = files[i].backend;
      const table = await readPartitionTable(async (o, l) => {
        const b = Buffer.alloc(l);
        await disk.read(b, o);
        return b;
      }, disk.size());
      if (!table) {
        writeErr(`qcowfs: warning: ${pl.images[i]} has no MBR or GPT partition table; no partition files\n`);
        continue;
      }
      const watch = new PartitionWatch(disk, table);
      files[i] = { ...files[i], backend: new WatchedDisk(disk, watch), window: { disk, start: 0 } };
      for (const part of table.partitions) {
        // Uncached, so a partition file stops serving the moment its table changes.
        files.push({
          name: `${stem(pl.images[i])}-p${part.number}.raw`, backend: new PartitionBackend(disk, watch, part), hostPath: pl.images[i],
          directIo: true, window: { disk, start: part.start },
        });
      }
    }
  }
  if (pl.snapshots) {
    // Each snapshot is its own read-only view of the image file.
    const active = images.length;
    for (let i = 0; i < active; i++) {
      for (const snap of images[i].snapshots) {
        // The active view already holds this file's locks for this process.
        let view: Qcow2Image;
        try {
          view = await Qcow2Image.openFile(pl.images[i], {
            snapshot: snap.id, readOnly: true, allowCorrupt: true, l2CacheBytes: pl.l2CacheBytes, lock: false, blockingReads,
          });
        } catch (err) {
          // One broken snapshot does not take the image and the other snapshots down with it.
          if (!(err instanceof CorruptImageError)) throw err;
          writeErr(`qcowfs: warning: ${pl.images[i]}: snapshot '${snap.name}' is not served: ${err.message}\n`);
          continue;
        }
        images.push(view);
        files.push({ name: snapshotFileName(pl.images[i], snap.name), backend: new ImageBackend(view), hostPath: pl.images[i], directIo: pl.directIo });
      }
    }
  }
  filesystem = new ImageFs(files, {
    rootIsFile: pl.rootIsFile,
    uid: process.getuid?.() ?? 0,
    gid: process.getgid?.() ?? 0,
  });
  const mountOpts: MountOptions & { requestTimeoutMs: number; readers: number; idlePollUs: number } = {
    mountpoint: pl.mountpoint,
    rootIsFile: pl.rootIsFile,
    readOnly: pl.readOnly,
    allowOther: pl.allowOther,
    fsname: pl.images.length === 1 ? pl.images[0] : 'qcowfs',
    subtype: 'qcowfs',
    debug: pl.debug,
    maxRequestBytes: pl.maxRequestBytes,
    maxInFlight: 16,
    errnoOf,
    // A slow flush is still a flush: never answer EIO while the engine is working.
    requestTimeoutMs: 0,
    // Device reads kept waiting for requests: 4 measured best for queued random I/O here.
    readers: 4,
    idlePollUs: pl.idlePollUs,
  };
  let mount: FuseMount;
  try {
    if (pl.transport === 'kernel') {
      mount = await mountKernel(filesystem, mountOpts);
    } else {
      const lf = libfuse();
      if (!lf.libfuseAvailable()) throw new CliError('the libfuse transport is not available here (fuse-native or fusermount missing)');
      mount = await lf.mountLibfuse(filesystem, mountOpts);
    }
  } catch (err) {
    for (const img of images) await img.close().catch(() => {});
    throw err;
  }
  raiseReadahead(pl.mountpoint, pl.maxRequestBytes);
  writeRecord({ pid: process.pid, mountpoint: pl.mountpoint, images: pl.images, transport: pl.transport, log: readyFd !== null ? logPath(pl.mountpoint) : null });
  if (readyFd !== null) {
    fs.writeSync(readyFd, 'READY\n');
    fs.closeSync(readyFd);
  }
  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    const m = mount as FuseMount & { unmount(o?: { force?: boolean }): Promise<void> };
    m.unmount({ force: true }).catch((err: unknown) => writeErr(`qcowfs: unmounting ${pl.mountpoint}: ${describeError(err).message}\n`));
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  process.on('SIGHUP', stop);
  let code = 0;
  try {
    await mount.done;
  } catch (err) {
    writeErr(`qcowfs: ${describeError(err).message}\n`);
    code = EXIT_FAILURE;
  }
  for (const img of images) {
    try {
      await img.close();
    } catch (err) {
      writeErr(`qcowfs: closing ${img.filename}: ${describeError(err).message}\n`);
      code = EXIT_FAILURE;
    }
  }
  removeRecord(pl.mountpoint, process.pid);
  if (readyFd !== null && code === 0) fs.rmSync(logPath(pl.mountpoint), { force: true });
  if (pl.transport === 'libfuse') {
    // fuse-native keeps a native handle referenced after the unmount; nothing is left to do.
    setImmediate(() => process.exit(code));
  }
  return code;
}

/**
 * The kernel caps a FUSE mount's readahead at its default (128 KiB), whatever
 * INIT asks for; raising the mount's backing-device readahead lets sequential
 * reads arrive as requests of up to `bytes`. Best effort: needs root.
 */
function raiseReadahead(mountpoint: string, bytes: number): void {
  try {
    // Never stat the mountpoint here: this process serves it, a blocking call on it would hang.
    // /proc/self/mountinfo names the mount's device: "id parent MAJ:MIN root mountpoint ...".
    const line = fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')
      .map((l) => l.split(' '))
      .filter((f) => f[4] === mountpoint.replace(/[ \t\n\\]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`))
      .pop();
    if (!line) return;
    fs.writeFileSync(`/sys/class/bdi/${line[2]}/read_ahead_kb`, String(Math.max(128, Math.floor(bytes / 1024))));
  } catch {
    // not root, or no sysfs: the kernel's default readahead stays
  }
}

/** Start the daemon in the background and wait until its mount is usable (or it failed). */
async function detach(p: Parsed): Promise<number> {
  const pl = plan(p); // validate here so usage errors are reported by the parent
  ensureStateDir();
  const log = logPath(pl.mountpoint);
  const logFd = fs.openSync(log, 'w');
  const bin = path.resolve(__dirname, '../../../../bin/qcowfs');
  const args = [bin, 'mount', '--foreground', '--ready-fd', '3', ...rawArgs(p)];
  const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', logFd, logFd, 'pipe'] });
  fs.closeSync(logFd);
  const pipe = child.stdio[3] as NodeJS.ReadableStream;
  let said = '';
  pipe.setEncoding('utf8');
  pipe.on('data', (s: string) => { said += s; });
  const exitCode = await new Promise<number | null>((resolve) => {
    let settled = false;
    pipe.on('end', () => { if (!settled && said.startsWith('READY')) { settled = true; resolve(null); } });
    child.on('exit', (code) => { if (!settled) { settled = true; resolve(code ?? EXIT_FAILURE); } });
  });
  if (exitCode === null) {
    child.unref();
    (pipe as unknown as { destroy(): void }).destroy();
    // Warnings the daemon gave while starting (a corrupt image served read-only, ...).
    const warnings = fs.readFileSync(log, 'utf8').split('\n').filter((l) => l.startsWith('qcowfs: warning:'));
    if (warnings.length > 0) writeErr(warnings.join('\n') + '\n');
    return 0;
  }
  // The daemon failed before the mount was usable: pass on what it said.
  const text = fs.existsSync(log) ? fs.readFileSync(log, 'utf8').trim() : '';
  fs.rmSync(log, { force: true });
  if (text) writeErr(text.split('\n').filter((l) => l.startsWith('qcowfs:')).join('\n') + '\n');
  return exitCode || EXIT_FAILURE;
}

/** The user's arguments, for handing on to the daemon. */
function rawArgs(p: Parsed): string[] {
  const out: string[] = [];
  for (const [k, vs] of p.options) {
    if (k === 'foreground' || k === 'ready-fd') continue;
    for (const v of vs) out.push(v === '' && !options.find((o) => o.name === k)?.value ? `--${k}` : `--${k}=${v}`);
  }
  return [...out, '--', ...p.positional];
}

async function run(p: Parsed): Promise<number> {
  const readyFdText = value(p, 'ready-fd');
  if (flag(p, 'foreground') || flag(p, 'debug') || readyFdText !== undefined) {
    const pl = plan(p);
    return serve(pl, readyFdText !== undefined ? Number(readyFdText) : null);
  }
  return detach(p);
}

export const mountCommand: Command = {
  name: 'mount',
  summary: 'serve images as raw files in a directory (or over a regular file)',
  usage: 'qcowfs mount IMAGE... MOUNTPOINT [options]',
  details: [
    'MOUNTPOINT is a directory that then holds one file per image, named after the image',
    'with .raw in place of its extension (img.qcow2 -> img.raw). If MOUNTPOINT is a regular',
    'file and one image is given, the raw view is mounted over that file itself.',
    '',
    'Transports: "kernel" speaks the FUSE protocol over /dev/fuse and needs root; it serves',
    'SEEK_DATA/SEEK_HOLE and fallocate (punch hole, zero range). "libfuse" mounts through the',
    'setuid fusermount for unprivileged users; libfuse 2 offers neither lseek nor fallocate,',
    'so on it `cp --sparse` finds no holes and hole punching fails with EOPNOTSUPP.',
    '',
    'Stop with `qcowfs unmount MOUNTPOINT` (or SIGINT/SIGTERM to the daemon): everything is',
    'flushed to the image before the daemon exits.',
  ].join('\n'),
  options,
  run,
};
