/** Positional file I/O that loops over short reads and writes. */
import type { FileHandle } from 'node:fs/promises';

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
    const { bytesRead } = await file.read(buf, bufOffset + done, length - done, position + done);
    if (bytesRead === 0) {
      buf.fill(0, bufOffset + done, bufOffset + length);
      return;
    }
    done += bytesRead;
  }
}

/** pwrite all of `data` at `position`. */
export async function writeFully(file: FileHandle, data: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await file.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
}
