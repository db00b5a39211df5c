/**
 * Positional reads over the bytes of a snapshot: a file (the normal case) or a Buffer (tests,
 * fuzzing). The parser and the block readers see only this, so the same code is exercised both
 * ways.
 */
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { pread } from '../disk/io.js';
import { CloudletError, NotFoundError } from '../../util/errors.js';

export interface SnapshotBytes {
  readonly size: number;
  /** Reads up to `length` bytes at `position` into buf[offset…]; returns how many were read. */
  readAt(buf: Buffer, offset: number, length: number, position: number): Promise<number>;
  close(): Promise<void>;
}

export class FileSnapshotBytes implements SnapshotBytes {
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    readonly size: number,
  ) {}

  static async open(path: string): Promise<FileSnapshotBytes> {
    let handle: FileHandle;
    try {
      // O_NONBLOCK: a FIFO given as the snapshot must not block the open (it is refused below).
      handle = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
    } catch (err) {
      throw new NotFoundError(`cannot open memory snapshot ${path}`, { path }, { cause: err });
    }
    try {
      const st = await handle.stat();
      if (!st.isFile()) {
        throw new NotFoundError(
          `memory snapshot ${path} is ${st.isDirectory() ? 'a directory' : 'not a regular file'}`,
          {
            path,
          },
        );
      }
      return new FileSnapshotBytes(path, handle, st.size);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  async readAt(buf: Buffer, offset: number, length: number, position: number): Promise<number> {
    if (this.closed) throw new CloudletError('memory snapshot is closed', { path: this.path });
    let done = 0;
    while (done < length) {
      const bytesRead = await pread(this.handle, buf, offset + done, length - done, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }
}

export class BufferSnapshotBytes implements SnapshotBytes {
  constructor(private readonly data: Buffer) {}

  get size(): number {
    return this.data.length;
  }

  async readAt(buf: Buffer, offset: number, length: number, position: number): Promise<number> {
    if (position >= this.data.length) return 0;
    return this.data.copy(buf, offset, position, Math.min(this.data.length, position + length));
  }

  async close(): Promise<void> {}
}
