/**
 * qcowfs as a library: the qcow2 engine over any block device, and the
 * block devices it ships with.
 */
export * from './qcow2';
export { BlockDevice } from './io/block-device';
export { FileDevice } from './io/file-device';
export { MemoryDevice } from './io/memory-device';
