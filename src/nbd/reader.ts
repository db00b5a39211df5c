/**
 * Exact-length reads from a socket, with backpressure: the socket is paused whenever nobody
 * waits for bytes and `highWater` bytes are already buffered, so a client that pipelines faster
 * than we serve fills its own socket buffers, not our memory. A long read (a WRITE payload) is
 * copied straight into its destination as it arrives, so holding it costs its length once.
 */
import type { Socket } from 'node:net';
import { ConnectionEnded } from './errors.js';

interface Fill {
  out: Buffer;
  filled: number;
  resolve: (b: Buffer) => void;
  reject: (e: Error) => void;
}

interface Skip {
  left: number;
  resolve: () => void;
  reject: (e: Error) => void;
}

export class SocketReader {
  private readonly chunks: Buffer[] = [];
  /** Bytes of chunks[0] already consumed. */
  private head = 0;
  private buffered = 0;
  private fill: Fill | null = null;
  private skipping: Skip | null = null;
  private failure: Error | null = null;
  private paused = false;

  constructor(
    private readonly socket: Socket,
    private readonly highWater: number,
  ) {
    socket.on('data', (d: Buffer) => this.onData(d));
    socket.on('end', () => this.fail(new ConnectionEnded()));
    socket.on('close', () => this.fail(new ConnectionEnded()));
  }

  /** Bytes received and not yet consumed. */
  get pending(): number {
    return this.buffered;
  }

  /** `n` bytes if already buffered, else null. Does not wait. */
  take(n: number): Buffer | null {
    if (this.buffered < n) return null;
    const first = this.chunks[0]!;
    let out: Buffer;
    if (first.length - this.head >= n) {
      out = first.subarray(this.head, this.head + n);
      this.consume(n);
    } else {
      out = Buffer.allocUnsafe(n);
      this.drainInto(out, 0, n);
    }
    this.flow();
    return out;
  }

  /** Exactly `n` bytes; rejects with ConnectionEnded if the stream ends first. */
  read(n: number): Promise<Buffer> {
    const ready = this.take(n);
    if (ready) return Promise.resolve(ready);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<Buffer>((resolve, reject) => {
      const out = Buffer.allocUnsafe(n);
      const filled = this.drainInto(out, 0, this.buffered);
      this.fill = { out, filled, resolve, reject };
      this.flow();
    });
  }

  /** Consumes and discards `n` bytes without holding them. */
  skip(n: number): Promise<void> {
    const now = Math.min(n, this.buffered);
    this.consume(now);
    if (now === n) {
      this.flow();
      return Promise.resolve();
    }
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<void>((resolve, reject) => {
      this.skipping = { left: n - now, resolve, reject };
      this.flow();
    });
  }

  private onData(d: Buffer): void {
    const f = this.fill;
    const s = this.skipping;
    if (f) {
      const k = Math.min(d.length, f.out.length - f.filled);
      d.copy(f.out, f.filled, 0, k);
      f.filled += k;
      if (k < d.length) this.push(d.subarray(k));
      if (f.filled === f.out.length) {
        this.fill = null;
        f.resolve(f.out);
      }
    } else if (s) {
      const k = Math.min(d.length, s.left);
      s.left -= k;
      if (k < d.length) this.push(d.subarray(k));
      if (s.left === 0) {
        this.skipping = null;
        s.resolve();
      }
    } else {
      this.push(d);
    }
    this.flow();
  }

  private push(d: Buffer): void {
    this.chunks.push(d);
    this.buffered += d.length;
  }

  private consume(n: number): void {
    this.buffered -= n;
    while (n > 0) {
      const first = this.chunks[0]!;
      const avail = first.length - this.head;
      if (n < avail) {
        this.head += n;
        return;
      }
      n -= avail;
      this.chunks.shift();
      this.head = 0;
    }
  }

  /** Copies `n` buffered bytes into out[at, at + n) and consumes them; returns at + n. */
  private drainInto(out: Buffer, at: number, n: number): number {
    let left = n;
    let pos = at;
    while (left > 0) {
      const first = this.chunks[0]!;
      const k = Math.min(left, first.length - this.head);
      first.copy(out, pos, this.head, this.head + k);
      pos += k;
      left -= k;
      this.consume(k);
    }
    return pos;
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    const f = this.fill;
    const s = this.skipping;
    this.fill = null;
    this.skipping = null;
    f?.reject(err);
    s?.reject(err);
  }

  /** Reads on while someone waits or the buffer is below highWater; pauses otherwise. */
  private flow(): void {
    const want = this.fill !== null || this.skipping !== null || this.buffered < this.highWater;
    if (want && this.paused) {
      this.paused = false;
      this.socket.resume();
    } else if (!want && !this.paused) {
      this.paused = true;
      this.socket.pause();
    }
  }
}
