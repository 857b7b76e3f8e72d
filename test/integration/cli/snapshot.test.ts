import { expect } from 'chai';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, qemuRaw, qemuCheck, tmpDir, run } from '../../helpers/qemu';

const BIN = path.resolve(__dirname, '../../../../bin/qcowfs');

function qcowfs(...args: string[]): { stdout: string; stderr: string; status: number } {
  return run(process.execPath, [BIN, ...args], { allowFail: true });
}

function expectClean(image: string): void {
  const c = qemuCheck(image);
  expect({ leaks: c.leaks ?? 0, corruptions: c.corruptions ?? 0, errors: c['check-errors'] }).to.deep.equal({ leaks: 0, corruptions: 0, errors: 0 });
}

describe('qcowfs snapshot (internal snapshots, checked with qemu-img)', function () {
  let dir: string;
  before(() => { dir = tmpDir(); });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  for (const opts of ['compat=1.1', 'compat=0.10', 'compat=1.1,cluster_size=4096,refcount_bits=8', 'compat=1.1,extended_l2=on']) {
    it(`create, apply and delete keep every view intact (${opts})`, () => {
      const img = path.join(dir, `s-${opts.replace(/[^a-z0-9]/gi, '_')}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, img, '64M');
      qemuIo(img, ['write -P 1 0 2M', 'write -c -P 9 4M 64k', 'write -z 8M 1M']);
      expect(qcowfs('snapshot', img, '-c', 'one').status).to.equal(0);
      expectClean(img);
      const one = qemuRaw(img, { snapshot: 'one' });
      expect(one.equals(qemuRaw(img))).to.equal(true);
      qemuIo(img, ['write -P 2 0 1M', 'write -P 3 4M 4k']);
      expect(qcowfs('snapshot', img, '-c', 'two').status).to.equal(0);
      const two = qemuRaw(img, { snapshot: 'two' });
      expect(qemuImg('snapshot', '-l', img)).to.match(/\bone\b[\s\S]*\btwo\b/);
      expect(qemuRaw(img, { snapshot: 'one' }).equals(one)).to.equal(true);
      expectClean(img);
      expect(qcowfs('snapshot', img, '-a', 'one').status).to.equal(0);
      expectClean(img);
      expect(qemuRaw(img).equals(one)).to.equal(true);
      expect(qemuRaw(img, { snapshot: 'two' }).equals(two)).to.equal(true);
      expect(qcowfs('snapshot', img, '-d', 'one').status).to.equal(0);
      expectClean(img);
      expect(qemuRaw(img).equals(one)).to.equal(true);
      expect(qcowfs('snapshot', img, '-d', '2').status).to.equal(0);
      expectClean(img);
      expect(qemuImg('snapshot', '-l', img).trim()).to.equal('');
      expect(qemuRaw(img).equals(one)).to.equal(true);
    });
  }

  it('deletes a snapshot QEMU took, and lists like qemu-img', () => {
    const img = path.join(dir, 'q.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
    qemuIo(img, ['write -P 5 0 1M']);
    qemuImg('snapshot', '-c', 'from-qemu', img);
    const l = qcowfs('snapshot', img, '-l');
    expect(l.status).to.equal(0);
    expect(l.stdout).to.match(/^1\s+from-qemu\s/m);
    expect(qcowfs('snapshot', img, '-d', 'from-qemu').status).to.equal(0);
    expectClean(img);
  });

  it('refuses a snapshot that 1-bit refcounts cannot count, leaving the image clean', () => {
    const img = path.join(dir, 'r1.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', img, '16M');
    qemuIo(img, ['write -P 5 0 1M']);
    const before = fs.readFileSync(img);
    const r = qcowfs('snapshot', img, '-c', 'x');
    expect(r.status).to.equal(2);
    expect(r.stderr).to.match(/refcount_bits=1/);
    expect(fs.readFileSync(img).equals(before)).to.equal(true);
    expectClean(img);
  });

  it('refuses a snapshot whose references would overflow 2-bit refcounts, changing nothing', () => {
    // Compressed clusters packed into one 4 KiB host cluster already hold several references each.
    const img = path.join(dir, 'r2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,refcount_bits=2', img, '16M');
    qemuIo(img, ['write -c -P 9 0 64k']);
    const before = fs.readFileSync(img);
    const r = qcowfs('snapshot', img, '-c', 'x');
    expect(r.status).to.equal(2);
    expect(r.stderr).to.match(/refcount overflow/);
    expect(fs.readFileSync(img).equals(before)).to.equal(true);
    expectClean(img);
  });

  it('refuses unknown snapshots and a second action with one line', () => {
    const img = path.join(dir, 'e.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
    const r = qcowfs('snapshot', img, '-d', 'nope');
    expect(r.status).to.equal(2);
    expect(r.stderr.trim().split('\n')).to.have.length(1);
    expect(r.stderr).to.match(/no snapshot 'nope'/);
    expect(qcowfs('snapshot', img, '-l', '-c', 'x').status).to.equal(2);
  });
});
