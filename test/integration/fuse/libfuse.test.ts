/**
 * The libfuse transport (fuse-native through fusermount), mounted for real:
 * an in-memory filesystem served from this process as root, then from a
 * child process running as `nobody` (the unprivileged case the transport
 * exists for), then the CLI serving a qcow2 image, as root and as nobody.
 *
 * This process serves the root mounts itself: everything that touches them
 * runs in a child process (real tools: stat, cmp, dd, truncate, ls), never a
 * synchronous call here, which would wait on the very thread that answers.
 *
 * Run directly (`node libfuse.test.js MOUNTPOINT [allow-other]`), this file
 * is the child: it mounts the same in-memory filesystem, says READY, and
 * says DONE when the mount has ended.
 */
import { expect } from 'chai';
import { ChildProcess, execFile, spawn } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import {
  type Attr, type AttrReply, type ConnectionInfo, type DirEntry, type Entry, FUSE_ROOT_ID, FuseErrno, type FuseFilesystem,
  type NodeId, type OpenReply, type RequestContext, type SetattrChanges, type Statfs,
} from '../../../src/fuse/filesystem';
import {
  fitStatfs, LIBFUSE2_MAX_REQUEST, libfuseAvailable, libfuseOptions, LibfuseMount, type LibfuseMountOptions, mountLibfuse,
} from '../../../src/fuse/libfuse';
import { qemuCheck, qemuImg, qemuIo, qemuRaw, run, tmpDir } from '../../helpers/qemu';

const E = os.constants.errno;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const FILE = 'disk.raw';
const FILE_NODE: NodeId = 2;
const SIZE = 4 * 1024 * 1024;

/** Byte i of the child's file: both sides know it without passing data. */
function pattern(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 7 + (i >>> 12)) & 0xff;
  return b;
}

/** An error the filesystem throws that only the test's errnoOf knows: ENOSPC. */
class FullError extends Error {
  readonly full = true;
}

/** A root directory holding one file backed by a Buffer; it records what it was asked. */
class MemoryFile implements FuseFilesystem {
  conn: ConnectionInfo | undefined;
  destroyed = 0;
  maxWrite = 0;
  inFlightReads = 0;
  peakInFlightReads = 0;
  readDelayMs = 0;
  /** Writes reaching past this offset fail with FullError. */
  writeLimit = Infinity;
  initError: Error | undefined;
  times: Array<{ atimeMs?: number | 'now'; mtimeMs?: number | 'now' }> = [];
  private readonly uid = process.getuid?.() ?? 0;
  private readonly gid = process.getgid?.() ?? 0;
  private mtimeMs = Date.now();

  constructor(public data: Buffer) {}

  init(conn: ConnectionInfo): void {
    if (this.initError) throw this.initError;
    this.conn = conn;
  }

  async destroy(): Promise<void> {
    this.destroyed++;
  }

  private attr(node: NodeId): Attr {
    const dir = node === FUSE_ROOT_ID;
    return {
      ino: node, size: dir ? 0 : this.data.length, blocks: dir ? 0 : Math.ceil(this.data.length / 512),
      atimeMs: this.mtimeMs, mtimeMs: this.mtimeMs, ctimeMs: this.mtimeMs,
      mode: dir ? S_IFDIR | 0o755 : S_IFREG | 0o644, nlink: dir ? 2 : 1,
      uid: this.uid, gid: this.gid, rdev: 0, blksize: 4096,
    };
  }

  async lookup(_ctx: RequestContext, parent: NodeId, name: string): Promise<Entry> {
    if (parent !== FUSE_ROOT_ID || name !== FILE) throw new FuseErrno(E.ENOENT);
    return { nodeid: FILE_NODE, generation: 1, attr: this.attr(FILE_NODE), entryTimeoutMs: 1000, attrTimeoutMs: 1000 };
  }

  async getattr(_ctx: RequestContext, node: NodeId): Promise<AttrReply> {
    return { attr: this.attr(node), attrTimeoutMs: 1000 };
  }

  async setattr(_ctx: RequestContext, node: NodeId, changes: SetattrChanges): Promise<AttrReply> {
    if (changes.size !== undefined) {
      const resized = Buffer.alloc(changes.size);
      this.data.copy(resized, 0, 0, Math.min(changes.size, this.data.length));
      this.data = resized;
    }
    if (changes.atimeMs !== undefined || changes.mtimeMs !== undefined) {
      this.times.push({ atimeMs: changes.atimeMs, mtimeMs: changes.mtimeMs });
      if (changes.mtimeMs !== undefined) this.mtimeMs = changes.mtimeMs === 'now' ? Date.now() : changes.mtimeMs;
    }
    return { attr: this.attr(node), attrTimeoutMs: 1000 };
  }

  async statfs(): Promise<Statfs> {
    const blocks = Math.ceil(this.data.length / 4096);
    return { blocks, bfree: 0, bavail: 0, files: 2, ffree: 0, bsize: 4096, namelen: 255, frsize: 4096 };
  }

  async open(): Promise<OpenReply> {
    return { fh: 11 };
  }

  async read(_ctx: RequestContext, node: NodeId, fh: number, offset: number, size: number): Promise<Buffer> {
    expect([node, fh]).to.deep.equal([FILE_NODE, 11]);
    this.inFlightReads++;
    this.peakInFlightReads = Math.max(this.peakInFlightReads, this.inFlightReads);
    try {
      if (this.readDelayMs > 0) await new Promise((r) => setTimeout(r, this.readDelayMs));
      return Buffer.from(this.data.subarray(offset, offset + size));
    } finally {
      this.inFlightReads--;
    }
  }

  async write(_ctx: RequestContext, _node: NodeId, _fh: number, offset: number, data: Buffer): Promise<number> {
    this.maxWrite = Math.max(this.maxWrite, data.length);
    if (offset + data.length > this.writeLimit) throw new FullError('no room left');
    if (offset + data.length > this.data.length) {
      const grown = Buffer.alloc(offset + data.length);
      this.data.copy(grown);
      this.data = grown;
    }
    data.copy(this.data, offset);
    return data.length;
  }

  async release(): Promise<void> {}

  async readdir(): Promise<DirEntry[]> {
    return [
      { name: '.', ino: FUSE_ROOT_ID, type: S_IFDIR },
      { name: '..', ino: FUSE_ROOT_ID, type: S_IFDIR },
      { name: FILE, ino: FILE_NODE, type: S_IFREG },
    ];
  }
}

function mountOptions(mountpoint: string, extra: Partial<LibfuseMountOptions> = {}): LibfuseMountOptions {
  return {
    mountpoint,
    rootIsFile: false,
    readOnly: false,
    allowOther: false,
    fsname: 'memory,test',
    subtype: 'qcowfs',
    debug: false,
    maxRequestBytes: 1024 * 1024,
    maxInFlight: 16,
    errnoOf: (err) => (err instanceof FullError ? E.ENOSPC : E.EIO),
    ...extra,
  };
}

// --- the unprivileged child -------------------------------------------------------------------

async function childMain(): Promise<void> {
  const [mountpoint, mode] = process.argv.slice(2);
  const filesystem = new MemoryFile(pattern(SIZE));
  let mount: LibfuseMount;
  try {
    mount = await mountLibfuse(filesystem, mountOptions(mountpoint, { allowOther: mode === 'allow-other' }));
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    process.stdout.write(`ERROR ${e.code} ${e.message}\n`);
    process.exitCode = 1;
    return;
  }
  process.stdout.write(`READY ${JSON.stringify(filesystem.conn)}\n`);
  await mount.done;
  // Nothing keeps this process alive now: it exits by itself.
  process.stdout.write(`DONE ${filesystem.destroyed} ${filesystem.data.length}\n`);
}

// --- helpers of the tests ---------------------------------------------------------------------

interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

const AS_NOBODY = ['setpriv', '--reuid=nobody', '--regid=nogroup', '--clear-groups'];

/** Run a command in a child process without blocking this one (it may be serving the mount). */
function sh(cmd: string, args: string[], opts: { asNobody?: boolean } = {}): Promise<Ran> {
  const [file, ...argv] = opts.asNobody ? [...AS_NOBODY, cmd, ...args] : [cmd, ...args];
  return new Promise((resolve) => {
    execFile(file, argv, { encoding: 'buffer', maxBuffer: 64 * 1024 * 1024, env: { ...process.env, LC_ALL: 'C' } }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      resolve({ code, stdout: stdout.toString('latin1'), stderr: stderr.toString() });
    });
  });
}

async function ok(cmd: string, args: string[], opts: { asNobody?: boolean } = {}): Promise<string> {
  const r = await sh(cmd, args, opts);
  expect(r.code, `${cmd} ${args.join(' ')}: ${r.stderr}`).to.equal(0);
  return r.stdout;
}

function mountLine(mountpoint: string): string | undefined {
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').find((l) => l.split(' ')[4] === mountpoint);
}

function sha256(b: Buffer): string {
  return crypto.createHash('sha256').update(b).digest('hex');
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms); }),
  ]);
}

/** Whatever a test left mounted goes: fusermount -u, then umount -l as a last resort. */
async function forceUnmount(mountpoint: string): Promise<void> {
  if (!mountLine(mountpoint)) return;
  await sh('fusermount', ['-u', mountpoint]);
  if (mountLine(mountpoint)) await sh('fusermount', ['-uz', mountpoint]);
  if (mountLine(mountpoint)) await sh('umount', ['-l', mountpoint]);
}

/**
 * Stock Debian has /dev/fuse 0666 (fusermount opens it as the calling user);
 * this machine may not: open it up for the enclosing describe, then restore it.
 */
function openFuseDeviceToUsers(): void {
  let mode: number | undefined;
  before(() => {
    mode = fs.statSync('/dev/fuse').mode & 0o7777;
    fs.chmodSync('/dev/fuse', 0o666);
  });
  after(() => {
    if (mode !== undefined) fs.chmodSync('/dev/fuse', mode);
  });
}

/**
 * Stock Debian (systemd) mounts fusectl at /sys/fs/fuse/connections, where the
 * transport tells a mount's connection from a later one; mount it for the
 * enclosing describe if this machine has not, and take it down afterwards.
 */
function withFusectl(): void {
  let mountedHere = false;
  before(async () => {
    const mounted = fs.readFileSync('/proc/self/mounts', 'utf8').split('\n').some((l) => l.split(' ')[2] === 'fusectl');
    if (!mounted && process.getuid?.() === 0) {
      await ok('mount', ['-t', 'fusectl', 'none', '/sys/fs/fuse/connections']);
      mountedHere = true;
    }
  });
  after(async () => {
    if (mountedHere) await sh('umount', ['/sys/fs/fuse/connections']);
  });
}

// --- the tests --------------------------------------------------------------------------------

function tests(): void {
  describe('libfuse transport (fuse-native)', function () {
    this.timeout(60_000);
    withFusectl();

    it('is available: fuse-native loads against libfuse.so.2 and fusermount is installed', () => {
      expect(libfuseAvailable()).to.equal(true);
    });

    it('passes ro, big_writes and a 128 KiB cap to libfuse, and fits statfs counts into 32 bits', () => {
      const opts = libfuseOptions(mountOptions('/x', { readOnly: true, allowOther: true, maxRequestBytes: 1 << 20, fsname: 'a\\b,c' }));
      expect(opts).to.include.members(['ro', 'allow_other', 'big_writes', `max_write=${LIBFUSE2_MAX_REQUEST}`, `max_read=${LIBFUSE2_MAX_REQUEST}`, 'subtype=qcowfs']);
      expect(opts).to.include('fsname=a\\\\b\\,c');
      expect(libfuseOptions(mountOptions('/x', { maxRequestBytes: 10_000 }))).to.include('max_write=8192');
      const s = fitStatfs({ blocks: 2 ** 34, bfree: 2 ** 33, bavail: 2 ** 33, files: 1, ffree: 0, bsize: 4096, namelen: 255, frsize: 4096 });
      expect(s.blocks * s.frsize).to.equal(2 ** 34 * 4096);
      expect(s.bfree * s.frsize).to.equal(2 ** 33 * 4096);
      expect(s.blocks).to.be.at.most(0xffffffff);
    });

    describe('served from this process (root)', () => {
      let dir: string;
      let mnt: string;
      let memfs: MemoryFile;
      let want: Buffer;
      let mount: LibfuseMount | undefined;

      beforeEach(async () => {
        dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-libfuse-'));
        mnt = path.join(dir, 'mnt');
        fs.mkdirSync(mnt);
        want = crypto.randomBytes(SIZE);
        memfs = new MemoryFile(Buffer.from(want));
        mount = undefined;
      });

      afterEach(async () => {
        if (mount) await withTimeout(mount.unmount({ force: true }), 10_000, 'unmount').catch(() => undefined);
        await forceUnmount(mnt);
        fs.rmSync(dir, { recursive: true, force: true });
      });

      async function mountIt(extra: Partial<LibfuseMountOptions> = {}): Promise<LibfuseMount> {
        mount = await mountLibfuse(memfs, mountOptions(mnt, extra));
        return mount;
      }

      function reference(name: string, data: Buffer): string {
        const p = path.join(dir, name);
        fs.writeFileSync(p, data);
        return p;
      }

      it('resolves only once usable, and tells init that libfuse 2 has neither lseek nor fallocate', async () => {
        const m = await mountIt();
        expect(m.transport).to.equal('libfuse');
        expect(m.mountpoint).to.equal(mnt);
        // Usable at once: the first look from another process is answered.
        expect((await ok('stat', ['-c', '%s %F', path.join(mnt, FILE)])).trim()).to.equal(`${SIZE} regular file`);
        expect(memfs.conn).to.deep.include({ supportsLseek: false, supportsFallocate: false, maxWrite: LIBFUSE2_MAX_REQUEST, maxRead: LIBFUSE2_MAX_REQUEST });
        const line = mountLine(mnt) ?? '';
        expect(line).to.match(/ - fuse\.qcowfs memory,test rw,/);
      });

      it('lists the directory and reads the file byte for byte (cmp), with the statfs it reports', async () => {
        await mountIt();
        expect((await ok('ls', ['-a1', mnt])).split('\n').filter(Boolean)).to.deep.equal(['.', '..', FILE]);
        await ok('cmp', [reference('want', want), path.join(mnt, FILE)]);
        const df = (await ok('stat', ['-f', '-c', '%S %b', mnt])).trim().split(' ').map(Number);
        expect(df[0] * df[1]).to.equal(SIZE);
        const missing = await sh('stat', [path.join(mnt, 'nope')]);
        expect(missing.code).to.not.equal(0);
        expect(missing.stderr).to.match(/No such file or directory/);
      });

      it('writes in place with dd conv=notrunc, in requests of up to 128 KiB', async () => {
        await mountIt();
        const patch = crypto.randomBytes(3 * 1024 * 1024);
        const src = reference('patch', patch);
        // 3 MiB at offset 512 KiB + 4 KiB: unaligned to the requests, inside the file.
        await ok('dd', [`if=${src}`, `of=${path.join(mnt, FILE)}`, 'bs=1M', 'oflag=seek_bytes', `seek=${512 * 1024 + 4096}`, 'conv=notrunc,fsync', 'status=none']);
        patch.copy(want, 512 * 1024 + 4096);
        expect(memfs.data.length).to.equal(SIZE);
        expect(sha256(memfs.data)).to.equal(sha256(want));
        expect(memfs.maxWrite).to.be.greaterThan(4096).and.at.most(LIBFUSE2_MAX_REQUEST);
        await ok('cmp', [reference('want', want), path.join(mnt, FILE)]);
      });

      it('truncates with truncate -s, growing with zeroes and shrinking', async () => {
        await mountIt();
        const file = path.join(mnt, FILE);
        await ok('truncate', ['-s', String(SIZE + 12345), file]);
        expect((await ok('stat', ['-c', '%s', file])).trim()).to.equal(String(SIZE + 12345));
        await ok('cmp', [reference('grown', Buffer.concat([want, Buffer.alloc(12345)])), file]);
        await ok('truncate', ['-s', '1M', file]);
        expect((await ok('stat', ['-c', '%s', file])).trim()).to.equal(String(1024 * 1024));
        expect(memfs.data.length).to.equal(1024 * 1024);
        await ok('cmp', [reference('shrunk', want.subarray(0, 1024 * 1024)), file]);
      });

      it('serves concurrent readers at once, up to maxInFlight, each reading its own range right', async () => {
        memfs.readDelayMs = 30;
        await mountIt({ maxInFlight: 3 });
        const readers = 8;
        const part = SIZE / readers;
        const outs = Array.from({ length: readers }, (_, i) => path.join(dir, `part${i}`));
        await Promise.all(outs.map((out, i) => ok('dd', [`if=${path.join(mnt, FILE)}`, `of=${out}`, `bs=${part}`, `skip=${i}`, 'count=1', 'status=none'])));
        outs.forEach((out, i) => expect(fs.readFileSync(out).equals(want.subarray(i * part, (i + 1) * part)), `part ${i}`).to.equal(true));
        expect(memfs.peakInFlightReads).to.be.greaterThan(1).and.at.most(3);
      });

      it("maps the filesystem's errors through errnoOf (ENOSPC here) and FuseErrno as is", async () => {
        memfs.writeLimit = 64 * 1024;
        await mountIt();
        const r = await sh('dd', ['if=/dev/zero', `of=${path.join(mnt, FILE)}`, 'bs=4k', 'seek=100', 'count=1', 'conv=notrunc,fsync', 'status=none']);
        expect(r.code).to.not.equal(0);
        expect(r.stderr).to.match(/No space left on device/);
        expect(sha256(memfs.data)).to.equal(sha256(want));
        const missing = await sh('cat', [path.join(mnt, 'other')]);
        expect(missing.stderr).to.match(/No such file or directory/);
      });

      it('sets times with touch (both stamps to the access time: the limit of fuse-native)', async () => {
        await mountIt();
        const file = path.join(mnt, FILE);
        await ok('touch', ['-d', '2001-02-03 04:05:06 UTC', file]);
        const at = Date.UTC(2001, 1, 3, 4, 5, 6);
        expect(memfs.times).to.deep.equal([{ atimeMs: at, mtimeMs: at }]);
        expect((await ok('stat', ['-c', '%Y', file])).trim()).to.equal(String(at / 1000));
        const before = Date.now();
        await ok('touch', [file]);
        const now = memfs.times[1];
        expect(now.atimeMs).to.be.a('number').within(before - 1000, Date.now() + 1000);
        expect(now.mtimeMs).to.equal(now.atimeMs);
        // One stamp alone: libfuse 2 drops the change.
        await ok('touch', ['-m', '-d', '2005-01-01 UTC', file]);
        expect(memfs.times).to.have.length(2);
      });

      it('mounts read-only: writes and truncation fail with EROFS, reads work', async () => {
        await mountIt({ readOnly: true });
        expect(mountLine(mnt)).to.match(/ ro[ ,]/);
        const file = path.join(mnt, FILE);
        const w = await sh('dd', ['if=/dev/zero', `of=${file}`, 'bs=4k', 'count=1', 'conv=notrunc', 'status=none']);
        expect(w.stderr).to.match(/Read-only file system/);
        const t = await sh('truncate', ['-s', '0', file]);
        expect(t.stderr).to.match(/Read-only file system/);
        await ok('cmp', [reference('want', want), file]);
        expect(memfs.maxWrite).to.equal(0);
      });

      it('unmount() ends the session: destroy runs once, done resolves, the mount is gone', async () => {
        const m = await mountIt();
        await ok('cmp', [reference('want', want), path.join(mnt, FILE)]);
        await m.unmount();
        await m.done;
        expect(memfs.destroyed).to.equal(1);
        expect(mountLine(mnt)).to.equal(undefined);
        await m.unmount();
        expect(memfs.destroyed).to.equal(1);
      });

      it('an unmount from outside (fusermount -u) settles done', async () => {
        const m = await mountIt();
        await ok('fusermount', ['-u', mnt]);
        await withTimeout(m.done, 5000, 'done after fusermount -u');
        expect(memfs.destroyed).to.equal(1);
      });

      it('regression: an unmount from outside is noticed though a new mount at once takes the same connection number', async () => {
        const first = await mountIt();
        await ok('fusermount', ['-u', mnt]);
        // The kernel hands the freed device minor, and so the fusectl name, to the next mount.
        const second = await mountLibfuse(new MemoryFile(Buffer.alloc(4096)), mountOptions(mnt));
        try {
          await withTimeout(first.done, 5000, 'done of the first mount');
          expect(memfs.destroyed).to.equal(1);
          expect((await ok('stat', ['-c', '%s', path.join(mnt, FILE)])).trim()).to.equal('4096');
        } finally {
          await withTimeout(second.unmount({ force: true }), 10_000, 'unmount of the second mount');
        }
      });

      it('a busy mount refuses unmount() with EBUSY; force detaches it and the session ends at the last close', async () => {
        const m = await mountIt();
        const holder = spawn('sh', ['-c', 'exec 3<"$1"; echo held; read line', 'sh', path.join(mnt, FILE)], { stdio: ['pipe', 'pipe', 'inherit'] });
        try {
          await new Promise<void>((r) => holder.stdout!.once('data', () => r()));
          const err = await m.unmount().then(() => null, (e: NodeJS.ErrnoException) => e);
          expect(err?.code).to.equal('EBUSY');
          expect(mountLine(mnt)).to.not.equal(undefined);
          const forced = m.unmount({ force: true });
          await new Promise((r) => setTimeout(r, 600));
          // Detached, but a file on it is still open: the session goes on.
          expect(mountLine(mnt)).to.equal(undefined);
          expect(memfs.destroyed).to.equal(0);
          holder.stdin!.end('\n');
          await withTimeout(forced, 5000, 'forced unmount');
          expect(memfs.destroyed).to.equal(1);
        } finally {
          holder.kill();
        }
      });

      it('refuses a regular file as mountpoint, saying that fuse-native cannot', async () => {
        const file = path.join(dir, 'over-me');
        fs.writeFileSync(file, 'x');
        const err = await mountLibfuse(memfs, mountOptions(file, { rootIsFile: true })).then(() => null, (e: NodeJS.ErrnoException) => e);
        expect(err?.code).to.equal('ENOTSUP');
        expect(err?.message).to.match(/regular file.*fuse-native mounts on directories only/);
        expect(mountLine(file)).to.equal(undefined);
      });

      it("rejects with the filesystem's init error and leaves nothing mounted", async () => {
        memfs.initError = new Error('cannot start');
        const err = await mountLibfuse(memfs, mountOptions(mnt)).then(() => null, (e: Error) => e);
        expect(err?.message).to.equal('cannot start');
        expect(mountLine(mnt)).to.equal(undefined);
        expect(memfs.destroyed).to.equal(1);
      });

      it('refuses a mountpoint that is already mounted, with EBUSY', async () => {
        await mountIt();
        const other = new MemoryFile(Buffer.alloc(10));
        const err = await mountLibfuse(other, mountOptions(mnt)).then(() => null, (e: NodeJS.ErrnoException) => e);
        expect(err?.code).to.equal('EBUSY');
        await ok('cmp', [reference('want', want), path.join(mnt, FILE)]);
      });
    });

    describe('as an unprivileged user (nobody, through the setuid fusermount)', () => {
      let dir: string;
      let mnt: string;
      let child: ChildProcess | undefined;

      openFuseDeviceToUsers();

      beforeEach(() => {
        dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-libfuse-user-'));
        fs.chmodSync(dir, 0o755);
        mnt = path.join(dir, 'mnt');
        fs.mkdirSync(mnt);
        fs.chownSync(mnt, 65534, 65534);
        child = undefined;
      });

      afterEach(async () => {
        await forceUnmount(mnt);
        if (child && child.exitCode === null) child.kill('SIGKILL');
        fs.rmSync(dir, { recursive: true, force: true });
      });

      /** Start the child as nobody; resolves with its first line and a promise of everything it says. */
      async function startChild(...args: string[]): Promise<{ first: string; all: Promise<{ out: string; code: number | null }> }> {
        const c = spawn(AS_NOBODY[0], [...AS_NOBODY.slice(1), process.execPath, __filename, mnt, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
        child = c;
        let out = '';
        let err = '';
        c.stdout!.setEncoding('utf8');
        c.stderr!.setEncoding('utf8');
        c.stderr!.on('data', (s: string) => { err += s; });
        const all = new Promise<{ out: string; code: number | null }>((r) => c.on('close', (code) => r({ out, code })));
        const first = await withTimeout(new Promise<string>((r) => {
          c.stdout!.on('data', (s: string) => {
            out += s;
            if (out.includes('\n')) r(out.split('\n')[0]);
          });
          c.on('close', () => r(`(exited) ${err}`));
        }), 20_000, 'the child mount');
        return { first, all };
      }

      it('mounts, serves stat, readdir, cmp, dd and truncate to the user, and fusermount -u ends it', async () => {
        const { first, all } = await startChild();
        expect(first).to.match(/^READY /);
        expect(JSON.parse(first.slice('READY '.length))).to.deep.include({ supportsLseek: false, supportsFallocate: false });
        expect(mountLine(mnt)).to.match(/ - fuse\.qcowfs memory,test rw,.*user_id=65534/);
        const file = path.join(mnt, FILE);
        const want = pattern(SIZE);
        const ref = path.join(dir, 'want');
        fs.writeFileSync(ref, want, { mode: 0o644 });
        const nobody = { asNobody: true };

        expect((await ok('stat', ['-c', '%s %U', file], nobody)).trim()).to.equal(`${SIZE} nobody`);
        expect((await ok('ls', ['-a1', mnt], nobody)).split('\n').filter(Boolean)).to.deep.equal(['.', '..', FILE]);
        await ok('cmp', [ref, file], nobody);
        // Without allow_other the kernel lets no one else in, root included.
        const asRoot = await sh('stat', [file]);
        expect(asRoot.stderr).to.match(/Permission denied/);

        const patch = crypto.randomBytes(300_000);
        const patchFile = path.join(dir, 'patch');
        fs.writeFileSync(patchFile, patch, { mode: 0o644 });
        await ok('dd', [`if=${patchFile}`, `of=${file}`, 'bs=64k', 'oflag=seek_bytes', 'seek=1000000', 'conv=notrunc', 'status=none'], nobody);
        patch.copy(want, 1_000_000);
        fs.writeFileSync(ref, want);
        await ok('cmp', [ref, file], nobody);
        await ok('truncate', ['-s', '2M', file], nobody);
        expect((await ok('stat', ['-c', '%s', file], nobody)).trim()).to.equal(String(2 * 1024 * 1024));
        await ok('cmp', ['-n', String(2 * 1024 * 1024), ref, file], nobody);

        await ok('fusermount', ['-u', mnt], nobody);
        const { out, code } = await withTimeout(all, 10_000, 'the child after fusermount -u');
        expect(code).to.equal(0);
        // destroy ran once; the file had shrunk to 2 MiB; the process then exited by itself.
        expect(out.split('\n')).to.include(`DONE 1 ${2 * 1024 * 1024}`);
        expect(mountLine(mnt)).to.equal(undefined);
      });

      it('says allow_other needs user_allow_other in /etc/fuse.conf, and mounts nothing', async () => {
        const conf = fs.existsSync('/etc/fuse.conf') ? fs.readFileSync('/etc/fuse.conf', 'utf8') : '';
        expect(conf, 'this test expects the stock /etc/fuse.conf').to.not.match(/^\s*user_allow_other\s*$/m);
        const { first, all } = await startChild('allow-other');
        expect(first).to.match(/^ERROR EPERM allow_other needs user_allow_other in \/etc\/fuse\.conf/);
        expect((await all).code).to.equal(1);
        expect(mountLine(mnt)).to.equal(undefined);
      });
    });
  });
}

function cliTests(): void {
  describe('the CLI over the libfuse transport, serving a qcow2 image', function () {
    this.timeout(120_000);
    const BIN = path.resolve(__dirname, '../../../../bin/qcowfs');
    let dir: string;
    let mnt: string;

    openFuseDeviceToUsers();

    beforeEach(() => {
      dir = tmpDir();
      fs.chmodSync(dir, 0o755);
      mnt = path.join(dir, 'mnt');
      fs.mkdirSync(mnt);
    });

    afterEach(async () => {
      await forceUnmount(mnt);
      fs.rmSync(dir, { recursive: true, force: true });
    });

    function image(name: string): string {
      const img = path.join(dir, name);
      qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
      qemuIo(img, ['write -P 1 0 3M', 'write -z 4M 1M', 'write -c -P 2 8M 1M']);
      return img;
    }

    it('as root: reads byte-exact, writes, truncates, and QEMU finds the image clean', () => {
      const img = image('root.qcow2');
      const want = qemuRaw(img);
      const r = run(process.execPath, [BIN, 'mount', '--transport', 'libfuse', img, mnt], { allowFail: true });
      expect(r.status, r.stderr).to.equal(0);
      expect(mountLine(mnt)).to.match(/ - fuse\.qcowfs /);
      const raw = path.join(mnt, 'root.raw');
      expect(fs.readFileSync(raw).equals(want)).to.equal(true);
      const fd = fs.openSync(raw, 'r+');
      fs.writeSync(fd, Buffer.alloc(70000, 7), 0, 70000, 5000);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      run('truncate', ['-s', '20M', raw]);
      expect(fs.statSync(raw).size).to.equal(20 * 1024 * 1024);
      want.fill(7, 5000, 75000);
      const after = fs.readFileSync(raw);
      expect(after.subarray(0, want.length).equals(want)).to.equal(true);
      expect(run(process.execPath, [BIN, 'unmount', mnt], { allowFail: true }).status).to.equal(0);
      expect(mountLine(mnt)).to.equal(undefined);
      const c = qemuCheck(img);
      expect((c.leaks ?? 0) + (c.corruptions ?? 0) + c['check-errors']).to.equal(0);
      expect(qemuRaw(img).equals(after)).to.equal(true);
    });

    it('as an unprivileged user, who alone may look without allow_other', () => {
      const img = image('user.qcow2');
      fs.chmodSync(img, 0o666);
      fs.chownSync(mnt, 65534, 65534);
      const want = qemuRaw(img);
      const asNobody = (...args: string[]) => run(AS_NOBODY[0], [...AS_NOBODY.slice(1), ...args], { allowFail: true });
      const r = asNobody(process.execPath, BIN, 'mount', img, mnt);
      expect(r.status, r.stderr).to.equal(0);
      expect(mountLine(mnt)).to.match(/user_id=65534/);
      const sum = asNobody('sha256sum', path.join(mnt, 'user.raw'));
      expect(sum.status, sum.stderr).to.equal(0);
      expect(sum.stdout.split(' ')[0]).to.equal(sha256(want));
      const u = asNobody(process.execPath, BIN, 'unmount', mnt);
      expect(u.status, u.stderr).to.equal(0);
      expect(mountLine(mnt)).to.equal(undefined);
    });
  });
}

if (require.main === module) {
  childMain().catch((err: unknown) => {
    process.stdout.write(`ERROR ${String(err)}\n`);
    process.exitCode = 1;
  });
} else {
  tests();
  cliTests();
}
