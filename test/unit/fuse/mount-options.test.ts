import { expect } from 'chai';
import { kernelMountOptions, type KernelMountOptions } from '../../../src/fuse/mount';
import { clampMaxWrite } from '../../../src/fuse/session';

function opts(extra: Partial<KernelMountOptions> = {}): KernelMountOptions {
  return {
    mountpoint: '/mnt', rootIsFile: false, readOnly: false, allowOther: false, fsname: 'img.qcow2', subtype: 'qcowfs',
    debug: false, maxRequestBytes: 1 << 20, maxInFlight: 16, errnoOf: () => 5, ...extra,
  };
}

describe('fuse mount options', () => {
  it('passes fd 3, the root mode, the owner and max_read', () => {
    expect(kernelMountOptions(opts(), 0, 0)).to.equal('fd=3,rootmode=40000,user_id=0,group_id=0,max_read=1048576');
  });

  it('uses a regular-file root mode to mount over a file', () => {
    expect(kernelMountOptions(opts({ rootIsFile: true }), 1000, 100)).to.equal('fd=3,rootmode=100000,user_id=1000,group_id=100,max_read=1048576');
  });

  it('adds allow_other, default_permissions and ro when asked', () => {
    const s = kernelMountOptions(opts({ allowOther: true, defaultPermissions: true, readOnly: true, maxRequestBytes: 128 * 1024 }), 0, 0);
    expect(s).to.equal('fd=3,rootmode=40000,user_id=0,group_id=0,max_read=131072,allow_other,default_permissions,ro');
  });

  it('clamps the request size to [4 KiB, 1 MiB]', () => {
    expect(clampMaxWrite(16 << 20)).to.equal(1 << 20);
    expect(clampMaxWrite(100)).to.equal(4096);
    expect(clampMaxWrite(Number.NaN)).to.equal(1 << 20);
    expect(clampMaxWrite(300_000)).to.equal(300_000);
  });
});
