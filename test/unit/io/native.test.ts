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
import { performance } from 'perf_hooks';
import * as v8 from 'v8';
import { FileDevice } from '../../../src/io/file-device';
import { loadNative, NATIVE_MODULE_PATH, type NativeModule, type PollHandle, type UringHandle } from '../../../src/io/native';
import { uringReader } from '../../../src/io/uring';

const E = os.constants.errno;

/** A file of `size` random bytes in `dir`, open for reading while `use` runs and settles. */
async function withRandomFile<T>(dir: string, size: number, use: (fd: number, data: Buffer) => T | Promise<T>): Promise<T> {
  const file = path.join(dir, 'f');
  const data = randomBytes(size);
  fs.writeFileSync(file, data);
  const fd = fs.openSync(file, 'r');
  try {
    return await use(fd, data);
  } finally {
    fs.closeSync(fd);
  }
}

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

  it('is an object with fast properties, whose reads optimized code inlines (an addon\'s own exports are a dictionary)', () => {
    v8.setFlagsFromString('--allow-natives-syntax');
    // eslint-disable-next-line @typescript-eslint/no-implied-eval
    const hasFastProperties = new Function('o', 'return %HasFastProperties(o)') as (o: object) => boolean;
    v8.setFlagsFromString('--no-allow-natives-syntax');
    expect(hasFastProperties({ a: 1 }), 'the check itself').to.equal(true);
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const raw = require(NATIVE_MODULE_PATH) as object;
    expect(hasFastProperties(raw), 'the addon\'s exports').to.equal(false);
    expect(hasFastProperties(native)).to.equal(true);
    expect(Object.keys(native).sort()).to.deep.equal(Object.keys(raw).sort());
  });

  it('preadNowait serves cached bytes and checks its arguments', () => withRandomFile(dir, 64 * 1024, (fd, data) => {
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
  }));

  it('preadFull reads into a part of the buffer until it is full or the file ends; writeTwo writes two buffers as one', () => withRandomFile(dir, 64 * 1024, (fd, data) => {
    const buf = Buffer.alloc(16384, 0xee);
    expect(native.preadFull(fd, buf, 100, 8192, 4096)).to.equal(8192);
    expect(buf.subarray(100, 8292).equals(data.subarray(4096, 12288))).to.equal(true);
    expect(buf[99]).to.equal(0xee);
    expect(buf[8292]).to.equal(0xee);
    expect(native.preadFull(fd, buf, 0, 16384, 60 * 1024)).to.equal(4096); // the file ends
    expect(native.preadFull(fd, buf, 0, 16384, 1 << 20)).to.equal(0);
    expect(() => native.preadFull(fd, buf, 8192, 16384, 0)).to.throw(TypeError); // outside the buffer
    expect(native.preadFull(-1, buf, 0, 10, 0)).to.equal(-E.EBADF);

    const a = Buffer.from('header--');
    const b = randomBytes(5000);
    const out = path.join(dir, 'out');
    const ofd = fs.openSync(out, 'w');
    try {
      expect(native.writeTwo(ofd, a, b)).to.equal(a.length + b.length);
    } finally {
      fs.closeSync(ofd);
    }
    expect(fs.readFileSync(out).equals(Buffer.concat([a, b]))).to.equal(true);
    expect(native.writeTwo(-1, a, b)).to.equal(-E.EBADF);
  }));

  it('pwriteFull writes a part of the buffer at a position, and answers an error as -errno', () => {
    const file = path.join(dir, 'w');
    const fd = fs.openSync(file, 'w+');
    try {
      const data = randomBytes(12288);
      expect(native.pwriteFull(fd, data, 4096, 8192, 100)).to.equal(8192);
      const back = fs.readFileSync(file);
      expect(back.length).to.equal(8292);
      expect(back.subarray(0, 100).equals(Buffer.alloc(100))).to.equal(true);
      expect(back.subarray(100).equals(data.subarray(4096))).to.equal(true);
      expect(native.pwriteFull(fd, data, 0, 4096, 2 ** 52)).to.equal(-E.EFBIG);
      expect(() => native.pwriteFull(fd, data, 8192, 8192, 0)).to.throw(TypeError); // outside the buffer
    } finally {
      fs.closeSync(fd);
    }
    const ro = fs.openSync(file, 'r');
    try {
      expect(native.pwriteFull(ro, Buffer.alloc(10), 0, 10, 0)).to.equal(-E.EBADF);
    } finally {
      fs.closeSync(ro);
    }
  });

  it('FileDevice writes through pwriteFull, and reports a failed write as Node does', async () => {
    const file = path.join(dir, 'img');
    fs.writeFileSync(file, Buffer.alloc(0));
    const dev = await FileDevice.open(file);
    const real = native.pwriteFull;
    const results: number[] = [];
    native.pwriteFull = (...args) => {
      const r = real(...args);
      results.push(r);
      return r;
    };
    try {
      const data = randomBytes(65536);
      await dev.pwrite(data, 4096);
      expect(results).to.deep.equal([65536]);
      expect(dev.size()).to.equal(4096 + 65536);
      expect(fs.readFileSync(file).subarray(4096).equals(data)).to.equal(true);
      const err = await dev.pwrite(Buffer.alloc(4096), 2 ** 52).then(() => null, (e: unknown) => e as NodeJS.ErrnoException);
      expect(results).to.deep.equal([65536, -E.EFBIG]);
      expect(err).to.be.instanceOf(Error);
      expect(err!.code).to.equal('EFBIG');
      expect(err!.syscall).to.equal('write');
    } finally {
      native.pwriteFull = real;
      await dev.close();
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

  it('a closed poll handle or ring stays closed once its close has run and new ones took the memory', async function () {
    const fifo = path.join(dir, 'c');
    execFileSync('mkfifo', [fifo]);
    const rd = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    const polls: PollHandle[] = [];
    const rings: UringHandle[] = [];
    try {
      const oldPoll = native.pollCreate(rd, () => {});
      const oldRing = native.uringCreate(4, () => {});
      if (typeof oldRing === 'number') this.skip(); // no io_uring here
      native.pollClose(oldPoll);
      native.uringClose(oldRing as UringHandle);
      await new Promise((r) => setTimeout(r, 20)); // the loop runs the closes
      // New ones of the same size: were the old structs freed, these would take their memory.
      for (let i = 0; i < 8; i++) polls.push(native.pollCreate(rd, () => {}));
      for (let i = 0; i < 4; i++) rings.push(native.uringCreate(4, () => {}) as UringHandle);
      expect(() => native.pollStart(oldPoll)).to.throw(/closed/);
      expect(() => native.pollSpin(oldPoll, 1000)).to.throw(/closed/);
      expect(native.pollClose(oldPoll)).to.equal(0);
      expect(() => native.uringRead(oldRing as UringHandle, rd, Buffer.alloc(8), 0, 8, 0, 1)).to.throw(TypeError);
      expect(native.uringClose(oldRing as UringHandle)).to.equal(0);
    } finally {
      for (const h of polls) native.pollClose(h);
      for (const r of rings) native.uringClose(r);
      fs.closeSync(rd);
    }
  });

  it('pollSpin keeps the loop from sleeping until its deadline, until told 0, or until the handle closes', async () => {
    const fifo = path.join(dir, 's');
    execFileSync('mkfifo', [fifo]);
    const rd = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    // Event-loop utilization over a 60 ms wait: the share of it the loop did not spend asleep in its poll phase.
    const busyWhileWaiting = async (): Promise<number> => {
      const before = performance.eventLoopUtilization();
      await new Promise((r) => setTimeout(r, 60));
      return performance.eventLoopUtilization(before).utilization;
    };
    const h = native.pollCreate(rd, () => {});
    let closed = false;
    try {
      native.pollStart(h);
      expect(await busyWhileWaiting(), 'not spinning').to.be.below(0.5);
      expect(native.pollSpin(h, 10_000_000)).to.equal(0);
      expect(await busyWhileWaiting(), 'spinning').to.be.above(0.8);
      native.pollSpin(h, 0);
      expect(await busyWhileWaiting(), 'told 0').to.be.below(0.5);
      native.pollSpin(h, 20_000);
      await new Promise((r) => setTimeout(r, 40));
      expect(await busyWhileWaiting(), 'past its deadline').to.be.below(0.5);
      expect(() => native.pollSpin(h, -1 as unknown as number)).to.not.throw();
      expect(() => (native.pollSpin as (h: unknown) => number)(h)).to.throw(TypeError);
      native.pollSpin(h, 10_000_000);
      native.pollClose(h);
      closed = true;
      expect(await busyWhileWaiting(), 'closed').to.be.below(0.5);
      expect(() => native.pollSpin(h, 1000)).to.throw(/closed/);
    } finally {
      if (!closed) native.pollClose(h);
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
    await withRandomFile(dir, 1 << 20, async (fd, data) => {
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
    });
  });
});

describe('io_uring reads: closing', () => {
  it('a ring with a read in flight refuses to close (the kernel may still write into its buffer), and closes once it completed', async function () {
    const native = loadNative()!;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowfs-uring-'));
    const fifo = path.join(dir, 'p');
    execFileSync('mkfifo', [fifo]);
    // Read-write: a blocking reader that needs no writer to open; the read then waits for data.
    const rd = fs.openSync(fifo, fs.constants.O_RDWR);
    const wr = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
    const done: number[] = [];
    const ring = native.uringCreate(4, (id, result) => done.push(id, result));
    try {
      if (typeof ring === 'number') this.skip(); // no io_uring here
      const buf = Buffer.alloc(16);
      expect(native.uringRead(ring as UringHandle, rd, buf, 0, 16, 0, 7)).to.equal(0);
      await new Promise((r) => setTimeout(r, 20));
      expect(done, 'completions before anything was written').to.deep.equal([]);
      expect(native.uringClose(ring as UringHandle)).to.equal(-E.EBUSY);
      fs.writeSync(wr, 'hello');
      for (let i = 0; i < 200 && done.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
      expect(done).to.deep.equal([7, 5]);
      expect(buf.subarray(0, 5).toString()).to.equal('hello');
      expect(native.uringClose(ring as UringHandle)).to.equal(0);
    } finally {
      if (typeof ring !== 'number') native.uringClose(ring);
      fs.closeSync(wr);
      fs.closeSync(rd);
      fs.rmSync(dir, { recursive: true, force: true });
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

  /** Run `fn` on a device over a new empty file, closing it after. */
  async function withEmptyDevice(fn: (dev: FileDevice, file: string) => Promise<void>): Promise<void> {
    const file = path.join(dir, 'img');
    fs.writeFileSync(file, Buffer.alloc(0));
    const dev = await FileDevice.open(file);
    try {
      await fn(dev, file);
    } finally {
      await dev.close();
    }
  }

  it('reads back what it wrote, small and large, and reads short at the end', () => withEmptyDevice(async (dev, file) => {
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
  }));

  it('a flush that finds nothing new written still waits for the sync under way', () => withEmptyDevice(async (dev) => {
    await dev.pwrite(randomBytes(1 << 20), 0);
    const done: string[] = [];
    const first = dev.flush().then(() => done.push('first'));
    // Nothing written since the first began: the second has no sync of its own
    // to make, but must not report the data durable before the first's is.
    const second = dev.flush().then(() => done.push('second'));
    expect(done).to.deep.equal([]);
    await Promise.all([first, second]);
    expect(done).to.deep.equal(['first', 'second']);
  }));

  it('a write still under way when a sync begins is synced by the next flush', () => withEmptyDevice(async (dev) => {
    // Count the device's fdatasyncs (it calls them through the fs module).
    const nodeFs = require('fs') as { fdatasync: (fd: number, cb: (err: Error | null) => void) => void };
    const realFdatasync = nodeFs.fdatasync;
    let syncs = 0;
    nodeFs.fdatasync = (fd, cb) => {
      syncs++;
      realFdatasync(fd, cb);
    };
    try {
      // Larger than the writes made on the spot: this one goes to the threadpool,
      // and the flush below begins its sync before the write has landed.
      const write = dev.pwrite(randomBytes(4 << 20), 0);
      const flush = dev.flush();
      await Promise.all([write, flush]);
      expect(syncs).to.equal(1);
      await dev.flush();
      expect(syncs, 'the next flush syncs the write the first may have missed').to.equal(2);
      await dev.flush();
      expect(syncs, 'and then there is nothing left to sync').to.equal(2);
    } finally {
      nodeFs.fdatasync = realFdatasync;
    }
  }));

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

describe('FileDevice: drop-behind and blocking reads', () => {
  let dir: string;
  let native: NativeModule;
  before(function () {
    native = loadNative()!;
    expect(native, 'the native module').to.not.equal(null);
  });
  beforeEach(() => {
    // /var/tmp: a disk file system, whose clean pages can be dropped (tmpfs pages cannot).
    dir = fs.mkdtempSync(path.join('/var/tmp', 'qcowfs-cache-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  function cached(fd: number, position: number, length: number): number {
    const st = new Float64Array(2);
    expect(native.cacheStat(fd, position, length, st)).to.equal(0);
    return st[0];
  }

  /**
   * [position, +length) of fd is still cached, as far as drop-behind goes: it drops whole 2 MiB
   * units, while the kernel may reclaim a folio or two of clean cache on its own meanwhile.
   */
  function expectKept(fd: number, position: number, length: number, what?: string): void {
    expect(cached(fd, position, length), what).to.be.greaterThan(length - MiB);
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

  const MiB = 1 << 20;

  /** Read [from, to) in `piece`-byte reads, checking every byte. */
  async function stream(dev: FileDevice, data: Buffer, from: number, to: number, piece = 512 << 10): Promise<void> {
    const buf = Buffer.alloc(piece);
    for (let at = from; at < to; at += piece) {
      expect(await dev.pread(buf, at)).to.equal(piece);
      expect(buf.equals(data.subarray(at, at + piece)), `bytes at ${at}`).to.equal(true);
    }
  }

  it('dropBehind: a sequential stream of large reads leaves only its last few MiB in the cache; without it, all stays', async () => {
    const { file, data } = coldFile(32 * MiB);
    const dev = await FileDevice.open(file, { readOnly: true, dropBehind: true });
    try {
      await stream(dev, data, 0, 32 * MiB);
      // What lies more than 4 MiB behind the last read has gone, in whole 2 MiB units.
      expect(cached(dev.fd, 0, 32 * MiB), 'cached after the stream').to.be.at.most(6 * MiB);
      expect(cached(dev.fd, 0, 26 * MiB), 'cached well behind its end').to.equal(0);
    } finally {
      await dev.close();
    }
    const { file: file2, data: data2 } = coldFile(32 * MiB);
    const usual = await FileDevice.open(file2, { readOnly: true });
    try {
      await stream(usual, data2, 0, 32 * MiB);
      expectKept(usual.fd, 0, 32 * MiB);
    } finally {
      await usual.close();
    }
  });

  it('dropBehind: a stream of small reads drops behind itself too; one that begins on cached data (warm) drops nothing', async () => {
    const small = coldFile(16 * MiB);
    const dev = await FileDevice.open(small.file, { readOnly: true, dropBehind: true });
    try {
      await stream(dev, small.data, 0, 16 * MiB, 64 << 10);
      expect(cached(dev.fd, 0, 10 * MiB), 'behind a stream of small reads').to.equal(0);
    } finally {
      await dev.close();
    }
    const warm = coldFile(16 * MiB);
    fs.readFileSync(warm.file); // another user reads it into the cache
    const dev2 = await FileDevice.open(warm.file, { readOnly: true, dropBehind: true });
    try {
      await stream(dev2, warm.data, 0, 16 * MiB);
      expectKept(dev2.fd, 0, 16 * MiB, 'a warm stream');
    } finally {
      await dev2.close();
    }
  });

  it('dropBehind: a new stream is told warm from cold by its first RWF_NOWAIT read, asks cachestat only without one, and not during a run of misses', async () => {
    const real = native.cacheStat;
    let asked = 0;
    let counting = false;
    native.cacheStat = function (...args: Parameters<NativeModule['cacheStat']>) {
      if (counting) asked++;
      return real.apply(this, args);
    };
    const during = async <T>(fn: () => Promise<T>): Promise<T> => {
      counting = true;
      try {
        return await fn();
      } finally {
        counting = false;
      }
    };
    try {
      const warm = coldFile(16 * MiB);
      fs.readFileSync(warm.file);
      const dev = await FileDevice.open(warm.file, { readOnly: true, dropBehind: true });
      try {
        await during(() => stream(dev, warm.data, 0, 16 * MiB));
        expectKept(dev.fd, 0, 16 * MiB, 'a warm stream');
      } finally {
        await dev.close();
      }
      const cold = coldFile(16 * MiB);
      const dev2 = await FileDevice.open(cold.file, { readOnly: true, dropBehind: true });
      try {
        const buf = Buffer.alloc(64 << 10);
        // The first read alone, on the spot, as a mount's request alone is read.
        expect(await during(async () => dev2.preadNow(buf, 0, true))).to.equal(buf.length);
        await during(() => stream(dev2, cold.data, buf.length, 16 * MiB, buf.length));
        expect(cached(dev2.fd, 0, 10 * MiB), 'behind a cold stream').to.equal(0);
      } finally {
        await dev2.close();
      }
      expect(asked, 'cachestat calls while streams had RWF_NOWAIT results').to.equal(0);
      // A file system that cannot read RWF_NOWAIT: the new stream asks cachestat.
      const dev3 = await FileDevice.open(cold.file, { readOnly: true, dropBehind: true });
      try {
        (dev3 as unknown as { nowait: unknown }).nowait = null;
        await during(() => stream(dev3, cold.data, 0, 4 * MiB));
      } finally {
        await dev3.close();
      }
      expect(asked, 'cachestat calls without RWF_NOWAIT').to.equal(1);
      // Cold random reads: once NOWAIT_MISS_LIMIT of them have missed, most skip the
      // RWF_NOWAIT try, and each starts a new stream taken as cold without asking.
      const scattered = coldFile(64 * MiB);
      const dev4 = await FileDevice.open(scattered.file, { readOnly: true, dropBehind: true });
      try {
        const buf = Buffer.alloc(4096);
        await during(async () => {
          for (let i = 0; i < 20; i++) {
            const at = ((i * 7) % 20) * 3 * MiB;
            expect(dev4.preadNow(buf, at, true)).to.equal(buf.length);
            expect(buf.equals(scattered.data.subarray(at, at + buf.length))).to.equal(true);
          }
        });
        // Then a stream: taken as cold, it drops behind itself.
        await during(() => stream(dev4, scattered.data, 0, 16 * MiB));
        expect(cached(dev4.fd, 0, 10 * MiB), 'behind a stream begun in a run of misses').to.equal(0);
      } finally {
        await dev4.close();
      }
      expect(asked, 'cachestat calls during a run of misses').to.equal(1);
    } finally {
      native.cacheStat = real;
    }
  });

  /**
   * Whether the page cache holds all of [position, +length) of fd once a
   * readahead(2) of it has been asked for. readahead is advice: under memory
   * pressure (a full suite beside other work) the kernel may decline it and
   * take it later, so it is asked again for up to two seconds.
   */
  async function readAheadLands(fd: number, position: number, length: number, readAhead = native.readAhead): Promise<boolean> {
    for (let i = 0; i < 40; i++) {
      if (cached(fd, position, length) === length) return true;
      await new Promise((r) => setTimeout(r, 50));
      readAhead.call(native, fd, position, length);
    }
    return cached(fd, position, length) === length;
  }

  for (const blocking of [false, true]) {
    it(`read-around: a small miss near a recent one reads the 128 KiB around it; a lone miss does not${blocking ? ' (blocking reads)' : ''}`, async () => {
      const { file, data } = coldFile(8 * MiB);
      const dev = await FileDevice.open(file, { readOnly: true, blockingReads: () => blocking });
      // The windows the device asks the kernel for; the kernel may defer them (readAheadLands).
      const asked: Array<[number, number]> = [];
      const readAhead = native.readAhead;
      native.readAhead = (fd, position, length) => {
        if (fd === dev.fd) asked.push([position, length]);
        return readAhead.call(native, fd, position, length);
      };
      // A miss the disk serves so fast that the RWF_NOWAIT read which started it finds it
      // done (a virtual disk over the host's cache can) is a hit to the device, which then
      // reads nothing around it. Here every miss is slower than that.
      const preadNowait = native.preadNowait;
      native.preadNowait = (fd, buf, offset, length, position) =>
        fd === dev.fd && cached(fd, position, length) < length ? -E.EAGAIN : preadNowait.call(native, fd, buf, offset, length, position);
      try {
        const buf = Buffer.alloc(4096);
        const read = async (at: number): Promise<void> => {
          expect(await dev.pread(buf, at)).to.equal(buf.length);
          expect(buf.equals(data.subarray(at, at + buf.length)), `bytes at ${at}`).to.equal(true);
        };
        const window = 1 * MiB; // aligned to 128 KiB
        await read(window + 20 * 1024); // the first miss: nothing recent near it
        expect(asked, 'after a lone miss').to.deep.equal([]);
        expect(cached(dev.fd, window, 128 * 1024), 'after a lone miss').to.be.below(128 * 1024);
        await read(window + 84 * 1024); // 64 KiB on: near
        expect(asked, 'after a miss near it').to.deep.equal([[window, 128 * 1024]]);
        expect(await readAheadLands(dev.fd, window, 128 * 1024, readAhead), 'its window is read').to.equal(true);
        expect(cached(dev.fd, window + 128 * 1024, 128 * 1024), 'the next window').to.be.below(128 * 1024);
        const far = 6 * MiB; // 5 MiB from both misses
        await read(far + 4096);
        expect(asked, 'after a miss far from the others').to.have.length(1);
        expect(cached(dev.fd, far, 128 * 1024), 'after a miss far from the others').to.be.below(128 * 1024);
        await read(far + 900 * 1024); // near the one before, in the window after it
        expect(asked[1], 'a miss near the far one').to.deep.equal([far + 896 * 1024, 128 * 1024]);
        expect(await readAheadLands(dev.fd, far + 896 * 1024, 128 * 1024, readAhead), 'its window is read').to.equal(true);
      } finally {
        native.preadNowait = preadNowait;
        native.readAhead = readAhead;
        await dev.close();
      }
    });
  }

  it('dropBehind: two streams read in turns, as two readers would, each drop behind themselves', async () => {
    const { file, data } = coldFile(64 * MiB);
    const dev = await FileDevice.open(file, { readOnly: true, dropBehind: true });
    try {
      // Far enough apart that the kernel's readahead for one does not reach the other.
      const buf = Buffer.alloc(512 << 10);
      for (let at = 0; at < 12 * MiB; at += buf.length) {
        for (const base of [0, 32 * MiB]) {
          expect(await dev.pread(buf, base + at)).to.equal(buf.length);
          expect(buf.equals(data.subarray(base + at, base + at + buf.length))).to.equal(true);
        }
      }
      expect(cached(dev.fd, 0, 6 * MiB), 'behind the first stream').to.equal(0);
      expect(cached(dev.fd, 32 * MiB, 6 * MiB), 'behind the second').to.equal(0);
    } finally {
      await dev.close();
    }
  });

  it('dropBehind: a stream over writes not yet synced reads them, and they still reach the disk', async () => {
    const { file, data } = coldFile(16 * MiB);
    const dev = await FileDevice.open(file, { dropBehind: true });
    try {
      for (const at of [MiB, 7 * MiB + 4096, 12 * MiB]) {
        const patch = randomBytes(256 << 10);
        await dev.pwrite(patch, at);
        patch.copy(data, at);
      }
      await stream(dev, data, 0, 16 * MiB);
      await dev.flush();
    } finally {
      await dev.close();
    }
    execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0'], { stdio: 'ignore' });
    expect(fs.readFileSync(file).equals(data), 'the file after the stream and a flush').to.equal(true);
  });

  it('dropBehind: a run of sequential writes, written back and dropped behind itself, reads back whole and reaches the disk', async () => {
    const file = path.join(dir, 'img');
    fs.writeFileSync(file, '');
    const data = randomBytes(48 * MiB);
    const dev = await FileDevice.open(file, { dropBehind: true });
    try {
      for (let at = 0; at < data.length; at += MiB) await dev.pwrite(data.subarray(at, at + MiB), at);
      const fd = fs.openSync(file, 'r');
      try {
        expect(native.startWriteback(fd, 0, 16 * MiB)).to.equal(0);
        expect(native.startWriteback(-1, 0, 16 * MiB)).to.equal(-E.EBADF);
        expect(() => native.startWriteback(fd, -1, 1)).to.throw(TypeError);
      } finally {
        fs.closeSync(fd);
      }
      await dev.flush();
      const back = Buffer.alloc(data.length);
      expect(await dev.pread(back, 0)).to.equal(data.length);
      expect(back.equals(data), 'read back through the device').to.equal(true);
    } finally {
      await dev.close();
    }
    execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0'], { stdio: 'ignore' });
    expect(fs.readFileSync(file).equals(data), 'the file after the writes and a flush').to.equal(true);
  });

  it('preadNow: a cached range is read on the spot; a cold one only when it may block (and only a small one), else null and nothing read', async () => {
    const { file, data } = coldFile(4 << 20);
    const dev = await FileDevice.open(file, { readOnly: true });
    try {
      const a = Buffer.alloc(4096);
      expect(dev.preadNow(a, 1 << 20, false), 'cold, may not block').to.equal(null);
      expect(a.equals(Buffer.alloc(4096)), 'nothing read').to.equal(true);
      expect(dev.preadNow(a, 1 << 20, true), 'cold, may block').to.equal(4096);
      expect(a.equals(data.subarray(1 << 20, (1 << 20) + 4096))).to.equal(true);
      // Now cached: read on the spot whatever the caller allows.
      const b = Buffer.alloc(4096);
      expect(dev.preadNow(b, 1 << 20, false)).to.equal(4096);
      expect(b.equals(a)).to.equal(true);
      // Larger than a blocking read may be: null when cold, even if the caller may block.
      execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0'], { stdio: 'ignore' });
      const c = Buffer.alloc(300000);
      expect(dev.preadNow(c, 3 << 20, true)).to.equal(null);
      expect(await dev.pread(c, 3 << 20)).to.equal(c.length);
      expect(dev.preadNow(c, 3 << 20, false), 'cached by the read before').to.equal(c.length);
      expect(c.equals(data.subarray(3 << 20, (3 << 20) + c.length))).to.equal(true);
      // At the end of the file: the bytes there are, as pread() returns them.
      const d = Buffer.alloc(8192);
      expect(dev.preadNow(d, (4 << 20) - 4096, true)).to.equal(4096);
      expect(d.subarray(0, 4096).equals(data.subarray((4 << 20) - 4096))).to.equal(true);
      expect(dev.preadNow(Buffer.alloc(0), 0, false)).to.equal(0);
      // A failed read is left to pread(), which reports it.
      await dev.close();
      expect(dev.preadNow(Buffer.alloc(4096), 0, true)).to.equal(null);
      expect(await dev.pread(Buffer.alloc(4096), 0).then(() => null, (e: unknown) => e)).to.be.instanceOf(Error);
    } finally {
      await dev.close().catch(() => undefined);
    }
  });

  it('blockingReads: a small read is made on the spot while the owner says so, else it completes later', async () => {
    const { file, data } = coldFile(4 << 20);
    let sole = true;
    let asked = 0;
    const dev = await FileDevice.open(file, { readOnly: true, blockingReads: () => { asked++; return sole; } });
    // Blocking reads are preadFull calls on the device's descriptor (the module object itself, not a copy).
    const preadFull = native.preadFull;
    let blocking = 0;
    native.preadFull = function (fd: number, ...rest: [Buffer, number, number, number]) {
      if (fd === dev.fd) blocking++;
      return preadFull.call(this, fd, ...rest);
    };
    try {
      // Filled before the promise is even awaited: the read blocked this thread.
      const a = Buffer.alloc(4096);
      const pa = dev.pread(a, 1 << 20);
      expect(a.equals(data.subarray(1 << 20, (1 << 20) + 4096)), 'filled on the spot').to.equal(true);
      expect(await pa).to.equal(4096);
      expect([asked, blocking]).to.deep.equal([1, 1]);
      // The owner has other work: the cold read completes asynchronously. Cold for sure: the
      // host's readahead after the first read may have reached this range, and a cached read
      // is served on the spot without asking the owner.
      sole = false;
      execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0'], { stdio: 'ignore' });
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
      native.preadFull = preadFull;
      await dev.close().catch(() => undefined);
    }
  });
});
