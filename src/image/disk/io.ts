/** Positional file I/O that loops over short reads and writes. */
import { readSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';

/**
 * Reads up to this size are done synchronously: a 4 KiB pread through the thread pool costs
 * ~30 µs of round trip, a synchronous one a few µs, and a CLI has nothing else to do meanwhile.
 */
export const SYNC_READ_MAX = 256 * 1024;

/** One pread: synchronous when small (see SYNC_READ_MAX). */
export async function pread(
  file: FileHandle,
  buf: Uint8Array,
  bufOffset: number,
  length: number,
  position: number,
): Promise<number> {
  if (length <= SYNC_READ_MAX) return readSync(file.fd, buf, bufOffset, length, position);
  return (await file.read(buf, bufOffset, length, position)).bytesRead;
}

/** pread until `length` bytes arrived; a file that ends early reads as zero from there. */
export async function readFully(
  file: FileHandle,
  buf: Uint8Array,
  bufOffset: number,
  length: number,
  position: number,
): Promise<void> {
  let done = 0;
  while (done < length) {
    const bytesRead = await pread(file, buf, bufOffset + done, length - done, position + done);
    if (bytesRead === 0) {
      buf.fill(0, bufOffset + done, bufOffset + length);
      return;
    }
    done += bytesRead;
  }
}

/** pwrite all of `data` at `position` (null: at the current position — a pipe or FIFO). */
export async function writeFully(file: FileHandle, data: Uint8Array, position: number | null): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const at = position === null ? null : position + done;
    const { bytesWritten } = await file.write(data, done, data.length - done, at);
    done += bytesWritten;
  }
}
