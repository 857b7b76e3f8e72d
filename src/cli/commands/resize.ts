import { OptionSpec, Parsed, UsageError } from '../args';
import { Command } from '../command';
import { Qcow2Image } from '../../qcow2/image';
import { parseSize } from '../../qcow2/layout';

const options: OptionSpec[] = [{ name: 'help', short: 'h', help: 'show this help' }];

async function run(p: Parsed): Promise<number> {
  const [file, sizeText, ...rest] = p.positional;
  if (!file || !sizeText || rest.length > 0) throw new UsageError('resize takes an image and a size');
  const img = await Qcow2Image.openFile(file);
  try {
    let size: number;
    const rel = /^([+-])(.*)$/.exec(sizeText);
    try {
      size = rel ? img.virtualSize + (rel[1] === '+' ? 1 : -1) * parseSize(rel[2]) : parseSize(sizeText);
    } catch (err) {
      throw new UsageError((err as Error).message);
    }
    await img.resize(size);
  } finally {
    await img.close();
  }
  return 0;
}

export const resizeCommand: Command = {
  name: 'resize',
  summary: 'grow or shrink the virtual disk',
  usage: 'qcowfs resize IMAGE [+|-]SIZE',
  details: 'Growing reads as zeroes; shrinking frees the clusters past the end and is refused for images with internal snapshots.',
  options,
  run,
};
