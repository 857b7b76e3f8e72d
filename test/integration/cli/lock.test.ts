import { expect } from 'chai';
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, tmpDir, run } from '../../helpers/qemu';
import { Qcow2Image } from '../../../src/qcow2/image';
import { ImageLockedError } from '../../../src/qcow2/errors';
import { lockingAvailable } from '../../../src/io/image-lock';

const BIN = path.resolve(__dirname, '../../../../bin/qcowfs');

/** qemu-io holding the image open (read-write unless `readOnly`) until killed. */
function holdWithQemu(image: string, readOnly: boolean): Promise<() => void> {
  const args = ['-f', 'qcow2', ...(readOnly ? ['-r'] : []), image];
  const child = spawn('qemu-io', args, { stdio: ['pipe', 'pipe', 'pipe'] });
  return new Promise((resolve, reject) => {
    child.stdout.once('data', () => resolve(() => child.kill('SIGKILL')));
    child.once('error', reject);
    child.stdin.write('help\n');
  });
}

/** What opening the image throws (or undefined). */
async function openError(image: string, readOnly: boolean): Promise<unknown> {
  try {
    await (await Qcow2Image.openFile(image, { readOnly })).close();
    return undefined;
  } catch (e) {
    return e;
  }
}

describe("image locks: QEMU's byte-range locks are taken and honoured", function () {
  let dir: string;
  let img: string;
  before(() => {
    dir = tmpDir();
    img = path.join(dir, 'l.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('the locking module is built', () => {
    expect(lockingAvailable()).to.equal(true);
  });

  it('a writer excludes QEMU readers and writers; readers share', async () => {
    const w = await Qcow2Image.openFile(img);
    try {
      const info = run('qemu-img', ['info', img], { allowFail: true });
      expect(info.status).to.not.equal(0);
      expect(info.stderr).to.match(/Failed to get shared "write" lock/);
      const io = run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 512', img], { allowFail: true });
      expect(io.stderr).to.match(/lock/);
    } finally {
      await w.close();
    }
    const r1 = await Qcow2Image.openFile(img, { readOnly: true });
    const r2 = await Qcow2Image.openFile(img, { readOnly: true });
    expect(run('qemu-img', ['info', img], { allowFail: true }).status).to.equal(0);
    await r1.close();
    await r2.close();
  });

  it('QEMU writing the image makes open and the CLI refuse with one line', async () => {
    const release = await holdWithQemu(img, false);
    try {
      expect(await openError(img, false)).to.be.instanceOf(ImageLockedError);
      expect(await openError(img, true)).to.be.instanceOf(ImageLockedError);
      const r = run(process.execPath, [BIN, 'info', img], { allowFail: true });
      expect(r.status).to.equal(1);
      expect(r.stderr.trim().split('\n')).to.have.length(1);
      expect(r.stderr).to.match(/another process/);
    } finally {
      release();
    }
  });

  it('QEMU reading the image still lets us read, not write', async () => {
    const release = await holdWithQemu(img, true);
    try {
      expect(await openError(img, true)).to.equal(undefined);
      expect(await openError(img, false)).to.be.instanceOf(ImageLockedError);
    } finally {
      release();
    }
  });
});
