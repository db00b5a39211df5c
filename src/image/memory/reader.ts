/**
 * Sequential reader for multi-GiB streams: large reads into one reusable buffer, synchronous
 * field accessors in between. Callers `ensure()` a small look-ahead before a record, then read
 * its fields without awaiting; page payloads are skipped, never copied. Every accessor checks
 * the end of the stream first, so a truncated file is a CorruptInputError naming the offset.
 */
import { CloudletError, CorruptInputError } from '../../util/errors.js';
import type { SnapshotBytes } from './snapshot-bytes.js';

const DEFAULT_CHUNK = 8 * 1024 * 1024;

export class SequentialReader {
  private readonly buf: Buffer;
  /** Stream offset of buf[0]. */
  private bufStart = 0;
  private bufLen = 0;
  private pos: number;

  constructor(
    private readonly source: SnapshotBytes,
    start: number,
    /** Exclusive end of what this reader may consume. */
    readonly end: number,
    chunk = DEFAULT_CHUNK,
  ) {
    this.pos = start;
    this.bufStart = start;
    // At least 1 KiB: every look-ahead the parser asks for (≤ 300 bytes) must fit.
    this.buf = Buffer.allocUnsafe(Math.max(1024, Math.min(chunk, Math.max(0, end - start))));
  }

  /** Absolute offset of the next byte. */
  get offset(): number {
    return this.pos;
  }

  get remaining(): number {
    return this.end - this.pos;
  }

  /** Bytes readable without another await. */
  get buffered(): number {
    return Math.max(0, this.bufStart + this.bufLen - this.pos);
  }

  /** Makes min(n, remaining) bytes available synchronously. */
  async ensure(n: number): Promise<void> {
    const want = Math.min(n, this.remaining);
    if (this.buffered >= want) return;
    if (want > this.buf.length) throw new CloudletError('reader look-ahead larger than its buffer', { want });
    const keep = this.buffered;
    if (keep > 0) this.buf.copy(this.buf, 0, this.pos - this.bufStart, this.pos - this.bufStart + keep);
    this.bufStart = this.pos;
    this.bufLen = keep;
    const toRead = Math.min(this.buf.length - keep, this.end - (this.pos + keep));
    const got = await this.source.readAt(this.buf, keep, toRead, this.pos + keep);
    this.bufLen += got;
    if (this.bufLen < want) this.truncated(want);
  }

  /** Next byte without consuming it, or -1 at the end. Needs a prior ensure(1). */
  peek(): number {
    if (this.remaining <= 0) return -1;
    this.need(1);
    return this.buf[this.pos - this.bufStart]!;
  }

  u8(): number {
    this.need(1);
    const v = this.buf[this.pos - this.bufStart]!;
    this.pos += 1;
    return v;
  }

  be16(): number {
    this.need(2);
    const v = this.buf.readUInt16BE(this.pos - this.bufStart);
    this.pos += 2;
    return v;
  }

  be32(): number {
    this.need(4);
    const v = this.buf.readUInt32BE(this.pos - this.bufStart);
    this.pos += 4;
    return v;
  }

  /** A be64 as [high, low] 32-bit halves: values past 2^53 stay exact enough to be refused. */
  be64parts(): [number, number] {
    this.need(8);
    const at = this.pos - this.bufStart;
    this.pos += 8;
    return [this.buf.readUInt32BE(at), this.buf.readUInt32BE(at + 4)];
  }

  /** A be64 as a number; values ≥ 2^53 come out inexact but still larger than any bound we check. */
  be64(): number {
    const [hi, lo] = this.be64parts();
    return hi * 2 ** 32 + lo;
  }

  /** Copies n buffered bytes (n small: names, headers). */
  bytes(n: number): Buffer {
    this.need(n);
    const at = this.pos - this.bufStart;
    this.pos += n;
    return Buffer.from(this.buf.subarray(at, at + n));
  }

  /** Skips n bytes (page payloads); beyond the buffer the next ensure() refills from there. */
  skip(n: number): void {
    if (n > this.remaining) this.truncated(n);
    this.pos += n;
  }

  private need(n: number): void {
    if (n > this.remaining) this.truncated(n);
    if (this.pos + n > this.bufStart + this.bufLen || this.pos < this.bufStart) {
      throw new CloudletError('reader used past its look-ahead', { offset: this.pos, need: n });
    }
  }

  private truncated(n: number): never {
    throw new CorruptInputError(`memory snapshot truncated: needed ${n} more bytes at offset ${this.pos}`, {
      offset: this.pos,
      needed: n,
      end: this.end,
    });
  }
}
