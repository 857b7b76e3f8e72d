/**
 * A layer of a backing chain: anything that can be read as a virtual disk
 * and say which of its ranges hold data. A qcow2 image is one; a raw file
 * used as a backing file is another.
 */
import { BlockDevice, hasFileDescriptor, hasHoleMap, readFull } from '../io/block-device';

/** One extent of block status, in the shape of `qemu-img map --output=json`. */
export interface MapExtent {
  start: number;
  length: number;
  /** Chain depth that decides this range (0 = the image itself). */
  depth: number;
  /** Allocated in the layer at `depth` (data or zero there). */
  present: boolean;
  zero: boolean;
  data: boolean;
  compressed: boolean;
  /** Host offset in `file`, when the range maps to one. */
  offset: number | null;
}

/** A range of an open host file; fd -1 stands for a run of zeroes. */
export interface HostSlice {
  fd: number;
  position: number;
  length: number;
}

/**
 * Where a guest range's bytes lie on the host, for readers that move them
 * without copying (splice). The layer keeps those ranges as they are (no
 * cluster is freed or reused) until `release` is called, exactly once.
 */
export interface HostExtents {
  slices: HostSlice[];
  release(): void;
}

export interface Layer {
  /** Guest-visible size in bytes. */
  readonly virtualSize: number;
  /** Format name, as qemu-img names it ("qcow2", "raw"). */
  readonly format: string;
  /** Path or name for messages. */
  readonly filename: string;
  /** The layer below, if any. */
  readonly backing: Layer | null;
  /** Read `buf.length` bytes at `offset` (must lie within virtualSize). */
  read(buf: Buffer, offset: number): Promise<void>;
  /** Block status of [offset, offset+length), walking the chain below; depth counted from this layer. */
  blockStatus(offset: number, length: number): Promise<MapExtent[]>;
  /**
   * The host ranges holding [offset, offset+length) (within virtualSize), or
   * null when some of it is not a plain file range (compressed clusters, a
   * device without a descriptor): read() it then.
   */
  mapForRead?(offset: number, length: number): Promise<HostExtents | null>;
  close(): Promise<void>;
}

/** A raw file as a layer (a raw backing file). */
export class RawLayer implements Layer {
  readonly format = 'raw';
  readonly backing = null;
  constructor(private readonly dev: BlockDevice, readonly filename: string) {}

  get virtualSize(): number {
    return this.dev.size();
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    await readFull(this.dev, buf, offset);
  }

  /** The file's own bytes (a raw file's content never moves). */
  async mapForRead(offset: number, length: number): Promise<HostExtents | null> {
    if (!hasFileDescriptor(this.dev)) return null;
    return { slices: [{ fd: this.dev.fd, position: offset, length }], release: () => undefined };
  }

  /**
   * As QEMU's file driver: the host file's holes (lseek SEEK_HOLE/SEEK_DATA)
   * read as zeroes and are reported zero, not data; the rest is data. Where
   * the host cannot tell, everything is data.
   */
  async blockStatus(offset: number, length: number): Promise<MapExtent[]> {
    const end = offset + length;
    const extent = (start: number, stop: number, data: boolean): MapExtent => ({
      start, length: stop - start, depth: 0, present: true, zero: !data, data, compressed: false, offset: start,
    });
    const dev = this.dev;
    if (!hasHoleMap(dev)) return [extent(offset, end, true)];
    const out: MapExtent[] = [];
    let pos = offset;
    while (pos < end) {
      const data = dev.seekHoleOrData(pos, false);
      if (data === undefined) return mergeExtents([...out, extent(pos, end, true)]);
      if (data === null || data >= end) {
        out.push(extent(pos, end, false));
        break;
      }
      if (data > pos) out.push(extent(pos, data, false));
      const hole = dev.seekHoleOrData(data, true);
      const stop = hole === undefined || hole === null ? end : Math.min(Math.max(hole, data + 1), end);
      out.push(extent(data, stop, true));
      pos = stop;
    }
    return out;
  }

  async close(): Promise<void> {
    await this.dev.close();
  }
}

/** Merge adjacent extents that qemu-img map would print as one. */
export function mergeExtents(extents: MapExtent[]): MapExtent[] {
  const out: MapExtent[] = [];
  for (const e of extents) {
    if (e.length === 0) continue;
    const last = out[out.length - 1];
    if (
      last &&
      last.start + last.length === e.start &&
      last.depth === e.depth &&
      last.present === e.present &&
      last.zero === e.zero &&
      last.data === e.data &&
      last.compressed === e.compressed &&
      ((last.offset === null && e.offset === null) || (last.offset !== null && e.offset !== null && last.offset + last.length === e.offset))
    ) {
      last.length += e.length;
    } else {
      out.push({ ...e });
    }
  }
  return out;
}
