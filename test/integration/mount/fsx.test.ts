/**
 * The fsx-style exerciser (fsx.py, beside this file) against the raw view:
 * thousands of seeded reads, writes, truncates, punched holes, zero ranges
 * and mmap I/O, each checked against a model of a plain file. The same seed
 * runs on a plain file in tmpfs first; both runs must end with the same
 * bytes, and QEMU must then read those bytes from the image and find it clean.
 */
import { expect } from 'chai';
import * as fs from 'fs';
import * as path from 'path';
import { qemuImg, qemuIo, run } from '../../helpers/qemu';
import { Sandbox, TEST_SOURCE_DIR, expectCheckClean, qemuConvertRaw, qcowfs, seekDataRanges, qemuDataRanges } from '../../helpers/mount';

const FSX = path.join(TEST_SOURCE_DIR, 'integration/mount/fsx.py');
const OPS = 1500;
const MAXSIZE = 6 * 1024 * 1024;

interface Config {
  name: string;
  seed: number;
  create(img: string, sb: Sandbox): void;
  /** Extra `qcowfs mount` options for the run. */
  mountArgs?: string[];
}

const configs: Config[] = [
  { name: '4K clusters', seed: 1, create: (img) => qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '0') },
  { name: '64K clusters with subclusters (extended L2)', seed: 2, create: (img) => qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', img, '0') },
  { name: 'v2 image (no zero clusters), 512 B clusters', seed: 3, create: (img) => qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=512', img, '0') },
  {
    name: 'an overlay on a backing file full of data',
    seed: 4,
    create: (img, sb) => {
      const base = sb.path('fsx-base.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, String(MAXSIZE));
      qemuIo(base, [`write -P 0xa5 0 ${MAXSIZE}`]);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', img, String(MAXSIZE));
    },
  },
  {
    // Direct I/O: every read and write reaches the daemon at the caller's size, and mmap
    // pages live beside it (FUSE_DIRECT_IO_ALLOW_MMAP).
    name: 'mount --direct-io, 64K clusters',
    seed: 5,
    create: (img) => qemuImg('create', '-q', '-f', 'qcow2', img, '0'),
    mountArgs: ['--direct-io'],
  },
];

function fsx(file: string, seed: number, extra: string[]): { ok: boolean; line: string; out: string } {
  const r = run('python3', [FSX, file, String(seed), String(OPS), String(MAXSIZE), ...extra], { allowFail: true });
  const out = r.stdout + r.stderr;
  const line = r.stdout.split('\n').find((l) => l.startsWith('ok ')) ?? '';
  return { ok: r.status === 0 && line !== '', line, out };
}

describe('qcowfs mount: an fsx-style exerciser agrees with a plain file', function () {
  let sb: Sandbox;
  let shm: string;
  before(() => {
    sb = new Sandbox('qcowfs-fsx-');
    shm = fs.mkdtempSync('/dev/shm/qcowfs-fsx-');
  });
  afterEach(() => sb.cleanup({ keepDir: true }));
  after(async () => {
    await sb.cleanup();
    fs.rmSync(shm, { recursive: true, force: true });
  });

  for (const cfg of configs) {
    it(`${OPS} operations, seed ${cfg.seed}: ${cfg.name}`, () => {
      const plain = fsx(path.join(shm, `plain-${cfg.seed}`), cfg.seed, ['--plain']);
      expect(plain.ok, `the plain file run: ${plain.out}`).to.equal(true);

      const img = sb.path(`fsx-${cfg.seed}.qcow2`);
      cfg.create(img, sb);
      const mnt = sb.mkdir(`mnt-${cfg.seed}`);
      sb.mount(...(cfg.mountArgs ?? []), img, mnt);
      const model = sb.path(`fsx-${cfg.seed}.model`);
      const mounted = fsx(path.join(mnt, `fsx-${cfg.seed}.raw`), cfg.seed, ['--dump', model]);
      expect(mounted.ok, `the run on the mount: ${mounted.out}`).to.equal(true);
      // The same operations, the same final bytes.
      expect(mounted.line).to.equal(plain.line);
      sb.unmount(mnt);

      expectCheckClean(img);
      const size = fs.statSync(model).size;
      expect(JSON.parse(qcowfs('info', '--json', img).stdout)['virtual-size']).to.equal(size);
      // QEMU reads an odd-sized disk rounded down to 512 bytes.
      const q = fs.readFileSync(qemuConvertRaw(img, sb.path(`fsx-${cfg.seed}.qemu`)));
      expect(q.equals(fs.readFileSync(model).subarray(0, Math.floor(size / 512) * 512))).to.equal(true);
      // On the image the run left behind, SEEK_DATA/SEEK_HOLE still follow qemu-img map,
      // which ends at the size rounded down to 512: data up to there goes on to the real end.
      const qemuEnd = Math.floor(size / 512) * 512;
      const wantData = qemuDataRanges(img).map(([s, e]): [number, number] => [s, e === qemuEnd ? size : e]);
      sb.mount('--read-only', img, mnt);
      expect(seekDataRanges(path.join(mnt, `fsx-${cfg.seed}.raw`))).to.deep.equal(wantData);
      sb.unmount(mnt);
    });
  }
});
