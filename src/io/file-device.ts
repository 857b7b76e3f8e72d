import * as fs from 'fs';
import { BlockDevice } from './block-device';
import { lockImage, READ_ONLY_LOCK, READ_WRITE_LOCK } from './image-lock';

const fsp = fs.promises;

/** A block device over a host file, with positioned I/O on one descriptor. */
export class FileDevice implements BlockDevice {
  private length: number;

  private constructor(
    private readonly handle: fs.promises.FileHandle,
    readonly name: string,
    readonly readOnly: boolean,
    length: number,
  ) {
    this.length = length;
  }

  /**
   * Open a file. With `lock`, take QEMU's image locks (read-only users
   * share, writers exclude everyone else) and fail with ImageLockedError.
   */
  static async open(path: string, opts: { readOnly?: boolean; lock?: boolean } = {}): Promise<FileDevice> {
    const readOnly = opts.readOnly ?? false;
    const handle = await fsp.open(path, readOnly ? 'r' : 'r+');
    try {
      const st = await handle.stat();
      if (!st.isFile() && !st.isBlockDevice()) {
        throw Object.assign(new Error(`${path}: not a regular file`), { code: 'EINVAL' });
      }
      if (opts.lock) lockImage(handle.fd, path, readOnly ? READ_ONLY_LOCK : READ_WRITE_LOCK);
      return new FileDevice(handle, path, readOnly, st.size);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** The underlying descriptor (for byte-range locks). */
  get fd(): number {
    return this.handle.fd;
  }

  size(): number {
    return this.length;
  }

  async pread(buf: Buffer, offset: number): Promise<number> {
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.handle.read(buf, done, buf.length - done, offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  async pwrite(buf: Buffer, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await this.handle.write(buf, done, buf.length - done, offset + done);
      done += bytesWritten;
    }
    if (offset + buf.length > this.length) this.length = offset + buf.length;
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.handle.datasync();
  }

  async truncate(size: number): Promise<void> {
    await this.handle.truncate(size);
    this.length = size;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }

  /** Bytes the file occupies on the host (st_blocks * 512). */
  async allocatedBytes(): Promise<number> {
    const st = await this.handle.stat();
    return st.blocks * 512;
  }
}
