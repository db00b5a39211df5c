/**
 * A ChunkStore for rebuilt chunks that keeps adopted buffers in memory up to a budget and
 * spills the oldest ones to a scratch file beyond it (unlinked right after it is created, so
 * nothing outlives the process). References into a VM's memory are scattered, so reads from
 * memory — a copy, not a syscall — are what keep assembly fast; the budget keeps a huge
 * overlay from taking the host's RAM.
 */
import { open, rm, type FileHandle } from 'node:fs/promises';
import { MemoryChunkStore } from '../delta/chunk-store.js';
import { readFully, writeFully } from './disk/io.js';

export class ScratchStore extends MemoryChunkStore {
  private inMemory = 0;
  private spilled = 0;
  private writing: Promise<void> = Promise.resolve();
  private fh: FileHandle | undefined;
  private failed: Error | undefined;

  /**
   * @param path scratch file, created only when the budget is exceeded
   * @param budget bytes kept in memory (default 512 MiB)
   */
  constructor(
    private readonly path: string,
    private readonly budget = 512 << 20,
  ) {
    super();
  }

  override async adopt(data: Uint8Array): Promise<number> {
    if (this.failed) throw this.failed;
    const loc = await super.adopt(data);
    if (this.inMemory > this.budget) await this.spill();
    return loc;
  }

  override async close(): Promise<void> {
    await this.writing.catch(() => undefined);
    await super.close();
    await this.fh?.close();
  }

  protected override adopted(bytes: number): void {
    this.inMemory += bytes;
  }

  protected override async readSpilled(loc: number, length: number, out: Buffer): Promise<void> {
    await this.writing;
    await readFully(this.fh!, out, 0, length, loc);
  }

  /** Writes the oldest buffers still in memory to the file until under budget, then lets them go. */
  private async spill(): Promise<void> {
    await this.writing;
    if (this.failed) throw this.failed;
    if (!this.fh) {
      this.fh = await open(this.path, 'wx+', 0o600);
      await rm(this.path, { force: true });
    }
    const fh = this.fh;
    const batch: Array<{ start: number; data: Uint8Array; k: number }> = [];
    let freed = 0;
    while (this.inMemory - freed > this.budget / 2 && this.spilled < this.kept.length) {
      const k = this.kept[this.spilled]!;
      if (k.data) {
        batch.push({ start: k.start, data: k.data, k: this.spilled });
        freed += k.length;
      }
      this.spilled++;
    }
    this.writing = (async () => {
      for (const b of batch) await writeFully(fh, b.data, b.start);
      for (const b of batch) this.kept[b.k]!.data = null;
      this.inMemory -= freed;
    })().catch((err: unknown) => {
      this.failed = err instanceof Error ? err : new Error(String(err));
    });
  }
}
