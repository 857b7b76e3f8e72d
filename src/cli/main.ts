/** qcowfs command line: argv -> command, one-line errors, meaningful exit codes. */
import { parseArgs, formatOptions, flag, UsageError } from './args';
import { describeError, EXIT_OK, EXIT_USAGE } from './exit';
import { Command, writeErr, writeOut } from './command';
import { infoCommand } from './commands/info';
import { mapCommand } from './commands/map';
import { checkCommand } from './commands/check';
import { createCommand } from './commands/create';
import { resizeCommand } from './commands/resize';
import { mountCommand } from './commands/mount';
import { unmountCommand } from './commands/unmount';
import { snapshotCommand } from './commands/snapshot';
import { compactCommand } from './commands/compact';

export const commands: Command[] = [mountCommand, unmountCommand, infoCommand, mapCommand, checkCommand, createCommand, resizeCommand, snapshotCommand, compactCommand];

export function registerCommand(c: Command): void {
  if (!commands.some((x) => x.name === c.name)) commands.push(c);
}

function version(): string {
  // eslint-disable-next-line @typescript-eslint/no-var-requires
  return (require('../../../package.json') as { version: string }).version;
}

function mainHelp(): string {
  const w = Math.max(...commands.map((c) => c.name.length));
  return [
    'qcowfs - qcow2 disk images as plain raw files',
    '',
    'Usage: qcowfs COMMAND [OPTIONS] ...',
    '',
    'Commands:',
    ...commands.map((c) => `  ${c.name.padEnd(w)}  ${c.summary}`),
    '',
    'Run `qcowfs COMMAND --help` for the options of a command.',
    '',
    'Exit status: 0 success, 1 operational error, 2 usage error, 3 corrupt or unsupported image.',
    '',
  ].join('\n');
}

export function commandHelp(c: Command): string {
  return [`Usage: ${c.usage}`, '', c.summary, '', 'Options:', formatOptions(c.options), ...(c.details ? ['', c.details] : []), ''].join('\n');
}

export async function main(argv: string[]): Promise<number> {
  try {
    const [name, ...rest] = argv;
    if (!name || name === '--help' || name === '-h' || name === 'help') {
      writeOut(mainHelp());
      return name ? EXIT_OK : EXIT_USAGE;
    }
    if (name === '--version' || name === '-V') {
      writeOut(`qcowfs ${version()}\n`);
      return EXIT_OK;
    }
    const cmd = commands.find((c) => c.name === name);
    if (!cmd) throw new UsageError(`unknown command '${name}'`);
    const parsed = parseArgs(rest, cmd.options);
    if (flag(parsed, 'help')) {
      writeOut(commandHelp(cmd));
      return EXIT_OK;
    }
    return await cmd.run(parsed);
  } catch (err) {
    const { message, code } = describeError(err);
    writeErr(`qcowfs: ${message}\n`);
    return code;
  }
}
