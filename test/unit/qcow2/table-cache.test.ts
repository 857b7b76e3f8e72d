import { expect } from 'chai';
import { TableCache } from '../../../src/qcow2/table-cache';
import { MemoryDevice } from '../../../src/io/memory-device';
import { CorruptImageError } from '../../../src/qcow2/errors';

const T = 512;

/** A device of 16 tables, table i filled with byte i, that logs every I/O. */
function device(log: string[]): MemoryDevice {
  const init = Buffer.alloc(16 * T);
  for (let i = 0; i < 16; i++) init.fill(i, i * T, (i + 1) * T);
  const dev = new MemoryDevice(init);
  const pread = dev.pread.bind(dev);
  const pwrite = dev.pwrite.bind(dev);
  dev.pread = async (buf, off) => { log.push(`r${off / T}`); return pread(buf, off); };
  dev.pwrite = async (buf, off) => { log.push(`w${off / T}`); return pwrite(buf, off); };
  return dev;
}

describe('qcow2 table cache', () => {
  it('loads tables once, then serves them from memory', async () => {
    const log: string[] = [];
    const cache = new TableCache(device(log), T, 4);
    const [a, b] = await Promise.all([cache.get(3 * T), cache.get(3 * T)]);
    expect(a).to.equal(b);
    expect(a[0]).to.equal(3);
    await cache.get(3 * T);
    expect(log).to.deep.equal(['r3']);
    expect(cache.stats).to.deep.include({ misses: 1, hits: 1 });
  });

  it('evicts the least recently used clean table', async () => {
    const log: string[] = [];
    const cache = new TableCache(device(log), T, 3);
    for (const i of [1, 2, 3]) await cache.get(i * T);
    await cache.get(1 * T); // 2 is now the oldest
    await cache.get(4 * T);
    expect(cache.peek(2 * T)).to.equal(undefined);
    for (const i of [1, 3, 4]) expect(cache.peek(i * T), `table ${i}`).to.not.equal(undefined);
    await cache.get(5 * T); // then 3
    expect(cache.peek(3 * T)).to.equal(undefined);
    expect(cache.size).to.equal(3);
    expect(log.filter((l) => l.startsWith('w'))).to.deep.equal([]);
  });

  it('keeps dirty tables over older clean ones', async () => {
    const log: string[] = [];
    const cache = new TableCache(device(log), T, 3);
    for (const i of [1, 2, 3]) await cache.get(i * T);
    (await cache.get(1 * T)).fill(0xaa);
    cache.markDirty(1 * T);
    await cache.get(2 * T);
    await cache.get(3 * T);
    await cache.get(4 * T); // 1 is the oldest but dirty: 2 goes
    expect(cache.peek(1 * T)?.[0]).to.equal(0xaa);
    expect(cache.peek(2 * T)).to.equal(undefined);
    expect(log.filter((l) => l.startsWith('w'))).to.deep.equal([]);
  });

  it('writes dirty tables back in offset order, after the hook that orders dependencies', async () => {
    const log: string[] = [];
    const dev = device(log);
    const cache = new TableCache(dev, T, 8);
    cache.before = async () => { log.push('before'); };
    for (const i of [7, 2, 5]) {
      const t = await cache.get(i * T);
      t.fill(0x40 + i);
      cache.markDirty(i * T);
    }
    await cache.get(3 * T); // clean: not written
    log.length = 0;
    await cache.flush();
    expect(log).to.deep.equal(['before', 'w2', 'w5', 'w7']);
    const check = Buffer.alloc(T);
    await dev.pread(check, 5 * T);
    expect(check.every((b) => b === 0x45)).to.equal(true);
    // Nothing dirty: a second flush does nothing, not even the hook.
    log.length = 0;
    await cache.flush();
    expect(log).to.deep.equal([]);
  });

  it('a full cache of dirty tables writes them back before evicting', async () => {
    const log: string[] = [];
    const cache = new TableCache(device(log), T, 2);
    cache.before = async () => { log.push('before'); };
    for (const i of [9, 4]) {
      (await cache.get(i * T)).fill(0xee);
      cache.markDirty(i * T);
    }
    log.length = 0;
    await cache.get(6 * T);
    expect(log).to.deep.equal(['r6', 'before', 'w4', 'w9']);
    expect(cache.hasDirty()).to.equal(false);
    expect(cache.size).to.equal(2);
    expect(cache.peek(9 * T), 'the least recently used went').to.equal(undefined);
  });

  it('install, discard and dropClean', async () => {
    const log: string[] = [];
    const cache = new TableCache(device(log), T, 4);
    await cache.install(10 * T, Buffer.alloc(T, 0x77));
    await cache.get(1 * T);
    cache.discard(10 * T);
    await cache.flush();
    expect(log).to.deep.equal(['r1']);
    await cache.install(11 * T, Buffer.alloc(T, 0x78));
    cache.dropClean();
    expect(cache.peek(1 * T)).to.equal(undefined);
    expect(cache.peek(11 * T)?.[0]).to.equal(0x78);
    expect(() => cache.markDirty(1 * T)).to.throw(/not cached/);
  });

  it('a table that fails validation is not cached', async () => {
    const log: string[] = [];
    const cache = new TableCache(device(log), T, 4, (off) => {
      if (off === 2 * T) throw new CorruptImageError('L2 table', off, 'bad');
    });
    let err: unknown = null;
    await cache.get(2 * T).catch((e: unknown) => { err = e; });
    expect(err).to.be.instanceOf(CorruptImageError);
    expect(cache.peek(2 * T)).to.equal(undefined);
    expect(cache.size).to.equal(0);
  });

  it('a table past the end of the device reads as zeroes; capacity below two is refused', async () => {
    const cache = new TableCache(device([]), T, 2);
    const t = await cache.get(16 * T - T / 2);
    expect(t.subarray(0, T / 2).every((b) => b === 15)).to.equal(true);
    expect(t.subarray(T / 2).every((b) => b === 0)).to.equal(true);
    expect(() => new TableCache(device([]), T, 1)).to.throw(RangeError);
  });
});
