/**
 * The pair reader: reads a customized target and the base at the same place side by side, in
 * 1 MiB batches, one batch ahead (the next read runs while the current batch is diffed).
 */
import { CHUNK_SIZE } from './chunk.js';
import type { ChunkSource } from './source.js';
import type { DiffStats } from './stats.js';

/** Chunks per batch: 1 MiB. */
const BATCH_CHUNKS = 256;

export interface Batch {
  /** The customized bytes of `count` chunks (zero past the target's end). */
  cust: Buffer;
  /** The base's bytes at the same place, when the base has any there. */
  base: Buffer | undefined;
  count: number;
  bytes: number;
}

export class PairReader {
  private end = 0;
  private pos = 0;
  private pending: Promise<Batch> | undefined;

  constructor(
    private readonly cust: ChunkSource,
    private readonly base: ChunkSource | undefined,
    private readonly stats: DiffStats,
  ) {}

  /** Starts reading chunks [first, end); next() then returns them batch by batch. */
  start(first: number, end: number): void {
    this.pos = first;
    this.end = end;
    this.pending = this.load();
  }

  async next(): Promise<Batch> {
    const pending = this.pending;
    if (!pending) throw new Error('PairReader.next() past the end of its range');
    const b = await pending;
    this.pending = this.pos < this.end ? this.load() : undefined;
    return b;
  }

  private load(): Promise<Batch> {
    const first = this.pos;
    const count = Math.min(BATCH_CHUNKS, this.end - first);
    this.pos += count;
    return this.read(first, count);
  }

  private async read(first: number, count: number): Promise<Batch> {
    const off = first * CHUNK_SIZE;
    const len = Math.min(count * CHUNK_SIZE, this.cust.size - off);
    // Buffers of their own (a batch may travel to a worker thread); zeroed only past the end.
    const cust = ownBuffer(count * CHUNK_SIZE);
    cust.fill(0, len);
    const jobs: Array<Promise<void>> = [this.cust.read(off, len, cust)];
    let base: Buffer | undefined;
    if (this.base && off < this.base.size) {
      base = ownBuffer(count * CHUNK_SIZE);
      const blen = Math.min(count * CHUNK_SIZE, this.base.size - off);
      base.fill(0, blen);
      jobs.push(this.base.read(off, blen, base));
      this.stats.bytesRead += blen;
    }
    await Promise.all(jobs);
    this.stats.bytesRead += len;
    return { cust, base, count, bytes: len };
  }
}

/** Uninitialized bytes in an ArrayBuffer of their own (never a slice of Node's buffer pool). */
function ownBuffer(n: number): Buffer {
  return Buffer.from(new ArrayBuffer(n));
}
