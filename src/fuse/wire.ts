/**
 * Little-endian 64-bit fields as JavaScript numbers. The FUSE structs carry
 * u64/s64 fields; inside qcowfs they are plain `number`s, so the conversion
 * happens here, at the edge, one 32-bit word at a time (no BigInt allocation
 * on the request path). Values beyond Number.MAX_SAFE_INTEGER are refused —
 * readers return NaN so callers turn that into a typed fault, writers throw —
 * never rounded, and `&`/`|` never touch a 64-bit value.
 */

const TWO_32 = 0x100000000;

/** Read a little-endian u64; NaN when it does not fit a safe integer. */
export function readU64LE(buf: Buffer, off: number): number {
  const lo = buf.readUInt32LE(off);
  const hi = buf.readUInt32LE(off + 4);
  if (hi > 0x1fffff) return NaN;
  return hi * TWO_32 + lo;
}

/** Read a little-endian s64; NaN when it does not fit a safe integer. */
export function readI64LE(buf: Buffer, off: number): number {
  const lo = buf.readUInt32LE(off);
  const hi = buf.readInt32LE(off + 4);
  const value = hi * TWO_32 + lo;
  return Number.isSafeInteger(value) ? value : NaN;
}

/** Write a safe non-negative integer as a little-endian u64. */
export function writeU64LE(buf: Buffer, off: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`not a u64-safe value: ${value}`);
  buf.writeUInt32LE(value >>> 0, off);
  buf.writeUInt32LE(Math.floor(value / TWO_32), off + 4);
}

/** Write a safe integer (possibly negative) as a little-endian s64. */
export function writeI64LE(buf: Buffer, off: number, value: number): void {
  if (!Number.isSafeInteger(value)) throw new RangeError(`not an s64-safe value: ${value}`);
  const hi = Math.floor(value / TWO_32);
  buf.writeUInt32LE(value - hi * TWO_32, off);
  buf.writeInt32LE(hi, off + 4);
}
