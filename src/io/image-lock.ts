/**
 * QEMU's image locking (block/file-posix.c): open file description locks on
 * single bytes of the image file. For each permission a user holds it
 * read-locks byte 100 + bit; for each permission it does not let others
 * have, byte 200 + bit. Taking a permission first checks that nobody locks
 * 200 + bit, and not sharing one checks that nobody locks 100 + bit. So a
 * qcowfs writer and a QEMU writer refuse each other, and readers share.
 */
import { loadNative, type NativeModule } from './native';

/** Another process holds a conflicting lock on the image file. */
export class LockConflictError extends Error {
  readonly code = 'ELOCKED';
  constructor(readonly file: string, readonly reason: string) {
    super(`${file}: ${reason}`);
    this.name = 'LockConflictError';
  }
}

/** BLK_PERM_* bits (include/block/block-common.h). */
export const BLK_PERM_CONSISTENT_READ = 0x01;
export const BLK_PERM_WRITE = 0x02;
export const BLK_PERM_WRITE_UNCHANGED = 0x04;
export const BLK_PERM_RESIZE = 0x08;
const BLK_PERM_ALL = 0x0f;
const RAW_LOCK_PERM_BASE = 100;
const RAW_LOCK_SHARED_BASE = 200;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];

type OfdLock = Pick<NativeModule, 'setLock' | 'testLock'>;

let warned = false;

function load(): OfdLock | null {
  return loadNative();
}

/** Whether image locks can be taken on this installation. */
export function lockingAvailable(): boolean {
  return load() !== null;
}

export interface LockRequest {
  /** Permissions this user takes. */
  perm: number;
  /** Permissions others may still have. */
  shared: number;
}

export const READ_ONLY_LOCK: LockRequest = { perm: BLK_PERM_CONSISTENT_READ, shared: BLK_PERM_ALL & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE) };
export const READ_WRITE_LOCK: LockRequest = {
  perm: BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED | BLK_PERM_RESIZE,
  shared: BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED,
};

/**
 * Check for conflicts and take the locks on `fd` (held until it is closed).
 * Throws ImageLockedError naming the permission another process holds.
 */
export function lockImage(fd: number, file: string, req: LockRequest): void {
  const n = load();
  if (!n) {
    if (!warned && process.env.QCOWFS_NO_LOCK_WARNING === undefined) {
      warned = true;
      process.stderr.write('qcowfs: warning: the native module is not built (npm run build): images are not locked against QEMU, and I/O takes slower paths\n');
    }
    return;
  }
  const unshared = BLK_PERM_ALL & ~req.shared;
  for (let i = 0; i < PERM_NAMES.length; i++) {
    const bit = 1 << i;
    if ((req.perm & bit) && n.testLock(fd, RAW_LOCK_SHARED_BASE + i, 1, 1) === 1) {
      throw new LockConflictError(file, `failed to get "${PERM_NAMES[i]}" lock: another process (QEMU or qcowfs) is using the image`);
    }
    if ((unshared & bit) && n.testLock(fd, RAW_LOCK_PERM_BASE + i, 1, 1) === 1) {
      throw new LockConflictError(file, `failed to get shared "${PERM_NAMES[i]}" lock: another process (QEMU or qcowfs) is using the image`);
    }
  }
  for (let i = 0; i < PERM_NAMES.length; i++) {
    const bit = 1 << i;
    if (req.perm & bit) setOrThrow(n, fd, RAW_LOCK_PERM_BASE + i, file, PERM_NAMES[i]);
    if (unshared & bit) setOrThrow(n, fd, RAW_LOCK_SHARED_BASE + i, file, PERM_NAMES[i]);
  }
}

function setOrThrow(n: OfdLock, fd: number, byte: number, file: string, what: string): void {
  const err = n.setLock(fd, byte, 1, 1);
  if (err !== 0) throw new LockConflictError(file, `failed to lock "${what}" (errno ${err}): another process is using the image`);
}
