/**
 * The kernel's page cache over the raw view: write-only opens write past it
 * (they never read what it would keep), and what other opens cached or
 * mapped stays coherent with those writes. Checked through the mount, with
 * fincore, and then by QEMU.
 */
import { expect } from 'chai';
import * as crypto from 'crypto';
import * as fs from 'fs';
import { qemuImg, run } from '../../helpers/qemu';
import { Sandbox, expectCheckClean, qemuConvertRaw, sha256Range } from '../../helpers/mount';

const MiB = 1024 * 1024;

/** Bytes of `file` in the page cache. */
function resident(file: string): number {
  return Number(run('fincore', ['--bytes', '--noheadings', '--output', 'RES', file]).stdout.trim());
}

/** Whether this kernel is at least major.minor. */
function kernelAtLeast(major: number, minor: number): boolean {
  const [a, b] = fs.readFileSync('/proc/sys/kernel/osrelease', 'utf8').split('.').map((x) => parseInt(x, 10));
  return a > major || (a === major && b >= minor);
}

describe('qcowfs mount: write-only opens and the page cache', function () {
  this.timeout(120_000);
  let sb: Sandbox;
  let mnt: string;
  before(() => {
    sb = new Sandbox('qcowfs-cache-');
    mnt = sb.mkdir('mnt');
  });
  afterEach(() => sb.cleanup({ keepDir: true }));
  after(() => sb.cleanup());

  it('dd into the raw file writes past the page cache (Linux 6.6+); a read-write open still caches', () => {
    const img = sb.path('wo.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
    sb.mount(img, mnt);
    const raw = `${mnt}/wo.raw`;
    const src = sb.path('src.bin');
    fs.writeFileSync(src, crypto.randomBytes(8 * MiB));
    run('dd', [`if=${src}`, `of=${raw}`, 'bs=1M', 'conv=notrunc,fsync', 'status=none']);
    // Before Linux 6.6 the kernel does not keep other opens' pages coherent with direct writes: cached.
    expect(resident(raw), 'pages cached after a write-only open wrote 8 MiB').to.equal(kernelAtLeast(6, 6) ? 0 : 8 * MiB);
    const fd = fs.openSync(raw, 'r+');
    try {
      fs.writeSync(fd, crypto.randomBytes(MiB), 0, MiB, 16 * MiB);
    } finally {
      fs.closeSync(fd);
    }
    expect(resident(raw), 'a read-write open writes through the cache').to.equal(MiB);
    expect(sha256Range(raw, 0, 8 * MiB)).to.equal(sha256Range(src, 0, 8 * MiB));
    sb.unmount(mnt);
    expectCheckClean(img);
    expect(sha256Range(qemuConvertRaw(img, sb.path('wo.out')), 0, 8 * MiB)).to.equal(sha256Range(src, 0, 8 * MiB));
  });

  it('what a reader cached or mapped shows the bytes a write-only open writes', () => {
    const img = sb.path('co.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
    sb.mount(img, mnt);
    const raw = `${mnt}/co.raw`;
    // A reader caches and maps the first pages, a write-only open writes into them (a whole
    // page, part of one, and past the mapped range), and the reader looks again.
    const script = [
      'import mmap, os, sys',
      'raw = sys.argv[1]',
      'r = os.open(raw, os.O_RDWR)',
      'm = mmap.mmap(r, 4 * 4096, mmap.MAP_SHARED)',
      'before = (os.pread(r, 4096, 0), m[4096:4100], os.pread(r, 8, 8192 + 100))',
      'w = os.open(raw, os.O_WRONLY)',
      "os.pwrite(w, b'A' * 4096, 0)",
      "os.pwrite(w, b'BCDE', 4096)",
      "os.pwrite(w, b'F' * 8, 8192 + 100)",
      'os.close(w)',
      "assert before == (bytes(4096), bytes(4), bytes(8)), before",
      "assert os.pread(r, 4096, 0) == b'A' * 4096, 'cached page'",
      "assert m[4096:4100] == b'BCDE', m[4096:4100]",
      "assert m[0:4] == b'AAAA', m[0:4]",
      "assert os.pread(r, 8, 8192 + 100) == b'F' * 8, 'part of a page'",
      "print('ok')",
    ].join('\n');
    expect(run('python3', ['-c', script, raw]).stdout.trim()).to.equal('ok');
    sb.unmount(mnt);
    expectCheckClean(img);
    const out = fs.readFileSync(qemuConvertRaw(img, sb.path('co.out')));
    expect(out.subarray(0, 4096).equals(Buffer.alloc(4096, 'A'))).to.equal(true);
    expect(out.subarray(4096, 4100).toString()).to.equal('BCDE');
    expect(out.subarray(8192 + 100, 8192 + 108).equals(Buffer.alloc(8, 'F'))).to.equal(true);
  });
});
