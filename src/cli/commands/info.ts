import { Qcow2Image } from '../../qcow2/image';
import { Layer } from '../../qcow2/layer';
import { featureName } from '../../qcow2/header';
import { QCOW2_COMPAT_LAZY_REFCOUNTS, QCOW2_INCOMPAT_CORRUPT, QCOW2_INCOMPAT_DIRTY } from '../../qcow2/constants';
import { OptionSpec, Parsed, flag } from '../args';
import { humanSize, snapshotTable } from '../format';
import { Command, openForInspection, writeOut } from '../command';

const options: OptionSpec[] = [
  { name: 'json', help: 'print JSON with qemu-img info --output=json field names' },
  { name: 'help', short: 'h', help: 'show this help' },
];

function imageInfo(img: Qcow2Image, actualSize: number): Record<string, unknown> {
  const h = img.header;
  const out: Record<string, unknown> = {
    'virtual-size': img.virtualSize,
    filename: img.filename,
    'cluster-size': img.clusterSize,
    format: 'qcow2',
    'actual-size': actualSize,
    'format-specific': {
      type: 'qcow2',
      data: h.version >= 3
        ? {
          compat: '1.1',
          'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib',
          'lazy-refcounts': (h.compatibleFeatures & QCOW2_COMPAT_LAZY_REFCOUNTS) !== 0,
          'refcount-bits': 2 ** h.refcountOrder,
          corrupt: (h.incompatibleFeatures & QCOW2_INCOMPAT_CORRUPT) !== 0,
          'extended-l2': img.extendedL2,
          ...(img.hasDataFile ? { 'data-file': h.dataFile, 'data-file-raw': img.dataFileRaw } : {}),
        }
        : { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 },
    },
    'dirty-flag': (h.incompatibleFeatures & QCOW2_INCOMPAT_DIRTY) !== 0,
  };
  if (h.backingFile !== null) {
    out['backing-filename'] = h.backingFile;
    out['full-backing-filename'] = img.backing?.filename ?? h.backingFile;
    if (h.backingFormat) out['backing-filename-format'] = h.backingFormat;
  }
  if (img.snapshots.length > 0) {
    out.snapshots = img.snapshots.map((s) => ({
      icount: s.icount ?? undefined,
      'vm-clock-nsec': s.vmClockNsec % 1e9,
      name: s.name,
      'date-sec': s.dateSec,
      'date-nsec': s.dateNsec,
      'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
      id: s.id,
      'vm-state-size': s.vmStateSize,
    }));
  }
  // Beyond qemu-img: what a user of the raw view wants to know.
  out['qcowfs'] = {
    version: h.version,
    'l1-size': h.l1Size,
    'refcount-table-clusters': h.refcountTableClusters,
    features: {
      incompatible: bitNames(img, 'incompatible', h.incompatibleFeatures),
      compatible: bitNames(img, 'compatible', h.compatibleFeatures),
      autoclear: bitNames(img, 'autoclear', h.autoclearFeatures),
    },
  };
  return out;
}

function bitNames(img: Qcow2Image, type: 'incompatible' | 'compatible' | 'autoclear', bits: number): string[] {
  const out: string[] = [];
  for (let b = 0; b < 32; b++) if (bits & (1 << b)) out.push(featureName(img.header, type, b));
  return out;
}

function chainOf(img: Qcow2Image): Layer[] {
  const out: Layer[] = [];
  for (let l: Layer | null = img; l; l = l.backing) out.push(l);
  return out;
}

function text(info: Record<string, unknown>, img: Qcow2Image): string {
  const fsd = (info['format-specific'] as { data: Record<string, unknown> }).data;
  const lines = [
    `image: ${img.filename}`,
    'file format: qcow2',
    `virtual size: ${humanSize(img.virtualSize)} (${img.virtualSize} bytes)`,
    `disk size: ${humanSize(info['actual-size'] as number)}`,
    `cluster_size: ${img.clusterSize}`,
  ];
  if (img.header.backingFile !== null) {
    lines.push(`backing file: ${img.header.backingFile}${info['full-backing-filename'] !== img.header.backingFile ? ` (actual path: ${info['full-backing-filename'] as string})` : ''}`);
    if (img.header.backingFormat) lines.push(`backing file format: ${img.header.backingFormat}`);
    const chain = chainOf(img).slice(1);
    if (chain.length > 1) lines.push(`backing chain: ${chain.map((l) => `${l.filename} (${l.format})`).join(' -> ')}`);
  }
  if (img.snapshots.length > 0) lines.push(...snapshotTable(img.snapshots));
  lines.push('Format specific information:');
  for (const [k, v] of Object.entries(fsd)) lines.push(`    ${k.replace(/-/g, ' ')}: ${String(v)}`);
  const q = info['qcowfs'] as { features: Record<string, string[]> };
  const feats = [...q.features.incompatible, ...q.features.compatible, ...q.features.autoclear];
  if (feats.length > 0) lines.push(`    features: ${feats.join(', ')}`);
  return lines.join('\n') + '\n';
}

async function run(p: Parsed): Promise<number> {
  const [file, ...rest] = p.positional;
  if (!file || rest.length > 0) throw new (await import('../args')).UsageError('info takes exactly one image');
  const img = await openForInspection(file);
  try {
    const info = imageInfo(img, await img.allocatedBytes());
    writeOut(flag(p, 'json') ? JSON.stringify(info, null, 4) + '\n' : text(info, img));
  } finally {
    await img.close();
  }
  return 0;
}

export const infoCommand: Command = {
  name: 'info',
  summary: 'show what an image is: version, size, features, backing chain, snapshots',
  usage: 'qcowfs info IMAGE [--json]',
  options,
  run,
};
