import { BlockDevice } from './block-device';

/** A growable in-memory block device, for tests and scratch images. */
export class MemoryDevice implements BlockDevice {
  private data: Buffer;
  private length: number;
  readonly name: string;
  readonly readOnly: boolean;
  /** Counters, so tests can assert what hit the device. */
  readonly stats = { reads: 0, writes: 0, flushes: 0, bytesRead: 0, bytesWritten: 0 };

  constructor(initial?: Buffer | number, opts: { readOnly?: boolean; name?: string } = {}) {
    if (Buffer.isBuffer(initial)) {
      this.data = Buffer.from(initial);
      this.length = initial.length;
    } else {
      this.length = initial ?? 0;
      this.data = Buffer.alloc(Math.max(this.length, 4096));
    }
    this.readOnly = opts.readOnly ?? false;
    this.name = opts.name ?? 'memory';
  }

  size(): number {
    return this.length;
  }

  /** A copy of the current contents. */
  contents(): Buffer {
    return Buffer.from(this.data.subarray(0, this.length));
  }

  async pread(buf: Buffer, offset: number): Promise<number> {
    return this.preadNow(buf, offset) ?? 0;
  }

  /** Memory never makes a read wait: every read is done on the spot (never null). */
  preadNow(buf: Buffer, offset: number): number | null {
    this.stats.reads++;
    if (offset >= this.length) return 0;
    const n = Math.min(buf.length, this.length - offset);
    this.data.copy(buf, 0, offset, offset + n);
    this.stats.bytesRead += n;
    return n;
  }

  async pwrite(buf: Buffer, offset: number): Promise<void> {
    if (this.readOnly) throw Object.assign(new Error('device is read-only'), { code: 'EROFS' });
    this.store(buf, offset);
  }

  /** Memory never makes a write wait: every write is done on the spot (false only when read-only). */
  pwriteNow(buf: Buffer, offset: number): boolean {
    if (this.readOnly) return false;
    this.store(buf, offset);
    return true;
  }

  private store(buf: Buffer, offset: number): void {
    this.stats.writes++;
    this.stats.bytesWritten += buf.length;
    this.ensure(offset + buf.length);
    buf.copy(this.data, offset);
    if (offset + buf.length > this.length) this.length = offset + buf.length;
  }

  async flush(): Promise<void> {
    this.stats.flushes++;
  }

  async truncate(size: number): Promise<void> {
    if (this.readOnly) throw Object.assign(new Error('device is read-only'), { code: 'EROFS' });
    if (size > this.length) {
      this.ensure(size);
      this.data.fill(0, this.length, size);
    } else {
      this.data.fill(0, size, this.length);
    }
    this.length = size;
  }

  async close(): Promise<void> {}

  private ensure(size: number): void {
    if (size <= this.data.length) return;
    let cap = this.data.length;
    while (cap < size) cap *= 2;
    const next = Buffer.alloc(cap);
    this.data.copy(next, 0, 0, this.length);
    this.data = next;
  }
}
