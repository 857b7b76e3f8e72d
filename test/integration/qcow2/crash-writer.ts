/**
 * Child process of the crash tests: opens an image and applies random
 * writes, zero writes and discards in epochs; after each epoch it calls
 * flush() and, once that resolves, prints "flushed <epoch>". The parent
 * regenerates the same operations from the seed (crashEpochOps), so a line
 * on stdout is the proof that everything up to that epoch is durable.
 *
 * Usage: node crash-writer.js <image> <seed> <firstEpoch>
 */
import { Qcow2Image } from '../../../src/qcow2';
import { Rng, Model, Op, OpMix, randomOp, applyToEngine } from './write-harness';

/** The operations of one epoch, a pure function of (seed, epoch, disk size, layout). */
export function crashEpochOps(seed: number, epoch: number, size: number, mix: OpMix): Op[] {
  const rng = new Rng((seed ^ Math.imul(epoch + 1, 0x85ebca6b)) >>> 0);
  // randomOp looks only at the model's size and windows, never at its bytes.
  const shape = Model.whole(Buffer.alloc(size));
  const n = rng.int(1, 6);
  const ops: Op[] = [];
  for (let i = 0; i < n; i++) ops.push(randomOp(rng, shape, { ...mix, resize: undefined }));
  return ops;
}

async function main(): Promise<void> {
  const [image, seedArg, firstArg, mixArg] = process.argv.slice(2);
  const seed = Number(seedArg) >>> 0;
  const first = Number(firstArg);
  const mix = JSON.parse(mixArg) as OpMix;
  const img = await Qcow2Image.openFile(image);
  process.stdout.write('ready\n');
  for (let epoch = first; epoch < first + 100000; epoch++) {
    for (const op of crashEpochOps(seed, epoch, img.virtualSize, mix)) await applyToEngine(img, op);
    await img.flush();
    process.stdout.write(`flushed ${epoch}\n`);
  }
  await img.close();
}

if (require.main === module) {
  main().catch((err) => {
    process.stderr.write(`${(err as Error).stack}\n`);
    process.exit(2);
  });
}
