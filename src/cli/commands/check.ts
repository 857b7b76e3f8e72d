import { OptionSpec, Parsed, flag, UsageError } from '../args';
import { Command, writeOut, writeErr } from '../command';
import { Qcow2Image } from '../../qcow2/image';
import { checkAndRepair } from '../../qcow2/check';
import { EXIT_BAD_IMAGE } from '../exit';

const options: OptionSpec[] = [
  { name: 'repair', short: 'r', help: 'rebuild the refcounts so leaks and refcount errors are fixed' },
  { name: 'json', help: 'print JSON with qemu-img check --output=json field names' },
  { name: 'help', short: 'h', help: 'show this help' },
];

async function run(p: Parsed): Promise<number> {
  const [file, ...rest] = p.positional;
  if (!file || rest.length > 0) throw new UsageError('check takes exactly one image');
  const repair = flag(p, 'repair');
  const img = await Qcow2Image.openFile(file, { readOnly: !repair, allowCorrupt: true, openBacking: false });
  let r;
  try {
    r = await checkAndRepair(img, repair);
  } finally {
    await img.close();
  }
  if (flag(p, 'json')) {
    const o: Record<string, unknown> = {
      'image-end-offset': r.imageEndOffset,
      'total-clusters': r.totalClusters,
      'check-errors': r.checkErrors,
    };
    if (r.leaks) o.leaks = r.leaks;
    if (r.corruptions) o.corruptions = r.corruptions;
    if (r.leaksFixed) o['leaks-fixed'] = r.leaksFixed;
    if (r.corruptionsFixed) o['corruptions-fixed'] = r.corruptionsFixed;
    o['allocated-clusters'] = r.allocatedClusters;
    o.filename = r.filename;
    o.format = 'qcow2';
    o['fragmented-clusters'] = r.fragmentedClusters;
    o['compressed-clusters'] = r.compressedClusters;
    writeOut(JSON.stringify(o, null, 4) + '\n');
  } else {
    for (const pr of r.problems) writeErr(pr.message + '\n');
    let out = '';
    if (r.leaksFixed || r.corruptionsFixed) out += `The following inconsistencies were found and repaired:\n\n    ${r.leaksFixed} leaked clusters\n    ${r.corruptionsFixed} corruptions\n\n`;
    if (r.corruptions) out += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    if (r.leaks) out += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (!r.corruptions && !r.leaks && !r.checkErrors) out += 'No errors were found on the image.\n';
    const pct = (n: number) => (r.totalClusters ? ((100 * n) / r.totalClusters).toFixed(2) : '0.00');
    out += `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters)}% allocated, ${r.allocatedClusters ? ((100 * r.fragmentedClusters) / r.allocatedClusters).toFixed(2) : '0.00'}% fragmented, ${r.allocatedClusters ? ((100 * r.compressedClusters) / r.allocatedClusters).toFixed(2) : '0.00'}% compressed clusters\n`;
    out += `Image end offset: ${r.imageEndOffset}\n`;
    writeOut(out);
  }
  // Exit codes as qemu-img check: 0 clean, 2 corruptions, 3 leaks only.
  if (r.corruptions || r.checkErrors) return 2;
  if (r.leaks) return EXIT_BAD_IMAGE;
  return 0;
}

export const checkCommand: Command = {
  name: 'check',
  summary: 'check the image for leaked clusters and corruption (like qemu-img check)',
  usage: 'qcowfs check IMAGE [--repair] [--json]',
  details: 'Exit status: 0 clean, 2 corruptions found, 3 only leaked clusters found, 1 the check could not run.',
  options,
  run,
};
