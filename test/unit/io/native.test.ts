/**
 * The native module's non-blocking I/O, and FileDevice over it: page-cache
 * reads, non-blocking reads and polling on a FIFO (which behaves like
 * /dev/fuse: readable or EAGAIN).
 */
import { expect } from 'chai';
import { execFileSync } from 'child_process';
import { randomBytes } from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { FileDevice } from '../../../src/io/file-device';
import { loadNative, type NativeModule } from '../../../src/io/native';
import { uringReader } from '../../../src/io/uring';

const E = os.constants.errno;

describe('native module: non-blocking I/O', () => {
  let dir: string;
  let native: NativeModule;

  before(() => {
    const n = loadNative();
    expect(n, 'build/Release/qcowfs_native.node (npm run build builds it)').to.not.equal(null);
    native = n!;
  });
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-native-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('preadNowait serves cached bytes and checks its arguments', () => {
    const file = path.join(dir, 'f');
    const data = randomBytes(64 * 1024);
    fs.writeFileSync(file, data);
    const fd = fs.openSync(file, 'r');
    try {
      const buf = Buffer.alloc(8192);
      const n = native.preadNowait(fd, buf, 0, 4096, 4096);
      // Just written, so cached: all of it (a file system without RWF_NOWAIT says EOPNOTSUPP).
      if (n !== -E.EOPNOTSUPP) {
        expect(n).to.equal(4096);
        expect(buf.subarray(0, 4096).equals(data.subarray(4096, 8192))).to.equal(true);
      }
      expect(native.preadNowait(fd, buf, 0, 4096, 1 << 20)).to.equal(0); // past the end
      expect(() => native.preadNowait(fd, buf, 4096, 8192, 0)).to.throw(TypeError); // outside the buffer
      expect(native.preadNowait(-1, buf, 0, 10, 0)).to.equal(-E.EBADF);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('readInto on a non-blocking FIFO answers -EAGAIN when empty, then the bytes', () => {
    const fifo = path.join(dir, 'q');
    execFileSync('mkfifo', [fifo]);
    const rd = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    const wr = fs.openSync(fifo, fs.constants.O_WRONLY);
    try {
      expect(native.setNonblock(rd)).to.equal(0);
      const buf = Buffer.alloc(100);
      expect(native.readInto(rd, buf)).to.equal(-E.EAGAIN);
      fs.writeSync(wr, 'hello');
      expect(native.readInto(rd, buf)).to.equal(5);
      expect(buf.toString('utf8', 0, 5)).to.equal('hello');
    } finally {
      fs.closeSync(wr);
      fs.closeSync(rd);
    }
  });

  it('a poll handle calls back when the descriptor becomes readable, and not while stopped', async () => {
    const fifo = path.join(dir, 'q');
    execFileSync('mkfifo', [fifo]);
    const rd = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    const wr = fs.openSync(fifo, fs.constants.O_WRONLY);
    const buf = Buffer.alloc(100);
    let calls = 0;
    const h = native.pollCreate(rd, () => {
      calls++;
      while (native.readInto(rd, buf) > 0) { /* drain: the poll is level-triggered */ }
    });
    const tick = () => new Promise((r) => setTimeout(r, 50));
    try {
      native.pollStart(h);
      await tick();
      expect(calls).to.equal(0);
      fs.writeSync(wr, 'x');
      await tick();
      expect(calls).to.equal(1);
      native.pollStop(h);
      fs.writeSync(wr, 'y');
      await tick();
      expect(calls).to.equal(1);
      native.pollStart(h);
      await tick();
      expect(calls).to.equal(2);
    } finally {
      native.pollClose(h);
      expect(() => native.pollStart(h)).to.throw(/closed/);
      fs.closeSync(wr);
      fs.closeSync(rd);
    }
  });
});

describe('spliced FUSE replies (spliceReply)', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-splice-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  function splice(outFd: number, unique: number, slices: number[][]): Promise<[number, number]> {
    return new Promise((resolve) => loadNative()!.spliceReply(outFd, unique, new Float64Array(slices.flat()), (st, r) => resolve([st, r])));
  }

  it('writes the reply header, then the slices: file ranges, zeroes, and zeroes past the end of a file', async () => {
    const src = path.join(dir, 'src');
    const data = randomBytes(300_000);
    fs.writeFileSync(src, data);
    const out = path.join(dir, 'out');
    const inFd = fs.openSync(src, 'r');
    const outFd = fs.openSync(out, 'w');
    try {
      // 100 KiB at an odd offset, 70000 zeroes, 1000 bytes straddling the end of the file.
      const slices = [[inFd, 12345, 102400], [-1, 0, 70000], [inFd, 299_500, 1000]];
      const [stage, result] = await splice(outFd, 2 ** 40 + 7, slices);
      expect([stage, result]).to.deep.equal([1, 16 + 102400 + 70000 + 1000]);
      const got = fs.readFileSync(out);
      expect(got.readUInt32LE(0)).to.equal(got.length);
      expect(got.readInt32LE(4)).to.equal(0);
      expect(got.readBigUInt64LE(8)).to.equal(2n ** 40n + 7n);
      const want = Buffer.concat([data.subarray(12345, 12345 + 102400), Buffer.alloc(70000), data.subarray(299_500), Buffer.alloc(500)]);
      expect(got.subarray(16).equals(want)).to.equal(true);
    } finally {
      fs.closeSync(inFd);
      fs.closeSync(outFd);
    }
  });

  it('says at which stage it failed: nothing sent (bad source, too large) or refused by the receiver', async () => {
    const src = path.join(dir, 'src');
    fs.writeFileSync(src, randomBytes(8192));
    const inFd = fs.openSync(src, 'r');
    const outFd = fs.openSync(path.join(dir, 'out'), 'w');
    try {
      expect(await splice(outFd, 1, [[987654, 0, 4096]])).to.deep.equal([0, -E.EBADF]);
      expect(await splice(outFd, 1, [[inFd, 0, 64 << 20]])).to.deep.equal([0, -E.EMSGSIZE]);
      expect(await splice(inFd, 1, [[inFd, 0, 4096]])).to.deep.equal([1, -E.EBADF]); // read-only receiver
      // The thread's pipe was dropped with the failed reply: the next one is whole.
      expect(await splice(outFd, 3, [[inFd, 0, 8192]])).to.deep.equal([1, 16 + 8192]);
      expect(fs.statSync(path.join(dir, 'out')).size).to.equal(16 + 8192);
      expect(() => loadNative()!.spliceReply(outFd, 1, new Float64Array([inFd, 0]), () => undefined)).to.throw(TypeError);
    } finally {
      fs.closeSync(inFd);
      fs.closeSync(outFd);
    }
  });

  it('pipeCapacity says how large a pipe may grow', () => {
    const n = loadNative()!;
    expect(n.pipeCapacity(64 * 1024)).to.equal(64 * 1024);
    const big = n.pipeCapacity(4 << 20);
    const max = Number(fs.readFileSync('/proc/sys/fs/pipe-max-size', 'utf8'));
    // Past pipe-max-size only with CAP_SYS_RESOURCE.
    expect(big).to.be.oneOf([4 << 20, Math.min(max, 4 << 20)]);
  });
});

describe('io_uring reads', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-uring-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('reads what the file holds, many at once, and says EOF and bad descriptors as results', async function () {
    const ring = uringReader();
    if (ring === null) this.skip(); // a kernel without io_uring (or with it disabled): the threadpool serves
    const file = path.join(dir, 'f');
    const data = randomBytes(1 << 20);
    fs.writeFileSync(file, data);
    const fd = fs.openSync(file, 'r');
    try {
      const bufs = Array.from({ length: 64 }, () => Buffer.alloc(8192));
      const results = await Promise.all(bufs.map((b, i) => ring!.read(fd, b, 100, 4096, i * 16384)!));
      results.forEach((n, i) => {
        expect(n).to.equal(4096);
        expect(bufs[i].subarray(100, 4196).equals(data.subarray(i * 16384, i * 16384 + 4096))).to.equal(true);
      });
      expect(await ring!.read(fd, bufs[0], 0, 4096, data.length)).to.equal(0);
      expect(await ring!.read(fd, bufs[0], 0, 4096, data.length - 10)).to.equal(10);
      expect(await ring!.read(-1, bufs[0], 0, 4096, 0)).to.equal(-E.EBADF);
      expect(() => ring!.read(fd, bufs[0], 8000, 4096, 0)).to.throw(TypeError);
    } finally {
      fs.closeSync(fd);
    }
  });
});

describe('io_uring reads: a full ring', () => {
  it('answers null once every entry is in flight, and every queued read completes', async function () {
    const ring = uringReader();
    if (ring === null) this.skip();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-uring-'));
    const file = path.join(dir, 'f');
    fs.writeFileSync(file, randomBytes(4096));
    const fd = fs.openSync(file, 'r');
    try {
      const queued: Promise<number>[] = [];
      let refused = 0;
      // Submitted in one go, so none can complete (completions run on the event loop) before the ring fills.
      for (let i = 0; i < 300; i++) {
        const p = ring!.read(fd, Buffer.alloc(4096), 0, 4096, 0);
        if (p === null) refused++;
        else queued.push(p);
      }
      expect(refused).to.be.above(0);
      expect(queued.length).to.be.above(0);
      for (const n of await Promise.all(queued)) expect(n).to.equal(4096);
      expect(await ring!.read(fd, Buffer.alloc(4096), 0, 4096, 0)).to.equal(4096); // room again
    } finally {
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('FileDevice', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-filedev-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('reads back what it wrote, small and large, and reads short at the end', async () => {
    const file = path.join(dir, 'img');
    fs.writeFileSync(file, Buffer.alloc(0));
    const dev = await FileDevice.open(file);
    try {
      const small = randomBytes(4096);
      const large = randomBytes(3 << 20);
      await dev.pwrite(small, 0);
      await dev.pwrite(large, 8192);
      await dev.flush();
      await dev.flush(); // nothing written since: a no-op that still succeeds
      expect(dev.size()).to.equal(8192 + large.length);
      const a = Buffer.alloc(4096);
      expect(await dev.pread(a, 0)).to.equal(4096);
      expect(a.equals(small)).to.equal(true);
      const b = Buffer.alloc(large.length);
      expect(await dev.pread(b, 8192)).to.equal(large.length);
      expect(b.equals(large)).to.equal(true);
      const tail = Buffer.alloc(10000);
      expect(await dev.pread(tail, dev.size() - 100)).to.equal(100);
      await dev.truncate(4096);
      await dev.flush();
      expect(fs.statSync(file).size).to.equal(4096);
    } finally {
      await dev.close();
    }
  });

  it('a read-only device reads, and its flush is a no-op', async () => {
    const file = path.join(dir, 'img');
    fs.writeFileSync(file, randomBytes(8192));
    const dev = await FileDevice.open(file, { readOnly: true });
    try {
      await dev.flush();
      const buf = Buffer.alloc(8192);
      expect(await dev.pread(buf, 0)).to.equal(8192);
      expect(buf.equals(fs.readFileSync(file))).to.equal(true);
    } finally {
      await dev.close();
    }
  });
});

describe('FileDevice: cold large reads past the page cache', () => {
  let dir: string;
  let native: NativeModule;
  before(function () {
    native = loadNative()!;
    expect(native, 'the native module').to.not.equal(null);
    expect(uringReader(), 'io_uring').to.not.equal(null);
  });
  beforeEach(() => {
    // /var/tmp: a disk file system (O_DIRECT), where /tmp may be tmpfs.
    dir = fs.mkdtempSync(path.join('/var/tmp', 'qcowfs-direct-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  function cached(fd: number, position: number, length: number): number {
    const st = new Float64Array(2);
    expect(native.cacheStat(fd, position, length, st)).to.equal(0);
    return st[0];
  }

  /** A file of `size` random bytes that the page cache holds none of. */
  function coldFile(size: number): { file: string; data: Buffer } {
    const file = path.join(dir, 'img');
    const data = randomBytes(size);
    fs.writeFileSync(file, data);
    const fd = fs.openSync(file, 'r');
    try {
      fs.fsyncSync(fd);
      // GNU dd: iflag=nocache with count=0 drops the whole file from the cache.
      execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0'], { stdio: 'ignore' });
      expect(cached(fd, 0, size), 'cached bytes after dropping the file').to.equal(0);
    } finally {
      fs.closeSync(fd);
    }
    return { file, data };
  }

  it('reads a cold range with O_DIRECT into an aligned buffer, leaving the cache empty; other reads use the cache', async () => {
    const { file, data } = coldFile(4 << 20);
    const usual = await FileDevice.open(file, { readOnly: true });
    try {
      expect(usual.readsPastCache(1 << 20, 1 << 20), 'with readahead (the default), every read goes through the cache').to.equal(false);
    } finally {
      await usual.close();
    }
    const dev = await FileDevice.open(file, { readOnly: true, readahead: false });
    try {
      expect(dev.readsPastCache(1 << 20, 1 << 20)).to.equal(true);
      expect(dev.readsPastCache(1 << 20, 64 << 10), 'too small').to.equal(false);
      expect(dev.readsPastCache((1 << 20) + 512, 1 << 20), 'unaligned').to.equal(false);
      const aligned = native.alignedBuffer(1 << 20);
      expect(await dev.pread(aligned, 1 << 20)).to.equal(1 << 20);
      expect(aligned.equals(data.subarray(1 << 20, 2 << 20))).to.equal(true);
      expect(cached(dev.fd, 0, 4 << 20), 'nothing came into the cache').to.equal(0);
      // An ordinary (unaligned) buffer: read direct through an aligned one.
      const plain = Buffer.alloc(1 << 20);
      expect(native.addressMod(plain, 4096)).to.not.equal(0);
      expect(await dev.pread(plain, 3 << 20)).to.equal(1 << 20);
      expect(plain.equals(data.subarray(3 << 20, 4 << 20))).to.equal(true);
      expect(cached(dev.fd, 0, 4 << 20), 'still nothing in the cache').to.equal(0);
      // Small reads go through the cache.
      const small = Buffer.alloc(64 << 10);
      for (let at = 2 << 20; at < 3 << 20; at += small.length) {
        expect(await dev.pread(small, at)).to.equal(small.length);
        expect(small.equals(data.subarray(at, at + small.length))).to.equal(true);
      }
      expect(cached(dev.fd, 2 << 20, 1 << 20)).to.equal(1 << 20);
      // Once all of it is cached, a range is read through the cache; half of it is not enough.
      expect(dev.readsPastCache(2 << 20, 1 << 20)).to.equal(false);
      expect(dev.readsPastCache((1 << 20) + (512 << 10), 1 << 20)).to.equal(true);
      // A direct read that runs past the end reads again through the cache, short.
      const tail = native.alignedBuffer(1 << 20);
      expect(await dev.pread(tail, (4 << 20) - (256 << 10))).to.equal(256 << 10);
      expect(tail.subarray(0, 256 << 10).equals(data.subarray((4 << 20) - (256 << 10)))).to.equal(true);
      const tail2 = Buffer.alloc(1 << 20);
      expect(await dev.pread(tail2, (4 << 20) - (512 << 10))).to.equal(512 << 10);
      expect(tail2.subarray(0, 512 << 10).equals(data.subarray((4 << 20) - (512 << 10)))).to.equal(true);
    } finally {
      await dev.close();
    }
  });

  it('a range with a write not yet on disk is read through the cache, and shows the write', async () => {
    const { file, data } = coldFile(2 << 20);
    const dev = await FileDevice.open(file, { readahead: false });
    try {
      const patch = randomBytes(4096);
      await dev.pwrite(patch, (1 << 20) + 8192);
      patch.copy(data, (1 << 20) + 8192);
      expect(dev.readsPastCache(1 << 20, 1 << 20)).to.equal(false);
      const buf = native.alignedBuffer(1 << 20);
      expect(await dev.pread(buf, 1 << 20)).to.equal(1 << 20);
      expect(buf.equals(data.subarray(1 << 20))).to.equal(true);
    } finally {
      await dev.close();
    }
  });

  it('where the file system has no O_DIRECT (tmpfs), reads go through the cache', async () => {
    const shm = fs.mkdtempSync('/dev/shm/qcowfs-direct-');
    try {
      const file = path.join(shm, 'img');
      const data = randomBytes(1 << 20);
      fs.writeFileSync(file, data);
      const dev = await FileDevice.open(file, { readOnly: true, readahead: false });
      try {
        expect(dev.readsPastCache(0, 1 << 20)).to.equal(false);
        const buf = native.alignedBuffer(1 << 20);
        expect(await dev.pread(buf, 0)).to.equal(1 << 20);
        expect(buf.equals(data)).to.equal(true);
      } finally {
        await dev.close();
      }
    } finally {
      fs.rmSync(shm, { recursive: true, force: true });
    }
  });

  it('blockingReads: a small read is made on the spot while the owner says so, else it completes later', async () => {
    const { file, data } = coldFile(4 << 20);
    let sole = true;
    let asked = 0;
    const dev = await FileDevice.open(file, { readOnly: true, readahead: false, blockingReads: () => { asked++; return sole; } });
    // Blocking reads are fs.readSync calls on the device's descriptor (the module object itself, not a copy).
    const nodeFs = require('fs') as typeof fs;
    const readSync = nodeFs.readSync;
    let blocking = 0;
    nodeFs.readSync = ((fd: number, ...rest: unknown[]) => {
      if (fd === dev.fd) blocking++;
      return (readSync as (...a: unknown[]) => number)(fd, ...rest);
    }) as typeof fs.readSync;
    try {
      // Filled before the promise is even awaited: the read blocked this thread.
      const a = Buffer.alloc(4096);
      const pa = dev.pread(a, 1 << 20);
      expect(a.equals(data.subarray(1 << 20, (1 << 20) + 4096)), 'filled on the spot').to.equal(true);
      expect(await pa).to.equal(4096);
      expect([asked, blocking]).to.deep.equal([1, 1]);
      // The owner has other work: the cold read completes asynchronously.
      sole = false;
      const b = Buffer.alloc(4096);
      expect(await dev.pread(b, 2 << 20)).to.equal(4096);
      expect(b.equals(data.subarray(2 << 20, (2 << 20) + 4096))).to.equal(true);
      expect([asked, blocking]).to.deep.equal([2, 1]);
      // Larger reads never block, whatever the owner says.
      sole = true;
      const c = Buffer.alloc(300000);
      expect(await dev.pread(c, 3 << 20)).to.equal(c.length);
      expect(c.equals(data.subarray(3 << 20, (3 << 20) + c.length))).to.equal(true);
      expect(blocking).to.equal(1);
      // A failing blocking read arrives as a rejected promise, as an asynchronous one does.
      await dev.close();
      const err = await dev.pread(Buffer.alloc(4096), 0).then(() => null, (e: unknown) => e);
      expect(err).to.be.instanceOf(Error);
      expect(blocking).to.equal(2);
    } finally {
      nodeFs.readSync = readSync;
      await dev.close().catch(() => undefined);
    }
  });

  it('without readahead small reads bring in only their pages; readAhead() turns the kernel\'s readahead back on', async () => {
    const { file, data } = coldFile(4 << 20);
    const dev = await FileDevice.open(file, { readOnly: true, readahead: false });
    // Two small reads one after the other: the kernel reads ahead of the second, if it may.
    const twoReads = async (at: number): Promise<void> => {
      const small = Buffer.alloc(4096);
      for (const pos of [at, at + 4096]) {
        expect(await dev.pread(small, pos)).to.equal(4096);
        expect(small.equals(data.subarray(pos, pos + 4096))).to.equal(true);
      }
    };
    try {
      await twoReads(1 << 20);
      expect(cached(dev.fd, 0, 4 << 20), 'only the pages read').to.equal(8192);
      dev.readAhead();
      await twoReads(3 << 20);
      expect(cached(dev.fd, 3 << 20, 1 << 20), 'the pages read and the kernel\'s readahead after them').to.be.above(8192);
    } finally {
      await dev.close();
    }
  });
});
