/**
 * Read-ahead for direct-I/O files: DirectReadAhead on its own (a fake file
 * and a hand-run event loop), then through ImageFs over an image in memory,
 * where a write between the read-ahead and the read must win.
 */
import { expect } from 'chai';
import { DirectReadAhead } from '../../../src/fs/read-ahead';
import { ImageBackend, type FileBackend } from '../../../src/fs/backend';
import { ImageFs } from '../../../src/fs/image-fs';
import { MemoryDevice } from '../../../src/io/memory-device';
import { Qcow2Image, createOnDevice } from '../../../src/qcow2';
import { patternBuffer } from '../../helpers/qemu';

/** A file of `size` bytes whose byte i is i % 251, read on the spot unless told otherwise. */
function fakeFile(size: number): FileBackend & { calls: Array<[number, number, boolean]>; answer: 'read' | 'decline' | 'throw' } {
  const f = {
    calls: [] as Array<[number, number, boolean]>,
    answer: 'read' as 'read' | 'decline' | 'throw',
    readOnly: true,
    readOnlyReason: null,
    size: () => size,
    readNow(buf: Buffer, offset: number, mayBlock: boolean): boolean {
      f.calls.push([offset, buf.length, mayBlock]);
      if (f.answer === 'throw') throw new Error('EIO');
      if (f.answer === 'decline') return false;
      for (let i = 0; i < buf.length; i++) buf[i] = (offset + i) % 251;
      return true;
    },
  };
  return f as unknown as FileBackend & typeof f;
}

function expected(offset: number, length: number): Buffer {
  return Buffer.from(Array.from({ length }, (_, i) => (offset + i) % 251));
}

describe('DirectReadAhead', () => {
  let queue: Array<() => void>;
  let ra: DirectReadAhead;
  const turn = () => { const q = queue; queue = []; for (const f of q) f(); };
  beforeEach(() => {
    queue = [];
    ra = new DirectReadAhead((f) => queue.push(f));
  });
  /** Two 4 KiB reads of `file` in order from 0, and the loop's turn after them: 8 KiB on is read ahead. */
  function readTwo(key: object, file: FileBackend): void {
    ra.follow(key, file, 0, 4096);
    ra.follow(key, file, 4096, 4096);
    turn();
  }

  it('reads the same length after a read that followed the one before it, once the loop is free, and hands it over once', () => {
    const file = fakeFile(1 << 20);
    const key = {};
    ra.follow(key, file, 0, 4096); // the first read of the file: nothing to follow yet
    expect(queue).to.have.length(0);
    ra.follow(key, file, 4096, 4096);
    expect(file.calls, 'not before the loop is free').to.deep.equal([]);
    turn();
    expect(file.calls).to.deep.equal([[8192, 4096, false]]);
    expect(ra.take(key, 8192, 4096)!.equals(expected(8192, 4096))).to.equal(true);
    expect(ra.take(key, 8192, 4096), 'handed over once').to.equal(null);
    expect(ra.stats).to.deep.equal({ hits: 1, reads: 1 });
  });

  it('a read elsewhere, of another length or of another file finds nothing; a read out of order starts nothing', () => {
    const file = fakeFile(1 << 20);
    const key = {};
    readTwo(key, file);
    expect(ra.take({}, 8192, 4096)).to.equal(null);
    expect(ra.take(key, 8192, 2048)).to.equal(null);
    expect(ra.take(key, 12288, 4096)).to.equal(null);
    ra.follow(key, file, 65536, 4096);
    expect(queue).to.have.length(0);
  });

  it('forgets what it read ahead, or was about to, when a file changes', () => {
    const file = fakeFile(1 << 20);
    const key = {};
    readTwo(key, file);
    ra.changed();
    expect(ra.take(key, 8192, 4096)).to.equal(null);
    ra.follow(key, file, 8192, 4096);
    ra.changed();
    turn();
    expect(file.calls, 'the read-ahead asked for before the change did not run').to.have.length(1);
    expect(ra.take(key, 12288, 4096)).to.equal(null);
  });

  it('stops at the end of the file; a file that declines or fails leaves nothing read ahead', () => {
    const file = fakeFile(10000);
    const key = {};
    readTwo(key, file);
    expect(file.calls).to.deep.equal([[8192, 10000 - 8192, false]]);
    expect(ra.take(key, 8192, 10000 - 8192)!.equals(expected(8192, 10000 - 8192))).to.equal(true);
    ra.follow(key, file, 8192, 10000 - 8192);
    turn();
    expect(file.calls, 'nothing past the end').to.have.length(1);
    for (const answer of ['decline', 'throw'] as const) {
      const other = fakeFile(1 << 20);
      other.answer = answer;
      readTwo(other, other);
      expect(other.calls).to.have.length(1);
      expect(ra.take(other, 8192, 4096), answer).to.equal(null);
    }
  });
});

describe('ImageFs: read-ahead of direct-I/O files', () => {
  const MiB = 1 << 20;

  async function mount(directIo: boolean): Promise<{ fs: ImageFs; img: Qcow2Image; data: Buffer }> {
    const dev = new MemoryDevice();
    await createOnDevice(dev, { size: 8 * MiB, clusterSize: 65536 });
    const img = await Qcow2Image.open(dev);
    const data = patternBuffer(4 * MiB, 3);
    await img.write(data, 0);
    const fs = new ImageFs([{ name: 'disk.raw', backend: new ImageBackend(img), hostPath: '/', directIo }], { rootIsFile: false, uid: 0, gid: 0 });
    return { fs, img, data };
  }

  const nextTurn = () => new Promise<void>((r) => setImmediate(r));
  const ctx = { unique: 1, uid: 0, gid: 0, pid: 0, signal: new AbortController().signal } as never;

  it('a sequential reader is answered from what was read ahead, and a write in between wins over it', async () => {
    const { fs, img, data } = await mount(true);
    const into = Buffer.alloc(MiB);
    const piece = 128 * 1024;
    const spy: number[] = [];
    const readNow = img.readNow.bind(img);
    img.readNow = (buf, offset, mayBlock) => { spy.push(offset); return readNow(buf, offset, mayBlock); };
    for (let at = 0; at < 4 * piece; at += piece) {
      const got = fs.readNow(2, 0, at, piece, into, false);
      expect(got!.equals(data.subarray(at, at + piece)), `bytes at ${at}`).to.equal(true);
      await nextTurn();
    }
    // Read at 0 and 128 KiB; from then on each piece was read ahead of its read, and the next one with it.
    expect(spy).to.deep.equal([0, piece, 2 * piece, 3 * piece, 4 * piece]);
    // The piece at 512 KiB is read ahead now; a write lands in it before the reader gets there.
    const fresh = Buffer.alloc(4096, 0xab);
    await fs.write(ctx, 2, 0, 4 * piece + 100, fresh);
    const got = fs.readNow(2, 0, 4 * piece, piece, into, false)!;
    expect(got.subarray(100, 4196).equals(fresh), 'the write, not what was read ahead').to.equal(true);
    expect(got.subarray(0, 100).equals(data.subarray(4 * piece, 4 * piece + 100))).to.equal(true);
    await img.close();
  });

  it('a write done on the spot (writeNow) in between wins over what was read ahead too', async () => {
    const { fs, img, data } = await mount(true);
    const into = Buffer.alloc(MiB);
    const piece = 128 * 1024;
    for (let at = 0; at < 4 * piece; at += piece) {
      fs.readNow(2, 0, at, piece, into, false);
      await nextTurn();
    }
    const fresh = Buffer.alloc(4096, 0xcd);
    expect(fs.writeNow(2, 0, 4 * piece + 100, fresh)).to.equal(4096);
    const got = fs.readNow(2, 0, 4 * piece, piece, into, false)!;
    expect(got.subarray(100, 4196).equals(fresh), 'the write, not what was read ahead').to.equal(true);
    expect(got.subarray(0, 100).equals(data.subarray(4 * piece, 4 * piece + 100))).to.equal(true);
    await img.close();
  });

  it('writeNow leaves to write() what grows the file, and files other files of the mount alias', async () => {
    const dev = new MemoryDevice();
    await createOnDevice(dev, { size: 8 * MiB, clusterSize: 65536 });
    const img = await Qcow2Image.open(dev);
    await img.write(patternBuffer(MiB, 4), 0);
    const backend = new ImageBackend(img);
    const plain = new ImageFs([{ name: 'disk.raw', backend, hostPath: '/' }], { rootIsFile: false, uid: 0, gid: 0 });
    expect(plain.writeNow(2, 0, 4096, Buffer.alloc(4096, 1))).to.equal(4096);
    expect(plain.writeNow(2, 0, 8 * MiB - 2048, Buffer.alloc(4096, 1)), 'past the end').to.equal(null);
    expect(plain.writeNow(99, 0, 0, Buffer.alloc(4096, 1)), 'no such file').to.equal(null);
    const disk = {};
    const aliased = new ImageFs([
      { name: 'disk.raw', backend, hostPath: '/', window: { disk, start: 0 } },
      { name: 'disk-p1.raw', backend, hostPath: '/', window: { disk, start: MiB } },
    ], { rootIsFile: false, uid: 0, gid: 0 });
    expect(aliased.writeNow(2, 0, 4096, Buffer.alloc(4096, 2)), 'an aliased file').to.equal(null);
    const back = Buffer.alloc(8192);
    await img.read(back, 4096);
    expect(back.subarray(0, 4096).equals(Buffer.alloc(4096, 1))).to.equal(true);
    await img.close();
  });

  it('reads nothing ahead of a file served through the page cache', async () => {
    const { fs, img, data } = await mount(false);
    const into = Buffer.alloc(MiB);
    let calls = 0;
    const readNow = img.readNow.bind(img);
    img.readNow = (buf, offset, mayBlock) => { calls++; return readNow(buf, offset, mayBlock); };
    for (let at = 0; at < 4 * 65536; at += 65536) {
      expect(fs.readNow(2, 0, at, 65536, into, false)!.equals(data.subarray(at, at + 65536))).to.equal(true);
      await nextTurn();
    }
    expect(calls).to.equal(4);
    await img.close();
  });
});
