/**
 * 64-bit big-endian fields as JavaScript numbers. Values above
 * Number.MAX_SAFE_INTEGER cannot be represented exactly and are refused
 * (returned as NaN by readU64, so callers validate), never rounded.
 */

/** Read a big-endian u64; NaN if it does not fit a safe integer. */
export function readU64(buf: Buffer, off: number): number {
  const hi = buf.readUInt32BE(off);
  const lo = buf.readUInt32BE(off + 4);
  if (hi > 0x1fffff) return NaN;
  return hi * 0x100000000 + lo;
}

/** Write a safe non-negative integer as a big-endian u64. */
export function writeU64(buf: Buffer, off: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`not a u64-safe value: ${value}`);
  buf.writeUInt32BE(Math.floor(value / 0x100000000), off);
  buf.writeUInt32BE(value >>> 0, off + 4);
}

/** hi word of a safe integer. */
export function hiWord(value: number): number {
  return Math.floor(value / 0x100000000);
}

/** lo word of a safe integer. */
export function loWord(value: number): number {
  return value >>> 0;
}

/** Combine two words into a number (caller guarantees it is safe). */
export function fromWords(hi: number, lo: number): number {
  return hi * 0x100000000 + (lo >>> 0);
}
