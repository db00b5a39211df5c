/**
 * An output image under construction: an AtomicFile (temp name, fsync, rename on commit) that
 * the writers can also read back. AtomicFile opens its temp file write-only, so reads go
 * through a second, read-only handle on the same temp file.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { AtomicFile, type AtomicOptions } from '../../util/atomic.js';
import { onCleanup } from '../../util/cleanup.js';
import { readFully, writeFully } from './io.js';

export class OutputFile {
  private closed = false;

  private constructor(
    private readonly file: AtomicFile,
    private readonly reader: FileHandle,
    private readonly unregister: () => void,
  ) {}

  static async create(path: string, options: AtomicOptions = {}): Promise<OutputFile> {
    const file = await AtomicFile.create(path, options);
    let reader: FileHandle;
    try {
      reader = await open(file.tempPath, 'r');
    } catch (err) {
      await file.abort();
      throw err;
    }
    // Registered after the AtomicFile's own action, so it runs first (newest first).
    const unregister = onCleanup(() => reader.close());
    return new OutputFile(file, reader, unregister);
  }

  write(data: Uint8Array, position: number): Promise<void> {
    return writeFully(this.file.handle, data, position);
  }

  /** Reads [position, position + length) into buf at bufOffset; past the end reads as zero. */
  read(buf: Uint8Array, bufOffset: number, length: number, position: number): Promise<void> {
    return readFully(this.reader, buf, bufOffset, length, position);
  }

  truncate(length: number): Promise<void> {
    return this.file.handle.truncate(length);
  }

  async commit(): Promise<void> {
    await this.closeReader();
    await this.file.commit();
  }

  async abort(): Promise<void> {
    await this.closeReader();
    await this.file.abort();
  }

  private async closeReader(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.unregister();
    await this.reader.close().catch(() => undefined);
  }
}
