/**
 * A bounded cache of cluster-sized metadata tables (L2 tables, refcount
 * blocks) keyed by host offset, least recently used first out. Dirty tables
 * are written back on flush or eviction; a `before` hook runs first, so the
 * refcount blocks a table depends on reach the disk before it does.
 *
 * Callers mutate a table only synchronously right after get()/install()
 * resolve and then call markDirty(): no eviction can happen in between.
 */
import { BlockDevice } from '../io/block-device';

interface Slot {
  buf: Buffer;
  dirty: boolean;
}

export class TableCache {
  private readonly slots = new Map<number, Slot>();
  private readonly loading = new Map<number, Promise<Buffer>>();
  private flushing: Promise<void> | null = null;
  /** Runs before any dirty table is written (write ordering). */
  before: (() => Promise<void>) | null = null;
  readonly stats = { hits: 0, misses: 0, writes: 0 };

  constructor(
    private readonly dev: BlockDevice,
    readonly tableSize: number,
    readonly capacity: number,
    /** Checks a freshly loaded table; throws CorruptImageError. */
    private readonly validate: (offset: number, buf: Buffer) => void = () => {},
  ) {
    if (capacity < 2) throw new RangeError('table cache needs room for at least two tables');
  }

  get size(): number {
    return this.slots.size;
  }

  async get(offset: number): Promise<Buffer> {
    const cached = this.getCached(offset);
    if (cached !== undefined) return cached;
    let p = this.loading.get(offset);
    if (!p) {
      this.stats.misses++;
      p = this.load(offset);
      this.loading.set(offset, p);
      p.finally(() => this.loading.delete(offset)).catch(() => {});
    }
    const buf = await p;
    const again = this.slots.get(offset);
    return again ? again.buf : buf;
  }

  private async load(offset: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(this.tableSize);
    const n = await this.dev.pread(buf, offset);
    if (n < this.tableSize) buf.fill(0, Math.max(n, 0));
    this.validate(offset, buf);
    await this.makeRoom(offset);
    const existing = this.slots.get(offset);
    if (existing) return existing.buf;
    this.slots.set(offset, { buf, dirty: false });
    return buf;
  }

  /** Put a new table into the cache (dirty), e.g. a freshly allocated L2 table. */
  async install(offset: number, buf: Buffer, dirty = true): Promise<Buffer> {
    await this.makeRoom(offset);
    this.slots.delete(offset);
    this.slots.set(offset, { buf, dirty });
    return buf;
  }

  /** The cached table, used (a hit, and the most recently used table now); undefined when it is not cached. */
  getCached(offset: number): Buffer | undefined {
    const slot = this.slots.get(offset);
    if (slot === undefined) return undefined;
    this.stats.hits++;
    this.slots.delete(offset);
    this.slots.set(offset, slot);
    return slot.buf;
  }

  /** The cached table, if cached (no I/O, not counted as a use). */
  peek(offset: number): Buffer | undefined {
    return this.slots.get(offset)?.buf;
  }

  markDirty(offset: number): void {
    const slot = this.slots.get(offset);
    if (!slot) throw new Error(`table at 0x${offset.toString(16)} marked dirty while not cached`);
    slot.dirty = true;
  }

  /** Drop a table without writing it (its cluster was freed). */
  discard(offset: number): void {
    this.slots.delete(offset);
  }

  /** Drop every clean table (after the tables were rewritten elsewhere). */
  dropClean(): void {
    for (const [off, s] of this.slots) if (!s.dirty) this.slots.delete(off);
  }

  hasDirty(): boolean {
    for (const s of this.slots.values()) if (s.dirty) return true;
    return false;
  }

  /** Write every dirty table, in offset order (no sync). */
  async flush(): Promise<void> {
    while (this.flushing) await this.flushing;
    if (!this.hasDirty()) return;
    this.flushing = this.doFlush();
    try {
      await this.flushing;
    } finally {
      this.flushing = null;
    }
  }

  private async doFlush(): Promise<void> {
    if (this.before) await this.before();
    const dirty = [...this.slots.entries()].filter(([, s]) => s.dirty).sort((a, b) => a[0] - b[0]);
    for (const [off, slot] of dirty) {
      slot.dirty = false;
      try {
        await this.dev.pwrite(slot.buf, off);
        this.stats.writes++;
      } catch (err) {
        slot.dirty = true;
        throw err;
      }
    }
  }

  private async makeRoom(keep: number): Promise<void> {
    while (this.slots.size >= this.capacity) {
      let victim: number | undefined;
      for (const [off, s] of this.slots) {
        if (off !== keep && !s.dirty) {
          victim = off;
          break;
        }
      }
      if (victim !== undefined) {
        this.slots.delete(victim);
        continue;
      }
      await this.flush();
      if (!this.hasDirty()) continue;
      return; // everything re-dirtied concurrently: go over capacity briefly rather than spin
    }
  }
}
