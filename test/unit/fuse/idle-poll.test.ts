/**
 * IdlePoll's window on a fake clock and a hand-run immediate queue.
 */
import { expect } from 'chai';
import { IdlePoll, turningWith } from '../../../src/fuse/idle-poll';

function harness(maxMs: number): { poll: IdlePoll; t: () => number; advance: (ms: number) => void; turns: () => number; queued: () => number } {
  let t = 0;
  let queue: Array<() => void> = [];
  let turns = 0;
  const poll = new IdlePoll(maxMs, () => t, turningWith(() => t, (f) => queue.push(f)));
  return {
    poll,
    t: () => t,
    // Let `ms` pass with the loop turning every 0.001 ms while anything is queued.
    advance: (ms: number) => {
      const end = t + ms;
      while (t < end) {
        if (queue.length === 0) {
          t = end;
          break;
        }
        t = Math.min(end, t + 0.001);
        const q = queue;
        queue = [];
        for (const f of q) {
          turns++;
          f();
        }
      }
    },
    turns: () => turns,
    queued: () => queue.length,
  };
}

/** A poller (longest window 0.1 ms) that one gap of `ms` has taught a window of `ms`. */
function withWindow(ms: number): ReturnType<typeof harness> {
  const h = harness(0.1);
  h.poll.idle(h.t());
  h.advance(ms);
  h.poll.arrived();
  expect(h.poll.window).to.be.closeTo(ms, 1e-9);
  return h;
}

describe('IdlePoll: adaptive polling between requests', () => {
  it('polls nothing until a gap shows polling would have caught a request', () => {
    const h = harness(0.1);
    h.poll.idle(h.t());
    expect(h.queued()).to.equal(0);
    h.advance(0.03);
    h.poll.arrived();
    expect(h.poll.window).to.be.closeTo(0.03, 1e-9);
    h.poll.idle(h.t());
    expect(h.queued()).to.equal(1);
  });

  it('stops turning the loop when a request arrives, and keeps the window that caught it', () => {
    const h = harness(0.1);
    h.poll.idle(h.t());
    h.advance(0.02);
    h.poll.arrived(); // window 0.02
    h.poll.idle(h.t());
    h.advance(0.01);
    h.poll.arrived(); // caught
    expect(h.poll.window).to.be.closeTo(0.02, 1e-9);
    const turns = h.turns();
    h.advance(1);
    expect(h.turns() - turns).to.be.at.most(1);
    expect(h.queued()).to.equal(0);
  });

  it('gives up at the end of the window, then grows it to cover a later request', () => {
    const h = harness(0.1);
    h.poll.idle(h.t());
    h.advance(0.01);
    h.poll.arrived(); // window 0.01
    h.poll.idle(h.t());
    h.advance(0.05);
    expect(h.queued()).to.equal(0); // the loop sleeps again after 0.01
    h.poll.arrived();
    expect(h.poll.window).to.be.closeTo(0.05, 1e-9);
    h.poll.idle(h.t());
    h.advance(0.2);
    h.poll.arrived();
    expect(h.poll.window).to.be.closeTo(0.025, 1e-9); // a pause longer than the longest window halves it
  });

  it('halves the window at each pause longer than the longest window, down to zero', () => {
    const h = withWindow(0.08);
    const seen: number[] = [];
    for (let i = 0; i < 6; i++) {
      h.poll.idle(h.t());
      h.advance(1);
      h.poll.arrived();
      seen.push(h.poll.window);
    }
    expect(seen[0]).to.be.closeTo(0.04, 1e-9);
    expect(seen[1]).to.be.closeTo(0.02, 1e-9);
    expect(seen[2]).to.be.closeTo(0.01, 1e-9);
    expect(seen[3]).to.be.closeTo(0.005, 1e-9);
    expect(seen[4]).to.equal(0); // below the first window: sleep at once
    expect(seen[5]).to.equal(0);
    h.poll.idle(h.t());
    expect(h.queued()).to.equal(0);
  });

  it('keeps polling through one late request among prompt ones', () => {
    const h = withWindow(0.08);
    h.poll.idle(h.t());
    h.advance(0.5); // the client was late once
    h.poll.arrived();
    h.poll.idle(h.t());
    expect(h.queued()).to.equal(1); // still polling after the next reply
    h.advance(0.03);
    h.poll.arrived(); // caught
    expect(h.poll.window).to.be.closeTo(0.04, 1e-9);
  });

  it('never grows past the longest window', () => {
    const h = harness(0.05);
    for (let i = 0; i < 10; i++) {
      h.poll.idle(h.t());
      h.advance(0.049);
      h.poll.arrived();
      h.poll.idle(h.t());
      h.advance(0.0001);
      h.poll.arrived();
    }
    expect(h.poll.window).to.be.at.most(0.05);
    expect(h.poll.window).to.be.greaterThan(0.04);
  });

  it('does not poll after a request that waited for the disk, nor learn from the gap', () => {
    const h = withWindow(0.03);
    const started = h.t();
    h.advance(0.05); // a request that waited for the disk
    h.poll.idle(started);
    expect(h.queued()).to.equal(0);
    h.advance(0.3);
    h.poll.arrived();
    expect(h.poll.window).to.be.closeTo(0.03, 1e-9);
  });

  it('allows a request that moved data the time to copy it', () => {
    const h = withWindow(0.03);
    let started = h.t();
    h.advance(0.06); // 128 KiB from the host's cache: 0.03 ms + 0.066 ms allowed
    h.poll.idle(started, 128 * 1024);
    expect(h.queued()).to.equal(1);
    h.advance(0.01);
    h.poll.arrived();
    started = h.t();
    h.advance(0.3); // 128 KiB that waited for the disk
    h.poll.idle(started, 128 * 1024);
    expect(h.queued()).to.equal(0);
    started = h.t();
    h.advance(0.04); // 4 KiB that waited for the disk: 0.032 ms allowed
    h.poll.idle(started, 4096);
    expect(h.queued()).to.equal(0);
  });

  it('polls after a request that did not wait for the disk (a write), however long it took', () => {
    const h = withWindow(0.03);
    const started = h.t();
    h.advance(0.1); // a slow copy into the host's page cache
    h.poll.idle(started, 4096, false);
    expect(h.queued()).to.equal(1);
    h.advance(0.01);
    h.poll.arrived();
    expect(h.poll.window).to.be.closeTo(0.03, 1e-9);
  });

  it('stop() ends a poll under way', () => {
    const h = harness(0.1);
    h.poll.idle(h.t());
    h.advance(0.05);
    h.poll.arrived();
    h.poll.idle(h.t());
    h.poll.stop();
    h.advance(0.002);
    expect(h.queued()).to.equal(0);
    h.poll.idle(h.t());
    expect(h.queued()).to.equal(0);
  });
});
