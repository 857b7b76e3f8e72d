#!/usr/bin/env bash
# One-time set-up on Debian: system packages (needs root), npm dependencies, build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
npm ci --no-audit --no-fund
npm run build
echo "qcowfs is ready: $(pwd)/bin/qcowfs --help"
