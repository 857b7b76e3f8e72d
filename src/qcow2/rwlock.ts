/**
 * An async readers-writer lock: reads (and in-place writes, which change no
 * metadata) share it; anything that changes metadata holds it alone.
 * Writers are preferred so a stream of readers cannot starve them.
 */
export class RwLock {
  private readers = 0;
  private writer = false;
  private readonly queue: Array<{ exclusive: boolean; wake: () => void }> = [];

  async shared<T>(fn: () => Promise<T>): Promise<T> {
    const release = await this.acquireShared();
    try {
      return await fn();
    } finally {
      release();
    }
  }

  /** Take a shared hold that outlives one call; the returned function releases it (once). */
  async acquireShared(): Promise<() => void> {
    if (this.writer || this.queue.length > 0) {
      await new Promise<void>((wake) => this.queue.push({ exclusive: false, wake }));
    } else {
      this.readers++;
    }
    return this.sharedRelease();
  }

  /**
   * A shared hold taken on the spot, or null when that would mean waiting (a
   * writer holds the lock or is queued for it): the caller then waits with
   * acquireShared() or shared().
   */
  tryShared(): (() => void) | null {
    if (this.writer || this.queue.length > 0) return null;
    this.readers++;
    return this.sharedRelease();
  }

  /**
   * Whether tryShared() would succeed now. For a caller that does all its
   * work before it returns: nothing else runs meanwhile, so it needs no hold.
   */
  sharedFree(): boolean {
    return !this.writer && this.queue.length === 0;
  }

  private sharedRelease(): () => void {
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      this.readers--;
      this.pump();
    };
  }

  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.writer || this.readers > 0 || this.queue.length > 0) {
      await new Promise<void>((wake) => this.queue.push({ exclusive: true, wake }));
    } else {
      this.writer = true;
    }
    try {
      return await fn();
    } finally {
      this.writer = false;
      this.pump();
    }
  }

  private pump(): void {
    if (this.writer) return;
    while (this.queue.length > 0) {
      const next = this.queue[0];
      if (next.exclusive) {
        if (this.readers > 0) return;
        this.queue.shift();
        this.writer = true;
        next.wake();
        return;
      }
      this.queue.shift();
      this.readers++;
      next.wake();
    }
  }
}
