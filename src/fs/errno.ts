/**
 * The one place errors become errno values for the kernel: engine errors by
 * kind, host I/O errors by their code, anything else EIO.
 */
import { constants } from 'os';
import { QcowError } from '../qcow2/errors';
import { FuseErrno } from '../fuse/filesystem';

const E = constants.errno;

const BY_KIND: Record<string, number> = {
  corrupt: E.EIO,
  unsupported: E.EOPNOTSUPP,
  'not-qcow2': E.EIO,
  'read-only': E.EROFS,
  backing: E.EIO,
  invalid: E.EINVAL,
  locked: E.EBUSY,
  'out-of-range': E.ENXIO,
};

export function errnoOf(err: unknown): number {
  if (err instanceof FuseErrno) return err.errno;
  if (QcowError.is(err)) return BY_KIND[err.kind] ?? E.EIO;
  const code = (err as NodeJS.ErrnoException | null)?.code;
  if (typeof code === 'string' && code in E) return E[code as keyof typeof E];
  return E.EIO;
}
