/**
 * Typed errors of the format engine. Each carries what a user needs to act:
 * corruption names the structure, the host offset and the reason. The FUSE
 * boundary maps them to errno once; the CLI maps them to a line and an exit code.
 */
const BRAND = Symbol.for('qcowfs.QcowError');

export abstract class QcowError extends Error {
  readonly [BRAND] = true;
  abstract readonly kind: string;

  static is(err: unknown): err is QcowError {
    return typeof err === 'object' && err !== null && (err as Record<symbol, unknown>)[BRAND] === true;
  }
}

/** The image's metadata contradicts itself or the spec. */
export class CorruptImageError extends QcowError {
  readonly kind = 'corrupt';
  constructor(
    /** Which structure: "header", "L1 table", "L2 table", "refcount block", ... */
    readonly structure: string,
    /** Host offset of the offending bytes or entry (-1 when not tied to one). */
    readonly hostOffset: number,
    readonly reason: string,
  ) {
    super(`corrupt image: ${structure}${hostOffset >= 0 ? ` at host offset 0x${hostOffset.toString(16)}` : ''}: ${reason}`);
    this.name = 'CorruptImageError';
  }
}

/** A valid image that uses something this engine does not implement. */
export class UnsupportedImageError extends QcowError {
  readonly kind = 'unsupported';
  constructor(readonly feature: string, detail?: string) {
    super(`unsupported image: ${feature}${detail ? ` (${detail})` : ''}`);
    this.name = 'UnsupportedImageError';
  }
}

/** Not a qcow2 image at all (bad magic, too short). */
export class NotQcow2Error extends QcowError {
  readonly kind = 'not-qcow2';
  constructor(readonly path: string, reason: string) {
    super(`${path}: not a qcow2 image: ${reason}`);
    this.name = 'NotQcow2Error';
  }
}

/** A write was attempted on an image opened read-only (or demoted to it). */
export class ReadOnlyImageError extends QcowError {
  readonly kind = 'read-only';
  constructor(reason = 'image is open read-only') {
    super(reason);
    this.name = 'ReadOnlyImageError';
  }
}

/** A backing file is missing, loops, or has the wrong format. */
export class BackingChainError extends QcowError {
  readonly kind = 'backing';
  constructor(readonly path: string, reason: string) {
    super(`backing file ${path}: ${reason}`);
    this.name = 'BackingChainError';
  }
}

/** A caller passed a range or value the engine cannot honour. */
export class InvalidRequestError extends QcowError {
  readonly kind = 'invalid';
  constructor(reason: string) {
    super(reason);
    this.name = 'InvalidRequestError';
  }
}

/** Another process holds the image (QEMU's byte-range locks). */
export class ImageLockedError extends QcowError {
  readonly kind = 'locked';
  constructor(readonly path: string, reason: string) {
    super(`${path}: ${reason}`);
    this.name = 'ImageLockedError';
  }
}

/** Offsets past the end of the virtual disk for seekData/seekHole (lseek's ENXIO). */
export class OutOfRangeError extends QcowError {
  readonly kind = 'out-of-range';
  constructor(reason: string) {
    super(reason);
    this.name = 'OutOfRangeError';
  }
}
