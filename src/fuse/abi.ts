/**
 * The Linux FUSE kernel ABI: opcodes, flag bits and struct sizes, as defined
 * in the kernel's include/uapi/linux/fuse.h. Names keep their spec spelling.
 * All structs are little-endian on the machines we run on (x86-64, arm64)
 * and padded to 8 bytes by the spec itself.
 */

/** Protocol version we speak (fuse.h FUSE_KERNEL_VERSION / _MINOR_VERSION). */
export const FUSE_KERNEL_VERSION = 7;
/**
 * The highest minor version we implement: LSEEK (7.24), PARALLEL_DIROPS
 * (7.25), MAX_PAGES (7.28), and from 7.39 shared mmap of direct-I/O files
 * (FUSE_DIRECT_IO_ALLOW_MMAP, in flags2 of 7.36). Everything else 7.32–7.39
 * added is either asked for by an INIT flag we never set (security contexts,
 * in-header extensions, submounts, extended setxattr) or a new request that
 * we answer ENOSYS and the kernel then stops sending (TMPFILE, STATX).
 */
export const FUSE_KERNEL_MINOR_VERSION = 39;
/**
 * The oldest kernel minor we accept: 7.9 fixed the sizes of getattr_in,
 * read_in, write_in, entry_out and attr_out; older kernels are not worth the
 * compatibility shims.
 */
export const FUSE_MIN_KERNEL_MINOR = 9;

/** fuse.h FUSE_ROOT_ID. */
export const FUSE_ROOT_ID = 1;

/** fuse.h FUSE_MIN_READ_BUFFER: the device refuses smaller read buffers. */
export const FUSE_MIN_READ_BUFFER = 8192;

/** Largest request payload we ever negotiate (max_write, max_read). */
export const FUSE_MAX_REQUEST_BYTES = 1024 * 1024;
/** The kernel's historical FUSE_MAX_MAX_PAGES default (fs/fuse/fuse_i.h). */
export const FUSE_MAX_MAX_PAGES = 256;
/** Page size assumed when turning max_write into max_pages. */
export const FUSE_PAGE_SIZE = 4096;

// --- enum fuse_opcode -------------------------------------------------------
export const FUSE_LOOKUP = 1;
export const FUSE_FORGET = 2; // no reply
export const FUSE_GETATTR = 3;
export const FUSE_SETATTR = 4;
export const FUSE_READLINK = 5;
export const FUSE_SYMLINK = 6;
export const FUSE_MKNOD = 8;
export const FUSE_MKDIR = 9;
export const FUSE_UNLINK = 10;
export const FUSE_RMDIR = 11;
export const FUSE_RENAME = 12;
export const FUSE_LINK = 13;
export const FUSE_OPEN = 14;
export const FUSE_READ = 15;
export const FUSE_WRITE = 16;
export const FUSE_STATFS = 17;
export const FUSE_RELEASE = 18;
export const FUSE_FSYNC = 20;
export const FUSE_SETXATTR = 21;
export const FUSE_GETXATTR = 22;
export const FUSE_LISTXATTR = 23;
export const FUSE_REMOVEXATTR = 24;
export const FUSE_FLUSH = 25;
export const FUSE_INIT = 26;
export const FUSE_OPENDIR = 27;
export const FUSE_READDIR = 28;
export const FUSE_RELEASEDIR = 29;
export const FUSE_FSYNCDIR = 30;
export const FUSE_GETLK = 31;
export const FUSE_SETLK = 32;
export const FUSE_SETLKW = 33;
export const FUSE_ACCESS = 34;
export const FUSE_CREATE = 35;
export const FUSE_INTERRUPT = 36; // no reply (unless EAGAIN)
export const FUSE_BMAP = 37;
export const FUSE_DESTROY = 38;
export const FUSE_IOCTL = 39;
export const FUSE_POLL = 40;
export const FUSE_NOTIFY_REPLY = 41;
export const FUSE_BATCH_FORGET = 42; // no reply
export const FUSE_FALLOCATE = 43;
export const FUSE_READDIRPLUS = 44;
export const FUSE_RENAME2 = 45;
export const FUSE_LSEEK = 46;
export const FUSE_COPY_FILE_RANGE = 47;
export const FUSE_SETUPMAPPING = 48;
export const FUSE_REMOVEMAPPING = 49;
export const FUSE_SYNCFS = 50;
export const FUSE_TMPFILE = 51;
export const FUSE_STATX = 52;
export const FUSE_COPY_FILE_RANGE_64 = 53;

// --- INIT flags (fuse_init_in.flags / fuse_init_out.flags) -----------------
export const FUSE_ASYNC_READ = 1 << 0;
export const FUSE_POSIX_LOCKS = 1 << 1;
export const FUSE_ATOMIC_O_TRUNC = 1 << 3;
export const FUSE_EXPORT_SUPPORT = 1 << 4;
export const FUSE_BIG_WRITES = 1 << 5;
export const FUSE_DONT_MASK = 1 << 6;
export const FUSE_FLOCK_LOCKS = 1 << 10;
export const FUSE_AUTO_INVAL_DATA = 1 << 12;
export const FUSE_DO_READDIRPLUS = 1 << 13;
export const FUSE_READDIRPLUS_AUTO = 1 << 14;
export const FUSE_ASYNC_DIO = 1 << 15;
/** Never requested: the filesystem must see every write as it happens. */
export const FUSE_WRITEBACK_CACHE = 1 << 16;
export const FUSE_NO_OPEN_SUPPORT = 1 << 17;
export const FUSE_PARALLEL_DIROPS = 1 << 18;
export const FUSE_HANDLE_KILLPRIV = 1 << 19;
export const FUSE_POSIX_ACL = 1 << 20;
export const FUSE_ABORT_ERROR = 1 << 21;
export const FUSE_MAX_PAGES = 1 << 22;
export const FUSE_CACHE_SYMLINKS = 1 << 23;
export const FUSE_NO_OPENDIR_SUPPORT = 1 << 24;
export const FUSE_EXPLICIT_INVAL_DATA = 1 << 25;
/** Bit 30: fuse_init_in/_out carry flags2 (7.36). Written unsigned-safe below. */
export const FUSE_INIT_EXT = 0x40000000;

// --- INIT flags2: bits 32 and up of the flags above, as fuse_init_in/_out.flags2 ---
/** fuse.h FUSE_DIRECT_IO_ALLOW_MMAP (1ULL << 36): shared mmap of FOPEN_DIRECT_IO files (7.39). */
export const FUSE_DIRECT_IO_ALLOW_MMAP = 1 << (36 - 32);

// --- fuse_setattr_in.valid --------------------------------------------------
export const FATTR_MODE = 1 << 0;
export const FATTR_UID = 1 << 1;
export const FATTR_GID = 1 << 2;
export const FATTR_SIZE = 1 << 3;
export const FATTR_ATIME = 1 << 4;
export const FATTR_MTIME = 1 << 5;
export const FATTR_FH = 1 << 6;
export const FATTR_ATIME_NOW = 1 << 7;
export const FATTR_MTIME_NOW = 1 << 8;
export const FATTR_LOCKOWNER = 1 << 9;
export const FATTR_CTIME = 1 << 10;
export const FATTR_KILL_SUIDGID = 1 << 11;

// --- fuse_open_out.open_flags -----------------------------------------------
export const FOPEN_DIRECT_IO = 1 << 0;
export const FOPEN_KEEP_CACHE = 1 << 1;
export const FOPEN_NONSEEKABLE = 1 << 2;
export const FOPEN_CACHE_DIR = 1 << 3;
export const FOPEN_STREAM = 1 << 4;
export const FOPEN_NOFLUSH = 1 << 5;
export const FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6;

// --- misc request flags -----------------------------------------------------
/** fuse_getattr_in.getattr_flags: fh is valid. */
export const FUSE_GETATTR_FH = 1 << 0;
/** fuse_release_in.release_flags. */
export const FUSE_RELEASE_FLUSH = 1 << 0;
/** fuse_write_in.write_flags. */
export const FUSE_WRITE_CACHE = 1 << 0;
export const FUSE_WRITE_LOCKOWNER = 1 << 1;
export const FUSE_WRITE_KILL_SUIDGID = 1 << 2;
/** fuse_fsync_in.fsync_flags. */
export const FUSE_FSYNC_FDATASYNC = 1 << 0;

// --- struct sizes (bytes) ---------------------------------------------------
export const FUSE_IN_HEADER_SIZE = 40; // struct fuse_in_header
export const FUSE_OUT_HEADER_SIZE = 16; // struct fuse_out_header
export const FUSE_ATTR_SIZE = 88; // struct fuse_attr
export const FUSE_ENTRY_OUT_SIZE = 40 + FUSE_ATTR_SIZE; // struct fuse_entry_out (128)
export const FUSE_ATTR_OUT_SIZE = 16 + FUSE_ATTR_SIZE; // struct fuse_attr_out (104)
export const FUSE_OPEN_OUT_SIZE = 16; // struct fuse_open_out
export const FUSE_WRITE_OUT_SIZE = 8; // struct fuse_write_out
export const FUSE_KSTATFS_SIZE = 80; // struct fuse_kstatfs == fuse_statfs_out
export const FUSE_STATFS_OUT_SIZE = FUSE_KSTATFS_SIZE;
export const FUSE_INIT_OUT_SIZE = 64; // struct fuse_init_out (7.23+)
/** fuse.h FUSE_COMPAT_22_INIT_OUT_SIZE: init_out as understood before 7.23. */
export const FUSE_COMPAT_22_INIT_OUT_SIZE = 24;
export const FUSE_LSEEK_OUT_SIZE = 8; // struct fuse_lseek_out
export const FUSE_DIRENT_HEADER_SIZE = 24; // offsetof(struct fuse_dirent, name)
/** offsetof(struct fuse_direntplus, dirent.name). */
export const FUSE_DIRENTPLUS_HEADER_SIZE = FUSE_ENTRY_OUT_SIZE + FUSE_DIRENT_HEADER_SIZE;

export const FUSE_INIT_IN_SIZE = 16; // struct fuse_init_in up to flags (7.6+); 64 from 7.36
export const FUSE_FORGET_IN_SIZE = 8;
export const FUSE_FORGET_ONE_SIZE = 16;
export const FUSE_BATCH_FORGET_IN_SIZE = 8;
export const FUSE_GETATTR_IN_SIZE = 16;
export const FUSE_SETATTR_IN_SIZE = 88;
export const FUSE_OPEN_IN_SIZE = 8;
export const FUSE_RELEASE_IN_SIZE = 24;
export const FUSE_FLUSH_IN_SIZE = 24;
export const FUSE_READ_IN_SIZE = 40;
export const FUSE_WRITE_IN_SIZE = 40;
export const FUSE_FSYNC_IN_SIZE = 16;
export const FUSE_ACCESS_IN_SIZE = 8;
export const FUSE_INTERRUPT_IN_SIZE = 8;
export const FUSE_FALLOCATE_IN_SIZE = 32;
export const FUSE_LSEEK_IN_SIZE = 24;

/** Align a variable-length record to 8 bytes (fuse.h FUSE_REC_ALIGN). */
export function fuseRecAlign(n: number): number {
  return (n + 7) & ~7;
}

/** Size of one fuse_dirent holding a name of `nameBytes` (FUSE_DIRENT_SIZE). */
export function fuseDirentSize(nameBytes: number): number {
  return fuseRecAlign(FUSE_DIRENT_HEADER_SIZE + nameBytes);
}

/** Size of one fuse_direntplus holding a name of `nameBytes` (FUSE_DIRENTPLUS_SIZE). */
export function fuseDirentplusSize(nameBytes: number): number {
  return fuseRecAlign(FUSE_DIRENTPLUS_HEADER_SIZE + nameBytes);
}

export interface OpcodeInfo {
  readonly name: string;
  /** Size of the fixed in-struct after fuse_in_header (names/arrays follow). */
  readonly inSize: number;
  /** The request carries a NUL-terminated name after the in-struct. */
  readonly hasName: boolean;
  /** The kernel expects no reply (FORGET, BATCH_FORGET, INTERRUPT). */
  readonly noReply: boolean;
}

function op(name: string, inSize: number, extra: { hasName?: boolean; noReply?: boolean } = {}): OpcodeInfo {
  return { name, inSize, hasName: extra.hasName ?? false, noReply: extra.noReply ?? false };
}

/**
 * opcode -> {name, in-struct size}. Every opcode of fuse.h is listed so that
 * debug output and ENOSYS replies can name it; inSize is only meaningful for
 * the opcodes the session decodes (the others are answered with ENOSYS
 * without looking at their body, so 0 is recorded).
 */
export const OPCODES: ReadonlyMap<number, OpcodeInfo> = new Map<number, OpcodeInfo>([
  [FUSE_LOOKUP, op('LOOKUP', 0, { hasName: true })],
  [FUSE_FORGET, op('FORGET', FUSE_FORGET_IN_SIZE, { noReply: true })],
  [FUSE_GETATTR, op('GETATTR', FUSE_GETATTR_IN_SIZE)],
  [FUSE_SETATTR, op('SETATTR', FUSE_SETATTR_IN_SIZE)],
  [FUSE_READLINK, op('READLINK', 0)],
  [FUSE_SYMLINK, op('SYMLINK', 0)],
  [FUSE_MKNOD, op('MKNOD', 0)],
  [FUSE_MKDIR, op('MKDIR', 0)],
  [FUSE_UNLINK, op('UNLINK', 0)],
  [FUSE_RMDIR, op('RMDIR', 0)],
  [FUSE_RENAME, op('RENAME', 0)],
  [FUSE_LINK, op('LINK', 0)],
  [FUSE_OPEN, op('OPEN', FUSE_OPEN_IN_SIZE)],
  [FUSE_READ, op('READ', FUSE_READ_IN_SIZE)],
  [FUSE_WRITE, op('WRITE', FUSE_WRITE_IN_SIZE)],
  [FUSE_STATFS, op('STATFS', 0)],
  [FUSE_RELEASE, op('RELEASE', FUSE_RELEASE_IN_SIZE)],
  [FUSE_FSYNC, op('FSYNC', FUSE_FSYNC_IN_SIZE)],
  [FUSE_SETXATTR, op('SETXATTR', 0)],
  [FUSE_GETXATTR, op('GETXATTR', 0)],
  [FUSE_LISTXATTR, op('LISTXATTR', 0)],
  [FUSE_REMOVEXATTR, op('REMOVEXATTR', 0)],
  [FUSE_FLUSH, op('FLUSH', FUSE_FLUSH_IN_SIZE)],
  [FUSE_INIT, op('INIT', FUSE_INIT_IN_SIZE)],
  [FUSE_OPENDIR, op('OPENDIR', FUSE_OPEN_IN_SIZE)],
  [FUSE_READDIR, op('READDIR', FUSE_READ_IN_SIZE)],
  [FUSE_RELEASEDIR, op('RELEASEDIR', FUSE_RELEASE_IN_SIZE)],
  [FUSE_FSYNCDIR, op('FSYNCDIR', 0)],
  [FUSE_GETLK, op('GETLK', 0)],
  [FUSE_SETLK, op('SETLK', 0)],
  [FUSE_SETLKW, op('SETLKW', 0)],
  [FUSE_ACCESS, op('ACCESS', FUSE_ACCESS_IN_SIZE)],
  [FUSE_CREATE, op('CREATE', 0)],
  [FUSE_INTERRUPT, op('INTERRUPT', FUSE_INTERRUPT_IN_SIZE, { noReply: true })],
  [FUSE_BMAP, op('BMAP', 0)],
  [FUSE_DESTROY, op('DESTROY', 0)],
  [FUSE_IOCTL, op('IOCTL', 0)],
  [FUSE_POLL, op('POLL', 0)],
  [FUSE_NOTIFY_REPLY, op('NOTIFY_REPLY', 0, { noReply: true })],
  [FUSE_BATCH_FORGET, op('BATCH_FORGET', FUSE_BATCH_FORGET_IN_SIZE, { noReply: true })],
  [FUSE_FALLOCATE, op('FALLOCATE', FUSE_FALLOCATE_IN_SIZE)],
  [FUSE_READDIRPLUS, op('READDIRPLUS', FUSE_READ_IN_SIZE)],
  [FUSE_RENAME2, op('RENAME2', 0)],
  [FUSE_LSEEK, op('LSEEK', FUSE_LSEEK_IN_SIZE)],
  [FUSE_COPY_FILE_RANGE, op('COPY_FILE_RANGE', 0)],
  [FUSE_SETUPMAPPING, op('SETUPMAPPING', 0)],
  [FUSE_REMOVEMAPPING, op('REMOVEMAPPING', 0)],
  [FUSE_SYNCFS, op('SYNCFS', 0)],
  [FUSE_TMPFILE, op('TMPFILE', 0)],
  [FUSE_STATX, op('STATX', 0)],
  [FUSE_COPY_FILE_RANGE_64, op('COPY_FILE_RANGE_64', 0)],
]);

/** The name of an opcode for messages ("OP_1234" when unknown). */
export function opcodeName(opcode: number): string {
  return OPCODES.get(opcode)?.name ?? `OP_${opcode}`;
}

/**
 * Checked at load: in-struct sizes are multiples of 8 (the spec pads every
 * struct to a 64-bit boundary) and names are unique. A typo in the table
 * fails the first import instead of corrupting requests at run time.
 */
function validateOpcodeTable(): void {
  const names = new Set<string>();
  for (const [code, info] of OPCODES) {
    if (!Number.isInteger(code) || code <= 0) throw new Error(`fuse abi: bad opcode ${code}`);
    if (info.inSize % 8 !== 0) throw new Error(`fuse abi: ${info.name} in-size ${info.inSize} is not 8-aligned`);
    if (names.has(info.name)) throw new Error(`fuse abi: duplicate opcode name ${info.name}`);
    names.add(info.name);
  }
  const fixed: Array<[string, number, number]> = [
    ['fuse_in_header', FUSE_IN_HEADER_SIZE, 40],
    ['fuse_entry_out', FUSE_ENTRY_OUT_SIZE, 128],
    ['fuse_attr_out', FUSE_ATTR_OUT_SIZE, 104],
    ['fuse_init_out', FUSE_INIT_OUT_SIZE, 64],
  ];
  for (const [name, got, want] of fixed) {
    if (got !== want) throw new Error(`fuse abi: sizeof(${name}) is ${got}, expected ${want}`);
  }
}
validateOpcodeTable();

/** Notifications the filesystem sends unasked (fuse_notify_code): the out header's error field. */
export const FUSE_NOTIFY_INVAL_INODE = 2;
/** struct fuse_notify_inval_inode_out: ino, off, len. */
export const FUSE_NOTIFY_INVAL_INODE_OUT_SIZE = 24;
