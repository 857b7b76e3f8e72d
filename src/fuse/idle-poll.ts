/**
 * Adaptive polling of the FUSE device between requests.
 *
 * A program that issues one request at a time (a `psync` fio job, a loop
 * device under a journaling filesystem) sends the next request a few tens of
 * microseconds after it gets its reply. If the daemon has gone to sleep in the
 * meantime, the kernel must wake it again, and on a virtual machine whose idle
 * vCPU halts that wake-up costs more than the request itself. So once the last
 * request in flight is answered, the event loop keeps turning without sleeping
 * (its poll phase then checks the device with a zero timeout) for a short
 * window, as QEMU's event loops (`poll-max-ns`) and KVM's halt polling do.
 *
 * The window adapts to the gaps seen, the way QEMU's and KVM's do: a request
 * that came within the longest window but after the current one grows the
 * window to cover it; a request that came later than the longest window halves
 * it (KVM's halt_poll_ns_shrink), down to zero, so a mount whose client pauses
 * soon polls nothing at all, while one late request among prompt ones (a
 * scheduling hiccup in the client) does not stop the polling that serves the
 * rest. With a 100 µs longest window, zeroing the window instead (QEMU's
 * default) gave random 4 KiB writes (fio, psync) 7.8-9.2k IOPS against 8.4-9.8k
 * when halving, 3 interleaved rounds each.
 */
import { performance } from 'perf_hooks';

/**
 * Default longest window, µs: KVM's default for halt polling. A client that
 * copies a 128 KiB reply somewhere before it asks for the next (`cp` of a
 * `--direct-io` mount) comes back after 80-200 µs on the benchmark machine
 * (median 102), and a 100 µs window caught only half of those requests. With
 * 200 instead of 100 (interleaved rounds), that `cp` of the benchmark's sparse
 * image took 0.47-0.50 s against 0.56-0.64 s (5 each), random 4 KiB writes did
 * 9.3-10.5k IOPS against 7.0-7.6k (3 each); cold random reads, which are not
 * followed by polling, and the loop-mounted ext4 did not change.
 */
export const IDLE_POLL_MAX_US = 200;

/**
 * Polling follows only requests served this fast (ms), plus the time to copy
 * the data they moved at IDLE_POLL_COPY_BYTES_PER_MS: one that took longer
 * waited for the disk (see idle()).
 */
export const IDLE_POLL_MAX_SERVICE_MS = 0.03;
/**
 * The copying a request is allowed on top of IDLE_POLL_MAX_SERVICE_MS (2 GB/s;
 * a 128 KiB read comes from the host's cache and is copied twice in 40-60 us
 * on the benchmark machine, while one that waited for the disk takes 300 us).
 */
export const IDLE_POLL_COPY_BYTES_PER_MS = 2e6;
/** The first window once a gap shows that polling would have caught a request, ms. */
const START_MS = 0.004;

/**
 * Keeps the event loop turning without sleeping for `ms` from now (0: stop
 * now). The session's is the native module's pollSpin, which does it in C;
 * turningWith() makes one from a clock and a way to run a function on the
 * loop's next turn.
 */
export type KeepAwake = (ms: number) => void;

/**
 * A KeepAwake that re-queues itself on every turn with `later` until the
 * deadline (setImmediate by default: it allocates on every turn, so the
 * session uses the native spinner when it has one).
 */
export function turningWith(
  now: () => number = () => performance.now(),
  later: (f: () => void) => void = setImmediate,
): KeepAwake {
  let until = 0;
  let ticking = false;
  const tick = (): void => {
    if (until === 0 || now() >= until) {
      ticking = false;
      return;
    }
    later(tick);
  };
  return (ms: number): void => {
    until = ms > 0 ? now() + ms : 0;
    if (until !== 0 && !ticking) {
      ticking = true;
      later(tick);
    }
  };
}

export class IdlePoll {
  private windowMs = 0;
  private idleSince = -1;
  private awake = false;

  constructor(
    private readonly maxMs: number,
    private readonly now: () => number = () => performance.now(),
    private readonly keepAwake: KeepAwake = turningWith(now),
  ) {}

  /** The current window, ms (0: the loop sleeps as soon as it is idle). */
  get window(): number {
    return this.windowMs;
  }

  /**
   * The last request in flight, which arrived at `started` and moved `bytes`
   * of data, was answered: keep the loop awake for the window. Not after a
   * request that took longer than IDLE_POLL_MAX_SERVICE_MS and the time to
   * copy its data (it waited for the disk): a wake-up is then a small part of
   * the round trip, and a polling vCPU slows the I/O under way elsewhere (on
   * the benchmark machine, cold 4 KiB random reads at queue depth 1 lost a
   * fifth when every request was followed by polling, while random 4 KiB
   * writes into the host's cache gained half again and more, and so did
   * `cp` of 128 KiB reads with --direct-io once their copying was allowed for).
   * `timed` false: the request did not wait for the disk, however long it
   * took (a WRITE, which only copies into the host's page cache: on a slow
   * day half of the 4 KiB writes of a dd took over 32 us, and polling, shut
   * off after each, no longer caught the next).
   */
  idle(started: number, bytes = 0, timed = true): void {
    const t = this.now();
    if (timed && t - started > IDLE_POLL_MAX_SERVICE_MS + bytes / IDLE_POLL_COPY_BYTES_PER_MS) {
      this.idleSince = -1;
      return;
    }
    this.idleSince = t;
    if (this.windowMs <= 0) return;
    this.awake = true;
    this.keepAwake(this.windowMs);
  }

  /** A request arrived while none was in flight: stop polling, and fit the window to the gap. */
  arrived(): void {
    if (this.idleSince < 0) return;
    const gap = this.now() - this.idleSince;
    this.idleSince = -1;
    this.sleep();
    if (gap <= this.windowMs) return; // caught by polling
    if (gap <= this.maxMs) this.windowMs = Math.min(this.maxMs, Math.max(this.windowMs * 2, START_MS, gap));
    else this.windowMs = this.windowMs / 2 < START_MS ? 0 : this.windowMs / 2;
  }

  /** Stop polling for good (the session ends). */
  stop(): void {
    this.sleep();
    this.idleSince = -1;
    this.windowMs = 0;
  }

  private sleep(): void {
    if (!this.awake) return;
    this.awake = false;
    this.keepAwake(0);
  }
}
