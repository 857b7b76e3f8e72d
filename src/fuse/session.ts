/**
 * A FUSE session over /dev/fuse: the read loop, INIT negotiation, dispatch
 * of requests to a FuseFilesystem, interrupts, and exactly one reply per
 * request.
 *
 * Reading. With the native module (src/io/native.ts) the device is made
 * non-blocking and watched on the event loop itself (a uv_poll handle):
 * when it is readable, requests are read with non-blocking read(2) until it
 * answers EAGAIN, and no request crosses a thread to arrive. Without the
 * module — Node cannot poll a character device — requests are read with
 * blocking read(2) calls run on the libuv threadpool (fs.read). Each of the
 * `readers` outstanding reads then occupies one threadpool thread until the
 * kernel has a request, so the pool must be larger than `readers`, or the
 * filesystem's own fs.* calls starve and the mount deadlocks. The pool size
 * comes from UV_THREADPOOL_SIZE, read once when the pool is first used: call
 * ensureThreadpool() at the very start of the process, before any
 * asynchronous fs/crypto/dns/zlib call. The session caps `readers` at the
 * pool size it can see minus two.
 *
 * Buffers. Read buffers (max_write + one page) are pooled. A request's
 * fields are copied out at decode, so its buffer returns to the pool at once
 * — except for WRITE, whose data is a view of the buffer and which keeps it
 * until the handler settles. At most `maxInFlight` handlers run at once; when
 * that many are pending, reading pauses (the kernel queues the rest). A
 * handler already answered by a timeout or an interrupt holds nobody up: up
 * to `maxInFlight` of those do not count (see holding()).
 *
 * Replies are written synchronously (writeSync / writevSync) from the main
 * thread: the kernel copies them straight into the waiting request, so they
 * never block, and a READ reply goes out as header + data without a copy.
 * Large READ replies are written the same way from the threadpool instead,
 * so that the kernel's copies of several run on several cores.
 * A large READ of a filesystem that can name its bytes as file ranges
 * (readSlices) is instead spliced from those files into the device on the
 * threadpool (native/splice.c): no copy in user space, and the kernel's one
 * copy off the event loop. The mount's max_read is sized so such a reply
 * fits in a pipe (readRequestMax).
 *
 * One reply per request. A handler's result or thrown error (mapped once by
 * opts.errnoOf, FuseErrno used as is) is the reply. A handler that does not
 * settle cannot hang the caller forever: an interrupted request is answered
 * EINTR after `interruptGraceMs`, and any request still pending after
 * `requestTimeoutMs` is answered EIO; its late result is dropped. FORGET,
 * BATCH_FORGET and INTERRUPT get no reply, as the protocol says.
 *
 * The serving process must never block on its own mount: a synchronous fs
 * call on a path inside it, or child_process.spawn() with a `cwd` inside it
 * (libuv waits for the child's exec while the child's chdir waits for a
 * FUSE_ACCESS reply only this process can send), deadlocks. Touch the mount
 * from other processes, or asynchronously.
 */
import * as fs from 'fs';
import { constants as osConstants } from 'os';
import { performance } from 'perf_hooks';
import {
  FUSE_ABORT_ERROR, FUSE_ASYNC_DIO, FUSE_ASYNC_READ, FUSE_BIG_WRITES, FUSE_DIRECT_IO_ALLOW_MMAP, FUSE_INIT_EXT, FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION, FUSE_MAX_MAX_PAGES, FUSE_MAX_PAGES, FUSE_MAX_REQUEST_BYTES, FUSE_MIN_KERNEL_MINOR,
  FUSE_MIN_READ_BUFFER, FUSE_NOTIFY_INVAL_INODE_OUT_SIZE, FUSE_OUT_HEADER_SIZE, FUSE_PAGE_SIZE, FUSE_PARALLEL_DIROPS, FUSE_LSEEK, FUSE_READ, FUSE_WRITE, opcodeName, OPCODES,
} from './abi';
import { IdlePoll, IDLE_POLL_MAX_US } from './idle-poll';
import { decodeRequest, FuseProtocolError, type FuseRequest, type InitRequest, type ReadRequest, type WriteRequest } from './decode';
import {
  encodeAttr, encodeDirents, encodeEmpty, encodeEntry, encodeError, encodeInit, encodeLseek,
  encodeNotifyInvalInode, encodeOpen, encodeReadHeader, encodeStatfs, encodeWrite,
} from './encode';
import {
  FuseErrno, type ConnectionInfo, type DirEntry, type FileSlices, type FuseFilesystem, type MountOptions, type RequestContext,
} from './filesystem';
import { loadNative, type NativeModule, type PollHandle } from '../io/native';

const E = osConstants.errno;

/**
 * Outstanding device reads when not told otherwise. Two keep a request ready
 * while another is being served; more did not raise throughput in 4 KiB
 * random-read runs (the main thread is the limit), and every extra reader
 * takes a threadpool thread away from the filesystem's own I/O — which
 * matters most when the pool could not be enlarged in time.
 */
export const DEFAULT_READERS = 2;
/** The threadpool size ensureThreadpool() asks for when not told otherwise. */
export const DEFAULT_THREADPOOL_SIZE = 16;
/** libuv's own ceiling for UV_THREADPOOL_SIZE. */
const UV_THREADPOOL_MAX = 1024;
const UV_THREADPOOL_DEFAULT = 4;

/**
 * Make the libuv threadpool at least `minThreads` big, by setting
 * UV_THREADPOOL_SIZE. Only effective when called before the threadpool is
 * first used (the first asynchronous fs, crypto, dns.lookup or zlib call of
 * the process); later calls change the variable but not the pool. Returns
 * the size now requested.
 */
export function ensureThreadpool(minThreads: number = DEFAULT_THREADPOOL_SIZE): number {
  const want = Math.min(UV_THREADPOOL_MAX, Math.max(1, Math.floor(minThreads)));
  const current = threadpoolSize();
  if (current >= want) return current;
  process.env.UV_THREADPOOL_SIZE = String(want);
  return want;
}

/** The threadpool size as requested by the environment (libuv's rule). */
export function threadpoolSize(): number {
  const n = Number.parseInt(process.env.UV_THREADPOOL_SIZE ?? '', 10);
  if (!Number.isFinite(n) || n <= 0) return UV_THREADPOOL_DEFAULT;
  return Math.min(n, UV_THREADPOOL_MAX);
}

/** Options of the kernel transport beyond the shared MountOptions. */
export interface KernelSessionOptions extends MountOptions {
  /** Device reads kept outstanding (default 2, capped at threadpool size - 2). */
  readers?: number;
  /** Answer EIO to a request whose handler has not settled after this long; 0 = never (default 120 s). */
  requestTimeoutMs?: number;
  /** Answer EINTR this long after FUSE_INTERRUPT if the handler has not settled (default 1 s). */
  interruptGraceMs?: number;
  /** Watch the device on the event loop when the native module is there (default true). */
  pollDevice?: boolean;
  /**
   * Send large READ replies by splicing the filesystem's file ranges into
   * the device (readSlices), when the native module is there (default true;
   * QCOWFS_NO_SPLICE=1 turns it off).
   */
  spliceReads?: boolean;
  /** The max_read the mount was given, when below max_write (see readRequestMax). */
  maxReadBytes?: number;
  /**
   * Poll mode: longest time (µs) the event loop keeps polling the device,
   * without sleeping, once the last request has been answered (default
   * IDLE_POLL_MAX_US; 0 = never). The window adapts, see IdlePoll.
   */
  idlePollUs?: number;
}

/**
 * READs at least this large are spliced. Below it, copying on the event loop
 * costs less than the round trip to a pool thread: with 64 KiB, the ext4-on-loop
 * benchmark (many medium reads that wait on each other) took 0.57 s against
 * 0.39 s unspliced; from 256 KiB it is no slower than unspliced.
 */
export const SPLICE_MIN_BYTES = 256 * 1024;
/**
 * READ replies at least this large that are not spliced are written on the
 * threadpool (sendReadOnPool), for the same trade: a cold 4 GiB read, whose
 * replies come from O_DIRECT reads, took 2.8-3.2 s against 3.4-6.5 s with
 * every reply written on the event loop.
 */
const POOL_REPLY_MIN_BYTES = SPLICE_MIN_BYTES;

/** Whether a session with these options will splice READ replies of `filesystem`. */
function splicesReads(filesystem: FuseFilesystem, opts: KernelSessionOptions): boolean {
  return opts.spliceReads !== false && process.env.QCOWFS_NO_SPLICE !== '1' && typeof filesystem.readSlices === 'function' &&
    loadNative() !== null;
}

/**
 * The largest READ to ask of the kernel (the max_read mount option): max_write,
 * or less when replies are spliced and a pipe cannot hold a max_write reply.
 * The kernel takes a spliced reply only whole from the pipe, a pipe slot
 * holds one page, and the header takes a slot of its own; without
 * CAP_SYS_RESOURCE a pipe holds pipe-max-size (1 MiB by default). Reads are
 * then halved to a size whose replies fit (512 KiB), rather than losing
 * the splice: readahead of 1 MiB becomes two requests in flight at once.
 */
export function readRequestMax(filesystem: FuseFilesystem, opts: KernelSessionOptions): number {
  const maxWrite = clampMaxWrite(opts.maxRequestBytes);
  if (!splicesReads(filesystem, opts)) return maxWrite;
  const capacity = loadNative()!.pipeCapacity(Math.min(2 * maxWrite, 8 * 1024 * 1024));
  if (capacity <= 0) return maxWrite;
  const dataPages = Math.floor(capacity / FUSE_PAGE_SIZE) - 2;
  let pages = 1;
  while (pages * 2 <= dataPages) pages *= 2;
  return Math.max(FUSE_PAGE_SIZE, Math.min(maxWrite, pages * FUSE_PAGE_SIZE));
}

const DEFAULT_REQUEST_TIMEOUT_MS = 120_000;
const DEFAULT_INTERRUPT_GRACE_MS = 1_000;
const SWEEP_INTERVAL_MS = 250;

/**
 * Notifications written at once, each on a threadpool thread that the kernel
 * may hold until a READ is answered: that READ, if it is a large one, is
 * itself answered from the threadpool, so notifications never take it all.
 */
const NOTIFY_TURNS = 4;

/** One request between its read and its handler settling; also its RequestContext. */
class Pending implements RequestContext {
  replied = false;
  interruptedAt = 0;
  /** Set when FUSE_INTERRUPT arrives; the signal is created only if a handler asks. */
  private controller: AbortController | undefined;
  /** The read buffer this request still holds (WRITE), returned when the handler settles. */
  heldBuffer: Buffer | undefined;
  /** The reply buffer lent to a READ handler, returned when the handler settles. */
  replyBuffer: Buffer | undefined;
  /** Debug text: key arguments. */
  args = '';
  /** The data a READ asks for or a WRITE carries (bytes), for IdlePoll. */
  bytes = 0;
  /** Answered by the sweep (timeout or interrupt) while its handler still runs. */
  answeredEarly = false;

  constructor(
    readonly unique: number,
    readonly opcode: number,
    readonly nodeid: number,
    readonly uid: number,
    readonly gid: number,
    readonly pid: number,
    readonly started: number,
  ) {}

  get signal(): AbortSignal {
    if (this.controller === undefined) {
      this.controller = new AbortController();
      if (this.interruptedAt !== 0) this.controller.abort(new FuseErrno(E.EINTR, 'interrupted'));
    }
    return this.controller.signal;
  }

  interrupt(now: number): void {
    if (this.interruptedAt !== 0) return;
    this.interruptedAt = now;
    this.controller?.abort(new FuseErrno(E.EINTR, 'interrupted'));
  }
}

const ERRNO_NAMES = new Map<number, string>(Object.entries(E).map(([name, n]) => [n, name]));

/**
 * The session over an open /dev/fuse file descriptor that a mount(2) has
 * bound. start() begins reading; `initialized` settles when INIT has been
 * answered; `done` when the kernel has ended the connection (unmount) and
 * the filesystem's destroy() has run.
 */
export class FuseSession {
  readonly initialized: Promise<ConnectionInfo>;
  readonly done: Promise<void>;

  private resolveInit!: (c: ConnectionInfo) => void;
  private rejectInit!: (e: Error) => void;
  private resolveDone!: () => void;
  private rejectDone!: (e: Error) => void;

  private readonly maxWrite: number;
  private readonly maxInFlight: number;
  private readonly readers: number;
  private readonly bufferSize: number;
  private readonly requestTimeoutMs: number;
  private readonly interruptGraceMs: number;
  private readonly debug: boolean;

  private readonly freeBuffers: Buffer[] = [];
  /** READ reply buffers (maxWrite bytes each), lent to handlers and reused. */
  private readonly freeReplyBuffers: Buffer[] = [];
  private readonly pending = new Map<number, Pending>();
  /** Interrupts whose target has not been read yet (readers race): unique -> time seen. */
  private readonly earlyInterrupts = new Map<number, number>();
  private readonly dirCache = new Map<string, DirEntry[]>();

  /** Scratch for fixed-size replies: replies are written synchronously, so one suffices. */
  private readonly scratch = Buffer.alloc(4096);
  private readonly readHeader = Buffer.alloc(FUSE_OUT_HEADER_SIZE);
  private readonly readIov: Buffer[] = [this.readHeader, this.readHeader];
  /** The native module for the hot path's system calls (fs's otherwise). */
  private readonly io: NativeModule | null = loadNative();
  private dirBuffer = Buffer.alloc(FUSE_MIN_READ_BUFFER + FUSE_OUT_HEADER_SIZE);

  private started = false;
  private stopping = false;
  private activeReaders = 0;
  private parkedReaders = 0;
  /** Poll mode: the native module and the device's poll handle. */
  private native: NativeModule | null = null;
  private poll: PollHandle | undefined;
  private pollParked = false;
  /** Poll mode: the last read of the device found it empty (EAGAIN). */
  private drained = false;
  private idlePoll: IdlePoll | undefined;
  private sweepTimer: NodeJS.Timeout | undefined;
  private conn: ConnectionInfo | undefined;
  /** Where READ replies are spliced from (native module), or null. */
  private splicer: NativeModule | null = null;
  /** Replies still being written on the threadpool (spliced or not): the device stays open until they end. */
  private repliesOnPool = 0;
  /**
   * The connection is over and the device about to be closed: nothing more is written to it.
   * A handler that outlives finish()'s wait would otherwise write to a closed descriptor, or
   * to whatever file has since been given its number.
   */
  private deviceGone = false;
  /** Pending handlers the sweep has answered, whose handler has not settled yet. */
  private answeredEarly = 0;
  private destroyed = false;
  /** Turns left for writing notifications on the threadpool, and who waits for one. */
  private notifyTurns = NOTIFY_TURNS;
  private readonly notifyWaiting: (() => void)[] = [];
  private fatal: Error | undefined;

  constructor(
    private readonly fd: number,
    private readonly filesystem: FuseFilesystem,
    private readonly opts: KernelSessionOptions,
  ) {
    this.initialized = new Promise((res, rej) => { this.resolveInit = res; this.rejectInit = rej; });
    this.done = new Promise((res, rej) => { this.resolveDone = res; this.rejectDone = rej; });
    // Nobody may be listening yet; an unobserved rejection must not kill the process.
    this.initialized.catch(() => undefined);
    this.done.catch(() => undefined);

    this.maxWrite = clampMaxWrite(opts.maxRequestBytes);
    this.maxInFlight = Math.max(1, Math.floor(opts.maxInFlight || 1));
    const poolRoom = Math.max(1, threadpoolSize() - 2);
    this.readers = Math.max(1, Math.min(Math.floor(opts.readers ?? DEFAULT_READERS), poolRoom, this.maxInFlight));
    // The kernel refuses reads smaller than max_write + headers (fs/fuse/dev.c).
    this.bufferSize = Math.max(FUSE_MIN_READ_BUFFER, this.maxWrite + FUSE_PAGE_SIZE);
    this.requestTimeoutMs = opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.interruptGraceMs = opts.interruptGraceMs ?? DEFAULT_INTERRUPT_GRACE_MS;
    this.debug = opts.debug;
  }

  /** What INIT negotiated, once it has. */
  get connection(): ConnectionInfo | undefined {
    return this.conn;
  }

  /** True once the connection has ended (reads returned ENODEV or failed). */
  get ended(): boolean {
    return this.stopping;
  }

  /** How requests are read: on the event loop ('poll') or by threadpool reads ('threadpool'). */
  get readMode(): 'poll' | 'threadpool' | undefined {
    if (!this.started) return undefined;
    return this.native !== null ? 'poll' : 'threadpool';
  }

  /** Requests whose handlers have not settled. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Start the device reads. The mount must already exist. */
  start(): void {
    if (this.started) throw new Error('FUSE session already started');
    this.started = true;
    this.sweepTimer = setInterval(() => this.sweep(), SWEEP_INTERVAL_MS);
    this.sweepTimer.unref();
    if (splicesReads(this.filesystem, this.opts)) this.splicer = loadNative();
    const native = this.opts.pollDevice === false ? null : loadNative();
    if (native !== null && native.setNonblock(this.fd) === 0) {
      this.native = native;
      this.activeReaders = 1;
      this.poll = native.pollCreate(this.fd, () => this.onReadable());
      native.pollStart(this.poll);
      const us = this.opts.idlePollUs ?? IDLE_POLL_MAX_US;
      if (us > 0) {
        const poll = this.poll;
        // Spun in C: setImmediate would allocate on every turn of the loop.
        this.idlePoll = new IdlePoll(us / 1000, undefined, (ms) => {
          if (this.poll === poll) native.pollSpin(poll, Math.ceil(ms * 1000));
        });
      }
      return;
    }
    for (let i = 0; i < this.readers; i++) {
      this.activeReaders++;
      this.readNext();
    }
  }

  // --- reading ---------------------------------------------------------------

  private takeBuffer(): Buffer {
    return this.freeBuffers.pop() ?? Buffer.allocUnsafe(this.bufferSize);
  }

  /**
   * Keep as many buffers as can be busy at once (one per reader plus one per
   * WRITE in flight), so a steady write load allocates nothing.
   */
  private giveBuffer(buf: Buffer): void {
    if (this.freeBuffers.length < this.readers + this.maxInFlight) this.freeBuffers.push(buf);
  }

  /** One reader: issue a read unless stopping or saturated. */
  private readNext(): void {
    if (this.stopping) {
      this.readerExited();
      return;
    }
    if (this.holding() >= this.maxInFlight) {
      this.parkedReaders++;
      return;
    }
    const buf = this.takeBuffer();
    fs.read(this.fd, buf, 0, buf.length, null, (err, n) => this.onRead(err, n, buf));
  }

  private onRead(err: NodeJS.ErrnoException | null, n: number, buf: Buffer): void {
    if (err) {
      this.giveBuffer(buf);
      switch (err.code) {
        case 'EINTR':
        case 'EAGAIN':
        case 'ENOENT': // the request was interrupted before we could read it
          this.readNext();
          return;
        case 'ENODEV': // unmounted
        case 'ECONNABORTED': // connection aborted (FUSE_ABORT_ERROR)
          this.stopping = true;
          this.readerExited();
          return;
        default:
          this.fatal ??= new Error(`reading /dev/fuse failed: ${err.message}`);
          this.stopping = true;
          this.readerExited();
          return;
      }
    }
    try {
      this.handle(buf, n);
    } catch (e) {
      // handle() only throws on a bug of this module; keep serving.
      process.stderr.write(`qcowfs: fuse: internal error: ${(e as Error).stack ?? e}\n`);
    }
    this.readNext();
  }

  /**
   * Poll mode: the device is readable (or has failed); read until it would
   * block. The device is read one request ahead of the one handled, so that
   * a request knows whether another is queued behind it (`drained`): one
   * that is alone may wait for the disk on the spot (soleRequest).
   */
  private onReadable(): void {
    const native = this.native!;
    let cur: Buffer | null = null;
    let curLength = 0;
    for (;;) {
      let next: Buffer | null = null;
      let nextLength = 0;
      // Saturated: read nothing more; stop watching (the poll is level-triggered) until a handler settles.
      const saturated = this.holding() + (cur === null ? 0 : 1) >= this.maxInFlight;
      if (!this.stopping && !saturated) {
        const buf = this.takeBuffer();
        const n = native.readInto(this.fd, buf);
        if (n >= 0) {
          next = buf;
          nextLength = n;
          this.drained = false;
        } else {
          this.giveBuffer(buf);
          const errno = -n;
          this.drained = errno === E.EAGAIN;
          if (errno === E.EINTR || errno === E.ENOENT) continue; // ENOENT: interrupted before we read it
          if (errno !== E.EAGAIN) {
            if (errno !== E.ENODEV && errno !== E.ECONNABORTED) {
              this.fatal ??= new Error(`reading /dev/fuse failed: ${errnoName(errno)}`);
            }
            if (cur !== null) this.handleRead(cur, curLength);
            this.stopPolling();
            return;
          }
        }
      } else {
        this.drained = false;
      }
      if (cur !== null) this.handleRead(cur, curLength);
      if (next === null) {
        if (!saturated || this.stopping || this.poll === undefined) return;
        if (this.holding() < this.maxInFlight) {
          cur = null; // it was answered on the spot: there is room again
          continue;
        }
        native.pollStop(this.poll);
        this.pollParked = true;
        return;
      }
      cur = next;
      curLength = nextLength;
    }
  }

  /** One request read from the device, handled. */
  private handleRead(buf: Buffer, n: number): void {
    if (this.pending.size === 0) this.idlePoll?.arrived();
    try {
      this.handle(buf, n);
    } catch (e) {
      process.stderr.write(`qcowfs: fuse: internal error: ${(e as Error).stack ?? e}\n`);
    }
  }

  private stopPolling(): void {
    this.stopping = true;
    this.idlePoll?.stop();
    if (this.poll !== undefined) {
      this.native!.pollClose(this.poll);
      this.poll = undefined;
    }
    this.readerExited();
  }

  private readerExited(): void {
    this.activeReaders--;
    if (this.activeReaders === 0) {
      // Parked readers (saturated) are stopped too.
      this.parkedReaders = 0;
      void this.finish();
    }
  }

  /**
   * The pending handlers that count against maxInFlight: all of them, less
   * those the sweep has answered (their callers have moved on), of which up
   * to maxInFlight more may run. Counted, handlers that never settle would
   * stop the reading of the device once there are maxInFlight of them,
   * though each was answered, and every later request would wait for good.
   */
  private holding(): number {
    return this.pending.size - Math.min(this.answeredEarly, this.maxInFlight);
  }

  /** A handler settled: wake a parked reader if any. */
  private unpark(): void {
    if (this.pollParked && this.holding() < this.maxInFlight && this.poll !== undefined) {
      this.pollParked = false;
      this.native!.pollStart(this.poll);
    }
    while (this.parkedReaders > 0 && this.holding() < this.maxInFlight) {
      this.parkedReaders--;
      this.readNext();
    }
  }

  // --- dispatch --------------------------------------------------------------

  private handle(buf: Buffer, n: number): void {
    let req: FuseRequest;
    try {
      req = decodeRequest(buf, n);
    } catch (e) {
      this.giveBuffer(buf);
      this.protocolFault(e);
      return;
    }
    const h = req.header;
    switch (req.kind) {
      case 'forget':
        this.giveBuffer(buf);
        this.debugLine(h.unique, 'FORGET', h.nodeid, `nlookup=${req.nlookup}`, '', 0);
        this.callForget(h.nodeid, req.nlookup);
        return;
      case 'batch-forget':
        this.giveBuffer(buf);
        this.debugLine(h.unique, 'BATCH_FORGET', h.nodeid, `count=${req.forgets.length}`, '', 0);
        for (const f of req.forgets) this.callForget(f.nodeid, f.nlookup);
        return;
      case 'interrupt':
        this.giveBuffer(buf);
        this.interrupt(h.unique, req.targetUnique);
        return;
      default:
        break;
    }
    if ((req.kind === 'read' && this.answerReadNow(req)) || (req.kind === 'write' && this.answerWriteNow(req))) {
      this.giveBuffer(buf);
      return;
    }
    const p = new Pending(h.unique, h.opcode, h.nodeid, h.uid, h.gid, h.pid, performance.now());
    if (req.kind === 'write') {
      p.heldBuffer = buf;
      p.bytes = req.data.length;
    } else {
      this.giveBuffer(buf);
      if (req.kind === 'read') p.bytes = req.size;
    }
    if (this.debug) p.args = describe(req);
    if (this.earlyInterrupts.size > 0 && this.earlyInterrupts.delete(h.unique)) p.interrupt(p.started);
    this.pending.set(h.unique, p);
    this.serve(req, p).then(
      () => this.settled(p),
      (err: unknown) => {
        this.replyError(p, this.errnoFor(err));
        this.settled(p);
      },
    );
  }

  /**
   * A READ the filesystem can answer on the spot (readNow) is answered here,
   * before it becomes a request in flight: no promise, no pending entry, the
   * reply written at once. Large reads are left to the splicing path, and
   * --debug takes the general path so that every request is logged alike.
   * False: nothing was sent, serve() takes it.
   */
  private answerReadNow(req: ReadRequest): boolean {
    const f = this.filesystem;
    const size = req.size;
    if (f.readNow === undefined || this.debug || size === 0 || size > this.maxWrite) return false;
    if (this.splicer !== null && size >= SPLICE_MIN_BYTES) return false;
    const started = performance.now();
    const unique = req.header.unique;
    const into = this.freeReplyBuffers.pop() ?? this.newReplyBuffer();
    try {
      // Alone: nothing more queued in the device (read one request ahead) and nothing in flight.
      const data = f.readNow(req.header.nodeid, req.fh, req.offset, size, into, this.drained && this.pending.size === 0);
      if (data === null) return false;
      if (this.earlyInterrupts.size > 0) this.earlyInterrupts.delete(unique);
      this.writeReadReply(unique, data);
      if (this.pending.size === 0 && !this.stopping) this.idlePoll?.idle(started, data.length);
      return true;
    } catch (err) {
      this.writeReply(unique, this.scratch, encodeError(this.scratch, unique, this.errnoFor(err)), FUSE_READ);
      if (this.pending.size === 0 && !this.stopping) this.idlePoll?.idle(started);
      return true;
    } finally {
      if (this.freeReplyBuffers.length < this.maxInFlight) this.freeReplyBuffers.push(into);
    }
  }

  /**
   * A WRITE the filesystem can do on the spot (writeNow: in place, into the
   * host's page cache) is answered here, as answerReadNow does for reads.
   * False: nothing was done, serve() takes it.
   */
  private answerWriteNow(req: WriteRequest): boolean {
    const f = this.filesystem;
    if (f.writeNow === undefined || this.debug) return false;
    const started = performance.now();
    const unique = req.header.unique;
    try {
      const written = f.writeNow(req.header.nodeid, req.fh, req.offset, req.data);
      if (written === null) return false;
      if (this.earlyInterrupts.size > 0) this.earlyInterrupts.delete(unique);
      this.writeReply(unique, this.scratch, encodeWrite(this.scratch, unique, written), FUSE_WRITE);
    } catch (err) {
      this.writeReply(unique, this.scratch, encodeError(this.scratch, unique, this.errnoFor(err)), FUSE_WRITE);
    }
    // A WRITE lands in the host's page cache: however long it took, it did not wait for the disk.
    if (this.pending.size === 0 && !this.stopping) this.idlePoll?.idle(started, req.data.length, false);
    return true;
  }

  private settled(p: Pending): void {
    if (p.heldBuffer !== undefined) {
      this.giveBuffer(p.heldBuffer);
      p.heldBuffer = undefined;
    }
    if (p.replyBuffer !== undefined) {
      // Only now: a handler answered early (interrupt, timeout) may still have been writing into it.
      if (this.freeReplyBuffers.length < this.maxInFlight) this.freeReplyBuffers.push(p.replyBuffer);
      p.replyBuffer = undefined;
    }
    if (!p.replied) {
      // Every path of serve() replies; this is the guard against one that forgot.
      this.replyError(p, E.EIO);
    }
    this.pending.delete(p.unique);
    if (p.answeredEarly) this.answeredEarly--;
    // A WRITE lands in the host's page cache: however long it took, it did not wait for the disk.
    if (this.pending.size === 0 && !this.stopping) this.idlePoll?.idle(p.started, p.bytes, p.opcode !== FUSE_WRITE);
    this.unpark();
  }

  private callForget(nodeid: number, nlookup: number): void {
    try {
      this.filesystem.forget?.(nodeid, nlookup);
    } catch (e) {
      process.stderr.write(`qcowfs: fuse: forget(${nodeid}) failed: ${(e as Error).message}\n`);
    }
  }

  private interrupt(unique: number, target: number): void {
    const now = performance.now();
    const p = this.pending.get(target);
    if (this.debug) this.debugLine(unique, 'INTERRUPT', 0, `target=${target}`, p ? 'aborting' : 'not pending', 0);
    if (p !== undefined) p.interrupt(now);
    else this.earlyInterrupts.set(target, now);
  }

  /** Serve one request; every path writes its reply (or throws, which replies an errno). */
  private async serve(req: FuseRequest, p: Pending): Promise<void> {
    const f = this.filesystem;
    const nodeid = req.header.nodeid;
    switch (req.kind) {
      case 'init':
        return this.serveInit(req, p);
      case 'destroy':
        await this.runDestroy();
        return this.replyEmpty(p);
      case 'lookup': {
        const entry = await f.lookup(p, nodeid, req.name);
        if (this.canReply(p)) this.send(p, encodeEntry(this.scratch, p.unique, entry), 'ok');
        return;
      }
      case 'getattr': {
        const r = await f.getattr(p, nodeid, req.fh);
        if (this.canReply(p)) this.send(p, encodeAttr(this.scratch, p.unique, r), this.debug ? `size=${r.attr.size}` : '');
        return;
      }
      case 'setattr': {
        const r = await f.setattr(p, nodeid, req.changes);
        if (this.canReply(p)) this.send(p, encodeAttr(this.scratch, p.unique, r), this.debug ? `size=${r.attr.size}` : '');
        return;
      }
      case 'open': {
        const r = await f.open(p, nodeid, req.flags);
        if (this.canReply(p)) this.send(p, encodeOpen(this.scratch, p.unique, r), this.debug ? `fh=${r.fh}` : '');
        return;
      }
      case 'opendir': {
        const r = f.opendir ? await f.opendir(p, nodeid, req.flags) : { fh: 0 };
        this.dirCache.delete(dirKey(nodeid, r.fh));
        if (this.canReply(p)) this.send(p, encodeOpen(this.scratch, p.unique, r), this.debug ? `fh=${r.fh}` : '');
        return;
      }
      case 'read': {
        if (this.splicer !== null && req.size >= SPLICE_MIN_BYTES && req.size <= this.maxWrite) {
          const slices = await f.readSlices!(p, nodeid, req.fh, req.offset, req.size);
          if (slices !== null) {
            let sent: boolean;
            try {
              sent = await this.spliceRead(p, slices);
            } finally {
              slices.release();
            }
            if (sent) return;
          }
        }
        let into: Buffer | undefined;
        if (req.size > 0 && req.size <= this.maxWrite) {
          into = this.freeReplyBuffers.pop() ?? this.newReplyBuffer();
          p.replyBuffer = into;
        }
        let data = await f.read(p, nodeid, req.fh, req.offset, req.size, into);
        if (data.length > req.size) data = data.subarray(0, req.size);
        if (data.length >= POOL_REPLY_MIN_BYTES) return this.sendReadOnPool(p, data);
        this.sendRead(p, data);
        return;
      }
      case 'write': {
        const written = await f.write(p, nodeid, req.fh, req.offset, req.data, req.flags);
        if (this.canReply(p)) this.send(p, encodeWrite(this.scratch, p.unique, written), this.debug ? `${written} bytes` : '');
        return;
      }
      case 'flush':
        if (!f.flush) return this.replyError(p, E.ENOSYS);
        await f.flush(p, nodeid, req.fh);
        return this.replyEmpty(p);
      case 'fsync':
        if (!f.fsync) return this.replyError(p, E.ENOSYS);
        await f.fsync(p, nodeid, req.fh, req.datasync);
        return this.replyEmpty(p);
      case 'release':
        await f.release(p, nodeid, req.fh, req.flags);
        return this.replyEmpty(p);
      case 'readdir':
        return this.serveReaddir(req.fh, req.offset, req.size, p);
      case 'releasedir':
        this.dirCache.delete(dirKey(nodeid, req.fh));
        if (f.releasedir) await f.releasedir(p, nodeid, req.fh);
        return this.replyEmpty(p);
      case 'statfs': {
        const st = await f.statfs(p, nodeid);
        if (this.canReply(p)) this.send(p, encodeStatfs(this.scratch, p.unique, st), 'ok');
        return;
      }
      case 'access':
        if (!f.access) return this.replyError(p, E.ENOSYS);
        await f.access(p, nodeid, req.mask);
        return this.replyEmpty(p);
      case 'lseek': {
        if (!f.lseek) return this.replyError(p, E.ENOSYS);
        if (req.offset < 0) return this.replyError(p, E.ENXIO);
        const off = await f.lseek(p, nodeid, req.fh, req.offset, req.whence);
        if (this.canReply(p)) this.send(p, encodeLseek(this.scratch, p.unique, off), this.debug ? `offset=${off}` : '');
        return;
      }
      case 'fallocate':
        if (!f.fallocate) return this.replyError(p, E.ENOSYS);
        await f.fallocate(p, nodeid, req.fh, req.offset, req.length, req.mode);
        return this.replyEmpty(p);
      case 'readdirplus': // FUSE_DO_READDIRPLUS is never negotiated
      case 'unsupported':
        return this.replyError(p, E.ENOSYS);
      case 'forget':
      case 'batch-forget':
      case 'interrupt':
        return; // handled in handle(); never reaches here
    }
  }

  private async serveReaddir(fh: number, offset: number, size: number, p: Pending): Promise<void> {
    // The filesystem lists a directory whole; it is listed again at offset 0
    // and cached per (node, handle) for the pages that follow.
    const key = dirKey(p.nodeid, fh);
    let entries = offset === 0 ? undefined : this.dirCache.get(key);
    if (entries === undefined) {
      entries = await this.filesystem.readdir(p, p.nodeid, fh);
      this.dirCache.set(key, entries);
    }
    if (!this.canReply(p)) return;
    const need = FUSE_OUT_HEADER_SIZE + size;
    if (this.dirBuffer.length < need) this.dirBuffer = Buffer.alloc(need);
    const out = encodeDirents(this.dirBuffer, p.unique, entries, Math.min(offset, entries.length), size);
    this.sendBuffer(p, this.dirBuffer, out.length, this.debug ? `${out.count} entries` : '');
  }

  private async serveInit(req: InitRequest, p: Pending): Promise<void> {
    if (req.major < FUSE_KERNEL_VERSION || (req.major === FUSE_KERNEL_VERSION && req.minor < FUSE_MIN_KERNEL_MINOR)) {
      this.rejectInit(codeError('EPROTO', `the kernel speaks FUSE ${req.major}.${req.minor}; 7.${FUSE_MIN_KERNEL_MINOR} or later is needed`));
      return this.replyError(p, E.EPROTO);
    }
    if (req.major > FUSE_KERNEL_VERSION) {
      // fuse.h: answer with our major only; the kernel sends INIT again.
      const len = encodeInit(this.scratch, p.unique, {
        major: FUSE_KERNEL_VERSION, minor: FUSE_KERNEL_MINOR_VERSION, maxReadahead: 0, flags: 0,
        maxBackground: 0, congestionThreshold: 0, maxWrite: 0, timeGran: 0, maxPages: 0,
      });
      return this.send(p, len, 'major mismatch');
    }
    const minor = Math.min(req.minor, FUSE_KERNEL_MINOR_VERSION);
    const wanted = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES | FUSE_ASYNC_DIO | FUSE_ABORT_ERROR;
    // Shared mmap of direct-I/O files (mount --direct-io, partition files): the kernel
    // then keeps the mapped pages coherent with direct reads and writes itself.
    const flags2 = req.flags & FUSE_INIT_EXT ? (req.flags2 & FUSE_DIRECT_IO_ALLOW_MMAP) >>> 0 : 0;
    const flags = ((req.flags & wanted) | (flags2 !== 0 ? FUSE_INIT_EXT : 0)) >>> 0;
    const maxPages = Math.min(FUSE_MAX_MAX_PAGES, Math.ceil(this.maxWrite / FUSE_PAGE_SIZE));
    // Without FUSE_MAX_PAGES the kernel caps a request at 32 pages.
    const effectiveMax = flags & FUSE_MAX_PAGES ? this.maxWrite : Math.min(this.maxWrite, 32 * FUSE_PAGE_SIZE);
    const maxBackground = Math.min(0xffff, this.maxInFlight);
    const conn: ConnectionInfo = {
      protoMajor: FUSE_KERNEL_VERSION,
      protoMinor: minor,
      maxWrite: effectiveMax,
      maxRead: Math.min(effectiveMax, this.opts.maxReadBytes ?? effectiveMax),
      supportsLseek: minor >= 24,
      supportsFallocate: minor >= 19,
      directIoAllowMmap: (flags2 & FUSE_DIRECT_IO_ALLOW_MMAP) !== 0,
      invalidate: minor >= 12 ? (nodeid, offset, length) => this.notifyInvalInode(nodeid, offset, length) : undefined,
      // Only poll mode reads the device until it is empty, and so knows.
      soleRequest: this.native !== null ? () => this.drained && this.pending.size <= 1 : undefined,
    };
    try {
      await this.filesystem.init?.(conn);
    } catch (e) {
      this.rejectInit(e instanceof Error ? e : new Error(String(e)));
      throw e;
    }
    const len = encodeInit(this.scratch, p.unique, {
      major: FUSE_KERNEL_VERSION,
      minor,
      maxReadahead: req.maxReadahead,
      flags,
      maxBackground,
      congestionThreshold: Math.max(1, Math.floor((maxBackground * 3) / 4)),
      maxWrite: this.maxWrite,
      timeGran: 1,
      maxPages,
      flags2,
    });
    this.conn = conn;
    this.send(p, len, this.debug ? `7.${minor} max_write=${this.maxWrite} flags=0x${flags.toString(16)} flags2=0x${flags2.toString(16)}` : '');
    this.resolveInit(conn);
  }

  private async runDestroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    await this.filesystem.destroy?.();
  }

  // --- replies ---------------------------------------------------------------

  private canReply(p: Pending): boolean {
    return !p.replied;
  }

  private replyEmpty(p: Pending): void {
    if (this.canReply(p)) this.send(p, encodeEmpty(this.scratch, p.unique), 'ok');
  }

  private replyError(p: Pending, errno: number): void {
    if (this.canReply(p)) this.send(p, encodeError(this.scratch, p.unique, errno), errnoName(errno));
  }

  private send(p: Pending, len: number, result: string): void {
    this.sendBuffer(p, this.scratch, len, result);
  }

  private sendBuffer(p: Pending, buf: Buffer, len: number, result: string): void {
    p.replied = true;
    this.writeReply(p.unique, buf, len, p.opcode);
    if (this.debug) this.debugPending(p, result);
  }

  /** Write one reply of `len` bytes of `buf` to the device. */
  private writeReply(unique: number, buf: Buffer, len: number, opcode: number): void {
    if (this.deviceGone) return;
    try {
      fs.writeSync(this.fd, buf, 0, len);
    } catch (e) {
      this.writeFailed(unique, opcode, e);
    }
  }

  /** A READ reply buffer of max_write bytes. */
  private newReplyBuffer(): Buffer {
    return Buffer.allocUnsafe(this.maxWrite);
  }

  private sendRead(p: Pending, data: Buffer): void {
    if (!this.canReply(p)) return;
    p.replied = true;
    this.writeReadReply(p.unique, data);
    if (this.debug) this.debugPending(p, `${data.length} bytes`);
  }

  /** Write a READ reply: the header, then the data. */
  private writeReadReply(unique: number, data: Buffer): void {
    if (this.deviceGone) return;
    encodeReadHeader(this.readHeader, unique, data.length);
    try {
      if (data.length === 0) {
        fs.writeSync(this.fd, this.readHeader, 0, FUSE_OUT_HEADER_SIZE);
      } else if (this.io !== null) {
        const n = this.io.writeTwo(this.fd, this.readHeader, data);
        if (n < 0) throw codeError(errnoName(-n), `write: ${errnoName(-n)}`);
      } else {
        this.readIov[1] = data;
        fs.writevSync(this.fd, this.readIov);
      }
    } catch (e) {
      this.writeFailed(unique, FUSE_READ, e);
    } finally {
      this.readIov[1] = this.readHeader;
    }
  }

  /**
   * Send a large READ reply from a threadpool thread. The kernel copies the
   * data into the reader's pages (for a cached file, fresh page-cache pages)
   * inside this write; on the pool, the copies of several replies run on
   * several cores instead of one after another on the event loop. The reply
   * buffer stays the request's until this settles.
   */
  private async sendReadOnPool(p: Pending, data: Buffer): Promise<void> {
    if (!this.canReply(p)) return;
    p.replied = true;
    const header = Buffer.allocUnsafe(FUSE_OUT_HEADER_SIZE);
    encodeReadHeader(header, p.unique, data.length);
    try {
      await this.writeOnPool([header, data]);
    } catch (e) {
      this.writeFailed(p.unique, p.opcode, e);
    }
    if (this.debug) this.debugPending(p, `${data.length} bytes`);
  }

  /** Write one message to the device from a threadpool thread; the device stays open until it is done. */
  private async writeOnPool(parts: Buffer[]): Promise<void> {
    if (this.deviceGone) return;
    this.repliesOnPool++;
    try {
      await new Promise<void>((resolve, reject) => fs.writev(this.fd, parts, (err) => (err ? reject(err) : resolve())));
    } finally {
      this.repliesOnPool--;
    }
  }

  /**
   * Send a READ reply spliced from file ranges (native/splice.c, on the
   * threadpool). False when it could not be put together and nothing was
   * sent: the caller answers with read() instead.
   */
  private async spliceRead(p: Pending, s: FileSlices): Promise<boolean> {
    if (!this.canReply(p) || this.deviceGone) return true;
    const native = this.splicer!;
    const triples = new Float64Array(s.slices.length * 3);
    s.slices.forEach((x, i) => {
      triples[3 * i] = x.fd;
      triples[3 * i + 1] = x.position;
      triples[3 * i + 2] = x.length;
    });
    p.replied = true;
    this.repliesOnPool++;
    let stage: number;
    let result: number;
    try {
      [stage, result] = await new Promise<[number, number]>((resolve) => {
        native.spliceReply(this.fd, p.unique, triples, (st, r) => resolve([st, r]));
      });
    } finally {
      this.repliesOnPool--;
    }
    if (result < 0 && stage === 0) {
      p.replied = false;
      // Files that cannot splice will not do better next time (EMSGSIZE: this reply did not fit the pipe).
      if (result === -E.EINVAL || result === -E.ENOSYS) this.splicer = null;
      return false;
    }
    if (result < 0) this.writeFailed(p.unique, p.opcode, codeError(errnoName(-result), `splice: ${errnoName(-result)}`));
    if (this.debug) this.debugPending(p, result < 0 ? errnoName(-result) : `${result - FUSE_OUT_HEADER_SIZE} bytes (spliced)`);
    return true;
  }

  /**
   * FUSE_NOTIFY_INVAL_INODE, written from the threadpool: the kernel may have
   * to wait for a READ of those pages that only this thread can answer.
   * An inode the kernel no longer knows (ENOENT) has nothing cached.
   */
  private async notifyInvalInode(nodeid: number, offset: number, length: number): Promise<void> {
    if (this.stopping) return;
    const buf = Buffer.alloc(FUSE_OUT_HEADER_SIZE + FUSE_NOTIFY_INVAL_INODE_OUT_SIZE);
    encodeNotifyInvalInode(buf, nodeid, offset, length);
    if (this.notifyTurns > 0) this.notifyTurns--;
    else await new Promise<void>((resolve) => this.notifyWaiting.push(resolve));
    try {
      await this.writeOnPool([buf]);
      if (this.debug) this.debugLine(0, 'NOTIFY_INVAL_INODE', nodeid, `offset=${offset} length=${length}`, 'ok', 0);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (this.debug || (code !== 'ENOENT' && code !== 'ENODEV')) {
        process.stderr.write(`qcowfs: fuse: invalidating node ${nodeid} failed: ${(e as Error).message}\n`);
      }
    } finally {
      const next = this.notifyWaiting.shift();
      if (next !== undefined) next(); // its turn passes on
      else this.notifyTurns++;
    }
  }

  private writeFailed(unique: number, opcode: number, e: unknown): void {
    const code = (e as NodeJS.ErrnoException).code;
    // ENOENT: the request was interrupted and is gone. ENODEV: unmounted.
    if (code === 'ENOENT' || code === 'ENODEV' || code === 'ECONNABORTED' || this.deviceGone) return;
    process.stderr.write(`qcowfs: fuse: the kernel refused the reply to ${opcodeName(opcode)} #${unique}: ${(e as Error).message}\n`);
    // A refused reply leaves the request waiting, and its caller with it, until
    // the mount goes away: answer it EIO instead (a reply the kernel always takes).
    try {
      fs.writeSync(this.fd, this.scratch, 0, encodeError(this.scratch, unique, E.EIO));
    } catch {
      // The kernel answered the request itself, or the device is gone.
    }
  }

  private errnoFor(err: unknown): number {
    let errno: number = E.EIO;
    if (err instanceof FuseErrno) {
      errno = err.errno;
    } else {
      try {
        errno = this.opts.errnoOf(err);
      } catch {
        errno = E.EIO;
      }
    }
    return Number.isInteger(errno) && errno > 0 && errno < 4096 ? errno : E.EIO;
  }

  private protocolFault(e: unknown): void {
    if (!FuseProtocolError.is(e)) throw e;
    // Past the end of every file served (a well-formed request, not logged): a READ there
    // reads nothing, SEEK_DATA/SEEK_HOLE find nothing (ENXIO), and a file cannot be written
    // or grown that far (EFBIG).
    const pastEnd = e.kind === 'beyond-any-file';
    if (pastEnd && e.opcode === FUSE_READ) return this.writeReadReply(e.unique, this.scratch.subarray(0, 0));
    if (!pastEnd) process.stderr.write(`qcowfs: fuse: ${e.message}\n`);
    if (e.unique < 0 || OPCODES.get(e.opcode)?.noReply) return;
    const errno = pastEnd ? (e.opcode === FUSE_LSEEK ? E.ENXIO : E.EFBIG)
      : e.kind === 'unknown-opcode' ? E.ENOSYS : e.kind === 'bad-value' ? E.EOVERFLOW : E.EIO;
    const len = encodeError(this.scratch, e.unique, errno);
    try {
      fs.writeSync(this.fd, this.scratch, 0, len);
    } catch {
      // the kernel may have dropped the request; nothing else to do
    }
  }

  // --- timeouts and shutdown -------------------------------------------------

  private sweep(): void {
    const now = performance.now();
    for (const [unique, seen] of this.earlyInterrupts) {
      if (now - seen > 1000) this.earlyInterrupts.delete(unique);
    }
    for (const p of this.pending.values()) {
      if (p.replied) continue;
      if (p.interruptedAt !== 0 && now - p.interruptedAt >= this.interruptGraceMs) {
        this.replyError(p, E.EINTR);
      } else if (this.requestTimeoutMs > 0 && now - p.started >= this.requestTimeoutMs) {
        process.stderr.write(`qcowfs: fuse: ${opcodeName(p.opcode)} #${p.unique} on node ${p.nodeid} did not complete in ${this.requestTimeoutMs} ms; answering EIO\n`);
        this.replyError(p, E.EIO);
      } else {
        continue;
      }
      p.answeredEarly = true;
      this.answeredEarly++;
    }
    this.unpark();
  }

  private async finish(): Promise<void> {
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.rejectInit(codeError('ENODEV', 'the filesystem was unmounted before the kernel finished INIT'));
    // Let running handlers settle (bounded), then tell the filesystem.
    const waitUntil = performance.now() + Math.max(this.requestTimeoutMs, 5000);
    while (this.pending.size > 0 && performance.now() < waitUntil) {
      await new Promise((r) => setTimeout(r, 10));
    }
    // Handlers still running answer nobody from now on (the kernel has ended the connection),
    // and a reply still being written on the pool must not find the device closed (and its
    // number reused).
    this.deviceGone = true;
    while (this.repliesOnPool > 0) await new Promise((r) => setTimeout(r, 10));
    let error = this.fatal;
    try {
      if (this.conn !== undefined) await this.runDestroy();
    } catch (e) {
      error ??= e instanceof Error ? e : new Error(String(e));
    }
    try {
      fs.closeSync(this.fd);
    } catch {
      // already closed
    }
    if (error) this.rejectDone(error);
    else this.resolveDone();
  }

  // --- debug -----------------------------------------------------------------

  private debugPending(p: Pending, result: string): void {
    this.debugLine(p.unique, opcodeName(p.opcode), p.nodeid, p.args, result, performance.now() - p.started);
  }

  private debugLine(unique: number, op: string, nodeid: number, args: string, result: string, ms: number): void {
    if (!this.debug) return;
    process.stderr.write(`fuse #${unique} ${op} node=${nodeid}${args ? ` ${args}` : ''}${result ? ` -> ${result}` : ''} (${ms.toFixed(3)} ms)\n`);
  }
}

function dirKey(nodeid: number, fh: number): string {
  return `${nodeid}:${fh}`;
}

function errnoName(errno: number): string {
  return ERRNO_NAMES.get(errno) ?? `errno ${errno}`;
}

/** Key arguments of a request, for debug output. */
function describe(req: FuseRequest): string {
  switch (req.kind) {
    case 'init': return `kernel=${req.major}.${req.minor} flags=0x${(req.flags >>> 0).toString(16)} flags2=0x${(req.flags2 >>> 0).toString(16)} readahead=${req.maxReadahead}`;
    case 'lookup': return `name=${JSON.stringify(req.name)}`;
    case 'getattr': return req.fh === undefined ? '' : `fh=${req.fh}`;
    case 'setattr': return `valid=0x${req.valid.toString(16)} ${JSON.stringify(req.changes)}`;
    case 'open': case 'opendir': return `flags=0x${req.flags.toString(16)}`;
    case 'read': case 'readdir': case 'readdirplus': return `fh=${req.fh} offset=${req.offset} size=${req.size}`;
    case 'write': return `fh=${req.fh} offset=${req.offset} size=${req.data.length}`;
    case 'release': case 'releasedir': case 'flush': return `fh=${req.fh}`;
    case 'fsync': return `fh=${req.fh} datasync=${req.datasync}`;
    case 'access': return `mask=${req.mask}`;
    case 'lseek': return `fh=${req.fh} offset=${req.offset} whence=${req.whence}`;
    case 'fallocate': return `fh=${req.fh} offset=${req.offset} length=${req.length} mode=0x${req.mode.toString(16)}`;
    case 'unsupported': return '';
    default: return '';
  }
}

/** max_write we offer: maxRequestBytes clamped to [4 KiB, 1 MiB]. */
export function clampMaxWrite(maxRequestBytes: number): number {
  const n = Number.isFinite(maxRequestBytes) ? Math.floor(maxRequestBytes) : FUSE_MAX_REQUEST_BYTES;
  return Math.max(FUSE_PAGE_SIZE, Math.min(FUSE_MAX_REQUEST_BYTES, n));
}

/** An Error with a `code`, as thrown to users. */
export function codeError(code: string, message: string): Error & { code: string } {
  const e = new Error(message) as Error & { code: string };
  e.code = code;
  return e;
}
