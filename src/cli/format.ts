/** Human-readable numbers and tables, as qemu-img prints them. */
import { Snapshot } from '../qcow2/snapshot';

export function humanSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  if (u === 0) return `${bytes} B`;
  const s = v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  return `${s.replace(/\.?0+$/, '')} ${units[u]}`;
}

export function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

/** The snapshot table of `qemu-img info` and `qemu-img snapshot -l` (lines, with its heading). */
export function snapshotTable(snaps: Snapshot[]): string[] {
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  const lines = ['Snapshot list:', 'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT'];
  for (const s of snaps) {
    const d = new Date(s.dateSec * 1000);
    const date = `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
    const secs = Math.floor(s.vmClockNsec / 1e9);
    const clock = `${p(Math.floor(secs / 3600))}:${p(Math.floor(secs / 60) % 60)}:${p(secs % 60)}.${p(Math.floor((s.vmClockNsec % 1e9) / 1e6), 3)}`;
    lines.push(`${s.id.padEnd(10)}${s.name.padEnd(18)}${humanSize(s.vmStateSize).padStart(7)} ${date} ${clock} ${String(s.icount ?? '').padStart(10)}`);
  }
  return lines;
}
