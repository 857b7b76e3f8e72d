/**
 * What a mount shows: every qcow2 variant QEMU writes, byte for byte as
 * `qemu-img convert -O raw` gives it, with SEEK_DATA/SEEK_HOLE following
 * `qemu-img map`; several images in one mount, a mount over a regular file,
 * read-only mounts and internal snapshots, detached and in the foreground.
 */
import { expect } from 'chai';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, patternBuffer, run } from '../../helpers/qemu';
import { loadNative } from '../../../src/io/native';
import {
  Sandbox, qcowfs, isMounted, seekDataRanges, qemuDataRanges, expectCheckClean, expectSameBytes,
  qemuConvertRaw, errnoOf, processGone, sha256Range, cacheDropsWhile,
} from '../../helpers/mount';

/** Data that compresses about 2:1, so compressed clusters are neither trivial nor skipped. */
function halfRandom(sb: Sandbox, name: string, length: number, seed: number): string {
  const b = patternBuffer(length, seed);
  for (let i = 0; i < length; i += 64) b.fill(0, i, Math.min(length, i + 32));
  const p = sb.path(name);
  fs.writeFileSync(p, b);
  return p;
}

function sha(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

interface Fixture {
  name: string;
  /** Builds the image (and whatever it refers to) in the sandbox; returns the image path. */
  make(sb: Sandbox): string;
}

const fixtures: Fixture[] = [
  {
    name: 'v2 (compat=0.10), 64K clusters, zlib-compressed clusters',
    make: (sb) => {
      const img = sb.path('v2.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', img, '16M');
      const src = halfRandom(sb, 'v2.src', 192 * 1024, 1);
      qemuIo(img, ['write -P 1 0 1M', 'write -P 2 3000000 100001', 'write -z 5M 1M', `write -c -s ${src} 8M 192k`, 'write -P 3 16773120 4096']);
      return img;
    },
  },
  {
    name: 'v3, 512 B clusters, unaligned writes',
    make: (sb) => {
      const img = sb.path('c512.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', img, '8M');
      qemuIo(img, ['write -P 1 1000 300k', 'write -P 2 5M 1M', 'write -z -u 5300k 7k', 'write -P 4 8387584 512']);
      return img;
    },
  },
  {
    name: 'v3, 64K clusters, zero clusters and zlib-compressed clusters',
    make: (sb) => {
      const img = sb.path('c64k.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', img, '32M');
      const src = halfRandom(sb, 'c64k.src', 256 * 1024, 2);
      qemuIo(img, ['write -P 3 0 4M', 'write -z 1M 1M', 'write -z -u 2M 128k', `write -c -s ${src} 8M 256k`, 'write -c -P 4 12M 64k', 'write -z 20M 64k']);
      return img;
    },
  },
  {
    name: 'v3, 2M clusters, a partial last cluster',
    make: (sb) => {
      const img = sb.path('c2m.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', img, '67109376');
      qemuIo(img, ['write -P 5 100k 3M', 'write -z 8M 2M', 'write -P 6 63M 1M', 'write -P 7 67108864 512']);
      return img;
    },
  },
  {
    name: 'extended L2 (subclusters), zero and compressed clusters',
    make: (sb) => {
      const img = sb.path('ext-l2.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', img, '16M');
      const src = halfRandom(sb, 'ext-l2.src', 64 * 1024, 3);
      qemuIo(img, ['write -P 1 0 3k', 'write -P 2 70k 10k', 'write -P 3 128k 64k', 'write -z 136k 4k', 'write -z 1M 64k', `write -c -s ${src} 2M 64k`, 'write -P 4 3M 2049']);
      return img;
    },
  },
  {
    name: 'zstd-compressed clusters, 2M clusters with extended L2',
    make: (sb) => {
      const img = sb.path('zstd.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd,cluster_size=2M,extended_l2=on', img, '32M');
      const src = halfRandom(sb, 'zstd.src', 4 << 20, 4);
      qemuIo(img, [`write -c -s ${src} 0 4M`, 'write -c -P 9 8M 2M', 'write -P 8 100k 64k', 'write -P 10 20M 100k']);
      return img;
    },
  },
  {
    name: 'a three-image qcow2 backing chain with differing sizes and cluster sizes',
    make: (sb) => {
      const base = sb.path('chain-base.qcow2');
      const mid = sb.path('chain-mid.qcow2');
      const top = sb.path('chain-top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', base, '8M');
      qemuIo(base, ['write -P 1 0 8M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'chain-base.qcow2', '-F', 'qcow2', mid, '12M');
      qemuIo(mid, ['write -P 2 1M 1M', 'write -P 3 9M 1M', 'write -z 4M 64k']);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=128k', '-b', 'chain-mid.qcow2', '-F', 'qcow2', top, '16M');
      qemuIo(top, ['write -P 4 1536k 1M', 'write -z 6M 256k', 'write -P 5 100k 5k', 'write -P 6 14M 128k']);
      return top;
    },
  },
  {
    name: 'a raw backing file',
    make: (sb) => {
      const base = sb.path('rawbase.img');
      // Written throughout: a raw layer counts as data everywhere (holes in it are not looked for).
      fs.writeFileSync(base, patternBuffer(6 << 20, 5));
      const top = sb.path('rawtop.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'rawbase.img', '-F', 'raw', top, '8M');
      qemuIo(top, ['write -P 4 1M 1M', 'write -z 2M 64k', 'write -P 5 5M 2M']);
      return top;
    },
  },
  {
    name: 'an external data file',
    make: (sb) => {
      const img = sb.path('extdata.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${sb.path('extdata.data')}`, img, '16M');
      qemuIo(img, ['write -P 1 0 1M', 'write -P 2 5M 300k', 'write -z 5M 64k', 'write -P 3 16711680 65536']);
      return img;
    },
  },
  {
    name: 'an external data file with data_file_raw',
    make: (sb) => {
      const img = sb.path('extraw.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${sb.path('extraw.data')},data_file_raw=on`, img, '16M');
      qemuIo(img, ['write -P 1 64k 1M', 'write -P 2 9M 300k']);
      return img;
    },
  },
];

describe('qcowfs mount: images read through a real mount', function () {
  let sb: Sandbox;
  let mnt: string;
  before(() => {
    sb = new Sandbox('qcowfs-fixtures-');
    mnt = sb.mkdir('mnt');
  });
  afterEach(() => sb.cleanup({ keepDir: true }));
  after(() => sb.cleanup());

  for (const fx of fixtures) {
    it(`${fx.name}: byte-exact, SEEK_DATA/SEEK_HOLE as qemu-img map, image untouched`, () => {
      const img = fx.make(sb);
      const want = qemuConvertRaw(img, `${img}.want`);
      const wantData = qemuDataRanges(img);
      sb.mount(img, mnt);
      const raw = path.join(mnt, path.basename(img).replace(/\.[^.]*$/, '.raw'));
      expect(fs.readdirSync(mnt)).to.deep.equal([path.basename(raw)]);
      expect(fs.statSync(raw).size).to.equal(fs.statSync(want).size);
      expectSameBytes(raw, want);
      expect(seekDataRanges(raw)).to.deep.equal(wantData);
      sb.unmount(mnt);
      // Mounting and reading leaves an image QEMU reads the same and finds clean.
      expectCheckClean(img);
      expectSameBytes(qemuConvertRaw(img, `${img}.after`), want);
    });
  }

  it('without the native module (QCOWFS_NO_NATIVE=1): says so, and serves the same bytes through the threadpool paths', () => {
    // Compressed and plain clusters and a backing file: every read path that has a native shortcut.
    const img = fixtures[0].make(sb);
    const top = sb.path('nonative-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', img, '-F', 'qcow2', top);
    qemuIo(top, ['write -P 9 100k 200k']);
    const want = qemuConvertRaw(top, `${top}.want`);
    const saved = process.env.QCOWFS_NO_NATIVE;
    process.env.QCOWFS_NO_NATIVE = '1';
    let r;
    try {
      r = qcowfs('mount', top, mnt);
    } finally {
      if (saved === undefined) delete process.env.QCOWFS_NO_NATIVE;
      else process.env.QCOWFS_NO_NATIVE = saved;
    }
    sb.track(mnt);
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stderr).to.match(/native module is not built/);
    const raw = path.join(mnt, 'nonative-top.raw');
    expectSameBytes(raw, want);
    expect(seekDataRanges(raw)).to.deep.equal(qemuDataRanges(top));
    sb.unmount(mnt);
    expectCheckClean(top);
  });

  it('serves several images in one mount, each as its own file', () => {
    const a = sb.path('multi-a.qcow2');
    const b = sb.path('multi-b.qcow2');
    const c = sb.path('multi-c.img');
    qemuImg('create', '-q', '-f', 'qcow2', a, '4M');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', b, '6M');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', c, '1000000');
    qemuIo(a, ['write -P 1 0 4M']);
    qemuIo(b, ['write -P 2 1M 1M']);
    qemuIo(c, ['write -P 3 4096 4096']);
    const wantA = qemuConvertRaw(a, `${a}.want`);
    const wantC = qemuConvertRaw(c, `${c}.want`);
    sb.mount(a, b, c, mnt);
    expect(fs.readdirSync(mnt).sort()).to.deep.equal(['multi-a.raw', 'multi-b.raw', 'multi-c.raw']);
    expectSameBytes(path.join(mnt, 'multi-a.raw'), wantA);
    expectSameBytes(path.join(mnt, 'multi-c.raw'), wantC);
    // A write to one file changes that image only.
    const fd = fs.openSync(path.join(mnt, 'multi-b.raw'), 'r+');
    fs.writeSync(fd, Buffer.alloc(8192, 0x77), 0, 8192, 3 << 20);
    fs.closeSync(fd);
    sb.unmount(mnt);
    for (const img of [a, b, c]) expectCheckClean(img);
    expectSameBytes(qemuConvertRaw(a, `${a}.after`), wantA);
    expectSameBytes(qemuConvertRaw(c, `${c}.after`), wantC);
    const gotB = fs.readFileSync(qemuConvertRaw(b, `${b}.after`));
    expect(gotB.subarray(1 << 20, 2 << 20).equals(Buffer.alloc(1 << 20, 2))).to.equal(true);
    expect(gotB.subarray(3 << 20, (3 << 20) + 8192).equals(Buffer.alloc(8192, 0x77))).to.equal(true);
  });

  it('refuses two images that would have the same file name, mounting nothing', () => {
    const d1 = sb.mkdir('clash1');
    const d2 = sb.mkdir('clash2');
    qemuImg('create', '-q', '-f', 'qcow2', path.join(d1, 'disk.qcow2'), '1M');
    qemuImg('create', '-q', '-f', 'qcow2', path.join(d2, 'disk.qcow2'), '1M');
    qemuImg('create', '-q', '-f', 'qcow2', path.join(d2, 'disk.img'), '1M');
    for (const pair of [[path.join(d1, 'disk.qcow2'), path.join(d2, 'disk.qcow2')], [path.join(d2, 'disk.qcow2'), path.join(d2, 'disk.img')]]) {
      const r = qcowfs('mount', ...pair, mnt);
      expect(r.status).to.equal(2);
      expect(r.stderr.trim().split('\n')).to.have.length(1);
      expect(r.stderr).to.match(/would both appear as disk\.raw/);
      expect(isMounted(mnt)).to.equal(false);
    }
  });

  it('mounts over a regular file: the file shows the disk until unmounted', () => {
    const img = sb.path('over.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '3M');
    qemuIo(img, ['write -P 1 0 1M', 'write -P 2 2M 512']);
    const want = qemuConvertRaw(img, `${img}.want`);
    const wantData = qemuDataRanges(img);
    const target = sb.path('over-target.bin');
    fs.writeFileSync(target, 'the file underneath\n');
    sb.mount(img, target);
    expect(fs.statSync(target).isFile()).to.equal(true);
    expect(fs.statSync(target).size).to.equal(3 << 20);
    expectSameBytes(target, want);
    expect(seekDataRanges(target)).to.deep.equal(wantData);
    const fd = fs.openSync(target, 'r+');
    fs.writeSync(fd, Buffer.from('written through the mount'), 0, 25, 1_500_000);
    fs.closeSync(fd);
    sb.unmount(target);
    expect(fs.readFileSync(target, 'utf8')).to.equal('the file underneath\n');
    expectCheckClean(img);
    const after = fs.readFileSync(qemuConvertRaw(img, `${img}.after`));
    expect(after.subarray(1_500_000, 1_500_025).toString()).to.equal('written through the mount');
    expect(after.subarray(0, 1 << 20).equals(Buffer.alloc(1 << 20, 1))).to.equal(true);
  });

  it('--read-only: reads work, every kind of write is refused with EROFS, the image file is not written', () => {
    const img = sb.path('ro.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
    qemuIo(img, ['write -P 1 0 2M']);
    const before = sha(img);
    const want = qemuConvertRaw(img, `${img}.want`);
    sb.mount('--read-only', img, mnt);
    const raw = path.join(mnt, 'ro.raw');
    expectSameBytes(raw, want);
    expect(errnoOf(() => fs.openSync(raw, 'r+'))).to.equal('EROFS');
    expect(errnoOf(() => fs.openSync(raw, 'w'))).to.equal('EROFS');
    expect(errnoOf(() => fs.truncateSync(raw, 1 << 20))).to.equal('EROFS');
    expect(errnoOf(() => fs.writeFileSync(path.join(mnt, 'new.raw'), 'x'))).to.equal('EROFS');
    const dd = run('dd', ['if=/dev/zero', `of=${raw}`, 'bs=4k', 'count=1', 'conv=notrunc'], { allowFail: true });
    expect(dd.status).to.not.equal(0);
    expect(dd.stderr).to.match(/Read-only file system/);
    const falloc = run('fallocate', ['--punch-hole', '-o', '0', '-l', '64k', raw], { allowFail: true });
    expect(falloc.status).to.not.equal(0);
    expect(falloc.stderr).to.match(/Read-only file system/);
    // Read-only users share the image: qemu-img reads it while it is mounted.
    expectCheckClean(img);
    sb.unmount(mnt);
    expect(sha(img)).to.equal(before);
  });

  it('a cold sequential read drops what it has read of the image from the host page cache (with --direct-io too), a warm one keeps it; all read what QEMU reads', async () => {
    // On a disk file system: tmpfs pages cannot be dropped (the sandbox may be on tmpfs).
    const dir = fs.mkdtempSync('/var/tmp/qcowfs-cold-');
    try {
      const img = path.join(dir, 'cold.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
      qemuIo(img, Array.from({ length: 64 }, (_, i) => `write -P ${i + 1} ${i}M 1M`));
      const want = qemuConvertRaw(img, path.join(dir, 'want.raw'));
      const raw = path.join(mnt, 'cold.raw');
      const imageCached = () => Number(run('fincore', ['--bytes', '--noheadings', '--raw', '--output', 'RES', img]).stdout.trim());
      run('sync', []);
      // Through the kernel's page cache the mount holds the 64 MiB afterwards; with --direct-io
      // nothing above the daemon keeps what it serves. Either way, of the image only the stream's
      // last few MiB and metadata stay in the host's cache.
      for (const mountOpts of [['--read-only'], ['--read-only', '--direct-io']]) {
        run('dd', [`if=${img}`, 'iflag=nocache', 'count=0']); // drop the image from the page cache
        expect(imageCached()).to.equal(0);
        const pid = sb.mount(...mountOpts, img, mnt);
        const drops = await cacheDropsWhile(pid, () => expectSameBytes(raw, want));
        expect(drops.length, `ranges the daemon dropped from the cache during a cold read with ${mountOpts.join(' ')}`).to.be.greaterThan(0);
        expect(imageCached(), `bytes of the image cached after a cold read through a mount with ${mountOpts.join(' ')}`).to.be.lessThan(10 << 20);
        sb.unmount(mnt);
      }
      // Warm: the image is in the page cache, and reading it through the mount leaves it there.
      run('dd', [`if=${img}`, 'of=/dev/null', 'bs=1M']);
      const page = Number(run('getconf', ['PAGESIZE']).stdout);
      const size = Math.ceil(fs.statSync(img).size / page) * page; // fincore counts whole pages
      expect(imageCached(), `bytes of the image (${size} in pages) cached after dd read it`).to.equal(size);
      const pid = sb.mount('--read-only', img, mnt);
      const drops = await cacheDropsWhile(pid, () => expectSameBytes(raw, want));
      sb.unmount(mnt);
      // What the daemon asked the kernel to drop decides: a warm stream taken for a cold one
      // would drop all but its last few MiB. The cache itself is only a rough check, since the
      // kernel reclaims clean pages on its own (once 64 KiB went between the read and this
      // check, once 2.3 MiB).
      expect(drops, 'ranges the daemon dropped from the cache during a warm read').to.deep.equal([]);
      expect(imageCached(), `bytes of the image (${size} in pages) cached after a warm read through the mount; 2 MiB units not whole: ${unitsNotCached(img)}`)
        .to.be.greaterThan(size - (16 << 20));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('--direct-io: reads and writes reach the image past the page cache (nothing of the raw file is cached), shared mmap works; refused on libfuse', () => {
    const img = fixtures[2].make(sb); // zero and compressed clusters: every read path
    const want = fs.readFileSync(qemuConvertRaw(img, `${img}.want`));
    sb.mount('--direct-io', img, mnt);
    const raw = path.join(mnt, 'c64k.raw');
    expectSameBytes(raw, `${img}.want`);
    // Odd-sized, unaligned writes and reads, as a direct-I/O file takes them.
    const fd = fs.openSync(raw, 'r+');
    try {
      const data = patternBuffer(300001, 41);
      fs.writeSync(fd, data, 0, data.length, 1234567);
      data.copy(want, 1234567);
      const back = Buffer.alloc(5000);
      fs.readSync(fd, back, 0, back.length, 1234000);
      expect(back.equals(want.subarray(1234000, 1239000))).to.equal(true);
    } finally {
      fs.closeSync(fd);
    }
    const cached = run('fincore', ['--bytes', '--noheadings', '--raw', '--output', 'RES', raw]).stdout.trim();
    expect(cached, 'bytes of the raw file in the page cache').to.equal('0');
    // Shared mmap works too (FUSE_DIRECT_IO_ALLOW_MMAP), coherent with direct reads and writes both ways.
    const mapped = run('python3', ['-c', [
      'import mmap, os, sys',
      'fd = os.open(sys.argv[1], os.O_RDWR)',
      'm = mmap.mmap(fd, 65536, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=3 * 65536)',
      'm[100:110] = b"mapped-io!"',
      'm.flush()',
      'seen = os.pread(fd, 10, 3 * 65536 + 100)',
      'os.pwrite(fd, b"DIRECT", 3 * 65536 + 104)',
      'print(seen.decode(), m[100:110].decode())',
    ].join('\n'), raw]).stdout.trim();
    expect(mapped).to.equal('mapped-io! mappDIRECT');
    Buffer.from('mappDIRECT').copy(want, 3 * 65536 + 100);
    sb.unmount(mnt);
    expectCheckClean(img);
    expect(fs.readFileSync(qemuConvertRaw(img, `${img}.after`)).equals(want)).to.equal(true);
    const r = qcowfs('mount', '--direct-io', '--transport', 'libfuse', img, mnt);
    expect(r.status).to.equal(2);
    expect(r.stderr).to.match(/--direct-io needs the kernel transport/);
    expect(isMounted(mnt)).to.equal(false);
  });

  it('--direct-io: a sequential reader reads what was written, truncated or punched just ahead of it (read-ahead forgets it)', () => {
    const img = sb.path('ahead.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    qemuIo(img, ['write -P 7 0 8M']);
    sb.mount('--direct-io', img, mnt);
    const raw = path.join(mnt, 'ahead.raw');
    // 128 KiB reads in order, as cp makes them; before some of them, another descriptor changes
    // the piece about to be read (by then read ahead): a write, a punched hole, a shrink and regrowth.
    run('python3', ['-c', [
      'import os, sys, time',
      'P = 128 * 1024',
      'r = os.open(sys.argv[1], os.O_RDONLY)',
      'w = os.open(sys.argv[1], os.O_WRONLY)',
      'FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2',
      'import ctypes',
      'libc = ctypes.CDLL(None, use_errno=True)',
      'libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]',
      'want = bytearray(b"\x07" * (8 << 20))',
      'for i in range(64):',
      '    at = i * P',
      '    if i % 8 == 3:',
      '        time.sleep(0.01)',
      '        os.pwrite(w, b"W" * 1000, at + 500); want[at + 500:at + 1500] = b"W" * 1000',
      '    elif i % 8 == 5:',
      '        time.sleep(0.01)',
      '        assert libc.fallocate(w, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, at, P) == 0, ctypes.get_errno()',
      '        want[at:at + P] = bytes(P)',
      '    elif i == 62:',
      '        time.sleep(0.01)',
      '        os.ftruncate(w, at); os.ftruncate(w, 8 << 20); want[at:] = bytes(len(want) - at)',
      '    got = os.pread(r, P, at)',
      '    assert got == bytes(want[at:at + P]), i',
      'open(sys.argv[2], "wb").write(want)',
    ].join('\n'), raw, sb.path('ahead.want')]);
    const want = fs.readFileSync(sb.path('ahead.want'));
    sb.unmount(mnt);
    expectCheckClean(img);
    const after = fs.readFileSync(qemuConvertRaw(img, sb.path('ahead.after')));
    expect(after.length).to.equal(8 << 20);
    expect(crypto.createHash('sha256').update(after).digest('hex')).to.equal(crypto.createHash('sha256').update(want).digest('hex'));
  });

  it('--snapshot NAME serves an internal snapshot, read-only; --snapshots serves them beside the image', () => {
    const img = sb.path('snap.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    qemuIo(img, ['write -P 1 0 2M', 'write -P 2 6M 1M']);
    qemuImg('snapshot', '-c', 'before', img);
    qemuIo(img, ['write -P 3 1M 2M', 'write -z 6M 512k', 'discard 7M 1M']);
    qemuImg('snapshot', '-c', 'after upgrade', img);
    qemuIo(img, ['write -P 4 0 64k']);
    const wantBefore = qemuConvertRaw(img, sb.path('snap-before.want'), { snapshot: 'before' });
    const wantAfter = qemuConvertRaw(img, sb.path('snap-after.want'), { snapshot: 'after upgrade' });
    const wantActive = qemuConvertRaw(img, sb.path('snap-active.want'));
    const before = sha(img);

    sb.mount('--snapshot', 'before', img, mnt);
    const raw = path.join(mnt, 'snap.raw');
    expectSameBytes(raw, wantBefore);
    expect(errnoOf(() => fs.openSync(raw, 'r+'))).to.equal('EROFS');
    sb.unmount(mnt);

    // By id, too (snapshot 2 is "after upgrade").
    sb.mount('--snapshot', '2', img, mnt);
    expectSameBytes(raw, wantAfter);
    sb.unmount(mnt);

    sb.mount('--read-only', '--snapshots', img, mnt);
    expect(fs.readdirSync(mnt).sort()).to.deep.equal(['snap.raw', 'snap@after upgrade.raw', 'snap@before.raw']);
    expectSameBytes(raw, wantActive);
    expectSameBytes(path.join(mnt, 'snap@before.raw'), wantBefore);
    expectSameBytes(path.join(mnt, 'snap@after upgrade.raw'), wantAfter);
    sb.unmount(mnt);
    expect(sha(img)).to.equal(before);

    const r = qcowfs('mount', '--snapshot', 'no-such-snapshot', img, mnt);
    expect(r.status).to.not.equal(0);
    expect(r.stderr.trim().split('\n')).to.have.length(1);
    expect(r.stderr).to.match(/no-such-snapshot/);
    expect(r.stderr).to.not.match(/\n\s+at /);
    expect(isMounted(mnt)).to.equal(false);
  });

  it('--foreground: serves from the child process until qcowfs unmount, then exits 0 with the writes in the image', async () => {
    const img = sb.path('fg.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
    const fg = await sb.mountForeground(img, mnt);
    const raw = path.join(mnt, 'fg.raw');
    const fd = fs.openSync(raw, 'r+');
    fs.writeSync(fd, Buffer.alloc(100000, 0x42), 0, 100000, 12345);
    fs.closeSync(fd);
    expect(sha256Range(raw, 12345, 100000)).to.equal(crypto.createHash('sha256').update(Buffer.alloc(100000, 0x42)).digest('hex'));
    sb.unmount(mnt);
    expect(await fg.exited).to.equal(0);
    expect(fg.stderr()).to.equal('');
    expectCheckClean(img);
    const got = fs.readFileSync(qemuConvertRaw(img, `${img}.after`));
    expect(got.subarray(12345, 112345).equals(Buffer.alloc(100000, 0x42))).to.equal(true);
    expect(got.subarray(0, 12345).equals(Buffer.alloc(12345))).to.equal(true);
  });

  it('--foreground: SIGTERM unmounts, flushes and exits 0', async () => {
    const img = sb.path('fg-term.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
    const fg = await sb.mountForeground(img, mnt);
    const fd = fs.openSync(path.join(mnt, 'fg-term.raw'), 'r+');
    fs.writeSync(fd, Buffer.alloc(65536, 0x5a), 0, 65536, 1 << 20);
    fs.closeSync(fd);
    fg.child.kill('SIGTERM');
    expect(await fg.exited).to.equal(0);
    expect(isMounted(mnt)).to.equal(false);
    expect(processGone(fg.pid)).to.equal(true);
    expectCheckClean(img);
    const got = fs.readFileSync(qemuConvertRaw(img, `${img}.after`));
    expect(got.subarray(1 << 20, (1 << 20) + 65536).equals(Buffer.alloc(65536, 0x5a))).to.equal(true);
  });
});

/**
 * For a failure message: the 2 MiB units of `file` (drop-behind's unit, and
 * the largest folio) that the page cache does not hold whole, as
 * "offset MiB: cached KiB", to tell a unit dropped from one the kernel took.
 */
function unitsNotCached(file: string): string {
  const native = loadNative();
  if (native === null) return '(no native module)';
  const fd = fs.openSync(file, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const unit = 2 << 20;
    const st = new Float64Array(2);
    const out: string[] = [];
    for (let at = 0; at < size; at += unit) {
      const len = Math.min(unit, size - at);
      if (native.cacheStat(fd, at, len, st) !== 0) return '(no cachestat)';
      if (st[0] < len) out.push(`${at >> 20} MiB: ${Math.floor(st[0] / 1024)} KiB`);
    }
    return out.length > 0 ? out.join(', ') : 'none';
  } finally {
    fs.closeSync(fd);
  }
}
