/**
 * A ChunkStore for rebuilt chunks: kept in memory in 4 MiB batches up to a budget, older
 * batches spilled to a scratch file (unlinked right after it is opened, so nothing outlives the
 * process) and read back from there. References into a VM's memory are scattered, so reads
 * from memory — a copy, not a syscall — are what keep the assembler fast; the budget keeps a
 * huge overlay from taking the host's RAM.
 */
import { open, rm, type FileHandle } from 'node:fs/promises';
import type { ChunkStore } from '../delta/chunk-store.js';
import { readFully, writeFully } from './disk/io.js';

const BATCH = 4 << 20;

export class ScratchStore implements ChunkStore {
  /** Batches by number; null once spilled to the file (batch k sits at k·BATCH). */
  private readonly batches: Array<Buffer | null> = [];
  private fill = BATCH;
  private inMemory = 0;
  private spilled = 0;
  private writing: Promise<void> = Promise.resolve();
  private failed: unknown;
  private fh: FileHandle | undefined;

  /**
   * @param path scratch file, created only when the budget is exceeded
   * @param budget bytes kept in memory (default 512 MiB)
   */
  constructor(
    private readonly path: string,
    private readonly budget = 512 << 20,
  ) {}

  /** Chunks only: at most one batch at a time. */
  async put(data: Uint8Array): Promise<number> {
    if (this.failed) throw this.failed;
    if (data.length > BATCH) throw new RangeError(`ScratchStore: ${data.length} bytes is larger than a batch`);
    if (this.fill + data.length > BATCH) {
      this.batches.push(Buffer.allocUnsafe(BATCH));
      this.fill = 0;
      this.inMemory += BATCH;
      if (this.inMemory > this.budget) await this.spill();
    }
    const k = this.batches.length - 1;
    this.batches[k]!.set(data, this.fill);
    const loc = k * BATCH + this.fill;
    this.fill += data.length;
    return loc;
  }

  async read(loc: number, length: number, out: Buffer): Promise<void> {
    const k = Math.floor(loc / BATCH);
    const b = this.batches[k];
    if (b) {
      b.copy(out, 0, loc - k * BATCH, loc - k * BATCH + length);
      return;
    }
    if (b === undefined) throw new RangeError(`ScratchStore: nothing kept at ${loc}`);
    await this.writing;
    await readFully(this.fh!, out, 0, length, loc);
  }

  async close(): Promise<void> {
    await this.writing.catch(() => undefined);
    this.batches.length = 0;
    await this.fh?.close();
  }

  /** Writes the oldest batch still in memory to the file, then lets it go. */
  private async spill(): Promise<void> {
    await this.writing;
    if (this.failed) throw this.failed;
    if (!this.fh) {
      this.fh = await open(this.path, 'wx+', 0o600);
      await rm(this.path, { force: true });
    }
    const k = this.spilled++;
    const buf = this.batches[k]!;
    const fh = this.fh;
    this.writing = writeFully(fh, buf, k * BATCH).then(
      () => {
        this.batches[k] = null;
        this.inMemory -= BATCH;
      },
      (err: unknown) => {
        this.failed = err;
      },
    );
  }
}
