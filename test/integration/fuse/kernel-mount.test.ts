/**
 * The kernel transport mounted for real (root, /dev/fuse) and checked with
 * ordinary tools: stat, ls, cat/cmp, dd, truncate, fallocate, python's
 * os.lseek. Each test mounts a fresh in-memory filesystem in its own temp
 * directory and always unmounts in afterEach.
 */
import { expect } from 'chai';
import { createHash, randomBytes } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { constants } from 'os';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FuseErrno, type RequestContext, type Statfs } from '../../../src/fuse/filesystem';
import { canMountKernel, mountKernel, unmountPath } from '../../../src/fuse/mount';
import { abortFuseConnection, waitFor } from '../../helpers/mount';
import { BLOCK, MemoryFs, type MemoryFsOptions } from './memory-fs';
import {
  cleanupMount, defaultErrnoOf, delay, holdBusy, isMounted, mountForTest, mountLine, sh, shOk, type TestMount,
} from './harness';

const MiB = 1 << 20;

// Both ways of reading /dev/fuse: polled on the event loop (native module) and threadpool reads.
for (const mode of ['poll', 'threadpool'] as const) {
  describe(`FUSE kernel transport (real mounts, ${mode} reads)`, function () {
    this.timeout(60_000);

    let t: TestMount | undefined;
    let mfs: MemoryFs;
    let scratch: string | undefined;

    async function mountMemory(opts: MemoryFsOptions = {}, preload?: Buffer): Promise<TestMount> {
      mfs = new MemoryFs(opts);
      if (preload) mfs.preload(0, preload);
      t = await mountForTest(mfs, { rootIsFile: opts.rootIsFile ?? false, pollDevice: mode === 'poll' });
      expect(t.mount.session.readMode).to.equal(mode);
      return t;
    }

    /** A file outside the mount holding `bytes`, for cmp and dd. */
    function outside(name: string, bytes: Buffer): string {
      scratch ??= fs.mkdtempSync('/tmp/qcowfs-fuse-data-');
      const p = path.join(scratch, name);
      fs.writeFileSync(p, bytes);
      return p;
    }

    function filePath(m: TestMount): string {
      return path.join(m.mountpoint, mfs.fileName);
    }

    afterEach(async () => {
      await cleanupMount(t);
      t = undefined;
      if (scratch) fs.rmSync(scratch, { recursive: true, force: true });
      scratch = undefined;
    });

    it('can mount here (root and /dev/fuse)', () => {
      expect(canMountKernel()).to.equal(true);
    });

    it('answers INIT with 1 MiB requests and shows up as fuse.<subtype>', async () => {
      const m = await mountMemory();
      const conn = m.mount.connection!;
      expect(conn.protoMajor).to.equal(7);
      expect(conn.protoMinor).to.be.at.least(24);
      expect(conn.maxWrite).to.equal(MiB);
      expect(conn.supportsLseek).to.equal(true);
      expect(mfs.stats.init).to.deep.equal(conn);
      const line = mountLine(m.mountpoint)!;
      expect(line).to.match(/^qcowfs-test \S+ fuse\.qcowfs rw,/);
      expect(line).to.contain('max_read=1048576');
    });

    it('stat and ls see the root directory and its file', async () => {
      const m = await mountMemory({ initialSize: 0 }, randomBytes(3 * BLOCK + 100));
      const st = (await shOk(`stat -c '%s %f %b %i %h' ${filePath(m)}`)).trim();
      expect(st).to.equal(`${3 * BLOCK + 100} 81a4 32 2 1`);
      const dir = (await shOk(`stat -c '%F %a' ${m.mountpoint}`)).trim();
      expect(dir).to.equal('directory 755');
      const ls = (await shOk(`ls -a1 ${m.mountpoint}`)).trim().split('\n');
      expect(ls).to.deep.equal(['.', '..', 'disk.raw']);
      expect(mfs.stats.readdirs).to.be.at.least(1);
      const missing = await sh(`stat ${m.mountpoint}/nope`);
      expect(missing.code).to.not.equal(0);
      expect(missing.stderr).to.contain('No such file or directory');
    });

    it('cat/cmp read back the data, dd writes land in the filesystem', async () => {
      const initial = randomBytes(2 * MiB + 12345);
      const m = await mountMemory({}, initial);
      const expected = outside('expected', initial);
      await shOk(`cmp ${expected} ${filePath(m)}`);

      const patch = randomBytes(300 * 1024);
      const src = outside('patch', patch);
      await shOk(`dd if=${src} of=${filePath(m)} bs=64k seek=3 conv=notrunc status=none`);
      const want = Buffer.from(initial);
      patch.copy(want, 3 * 65536);
      expect(mfs.data.subarray(0, mfs.size).equals(want)).to.equal(true);
      await shOk(`cmp ${outside('want', want)} ${filePath(m)}`);
      expect(mfs.stats.writes).to.be.greaterThan(0);
    });

    it('truncate grows and shrinks the file through SETATTR', async () => {
      const m = await mountMemory({}, randomBytes(BLOCK * 4));
      await shOk(`truncate -s 10M ${filePath(m)}`);
      expect(mfs.size).to.equal(10 * MiB);
      expect((await shOk(`stat -c %s ${filePath(m)}`)).trim()).to.equal(String(10 * MiB));
      await shOk(`truncate -s 1000 ${filePath(m)}`);
      expect(mfs.size).to.equal(1000);
      expect((await shOk(`wc -c < ${filePath(m)}`)).trim()).to.equal('1000');
    });

    it('answers SEEK_DATA / SEEK_HOLE from the filesystem', async () => {
      const m = await mountMemory({ initialSize: MiB });
      mfs.preload(0, randomBytes(BLOCK));
      mfs.preload(64 * 1024, randomBytes(BLOCK));
      const script = [
        'import os, sys',
        'fd = os.open(sys.argv[1], os.O_RDONLY)',
        'out = [os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 4096, os.SEEK_DATA), os.lseek(fd, 65536, os.SEEK_HOLE)]',
        'try:',
        '    os.lseek(fd, 70000, os.SEEK_DATA); out.append("no-enxio")',
        'except OSError as e:',
        '    out.append(e.errno)',
        'print(" ".join(map(str, out)))',
      ].join('\n');
      const py = outside('seek.py', Buffer.from(script));
      const out = (await shOk(`python3 ${py} ${filePath(m)}`)).trim();
      expect(out).to.equal(`4096 65536 69632 ${constants.errno.ENXIO}`);
      expect(mfs.stats.lseeks.map((l) => l.whence)).to.include.members([3, 4]);
    });

    it('fallocate --punch-hole reaches the filesystem and reads back zeros', async () => {
      const initial = randomBytes(MiB);
      const m = await mountMemory({}, initial);
      await shOk(`fallocate --punch-hole --offset 65536 --length 131072 ${filePath(m)}`);
      expect(mfs.stats.fallocates).to.deep.equal([{ offset: 65536, length: 131072, mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE }]);
      expect(mfs.size).to.equal(MiB);
      const want = Buffer.from(initial);
      want.fill(0, 65536, 65536 + 131072);
      await shOk(`cmp ${outside('want', want)} ${filePath(m)}`);
      const holes = (await shOk(`python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); print(os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 65536, os.SEEK_DATA))" ${filePath(m)}`)).trim();
      expect(holes).to.equal(`65536 ${65536 + 131072}`);
    });

    it('fallocate without flags extends the file', async () => {
      const m = await mountMemory({}, randomBytes(BLOCK));
      await shOk(`fallocate -l 8M ${filePath(m)}`);
      expect(mfs.size).to.equal(8 * MiB);
      expect(mfs.stats.fallocates[0]).to.deep.equal({ offset: 0, length: 8 * MiB, mode: 0 });
    });

    it('serves concurrent reads in parallel', async () => {
      const initial = randomBytes(8 * MiB);
      const m = await mountMemory({ directIo: true, readDelayMs: 30 }, initial);
      const expected = outside('expected', initial);
      const jobs = Array.from({ length: 8 }, (_, i) =>
        shOk(`dd if=${filePath(m)} bs=256k skip=${i * 4} count=4 status=none | cmp - ${expected} -i 0:${i * MiB} -n ${MiB}`));
      await Promise.all(jobs);
      expect(mfs.stats.peakInFlightReads).to.be.at.least(4);
      // With others pending, a read is not the sole request (poll mode can tell; threadpool mode cannot).
      if (mode === 'poll') expect(mfs.stats.soleReads).to.include(false);
      else expect(mfs.stats.soleReads.every((s) => s === undefined)).to.equal(true);
    });

    it('tells a handler when its request is the only one (soleRequest, poll mode)', async () => {
      const initial = randomBytes(MiB);
      const m = await mountMemory({ directIo: true }, initial);
      // One direct 4 KiB read at a time: each is alone.
      const got = await shOk(`dd if=${filePath(m)} bs=4k count=16 iflag=direct status=none | sha256sum`);
      expect(got.split(' ')[0]).to.equal(createHash('sha256').update(initial.subarray(0, 64 * 1024)).digest('hex'));
      expect(mfs.stats.soleReads).to.have.length(16);
      expect(mfs.stats.soleReads).to.deep.equal(new Array(16).fill(mode === 'poll' ? true : undefined));
    });

    it('answers a READ the filesystem serves on the spot (readNow) without read(), telling it when the read is alone', async () => {
      const initial = randomBytes(MiB);
      const m = await mountMemory({ directIo: true, readNow: 'serve' }, initial);
      const got = await shOk(`dd if=${filePath(m)} bs=4k count=16 iflag=direct status=none | sha256sum`);
      expect(got.split(' ')[0]).to.equal(createHash('sha256').update(initial.subarray(0, 64 * 1024)).digest('hex'));
      expect(mfs.stats.reads, 'read() calls').to.equal(0);
      // One direct read at a time: each is alone where the transport can tell (poll mode reads the device ahead).
      expect(mfs.stats.readNows).to.deep.equal(new Array(16).fill(mode === 'poll'));
      // An O_DIRECT 1 MiB read of a file opened without FOPEN_DIRECT_IO reaches the filesystem as 128 KiB
      // requests sent at once (FUSE_ASYNC_DIO); they queue up while the first is being served, and those
      // with others behind them are told so.
      await cleanupMount(t);
      mfs = new MemoryFs({ readNow: 'serve', readNowStallMs: 50 });
      mfs.preload(0, initial);
      const small = await mountForTest(mfs, { pollDevice: mode === 'poll', maxRequestBytes: 128 * 1024 });
      t = small;
      const all = await shOk(`dd if=${filePath(small)} bs=1M count=1 iflag=direct status=none | sha256sum`);
      expect(all.split(' ')[0]).to.equal(createHash('sha256').update(initial).digest('hex'));
      expect(mfs.stats.reads).to.equal(0);
      expect(mfs.stats.readNows).to.have.length(8);
      expect(mfs.stats.readNows, 'a read with others queued behind it may not block').to.include(false);
      if (mode === 'poll') expect(mfs.stats.readNows[7], 'the last one is alone').to.equal(true);
    });

    it('answers a WRITE the filesystem does on the spot (writeNow) without write()', async () => {
      const initial = randomBytes(MiB);
      const m = await mountMemory({ directIo: true, writeNow: 'serve' }, initial);
      const data = randomBytes(64 * 1024);
      const src = outside('src', data);
      await shOk(`dd if=${src} of=${filePath(m)} bs=4k seek=8 oflag=direct conv=notrunc status=none`);
      expect([mfs.stats.writeNows, mfs.stats.writes], '[writeNow, write() calls]').to.deep.equal([16, 0]);
      expect(mfs.data.subarray(32 * 1024, 96 * 1024).equals(data)).to.equal(true);
      expect(mfs.data.subarray(0, 32 * 1024).equals(initial.subarray(0, 32 * 1024))).to.equal(true);
      expect(mfs.data.subarray(96 * 1024, MiB).equals(initial.subarray(96 * 1024))).to.equal(true);
    });

    it('calls write() for a WRITE the filesystem declines to do on the spot, and maps what writeNow throws to an errno', async () => {
      const initial = randomBytes(MiB);
      const m = await mountMemory({ directIo: true, writeNow: 'decline' }, initial);
      const data = randomBytes(16 * 1024);
      const src = outside('src', data);
      await shOk(`dd if=${src} of=${filePath(m)} bs=4k seek=3 oflag=direct conv=notrunc status=none`);
      expect([mfs.stats.writeNows, mfs.stats.writes]).to.deep.equal([4, 4]);
      expect(mfs.data.subarray(12 * 1024, 28 * 1024).equals(data)).to.equal(true);
      await cleanupMount(t);
      mfs = new MemoryFs({ directIo: true, writeNow: 'throw' });
      mfs.preload(0, initial);
      t = await mountForTest(mfs, { pollDevice: mode === 'poll' });
      const r = await sh(`dd if=${src} of=${filePath(t)} bs=4k count=1 oflag=direct conv=notrunc status=none`);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.match(/Invalid or incomplete multibyte or wide character/); // EILSEQ
      expect(mfs.stats.writes).to.equal(0);
      expect(mfs.data.equals(initial)).to.equal(true);
    });

    it('calls read() for a READ the filesystem declines to serve on the spot, and maps what readNow throws to an errno', async () => {
      const initial = randomBytes(MiB);
      const m = await mountMemory({ directIo: true, readNow: 'decline' }, initial);
      const got = await shOk(`dd if=${filePath(m)} bs=4k count=4 skip=3 iflag=direct status=none | sha256sum`);
      expect(got.split(' ')[0]).to.equal(createHash('sha256').update(initial.subarray(12 * 1024, 28 * 1024)).digest('hex'));
      expect([mfs.stats.readNows.length, mfs.stats.reads]).to.deep.equal([4, 4]);
      await cleanupMount(t);
      mfs = new MemoryFs({ directIo: true, readNow: 'throw' });
      mfs.preload(0, initial);
      t = await mountForTest(mfs, { pollDevice: mode === 'poll' });
      const r = await sh(`dd if=${filePath(t)} bs=4k count=1 iflag=direct status=none of=/dev/null`);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.match(/Invalid or incomplete multibyte or wide character/); // EILSEQ
      expect(mfs.stats.reads).to.equal(0);
    });

    it('passes 1 MiB reads and writes to the filesystem', async () => {
      const m = await mountMemory({ directIo: true, initialSize: 0 });
      const data = randomBytes(4 * MiB);
      const src = outside('src', data);
      await shOk(`dd if=${src} of=${filePath(m)} bs=1M count=4 status=none`);
      expect(mfs.stats.maxWriteSize).to.equal(MiB);
      expect(mfs.data.subarray(0, 4 * MiB).equals(data)).to.equal(true);
      await shOk(`dd if=${filePath(m)} of=/dev/null bs=1M count=4 status=none`);
      expect(mfs.stats.maxReadSize).to.equal(MiB);
    });

    it('buffered 1 MiB writes arrive as 1 MiB requests (big writes)', async () => {
      const m = await mountMemory({ initialSize: 0 });
      const src = outside('src', randomBytes(4 * MiB));
      await shOk(`dd if=${src} of=${filePath(m)} bs=1M count=4 status=none`);
      expect(mfs.stats.maxWriteSize).to.equal(MiB);
    });

    it('maps a handler error to an errno once, through errnoOf', async () => {
      class Failing extends MemoryFs {
        override async statfs(): Promise<Statfs> {
          throw new Error('statfs is broken');
        }
      }
      mfs = new Failing();
      const seen: unknown[] = [];
      t = await mountForTest(mfs, {
        pollDevice: mode === 'poll',
        errnoOf: (err) => {
          seen.push(err);
          return constants.errno.EACCES;
        },
      });
      const r = await sh(`stat -f ${t.mountpoint}`);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.contain('Permission denied');
      expect(seen.length).to.equal(1);
      expect((seen[0] as Error).message).to.equal('statfs is broken');
    });

    it('aborts the signal of an interrupted request and answers it', async () => {
      let aborted = 0;
      let started = 0;
      class Hanging extends MemoryFs {
        override read(ctx: RequestContext): Promise<Buffer> {
          started++;
          return new Promise((_, reject) => {
            ctx.signal!.addEventListener('abort', () => {
              aborted++;
              reject(new FuseErrno(constants.errno.EINTR));
            });
          });
        }
      }
      mfs = new Hanging({ directIo: true });
      mfs.preload(0, randomBytes(BLOCK));
      t = await mountForTest(mfs, { pollDevice: mode === 'poll' });
      const began = Date.now();
      const r = await sh(`timeout -s INT 1 cat ${path.join(t.mountpoint, mfs.fileName)} > /dev/null`, 20_000);
      expect(r.code).to.not.equal(0);
      expect(Date.now() - began).to.be.below(10_000);
      expect(started).to.equal(1);
      expect(aborted).to.equal(1);
    });

    it('keeps serving once maxInFlight handlers never settle, since each was answered EIO', async () => {
      class StuckAtZero extends MemoryFs {
        override read(ctx: RequestContext, nodeid: number, fh: number, offset: number, size: number, into?: Buffer): Promise<Buffer> {
          if (offset < BLOCK) return new Promise(() => undefined);
          return super.read(ctx, nodeid, fh, offset, size, into);
        }
      }
      mfs = new StuckAtZero({ directIo: true });
      const data = randomBytes(4 * BLOCK);
      mfs.preload(0, data);
      t = await mountForTest(mfs, { requestTimeoutMs: 300, maxInFlight: 2, pollDevice: mode === 'poll' });
      const file = path.join(t.mountpoint, mfs.fileName);
      // Two reads whose handlers never settle: as many as may be in flight.
      const stuck = await Promise.all([0, 1].map(() => sh(`dd if=${file} of=/dev/null bs=${BLOCK} count=1 status=none`, 20_000)));
      for (const r of stuck) expect(r.stderr).to.contain('Input/output error');
      expect(t.mount.session.inFlight, 'handlers still running').to.equal(2);
      // A third read is still served.
      const r = await sh(`dd if=${file} bs=${BLOCK} skip=2 count=1 status=none | sha256sum`, 10_000);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout.split(' ')[0]).to.equal(createHash('sha256').update(data.subarray(2 * BLOCK, 3 * BLOCK)).digest('hex'));
    });

    it('answers a request whose handler never settles (EIO after requestTimeoutMs)', async () => {
      class Stuck extends MemoryFs {
        override read(): Promise<Buffer> {
          return new Promise(() => undefined);
        }
      }
      mfs = new Stuck({ directIo: true });
      mfs.preload(0, randomBytes(BLOCK));
      t = await mountForTest(mfs, { requestTimeoutMs: 500, pollDevice: mode === 'poll' });
      const r = await sh(`cat ${path.join(t.mountpoint, mfs.fileName)} > /dev/null`, 20_000);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.contain('Input/output error');
    });

    it('answers file positions beyond 2^53 as past the end: reads read nothing, SEEK_DATA ENXIO, writes and growth EFBIG', async () => {
      const m = await mountMemory({ directIo: true }, randomBytes(BLOCK));
      const script = [
        'import errno, os, sys',
        'fd = os.open(sys.argv[1], os.O_RDWR)',
        'far = 2 ** 60',
        'def err(f):',
        '    try:',
        '        f()',
        '        return "ok"',
        '    except OSError as e:',
        '        return errno.errorcode[e.errno]',
        'print(len(os.pread(fd, 4096, far)))',
        'print(err(lambda: os.lseek(fd, far, os.SEEK_DATA)))',
        'print(err(lambda: os.pwrite(fd, b"x", far)))',
        'print(err(lambda: os.ftruncate(fd, far)))',
        'print(err(lambda: os.posix_fallocate(fd, far, 4096)))',
        'print(len(os.pread(fd, 4096, 0)))',
      ].join('\n');
      const out = (await shOk(`python3 -c '${script}' ${filePath(m)}`)).trim().split('\n');
      expect(out).to.deep.equal(['0', 'ENXIO', 'EFBIG', 'EFBIG', 'EFBIG', String(BLOCK)]);
    });

    it('a handler that outlives the connection writes nothing to the closed device, nor to the file given its number', async () => {
      let release: (b: Buffer) => void = () => undefined;
      class Late extends MemoryFs {
        override read(): Promise<Buffer> {
          return new Promise((resolve) => { release = resolve; });
        }
      }
      mfs = new Late({ directIo: true });
      mfs.preload(0, randomBytes(BLOCK));
      t = await mountForTest(mfs, { requestTimeoutMs: 0, pollDevice: mode === 'poll' });
      const fuseFds = fs.readdirSync('/proc/self/fd').filter((n) => {
        try {
          return fs.readlinkSync(`/proc/self/fd/${n}`) === '/dev/fuse';
        } catch {
          return false;
        }
      }).map(Number);
      expect(fuseFds, 'the session\'s /dev/fuse descriptor').to.have.length(1);
      const reader = sh(`dd if=${path.join(t.mountpoint, mfs.fileName)} of=/dev/null bs=4k count=1 iflag=direct`, 30_000);
      await waitFor('the READ to reach its handler', () => t!.mount.session.inFlight > 0, 2000);
      expect(t.mount.session.inFlight, 'the READ is with its handler').to.equal(1);
      // The connection ends while the handler still runs; the session gives it a few seconds, then closes the device.
      expect(abortFuseConnection(t.mountpoint)).to.equal(true);
      await reader;
      await t.mount.done.catch(() => undefined);
      // A file takes the device's old number (descriptors are handed out lowest first).
      const victim = outside('victim', Buffer.alloc(0));
      const placeholders: number[] = [];
      let fd = -1;
      try {
        for (let i = 0; i < 256; i++) {
          fd = fs.openSync(victim, 'r+');
          if (fd === fuseFds[0]) break;
          placeholders.push(fd);
          fd = -1;
        }
        expect(fd, 'a file opened with the old descriptor number').to.equal(fuseFds[0]);
        release(Buffer.alloc(BLOCK, 0x77)); // the handler answers at last
        await delay(200);
        expect(fs.fstatSync(fd).size, 'bytes written into the file that took the number').to.equal(0);
      } finally {
        if (fd >= 0) fs.closeSync(fd);
        for (const p of placeholders) fs.closeSync(p);
      }
    });

    it('unmount runs destroy and ends the session', async () => {
      const m = await mountMemory({}, randomBytes(BLOCK));
      await shOk(`cat ${filePath(m)} > /dev/null`);
      await m.mount.unmount();
      expect(isMounted(m.mountpoint)).to.equal(false);
      expect(mfs.stats.destroyed).to.equal(1);
      await m.mount.done;
    });

    it('an unmount from outside (umount) also ends the session', async () => {
      const m = await mountMemory({}, randomBytes(BLOCK));
      await shOk(`umount ${m.mountpoint}`);
      await m.mount.done;
      expect(mfs.stats.destroyed).to.equal(1);
    });

    it('refuses to unmount a busy mountpoint unless forced', async () => {
      const m = await mountMemory({}, randomBytes(BLOCK));
      const busy = holdBusy(m.mountpoint);
      try {
        await delay(200);
        let code: string | undefined;
        try {
          await m.mount.unmount();
        } catch (e) {
          code = (e as { code?: string }).code;
          expect((e as Error).message).to.contain('busy');
        }
        expect(code).to.equal('EBUSY');
        expect(isMounted(m.mountpoint)).to.equal(true);
        const forced = m.mount.unmount({ force: true });
        await delay(200);
        expect(isMounted(m.mountpoint)).to.equal(false);
        busy.kill();
        await busy.exited;
        await forced;
        expect(mfs.stats.destroyed).to.equal(1);
      } finally {
        busy.kill();
      }
    });

    it('mounts read-only when asked: writes fail before reaching the filesystem', async () => {
      mfs = new MemoryFs();
      mfs.preload(0, randomBytes(BLOCK));
      t = await mountForTest(mfs, { readOnly: true, pollDevice: mode === 'poll' });
      expect(mountLine(t.mountpoint)).to.match(/ fuse\.qcowfs ro,/);
      const r = await sh(`dd if=/dev/zero of=${path.join(t.mountpoint, mfs.fileName)} bs=4k count=1 conv=notrunc status=none`);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.contain('Read-only file system');
      expect(mfs.stats.writes).to.equal(0);
      await shOk(`cat ${path.join(t.mountpoint, mfs.fileName)} > /dev/null`);
    });

    it('debug: one line per request on stderr with opcode, node, arguments and result', async () => {
      const lines: string[] = [];
      const write = process.stderr.write.bind(process.stderr);
      mfs = new MemoryFs();
      mfs.preload(0, randomBytes(BLOCK));
      (process.stderr as { write: unknown }).write = (chunk: string | Uint8Array, ...rest: unknown[]) => {
        if (String(chunk).startsWith('fuse #')) {
          lines.push(String(chunk));
          return true;
        }
        return (write as (...a: unknown[]) => boolean)(chunk, ...rest);
      };
      try {
        t = await mountForTest(mfs, { debug: true, pollDevice: mode === 'poll' });
        await shOk(`cat ${path.join(t.mountpoint, mfs.fileName)} > /dev/null; cat ${t.mountpoint}/missing 2>/dev/null || true`);
        await t.mount.unmount();
      } finally {
        (process.stderr as { write: unknown }).write = write;
      }
      expect(lines.some((l) => /^fuse #\d+ INIT node=0 kernel=7\.\d+ .* -> 7\.\d+ max_write=1048576 /.test(l))).to.equal(true);
      expect(lines.some((l) => /^fuse #\d+ LOOKUP node=1 name="disk\.raw" -> ok \(\d+\.\d{3} ms\)\n$/.test(l))).to.equal(true);
      expect(lines.some((l) => /^fuse #\d+ LOOKUP node=1 name="missing" -> ENOENT /.test(l))).to.equal(true);
      expect(lines.some((l) => /^fuse #\d+ READ node=2 fh=\d+ offset=0 size=\d+ -> 4096 bytes /.test(l))).to.equal(true);
    });

    it('mounts over a regular file (rootIsFile)', async () => {
      const initial = randomBytes(MiB + 7);
      const m = await mountMemory({ rootIsFile: true }, initial);
      expect(mountLine(m.mountpoint)).to.match(/ fuse\.qcowfs /);
      const st = (await shOk(`stat -c '%F %s %i' ${m.mountpoint}`)).trim();
      expect(st).to.equal(`regular file ${MiB + 7} 1`);
      await shOk(`cmp ${outside('expected', initial)} ${m.mountpoint}`);
      const patch = randomBytes(4096);
      await shOk(`dd if=${outside('patch', patch)} of=${m.mountpoint} bs=4096 seek=2 conv=notrunc status=none`);
      expect(mfs.data.subarray(8192, 12288).equals(patch)).to.equal(true);
      const ls = await sh(`ls ${m.mountpoint}/`);
      expect(ls.code).to.not.equal(0);
    });
  });
}

describe('FUSE kernel transport: mount errors', () => {
  it('reports a missing mountpoint with code ENOENT', async () => {
    const err = await mountKernel(new MemoryFs(), options('/nonexistent/qcowfs-mnt', false)).then(() => undefined, (e: unknown) => e);
    expect(err).to.be.instanceOf(Error);
    expect((err as { code: string }).code).to.equal('ENOENT');
    expect((err as Error).message).to.contain('does not exist');
  });

  it('refuses a file mountpoint for a directory root and vice versa', async () => {
    const base = fs.mkdtempSync('/tmp/qcowfs-fuse-err-');
    try {
      const file = path.join(base, 'f');
      fs.writeFileSync(file, '');
      const e1 = await mountKernel(new MemoryFs(), options(file, false)).then(() => undefined, (e: unknown) => e);
      expect((e1 as { code: string }).code).to.equal('ENOTDIR');
      const e2 = await mountKernel(new MemoryFs(), options(base, true)).then(() => undefined, (e: unknown) => e);
      expect((e2 as { code: string }).code).to.equal('EISDIR');
      expect(isMounted(base)).to.equal(false);
      expect(isMounted(file)).to.equal(false);
    } finally {
      fs.rmSync(base, { recursive: true, force: true });
    }
  });

  it('rejects and leaves nothing mounted when the filesystem refuses INIT', async () => {
    class NoInit extends MemoryFs {
      override init(): void {
        throw new Error('cannot serve this image');
      }
    }
    const base = fs.mkdtempSync('/tmp/qcowfs-fuse-err-');
    try {
      const err = await mountKernel(new NoInit(), options(base, false)).then(() => undefined, (e: unknown) => e);
      expect((err as Error).message).to.equal('cannot serve this image');
      expect(isMounted(base)).to.equal(false);
    } finally {
      if (isMounted(base)) await unmountPath(base, { lazy: true });
      fs.rmSync(base, { recursive: true, force: true });
    }
  });

  it('unmountPath on a path with nothing mounted fails with EINVAL', async () => {
    const base = fs.mkdtempSync('/tmp/qcowfs-fuse-err-');
    try {
      const err = await unmountPath(base).then(() => undefined, (e: unknown) => e);
      expect((err as { code: string }).code).to.equal('EINVAL');
      expect((err as Error).message).to.contain('not mounted');
    } finally {
      fs.rmSync(base, { recursive: true, force: true });
    }
  });
});

function options(mountpoint: string, rootIsFile: boolean) {
  return {
    mountpoint, rootIsFile, readOnly: false, allowOther: false, fsname: 'x', subtype: 'qcowfs', debug: false,
    maxRequestBytes: MiB, maxInFlight: 8, errnoOf: defaultErrnoOf,
  };
}
