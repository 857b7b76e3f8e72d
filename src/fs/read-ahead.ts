/**
 * Read-ahead for files served past the kernel's page cache (direct I/O).
 *
 * The kernel reads ahead of a program that reads a cached file in order:
 * while the program works on one piece, the next is already on its way. A
 * direct-I/O file gets none of that. Each read waits for the daemon, which
 * copies the bytes out of the image's page cache (pages that came fresh
 * from the disk, so the copy is slow) before it can answer. `cp` of a
 * --direct-io mount spent most of its time waiting so.
 *
 * This reads ahead for such a file the way the kernel would have: once a
 * read of a file follows the one before it, the same length after it is
 * read from the host's page cache into a buffer as soon as the event loop
 * is free (after the reply has been written, while the program works on
 * it), and a read of exactly that range is answered from the buffer. Only
 * what the page cache holds is read ahead; nothing waits for the disk.
 * One buffer for all files: a second sequential reader at the same time
 * only takes turns with the first.
 *
 * Anything that changes what a file shows calls changed(), when it starts
 * and again when it is done: what was read ahead is then forgotten. A write
 * still under way when the read-ahead ran may have landed after it; the
 * second call covers that.
 */
import type { FileBackend } from './backend';

interface Range {
  key: object;
  offset: number;
  length: number;
}

export class DirectReadAhead {
  private buf: Buffer | null = null;
  /** The range the buffer holds, valid until changed() or the next read-ahead. */
  private held: Range | null = null;
  /** The read-ahead to run once the loop is free; the latest asked for wins. */
  private next: (Range & { backend: FileBackend }) | null = null;
  private scheduled = false;
  /** Where the last read of each file ended, to tell a sequential reader. */
  private readonly lastEnd = new WeakMap<object, number>();
  /** Reads answered from the buffer, and read-aheads made (for tests). */
  readonly stats = { hits: 0, reads: 0 };

  constructor(private readonly later: (run: () => void) => void = setImmediate) {}

  /**
   * The bytes of [offset, offset+length) of file `key`, if they were read
   * ahead and nothing changed since; null otherwise. The buffer is left
   * untouched until the event loop's next turn: the caller writes its reply
   * before that.
   */
  take(key: object, offset: number, length: number): Buffer | null {
    const h = this.held;
    if (h === null || h.key !== key || h.offset !== offset || h.length !== length) return null;
    this.held = null;
    this.stats.hits++;
    return this.buf!.subarray(0, length);
  }

  /**
   * A read of [offset, offset+length) of `key` was answered. If it followed
   * the read before it, read the same length after it once the loop is free.
   */
  follow(key: object, backend: FileBackend, offset: number, length: number): void {
    const sequential = this.lastEnd.get(key) === offset;
    this.lastEnd.set(key, offset + length);
    if (!sequential || backend.readNow === undefined) return;
    this.next = { key, backend, offset: offset + length, length };
    if (this.scheduled) return;
    this.scheduled = true;
    this.later(() => this.run());
  }

  /** What a file shows changed or is changing: forget what was read ahead. */
  changed(): void {
    this.held = null;
    this.next = null;
  }

  private run(): void {
    this.scheduled = false;
    const t = this.next;
    this.next = null;
    if (t === null) return;
    const end = Math.min(t.offset + t.length, t.backend.size());
    if (end <= t.offset) return;
    const length = end - t.offset;
    if (this.buf === null || this.buf.length < length) this.buf = Buffer.allocUnsafe(length);
    this.held = null; // the buffer is being overwritten
    let read = false;
    try {
      read = t.backend.readNow!(this.buf.subarray(0, length), t.offset, false);
    } catch {
      read = false; // the read itself, when it comes, meets the error and reports it
    }
    if (!read) return;
    this.stats.reads++;
    this.held = { key: t.key, offset: t.offset, length };
  }
}
