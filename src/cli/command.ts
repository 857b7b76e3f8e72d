/** What every command is, and helpers they share. */
import { OptionSpec, Parsed } from './args';
import { Qcow2Image, OpenOptions } from '../qcow2/image';

export interface Command {
  name: string;
  summary: string;
  usage: string;
  /** Extra help text after the options. */
  details?: string;
  options: OptionSpec[];
  run(p: Parsed): Promise<number>;
}

export function writeOut(s: string): void {
  process.stdout.write(s);
}

export function writeErr(s: string): void {
  process.stderr.write(s);
}

/** Open an image read-only for looking at it; a corrupt-marked image is still shown. */
export async function openForInspection(file: string, opts: OpenOptions = {}): Promise<Qcow2Image> {
  return Qcow2Image.openFile(file, { readOnly: true, allowCorrupt: true, ...opts });
}
