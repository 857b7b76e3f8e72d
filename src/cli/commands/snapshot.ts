import { OptionSpec, Parsed, flag, value, UsageError } from '../args';
import { Command, writeOut } from '../command';
import { CliError } from '../exit';
import { Qcow2Image } from '../../qcow2/image';
import { mountedBy } from '../state';
import { snapshotTable } from '../format';

const options: OptionSpec[] = [
  { name: 'list', short: 'l', help: 'list the snapshots' },
  { name: 'create', short: 'c', value: true, meta: 'NAME', help: 'take a snapshot of the current disk' },
  { name: 'delete', short: 'd', value: true, meta: 'NAME', help: 'delete a snapshot (by id or name)' },
  { name: 'apply', short: 'a', value: true, meta: 'NAME', help: 'revert the disk to a snapshot (by id or name)' },
  { name: 'help', short: 'h', help: 'show this help' },
];

async function run(p: Parsed): Promise<number> {
  const [file, ...rest] = p.positional;
  if (!file || rest.length > 0) throw new UsageError('snapshot takes exactly one image');
  const actions = ['list', 'create', 'delete', 'apply'].filter((a) => flag(p, a));
  if (actions.length !== 1) throw new UsageError('give exactly one of -l, -c NAME, -d NAME, -a NAME');
  const action = actions[0];
  if (action !== 'list') {
    const m = mountedBy(file);
    if (m) throw new CliError(`${file} is mounted at ${m.mountpoint} (pid ${m.pid}); unmount it first`);
  }
  const img = await Qcow2Image.openFile(file, { readOnly: action === 'list', openBacking: false });
  try {
    switch (action) {
      case 'list':
        if (img.snapshots.length > 0) writeOut(snapshotTable(img.snapshots).join('\n') + '\n');
        break;
      case 'create': await img.createSnapshot(value(p, 'create')!); break;
      case 'delete': await img.deleteSnapshot(value(p, 'delete')!); break;
      case 'apply': await img.applySnapshot(value(p, 'apply')!); break;
    }
  } finally {
    await img.close();
  }
  return 0;
}

export const snapshotCommand: Command = {
  name: 'snapshot',
  summary: 'list, create, delete or apply internal snapshots (like qemu-img snapshot)',
  usage: 'qcowfs snapshot IMAGE -l | -c NAME | -d NAME | -a NAME',
  details: 'Changing snapshots is refused while a qcowfs daemon serves the image.',
  options,
  run,
};
