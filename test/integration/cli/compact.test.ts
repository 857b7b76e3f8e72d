import { expect } from 'chai';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, qemuRaw, qemuCheck, qemuInfo, tmpDir, run } from '../../helpers/qemu';

const BIN = path.resolve(__dirname, '../../../../bin/qcowfs');

function qcowfs(...args: string[]): { stdout: string; stderr: string; status: number } {
  return run(process.execPath, [BIN, ...args], { allowFail: true });
}

function clean(image: string): boolean {
  const c = qemuCheck(image);
  return (c.leaks ?? 0) === 0 && (c.corruptions ?? 0) === 0 && c['check-errors'] === 0;
}

describe('qcowfs compact: freed clusters go back to the host', function () {
  let dir: string;
  before(() => { dir = tmpDir(); });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  for (const opts of ['compat=1.1', 'compat=0.10', 'cluster_size=16384,refcount_bits=8', 'extended_l2=on', 'compression_type=zstd']) {
    it(`shrinks the file and keeps content, snapshots and backing (${opts})`, () => {
      const base = path.join(dir, `base-${opts.replace(/\W/g, '_')}.qcow2`);
      const img = path.join(dir, `c-${opts.replace(/\W/g, '_')}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
      qemuIo(base, ['write -P 3 0 64M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, '-b', path.basename(base), '-F', 'qcow2', img);
      qemuIo(img, ['write -P 1 0 24M', 'write -c -P 7 30M 1M', 'write -z 40M 1M']);
      qemuImg('snapshot', '-c', 'old', img);
      qemuIo(img, ['write -P 2 0 16M']);
      // Deleting the snapshot frees the 16M it alone held.
      qemuImg('snapshot', '-d', 'old', img);
      qemuImg('snapshot', '-c', 'keep', img);
      const active = qemuRaw(img);
      // The snapshot now shares everything with the active disk; the discarded range is free space.
      const sizeBefore = fs.statSync(img).size;
      const r = qcowfs('compact', img);
      expect(r.status, r.stderr).to.equal(0);
      expect(fs.statSync(img).size).to.be.lessThan(sizeBefore - 8 * 1024 * 1024);
      expect(clean(img)).to.equal(true);
      expect(qemuRaw(img).equals(active)).to.equal(true);
      expect(qemuRaw(img, { snapshot: 'keep' }).equals(active)).to.equal(true);
      expect((qemuInfo(img)['backing-filename'] as string)).to.equal(path.basename(base));
    });
  }

  it('keeps distinct snapshot contents (shared clusters stay shared)', () => {
    const img = path.join(dir, 'snaps.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '32M');
    qemuIo(img, ['write -P 1 0 8M']);
    qemuImg('snapshot', '-c', 'a', img);
    qemuIo(img, ['write -P 2 0 1M']);
    qemuImg('snapshot', '-c', 'b', img);
    qemuIo(img, ['write -P 3 2M 1M', 'discard 16M 8M']);
    const views = { active: qemuRaw(img), a: qemuRaw(img, { snapshot: 'a' }), b: qemuRaw(img, { snapshot: 'b' }) };
    const out = path.join(dir, 'snaps-compact.qcow2');
    expect(qcowfs('compact', img, '-o', out).status).to.equal(0);
    expect(clean(out)).to.equal(true);
    expect(qemuRaw(out).equals(views.active)).to.equal(true);
    expect(qemuRaw(out, { snapshot: 'a' }).equals(views.a)).to.equal(true);
    expect(qemuRaw(out, { snapshot: 'b' }).equals(views.b)).to.equal(true);
    // Shared data is stored once: the copy is no larger than the data it must hold (8M + 1M + 1M, plus metadata).
    expect(fs.statSync(out).size).to.be.lessThan(11 * 1024 * 1024);
    expect(qcowfs('compact', img, '-o', out).status).to.equal(1);
  });
});
