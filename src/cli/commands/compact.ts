import * as fs from 'fs';
import * as path from 'path';
import { OptionSpec, Parsed, value, UsageError } from '../args';
import { Command, writeOut } from '../command';
import { CliError } from '../exit';
import { compactImage } from '../../qcow2/compact';
import { mountedBy } from '../state';
import { humanSize } from '../format';

const options: OptionSpec[] = [
  { name: 'output', short: 'o', value: true, meta: 'FILE', help: 'write the compacted image to FILE instead of replacing IMAGE' },
  { name: 'help', short: 'h', help: 'show this help' },
];

async function run(p: Parsed): Promise<number> {
  const [file, ...rest] = p.positional;
  if (!file || rest.length > 0) throw new UsageError('compact takes exactly one image');
  const m = mountedBy(file);
  if (m) throw new CliError(`${file} is mounted at ${m.mountpoint} (pid ${m.pid}); unmount it first`);
  const output = value(p, 'output');
  const dst = output ?? path.join(path.dirname(path.resolve(file)), `.${path.basename(file)}.compact-${process.pid}`);
  if (output && fs.existsSync(output)) throw new CliError(`${output} already exists`);
  const r = await compactImage(file, dst);
  if (!output) {
    // Replace atomically: until the rename the original is untouched.
    fs.chmodSync(dst, fs.statSync(file).mode & 0o7777);
    fs.renameSync(dst, file);
  }
  writeOut(`${output ?? file}: ${humanSize(r.bytesBefore)} -> ${humanSize(r.bytesAfter)}\n`);
  return 0;
}

export const compactCommand: Command = {
  name: 'compact',
  summary: 'rewrite an image so freed clusters go back to the host (keeps snapshots and the backing link)',
  usage: 'qcowfs compact IMAGE [-o OUTPUT]',
  details: 'Without -o the image is replaced atomically once the compacted copy is complete. Refused while the image is mounted.',
  options,
  run,
};
