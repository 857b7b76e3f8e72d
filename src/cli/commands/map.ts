import { OptionSpec, Parsed, flag, UsageError } from '../args';
import { Command, openForInspection, writeOut } from '../command';
import { MapExtent } from '../../qcow2/layer';
import { Layer } from '../../qcow2/layer';

const options: OptionSpec[] = [
  { name: 'json', help: 'print JSON in the shape of qemu-img map --output=json' },
  { name: 'help', short: 'h', help: 'show this help' },
];

/** JSON as qemu-img prints it: offset only where the range maps to a host offset. */
export function mapJson(extents: MapExtent[]): string {
  const rows = extents.map((e) => {
    const o: Record<string, unknown> = { start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data };
    if (e.compressed) o.compressed = true;
    if (e.offset !== null) o.offset = e.offset;
    return `{ ${Object.entries(o).map(([k, v]) => `${JSON.stringify(k)}: ${JSON.stringify(v)}`).join(', ')}}`;
  });
  return `[${rows.join(',\n')}]\n`;
}

function fileAt(top: Layer, depth: number): string {
  let l: Layer | null = top;
  for (let i = 0; i < depth && l; i++) l = l.backing;
  return l?.filename ?? top.filename;
}

async function run(p: Parsed): Promise<number> {
  const [file, ...rest] = p.positional;
  if (!file || rest.length > 0) throw new UsageError('map takes exactly one image');
  const img = await openForInspection(file);
  try {
    const extents = await img.blockStatus(0, img.virtualSize);
    if (flag(p, 'json')) {
      writeOut(mapJson(extents));
    } else {
      const hex = (n: number) => `0x${n.toString(16)}`;
      let out = 'Offset          Length          Mapped to       File\n';
      for (const e of extents) {
        if (!e.data || e.offset === null) continue;
        out += `${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset).padEnd(16)}${fileAt(img, e.depth)}\n`;
      }
      writeOut(out);
    }
  } finally {
    await img.close();
  }
  return 0;
}

export const mapCommand: Command = {
  name: 'map',
  summary: 'list the extents of the disk: data, zero, unallocated, which layer, host offset',
  usage: 'qcowfs map IMAGE [--json]',
  options,
  run,
};
