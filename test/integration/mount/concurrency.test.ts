/**
 * Several processes on one raw view at once: writers on separate regions,
 * writers sharing clusters (each its own bytes of them, over a backing file
 * so every first write copies the cluster), readers alongside, and fio with
 * two verifying jobs. Checked through the mount and then by QEMU.
 */
import { expect } from 'chai';
import { spawn } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, patternBuffer, run } from '../../helpers/qemu';
import { Sandbox, expectCheckClean, qemuConvertRaw, sha256Range } from '../../helpers/mount';

const MiB = 1024 * 1024;

function sha(b: Buffer): string {
  return crypto.createHash('sha256').update(b).digest('hex');
}

/** Run a command to completion; resolves with its status and stderr. */
function start(cmd: string, args: string[]): Promise<{ status: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const c = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    c.on('close', (status) => resolve({ status, stderr: err }));
  });
}

/** A python writer: `count` blocks of `bs` bytes from `src` at `first + i*stride`, fsync at the end. */
const STRIDED_WRITER = `
import os, sys
raw, src, first, stride, bs, count, direct = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
data = open(src, 'rb').read()
fd = os.open(raw, os.O_WRONLY | (os.O_DIRECT if direct else 0))
import mmap
buf = mmap.mmap(-1, bs)
for i in range(count):
    buf.seek(0)
    buf.write(data[i * bs:(i + 1) * bs])
    if os.pwrite(fd, buf, first + i * stride) != bs:
        sys.exit('short write')
os.fsync(fd)
os.close(fd)
`;

describe('qcowfs mount: concurrent processes', function () {
  let sb: Sandbox;
  let mnt: string;
  before(() => {
    sb = new Sandbox('qcowfs-conc-');
    mnt = sb.mkdir('mnt');
  });
  afterEach(() => sb.cleanup({ keepDir: true }));
  after(() => sb.cleanup());

  it('two dd writers on separate regions and two readers of a third, all at once', async () => {
    const img = sb.path('dd.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '96M');
    const third = patternBuffer(16 * MiB, 3);
    fs.writeFileSync(sb.path('third.src'), third);
    qemuIo(img, [`write -s ${sb.path('third.src')} 64M 16M`]);
    const a = patternBuffer(24 * MiB, 1);
    const b = patternBuffer(24 * MiB, 2);
    fs.writeFileSync(sb.path('a.src'), a);
    fs.writeFileSync(sb.path('b.src'), b);
    sb.mount(img, mnt);
    const raw = path.join(mnt, 'dd.raw');
    const results = await Promise.all([
      start('dd', [`if=${sb.path('a.src')}`, `of=${raw}`, 'bs=64k', 'conv=notrunc,fsync', 'status=none']),
      start('dd', [`if=${sb.path('b.src')}`, `of=${raw}`, 'bs=1M', `seek=32`, 'oflag=direct', 'conv=notrunc,fsync', 'status=none']),
      start('sh', ['-c', `dd if=${raw} bs=128k skip=512 count=128 iflag=direct status=none | cmp - ${sb.path('third.src')}`]),
      start('sh', ['-c', `dd if=${raw} bs=1M skip=64 count=16 status=none | cmp - ${sb.path('third.src')}`]),
    ]);
    results.forEach((r, i) => expect(r.status, `process ${i}: ${r.stderr}`).to.equal(0));
    expect(sha256Range(raw, 0, 24 * MiB)).to.equal(sha(a));
    expect(sha256Range(raw, 32 * MiB, 24 * MiB)).to.equal(sha(b));
    sb.unmount(mnt);
    expectCheckClean(img);
    const q = fs.readFileSync(qemuConvertRaw(img, sb.path('dd.qemu')));
    expect(sha(q.subarray(0, 24 * MiB))).to.equal(sha(a));
    expect(q.subarray(24 * MiB, 32 * MiB).equals(Buffer.alloc(8 * MiB))).to.equal(true);
    expect(sha(q.subarray(32 * MiB, 56 * MiB))).to.equal(sha(b));
    expect(sha(q.subarray(64 * MiB, 80 * MiB))).to.equal(sha(third));
  });

  for (const direct of [false, true]) {
    it(`two writers sharing every cluster of an overlay, ${direct ? 'O_DIRECT' : 'through the page cache'}: no write and no backing byte is lost`, async () => {
      const base = sb.path(`share-base-${direct}.qcow2`);
      const top = sb.path(`share-top-${direct}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
      qemuIo(base, ['write -P 0xa5 0 16M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
      const baseSum = sha(fs.readFileSync(base));
      const clusters = 256; // 64 KiB each
      const bs = 4096;
      const srcA = patternBuffer(clusters * bs, 11);
      const srcB = patternBuffer(clusters * bs, 12);
      fs.writeFileSync(sb.path('share-a.src'), srcA);
      fs.writeFileSync(sb.path('share-b.src'), srcB);
      sb.mount(top, mnt);
      const raw = path.join(mnt, path.basename(top).replace('.qcow2', '.raw'));
      const d = direct ? '1' : '0';
      const [ra, rb] = await Promise.all([
        start('python3', ['-c', STRIDED_WRITER, raw, sb.path('share-a.src'), '0', '65536', String(bs), String(clusters), d]),
        start('python3', ['-c', STRIDED_WRITER, raw, sb.path('share-b.src'), '32768', '65536', String(bs), String(clusters), d]),
      ]);
      expect(ra.status, ra.stderr).to.equal(0);
      expect(rb.status, rb.stderr).to.equal(0);
      const want = Buffer.alloc(16 * MiB, 0xa5);
      for (let k = 0; k < clusters; k++) {
        srcA.copy(want, k * 65536, k * bs, (k + 1) * bs);
        srcB.copy(want, k * 65536 + 32768, k * bs, (k + 1) * bs);
      }
      run('python3', ['-c', 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)', raw]);
      expect(sha256Range(raw, 0, 16 * MiB)).to.equal(sha(want));
      sb.unmount(mnt);
      expectCheckClean(top);
      expect(sha(fs.readFileSync(qemuConvertRaw(top, sb.path('share.qemu'))))).to.equal(sha(want));
      // Writes went to the overlay only.
      expect(sha(fs.readFileSync(base))).to.equal(baseSum);
    });
  }

  it('fio: two jobs doing verified random reads and writes on separate halves', () => {
    const img = sb.path('fio.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
    sb.mount(img, mnt);
    const raw = path.join(mnt, 'fio.raw');
    const r = run('fio', [
      `--filename=${raw}`, '--rw=randrw', '--bs=4k', '--ioengine=psync', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1',
      '--verify_state_save=0', '--output=/dev/null', '--randrepeat=1',
      // Job a goes through the page cache, job b bypasses it.
      '--name=a', '--offset=0', '--size=24M', '--name=b', '--offset=32M', '--size=24M', '--direct=1',
    ], { allowFail: true, cwd: sb.dir });
    expect(r.status, r.stdout + r.stderr).to.equal(0);
    sb.unmount(mnt);
    expectCheckClean(img);
  });
});
