/** Pure layout arithmetic (QEMU's offset_to_l1_index and friends). */

export function alignUp(value: number, to: number): number {
  return Math.ceil(value / to) * to;
}

export function alignDown(value: number, to: number): number {
  return Math.floor(value / to) * to;
}

export function sizeToClusters(bytes: number, clusterSize: number): number {
  return Math.ceil(bytes / clusterSize);
}

/** L2 entries in one table: cluster_size / entry size (8, or 16 with extended L2). */
export function l2EntriesPerTable(clusterBits: number, extendedL2: boolean): number {
  return 2 ** clusterBits / (extendedL2 ? 16 : 8);
}

/** Bytes of guest disk one L2 table maps. */
export function bytesPerL2Table(clusterBits: number, extendedL2: boolean): number {
  return l2EntriesPerTable(clusterBits, extendedL2) * 2 ** clusterBits;
}

/** L1 entries needed for a virtual size (size_to_l1). */
export function l1EntriesFor(virtualSize: number, clusterBits: number, extendedL2: boolean): number {
  return Math.ceil(virtualSize / bytesPerL2Table(clusterBits, extendedL2));
}

/** Parse a size with an optional K/M/G/T/P/E suffix (powers of 1024), as qemu-img does. */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new RangeError(`invalid size '${text}'`);
  const mult: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };
  const v = Math.round(parseFloat(m[1]) * mult[m[2].toLowerCase()]);
  if (!Number.isSafeInteger(v)) throw new RangeError(`size '${text}' too large`);
  return v;
}
