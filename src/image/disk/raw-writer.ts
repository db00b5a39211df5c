/**
 * RawWriter: a plain raw disk = the base with the caller's chunks written over it, resized to
 * the new virtual size.
 *
 * It streams in 1 MiB windows, in ascending order, each written at most once: a window the
 * caller touches is loaded from the base (one read), patched with the chunks, then its non-zero
 * 4 KiB blocks are written; windows in between are copied from the base's data extents only.
 * The file starts as one big hole (truncate), so holes in the base and zeroed chunks cost
 * nothing and stay holes. Everything before `cursor` is final in the file.
 */
import { PAGE_SIZE } from '../../util/page.js';
import type { ChunkSource, Extent } from '../../delta/source.js';
import { UnsupportedError } from '../../util/errors.js';
import { clipExtents } from './extents.js';
import { OrderedWriter } from './ordered-writer.js';
import { OutputFile } from './output-file.js';
import type { WriterStats } from './writer.js';

export interface RawWriterOptions {
  /** Size of the output; the base is cut or zero-extended to it. */
  virtualSize: number;
  base: ChunkSource;
  /** fsync on finish (default true; see util/atomic.ts). */
  durable?: boolean;
}

/** Unit of reading the base and writing the output: few, large system calls. */
const WINDOW = 1024 * 1024;

export class RawWriter extends OrderedWriter {
  readonly format = 'raw';
  /** Everything before it is final in the file. */
  private cursor = 0;
  /** First base extent ending after the cursor. */
  private extentIndex = 0;
  /** The window being patched (-1: none); it starts at `cursor`. */
  private windowIndex = -1;
  private readonly window = Buffer.alloc(WINDOW);
  private readonly copyBuf = Buffer.allocUnsafe(WINDOW);
  private readonly zeros = Buffer.alloc(PAGE_SIZE);
  private readonly baseLimit: number;

  private constructor(
    file: OutputFile,
    path: string,
    virtualSize: number,
    private readonly base: ChunkSource,
    private readonly baseExtents: Extent[],
  ) {
    super(file, path, virtualSize);
    this.baseLimit = Math.min(base.size, virtualSize);
  }

  static async create(path: string, opts: RawWriterOptions): Promise<RawWriter> {
    if (!Number.isSafeInteger(opts.virtualSize) || opts.virtualSize < 0) {
      throw new UnsupportedError(`invalid virtual size ${opts.virtualSize}`);
    }
    const extents = clipExtents(await opts.base.dataExtents(), Math.min(opts.base.size, opts.virtualSize));
    const file = await OutputFile.create(path, { durable: opts.durable });
    try {
      await file.truncate(opts.virtualSize);
    } catch (err) {
      await file.abort();
      throw err;
    }
    return new RawWriter(file, path, opts.virtualSize, opts.base, extents);
  }

  protected async readInto(offset: number, length: number, out: Buffer): Promise<void> {
    const end = offset + length;
    const wStart = this.windowIndex >= 0 ? this.windowIndex * WINDOW : this.cursor;
    const wEnd = this.windowIndex >= 0 ? Math.min(wStart + WINDOW, this.virtualSize) : this.cursor;
    let pos = offset;
    while (pos < end) {
      const dst = out.subarray(pos - offset);
      if (pos < this.cursor) {
        const n = Math.min(end, this.cursor) - pos;
        await this.file.read(dst, 0, n, pos);
        pos += n;
      } else if (pos < wEnd) {
        const n = Math.min(end, wEnd) - pos;
        this.window.copy(dst, 0, pos - wStart, pos - wStart + n);
        pos += n;
      } else {
        // Not reached yet: the base, zero past the virtual size.
        const n = end - pos;
        const fromBase = Math.max(0, Math.min(end, this.virtualSize) - pos);
        if (fromBase > 0) await this.base.read(pos, fromBase, dst.subarray(0, fromBase));
        dst.fill(0, fromBase, n);
        pos += n;
      }
    }
  }

  /** The last window, then the base's data after it. */
  protected async complete(): Promise<WriterStats> {
    await this.flushWindow();
    await this.copyBase(this.virtualSize);
    return {
      path: this.path,
      format: 'raw',
      virtual_size: this.virtualSize,
      file_size: this.virtualSize,
      written_bytes: this.writtenBytes,
      zeroed_bytes: this.zeroedBytes,
    };
  }

  /** Copies (or zeroes, when data is null) a range into the windows it spans. */
  protected async put(offset: number, length: number, data: Uint8Array | null): Promise<void> {
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const wi = Math.floor(pos / WINDOW);
      if (wi !== this.windowIndex) await this.openWindow(wi);
      const wStart = wi * WINDOW;
      const n = Math.min(end, wStart + WINDOW) - pos;
      if (data) this.window.set(data.subarray(pos - offset, pos - offset + n), pos - wStart);
      else this.window.fill(0, pos - wStart, pos - wStart + n);
      pos += n;
    }
  }

  /** Completes the current window, copies the base up to window `wi`, and loads it. */
  private async openWindow(wi: number): Promise<void> {
    await this.flushWindow();
    const start = wi * WINDOW;
    await this.copyBase(start);
    const fromBase = Math.max(0, Math.min(start + WINDOW, this.baseLimit) - start);
    const e = this.baseExtents[this.extentIndex];
    if (fromBase > 0 && e && e.start < start + fromBase) {
      await this.base.read(start, fromBase, this.window.subarray(0, fromBase));
      this.window.fill(0, fromBase);
    } else {
      this.window.fill(0);
    }
    this.windowIndex = wi;
  }

  private async flushWindow(): Promise<void> {
    if (this.windowIndex < 0) return;
    const start = this.windowIndex * WINDOW;
    const end = Math.min(start + WINDOW, this.virtualSize);
    await this.writeNonZero(this.window.subarray(0, end - start), start);
    this.windowIndex = -1;
    this.cursor = end;
    this.skipExtents();
  }

  /** Copies the base's data in [cursor, to) into the file, leaving zero blocks as holes. */
  private async copyBase(to: number): Promise<void> {
    for (let i = this.extentIndex; i < this.baseExtents.length; i++) {
      const e = this.baseExtents[i];
      if (!e || e.start >= to) break;
      const stop = Math.min(to, e.start + e.length);
      for (let pos = Math.max(this.cursor, e.start); pos < stop; pos += WINDOW) {
        const n = Math.min(WINDOW, stop - pos);
        await this.base.read(pos, n, this.copyBuf.subarray(0, n));
        await this.writeNonZero(this.copyBuf.subarray(0, n), pos);
      }
    }
    this.cursor = Math.max(this.cursor, to);
    this.skipExtents();
  }

  private skipExtents(): void {
    while (this.extentIndex < this.baseExtents.length) {
      const e = this.baseExtents[this.extentIndex];
      if (e && e.start + e.length > this.cursor) break;
      this.extentIndex++;
    }
  }

  /** Writes the runs of `data` that are not all-zero 4 KiB blocks, so holes stay holes. */
  private async writeNonZero(data: Buffer, position: number): Promise<void> {
    let runStart = -1;
    for (let at = 0; at < data.length; at += PAGE_SIZE) {
      const block = data.subarray(at, Math.min(at + PAGE_SIZE, data.length));
      const zero = block.equals(this.zeros.subarray(0, block.length));
      if (!zero && runStart < 0) runStart = at;
      if (zero && runStart >= 0) {
        await this.file.write(data.subarray(runStart, at), position + runStart);
        runStart = -1;
      }
    }
    if (runStart >= 0) await this.file.write(data.subarray(runStart), position + runStart);
  }
}
