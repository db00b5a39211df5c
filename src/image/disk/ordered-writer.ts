/**
 * OrderedWriter: what Qcow2Writer and RawWriter share. It serializes every call, enforces the
 * DiskWriter contract (usable state, ascending aligned chunks), counts written/zeroed bytes, and
 * removes the partial output after the first I/O failure. A subclass supplies the format:
 * `put` (store a range), `readInto` (current bytes) and `complete` (everything finish() does
 * before the file is committed).
 */
import { PAGE_SIZE } from '../../util/page.js';
import type { OutputFile } from './output-file.js';
import { OpQueue } from './op-queue.js';
import { checkChunkRange, checkUsable, type DiskWriter, type WriterStats } from './writer.js';

export abstract class OrderedWriter implements DiskWriter {
  abstract readonly format: 'qcow2' | 'raw';
  private readonly queue = new OpQueue();
  private state: 'open' | 'finished' | 'aborted' | 'failed' = 'open';
  private nextOffset = 0;
  protected writtenBytes = 0;
  protected zeroedBytes = 0;

  protected constructor(
    protected readonly file: OutputFile,
    readonly path: string,
    readonly virtualSize: number,
  ) {}

  writeChunk(offset: number, data: Uint8Array): Promise<void> {
    return this.queue.run(async () => {
      checkUsable(this.state, this.path);
      const end = checkChunkRange(offset, data.length, this.virtualSize, this.nextOffset);
      await this.guard(() => this.put(offset, data.length, data));
      this.nextOffset = end;
      this.writtenBytes += data.length;
    });
  }

  zeroChunk(offset: number, length?: number): Promise<void> {
    return this.queue.run(async () => {
      checkUsable(this.state, this.path);
      const len = length ?? Math.min(PAGE_SIZE, this.virtualSize - offset);
      const end = checkChunkRange(offset, len, this.virtualSize, this.nextOffset);
      await this.guard(() => this.put(offset, len, null));
      this.nextOffset = end;
      this.zeroedBytes += len;
    });
  }

  readBack(offset: number, length: number, buf?: Buffer): Promise<Buffer> {
    return this.queue.run(async () => {
      checkUsable(this.state, this.path);
      const out = buf ?? Buffer.alloc(length);
      if (length > out.length) throw new RangeError(`readBack of ${length} bytes into a ${out.length}-byte buffer`);
      await this.readInto(offset, length, out);
      return out;
    });
  }

  finish(): Promise<WriterStats> {
    return this.queue.run(async () => {
      checkUsable(this.state, this.path);
      const stats = await this.guard(async () => {
        const s = await this.complete();
        await this.file.commit();
        return s;
      });
      this.state = 'finished';
      return stats;
    });
  }

  abort(): Promise<void> {
    return this.queue.run(async () => {
      if (this.state === 'finished') return;
      if (this.state === 'open') this.state = 'aborted';
      await this.file.abort();
    });
  }

  /** Copies (or zeroes, when data is null) a range that passed the contract checks. */
  protected abstract put(offset: number, length: number, data: Uint8Array | null): Promise<void>;

  /** The output's current bytes at [offset, offset + length) into `out` (at least that long). */
  protected abstract readInto(offset: number, length: number, out: Buffer): Promise<void>;

  /** Writes everything still missing from the file; finish() then commits it. */
  protected abstract complete(): Promise<WriterStats>;

  /**
   * Runs an I/O step; after the first failure the partial file is removed and the writer
   * refuses reuse (its state may be half-updated). Contract checks run before, outside it.
   */
  private async guard<T>(step: () => Promise<T>): Promise<T> {
    try {
      return await step();
    } catch (err) {
      this.state = 'failed';
      await this.file.abort();
      throw err;
    }
  }
}
