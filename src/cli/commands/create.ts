import { OptionSpec, Parsed, UsageError, value, values } from '../args';
import { Command } from '../command';
import { createImageFile, CreateOptions } from '../../qcow2/create';
import { parseSize } from '../../qcow2/layout';

const options: OptionSpec[] = [
  { name: 'option', short: 'o', value: true, repeat: true, meta: 'K=V[,K=V]', help: 'cluster_size, refcount_bits, compat (0.10|1.1), lazy_refcounts, extended_l2, compression_type (zlib|zstd)' },
  { name: 'backing', short: 'b', value: true, meta: 'FILE', help: 'backing file (relative names resolve against the image directory)' },
  { name: 'backing-format', short: 'F', value: true, meta: 'FMT', help: 'backing file format: qcow2 or raw (probed when not given)' },
  { name: 'help', short: 'h', help: 'show this help' },
];

function onOff(k: string, v: string): boolean {
  if (v === 'on' || v === 'true' || v === '') return true;
  if (v === 'off' || v === 'false') return false;
  throw new UsageError(`${k} must be on or off`);
}

export function parseCreateOptions(list: string[]): Partial<CreateOptions> {
  const o: Partial<CreateOptions> = {};
  for (const item of list.flatMap((s) => s.split(','))) {
    if (!item) continue;
    const eq = item.indexOf('=');
    const k = eq < 0 ? item : item.slice(0, eq);
    const v = eq < 0 ? '' : item.slice(eq + 1);
    switch (k) {
      case 'cluster_size': o.clusterSize = parseSize(v); break;
      case 'refcount_bits': o.refcountBits = Number(v); break;
      case 'compat':
        if (v === 'v2' || v === '0.10') o.compat = '0.10';
        else if (v === 'v3' || v === '1.1') o.compat = '1.1';
        else throw new UsageError(`invalid compat '${v}' (0.10 or 1.1)`);
        break;
      case 'lazy_refcounts': o.lazyRefcounts = onOff(k, v); break;
      case 'extended_l2': o.extendedL2 = onOff(k, v); break;
      case 'compression_type':
        if (v !== 'zlib' && v !== 'zstd') throw new UsageError(`invalid compression_type '${v}' (zlib or zstd)`);
        o.compressionType = v;
        break;
      case 'size': o.size = parseSize(v); break;
      default: throw new UsageError(`unknown create option '${k}'`);
    }
  }
  return o;
}

async function run(p: Parsed): Promise<number> {
  const [file, sizeText, ...rest] = p.positional;
  if (!file || rest.length > 0) throw new UsageError('create takes an image name and a size');
  const o = parseCreateOptions(values(p, 'option'));
  if (sizeText !== undefined) {
    try {
      o.size = parseSize(sizeText);
    } catch (err) {
      throw new UsageError((err as Error).message);
    }
  }
  const backing = value(p, 'backing');
  const fmt = value(p, 'backing-format');
  if (fmt !== undefined && fmt !== 'qcow2' && fmt !== 'raw') throw new UsageError(`unsupported backing format '${fmt}' (qcow2 or raw)`);
  if (!backing && o.size === undefined) throw new UsageError('an image size is required without a backing file');
  await createImageFile(file, { ...o, backingFile: backing, backingFormat: fmt as 'qcow2' | 'raw' | undefined });
  return 0;
}

export const createCommand: Command = {
  name: 'create',
  summary: 'create an empty qcow2 image',
  usage: 'qcowfs create IMAGE SIZE [-o cluster_size=64K,refcount_bits=16,compat=1.1,lazy_refcounts=on,extended_l2=on] [-b BACKING [-F qcow2|raw]]',
  details: 'SIZE takes K, M, G, T suffixes (powers of 1024). With -b the size defaults to the backing file\'s.',
  options,
  run,
};
