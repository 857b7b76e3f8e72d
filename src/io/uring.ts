/**
 * Reads that miss the page cache, through one io_uring per process (the
 * native module's uring.c). The kernel completes a buffered read itself and
 * signals the event loop, so a cold read costs one wake-up instead of the
 * threadpool's two; on virtual machines that is most of a 4 KiB read's time.
 * Where io_uring is missing or refused, uringReader() is null and reads go
 * to the threadpool.
 */
import { constants as osConstants } from 'os';
import { loadNative, type NativeModule, type UringHandle } from './native';

/** Reads in flight at once; more wait for the threadpool. */
const RING_ENTRIES = 256;

export class UringReader {
  private readonly waiting = new Map<number, { resolve: (n: number) => void; buf: Buffer }>();
  private nextId = 1;

  private constructor(private readonly native: NativeModule, private readonly ring: UringHandle) {}

  static create(native: NativeModule): UringReader | null {
    let reader: UringReader | null = null;
    const ring = native.uringCreate(RING_ENTRIES, (id, result) => reader?.complete(id, result));
    if (typeof ring === 'number') return null;
    reader = new UringReader(native, ring);
    return reader;
  }

  /**
   * Read buf[offset, offset+length) from fd at `position`: bytes read (0 at
   * the end of the file) or -errno. Null when the ring is full.
   */
  read(fd: number, buf: Buffer, offset: number, length: number, position: number): Promise<number> | null {
    const id = this.nextId;
    this.nextId = this.nextId >= Number.MAX_SAFE_INTEGER ? 1 : this.nextId + 1;
    const r = this.native.uringRead(this.ring, fd, buf, offset, length, position, id);
    if (r === -osConstants.errno.EBUSY) return null;
    if (r < 0) return Promise.resolve(r);
    // The buffer stays referenced here until the kernel is done with it.
    return new Promise((resolve) => this.waiting.set(id, { resolve, buf }));
  }

  private complete(id: number, result: number): void {
    const w = this.waiting.get(id);
    if (w === undefined) return;
    this.waiting.delete(id);
    w.resolve(result);
  }
}

let shared: UringReader | null | undefined;

/** The process's io_uring reader, or null (no native module, no io_uring, or QCOWFS_NO_URING=1). */
export function uringReader(): UringReader | null {
  if (shared !== undefined) return shared;
  const native = loadNative();
  shared = native === null || process.env.QCOWFS_NO_URING === '1' ? null : UringReader.create(native);
  return shared;
}
