'use strict';
// Builds the native module (image locks, non-blocking I/O). If it
// cannot be built (no compiler or Node headers), qcowfs still works and says
// at run time that image locking is unavailable.
const { spawnSync } = require('child_process');
const path = require('path');

const root = path.resolve(__dirname, '..');
const r = spawnSync('node-gyp', ['rebuild', '--silent'], { cwd: root, stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8', shell: false });
if (r.status !== 0) {
  const why = r.error ? r.error.message : (r.stderr || '').trim().split('\n').slice(-3).join(' ');
  process.stderr.write(`qcowfs: warning: the native module was not built (${why}); images will not be locked against QEMU and I/O takes a slower path\n`);
}
