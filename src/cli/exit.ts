/**
 * Exit codes and the one-line message for every error a command can end
 * with: 0 ok, 1 operational error, 2 usage error, 3 corrupt or unsupported
 * image. No stack traces for anything a user can cause.
 */
import { QcowError } from '../qcow2/errors';
import { UsageError } from './args';

export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;
export const EXIT_BAD_IMAGE = 3;

/** An operational failure with a message meant for the user. */
export class CliError extends Error {
  constructor(message: string, readonly exitCode = EXIT_FAILURE) {
    super(message);
    this.name = 'CliError';
  }
}

const SYSCALL_WORDS: Record<string, string> = {
  ENOENT: 'no such file or directory',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EISDIR: 'is a directory',
  ENOTDIR: 'not a directory',
  EEXIST: 'file exists',
  EBUSY: 'device or resource busy',
  ENOSPC: 'no space left on device',
  EROFS: 'read-only file system',
  EIO: 'input/output error',
};

export function describeError(err: unknown): { message: string; code: number } {
  if (err instanceof UsageError) return { message: `${err.message} (see --help)`, code: EXIT_USAGE };
  if (err instanceof CliError) return { message: err.message, code: err.exitCode };
  if (QcowError.is(err)) {
    const bad = err.kind === 'corrupt' || err.kind === 'unsupported' || err.kind === 'not-qcow2' || err.kind === 'backing';
    return { message: err.message, code: bad ? EXIT_BAD_IMAGE : err.kind === 'invalid' ? EXIT_USAGE : EXIT_FAILURE };
  }
  const e = err as NodeJS.ErrnoException;
  if (e && typeof e.code === 'string' && e.syscall) {
    const words = SYSCALL_WORDS[e.code] ?? e.code;
    return { message: `${e.path ?? e.syscall}: ${words}`, code: EXIT_FAILURE };
  }
  if (e && typeof e.code === 'string' && e.message) return { message: e.message, code: EXIT_FAILURE };
  return { message: `internal error: ${(err as Error)?.stack ?? String(err)}`, code: EXIT_FAILURE };
}
