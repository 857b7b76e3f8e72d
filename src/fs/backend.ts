/**
 * What a file in the mount is backed by: a byte range a filesystem can read,
 * write, resize and ask about sparseness. The active image, a snapshot view
 * and a partition window all fit this shape.
 */
import { Qcow2Image } from '../qcow2/image';
import type { HostExtents } from '../qcow2/layer';

export interface FileBackend {
  readonly readOnly: boolean;
  /** Why the file is read-only, for messages. */
  readonly readOnlyReason: string | null;
  size(): number;
  read(buf: Buffer, offset: number): Promise<void>;
  /** read() done on the spot when that needs no waiting (see Qcow2Image.readNow): true, or false and nothing read. */
  readNow?(buf: Buffer, offset: number, mayBlock: boolean): boolean;
  /** Where [offset, offset+length) lies in host files, held until release(); null: use read(). */
  mapForRead?(offset: number, length: number): Promise<HostExtents | null>;
  write(data: Buffer, offset: number): Promise<void>;
  /** write() done on the spot when that needs no waiting (see Qcow2Image.writeNow): true, or false and nothing done. */
  writeNow?(data: Buffer, offset: number): boolean;
  resize(size: number): Promise<void>;
  writeZeroes(offset: number, length: number, unmap: boolean): Promise<void>;
  seekData(offset: number): Promise<number>;
  seekHole(offset: number): Promise<number>;
  flush(): Promise<void>;
  /** Bytes really held on the host for this file (st_blocks * 512). */
  allocatedBytes(): Promise<number>;
  /**
   * True once the file has stopped serving its content for good (a partition
   * whose table changed): the kernel's cached pages of it are then dropped.
   */
  readonly withdrawn?: boolean;
}

/** The active layer (or a snapshot view) of a qcow2 image as a file. */
export class ImageBackend implements FileBackend {
  constructor(readonly image: Qcow2Image) {}

  get readOnly(): boolean {
    return this.image.readOnly;
  }

  get readOnlyReason(): string | null {
    return this.image.readOnlyWhy;
  }

  size(): number {
    return this.image.virtualSize;
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.image.read(buf, offset);
  }

  readNow(buf: Buffer, offset: number, mayBlock: boolean): boolean {
    return this.image.readNow(buf, offset, mayBlock);
  }

  mapForRead(offset: number, length: number): Promise<HostExtents | null> {
    return this.image.mapForRead(offset, length);
  }

  write(data: Buffer, offset: number): Promise<void> {
    return this.image.write(data, offset);
  }

  writeNow(data: Buffer, offset: number): boolean {
    return this.image.writeNow(data, offset);
  }

  resize(size: number): Promise<void> {
    return this.image.resize(size);
  }

  writeZeroes(offset: number, length: number, unmap: boolean): Promise<void> {
    return this.image.writeZeroes(offset, length, { unmap });
  }

  seekData(offset: number): Promise<number> {
    return this.image.seekData(offset);
  }

  seekHole(offset: number): Promise<number> {
    return this.image.seekHole(offset);
  }

  flush(): Promise<void> {
    return this.image.flush();
  }

  allocatedBytes(): Promise<number> {
    return this.image.allocatedBytes();
  }
}
