/**
 * Reading structures out of a ChunkSource for the file-system readers: bounded reads that refuse
 * to run past the image, and batched block reads (adjacent blocks in one read).
 */
import type { ChunkSource } from '../../delta/source.js';

/**
 * Internal: the bytes are not a well-formed instance of the structure being read. The readers
 * catch it and turn it into a verdict or a note; it never leaves freeSpace().
 */
export class FsFormatError extends Error {
  override readonly name = 'FsFormatError';
}

/** The largest single read the readers issue. */
export const MAX_READ = 1 << 20;

/** [offset, offset + length) of the image; refuses ranges outside [0, source.size). */
export async function readBytes(source: ChunkSource, offset: number, length: number): Promise<Buffer> {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new FsFormatError(`bad read range ${offset}+${length}`);
  }
  if (offset + length > source.size) {
    throw new FsFormatError(`read of ${length} bytes at ${offset} runs past the end of the image (${source.size})`);
  }
  const buf = Buffer.alloc(length);
  for (let pos = 0; pos < length; pos += MAX_READ) {
    const n = Math.min(MAX_READ, length - pos);
    await source.read(offset + pos, n, buf.subarray(pos, pos + n));
  }
  return buf;
}

/**
 * Reads the given blocks (numbers relative to `base`, in bytes `base + n * blockSize`), adjacent
 * ones together in reads of at most MAX_READ bytes, a few reads at a time. Returns a map from block
 * number to its bytes (views into the read buffers).
 */
export async function readBlocks(
  source: ChunkSource,
  base: number,
  blockSize: number,
  blocks: readonly number[],
): Promise<Map<number, Buffer>> {
  const sorted = [...new Set(blocks)].sort((a, b) => a - b);
  const runs: { first: number; count: number }[] = [];
  const perRun = Math.max(1, Math.floor(MAX_READ / blockSize));
  for (const b of sorted) {
    const last = runs[runs.length - 1];
    if (last && b === last.first + last.count && last.count < perRun) last.count++;
    else runs.push({ first: b, count: 1 });
  }
  const out = new Map<number, Buffer>();
  const CONCURRENCY = 4;
  for (let i = 0; i < runs.length; i += CONCURRENCY) {
    const batch = runs.slice(i, i + CONCURRENCY);
    const bufs = await Promise.all(
      batch.map((r) => readBytes(source, base + r.first * blockSize, r.count * blockSize)),
    );
    batch.forEach((r, k) => {
      const buf = bufs[k] as Buffer;
      for (let j = 0; j < r.count; j++) out.set(r.first + j, buf.subarray(j * blockSize, (j + 1) * blockSize));
    });
  }
  return out;
}
