/** The qcow2 engine's public surface. */
export { Qcow2Image, OpenOptions } from './image';
export { Layer, MapExtent, RawLayer } from './layer';
export { createImageFile, createOnDevice, CreateOptions } from './create';
export { checkImage, checkAndRepair, rebuildRefcounts, CheckResult, CheckProblem } from './check';
export { Snapshot } from './snapshot';
export { Qcow2Header, featureName } from './header';
export * from './errors';
export { parseSize } from './layout';
