/**
 * The block device the qcow2 engine works over: positioned reads and writes,
 * a size, flush and (optionally) truncate. The engine never touches files
 * directly, so unit tests run it on an in-memory device.
 */
export interface BlockDevice {
  /** Size in bytes. */
  size(): number;
  /** Read into `buf` at `offset`; returns bytes read (short only at end of device). */
  pread(buf: Buffer, offset: number): Promise<number>;
  /**
   * The same read, done before returning when it can be without waiting on
   * anything but the host's page cache (or, with `mayBlock`, on the disk):
   * bytes read, or null when it would have to wait or the read failed (the
   * caller then uses pread(), which reports the error; `buf` may have been
   * written to).
   */
  preadNow?(buf: Buffer, offset: number, mayBlock: boolean): number | null;
  /** Write all of `buf` at `offset`, growing the device if needed. */
  pwrite(buf: Buffer, offset: number): Promise<void>;
  /**
   * The same write, done before returning when it can be without waiting on
   * anything but the host's page cache: true, or false when it would have
   * to wait or the write failed (the caller then uses pwrite(), which writes
   * it all again and reports the error).
   */
  pwriteNow?(buf: Buffer, offset: number): boolean;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  /** Set the device size (grow with zeroes or shrink). */
  truncate(size: number): Promise<void>;
  /** Release the device. */
  close(): Promise<void>;
  /** True when the device refuses writes. */
  readonly readOnly: boolean;
  /** A human name for messages (a path, or "memory"). */
  readonly name: string;
}

/** Read exactly `buf.length` bytes; the part past the end of the device reads as zeroes. */
export async function readFull(dev: BlockDevice, buf: Buffer, offset: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const n = await dev.pread(done === 0 ? buf : buf.subarray(done), offset + done);
    if (n <= 0) {
      buf.fill(0, done);
      return;
    }
    done += n;
  }
}

/** Devices that can tell how many bytes they really occupy on the host. */
export interface AllocatedSize {
  allocatedBytes(): Promise<number>;
}

export function hasAllocatedSize(dev: BlockDevice): dev is BlockDevice & AllocatedSize {
  return typeof (dev as Partial<AllocatedSize>).allocatedBytes === 'function';
}

/** Devices that know where their holes are (a sparse host file). */
export interface HoleMap {
  /**
   * The first offset >= `offset` that is data (or a hole, with `hole`), as
   * lseek(SEEK_DATA / SEEK_HOLE) answers; null for data when there is none
   * before the end, and undefined when the host cannot tell.
   */
  seekHoleOrData(offset: number, hole: boolean): number | null | undefined;
}

export function hasHoleMap(dev: BlockDevice): dev is BlockDevice & HoleMap {
  return typeof (dev as Partial<HoleMap>).seekHoleOrData === 'function';
}

/** Devices over an open host file, whose byte ranges a transport can splice without copying. */
export interface FileBacked {
  /** The descriptor; it stays open until close(). */
  readonly fd: number;
  /**
   * A transport is about to read (splice) this range of the file itself,
   * past the device: the device learns of the read as of its own (it may
   * follow sequential streams; FileDevice drop-behind).
   */
  reading?(position: number, length: number): void;
}

export function hasFileDescriptor(dev: BlockDevice): dev is BlockDevice & FileBacked {
  return typeof (dev as Partial<FileBacked>).fd === 'number';
}
