/**
 * qcow2 on-disk constants, named as in QEMU's docs/interop/qcow2.txt and
 * block/qcow2.h. 64-bit fields are handled as two 32-bit words (hi, lo) so
 * flag bits above bit 31 can be tested without BigInt.
 */

/** "QFI\xfb" (qcow2.txt, header byte 0). */
export const QCOW_MAGIC = 0x514649fb;

export const QCOW2_VERSION_2 = 2;
export const QCOW2_VERSION_3 = 3;

/** Fixed header sizes: v2 ends at byte 72, v3 at 104 (112 with compression_type). */
export const QCOW2_V2_HEADER_SIZE = 72;
export const QCOW2_V3_HEADER_SIZE = 104;
export const QCOW2_V3_HEADER_SIZE_WITH_COMPRESSION = 112;

/** cluster_bits bounds QEMU accepts (512 B .. 2 MiB). */
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;

/** QCOW_MAX_L1_SIZE / QCOW_MAX_REFTABLE_SIZE in block/qcow2.h: 32 MiB of entries. */
export const QCOW_MAX_L1_SIZE_BYTES = 32 * 1024 * 1024;
export const QCOW_MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024;
/** QCOW_MAX_SNAPSHOTS and the snapshot table size limit. */
export const QCOW_MAX_SNAPSHOTS = 65536;
export const QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS;
/** Longest backing file name QEMU accepts (1023 bytes). */
export const MAX_BACKING_FILE_NAME = 1023;
/** Largest virtual disk QEMU creates: 2^61 - 512 bytes; we keep to safe integers. */
export const QCOW_MAX_VIRTUAL_SIZE = Number.MAX_SAFE_INTEGER - 511;

/** Incompatible feature bits (header byte 72). */
export const QCOW2_INCOMPAT_DIRTY_BITNR = 0;
export const QCOW2_INCOMPAT_CORRUPT_BITNR = 1;
export const QCOW2_INCOMPAT_DATA_FILE_BITNR = 2;
export const QCOW2_INCOMPAT_COMPRESSION_BITNR = 3;
export const QCOW2_INCOMPAT_EXTL2_BITNR = 4;
export const QCOW2_INCOMPAT_DIRTY = 1 << QCOW2_INCOMPAT_DIRTY_BITNR;
export const QCOW2_INCOMPAT_CORRUPT = 1 << QCOW2_INCOMPAT_CORRUPT_BITNR;
export const QCOW2_INCOMPAT_DATA_FILE = 1 << QCOW2_INCOMPAT_DATA_FILE_BITNR;
export const QCOW2_INCOMPAT_COMPRESSION = 1 << QCOW2_INCOMPAT_COMPRESSION_BITNR;
export const QCOW2_INCOMPAT_EXTL2 = 1 << QCOW2_INCOMPAT_EXTL2_BITNR;
export const QCOW2_INCOMPAT_MASK =
  QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2;

/** Compatible feature bits (header byte 80). */
export const QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0;

/** Autoclear feature bits (header byte 88). */
export const QCOW2_AUTOCLEAR_BITMAPS = 1 << 0;
export const QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1;
export const QCOW2_AUTOCLEAR_MASK = QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW;
/** The autoclear bits a writer of ours keeps: it maintains no bitmaps, only guest == host for raw data files. */
export const QCOW2_AUTOCLEAR_MAINTAINED = QCOW2_AUTOCLEAR_DATA_FILE_RAW;

/** compression_type (header byte 104). */
export const QCOW2_COMPRESSION_TYPE_ZLIB = 0;
export const QCOW2_COMPRESSION_TYPE_ZSTD = 1;

/** crypt_method (header byte 32). */
export const QCOW_CRYPT_NONE = 0;
export const QCOW_CRYPT_AES = 1;
export const QCOW_CRYPT_LUKS = 2;

/** Header extension types (qcow2.txt "Header extensions"). */
export const QCOW2_EXT_MAGIC_END = 0x00000000;
export const QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xe2792aca;
export const QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803f857;
export const QCOW2_EXT_MAGIC_BITMAPS = 0x23852875;
export const QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537be77;
export const QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441;

/**
 * Table entry flags. In the high 32-bit word of a 64-bit entry:
 * QCOW_OFLAG_COPIED is bit 63, QCOW_OFLAG_COMPRESSED bit 62.
 * QCOW_OFLAG_ZERO is bit 0 of the low word.
 */
export const QCOW_OFLAG_COPIED_HI = 0x80000000;
export const QCOW_OFLAG_COMPRESSED_HI = 0x40000000;
export const QCOW_OFLAG_ZERO_LO = 0x1;

/**
 * L1E_OFFSET_MASK / L2E_OFFSET_MASK = 0x00fffffffffffe00: bits 9..55.
 * As words: hi & 0x00ffffff, lo & 0xfffffe00.
 */
export const OFFSET_MASK_HI = 0x00ffffff;
export const OFFSET_MASK_LO = 0xfffffe00;
/** Reserved bits of a standard L1 entry: 1..8 and 56..62. */
export const L1E_RESERVED_HI = 0x7f000000;
export const L1E_RESERVED_LO = 0x000001ff;
/** Reserved bits of a standard (non-compressed) L2 entry: 1..8, 56..61. */
export const L2E_STD_RESERVED_HI = 0x3f000000;
export const L2E_STD_RESERVED_LO = 0x000001fe;
/** REFT_OFFSET_MASK = 0xfffffffffffffe00; reserved bits 0..8. */
export const REFT_RESERVED_LO = 0x000001ff;

/** Extended L2: 32 subclusters a cluster; entries are 16 bytes. */
export const QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32;
export const L2E_SIZE_NORMAL = 8;
export const L2E_SIZE_EXTENDED = 16;

/** Size of the fixed part of a snapshot table entry. */
export const SNAPSHOT_HEADER_SIZE = 40;
/** The extra data QEMU writes for snapshots: vm_state_size_large, disk_size, icount. */
export const SNAPSHOT_EXTRA_DATA_SIZE = 24;

export const SECTOR_SIZE = 512;
