/**
 * Chunks: every target is cut into fixed 4 KiB chunks (a guest page, a common filesystem
 * block: util/page.ts). The last chunk of a target may be shorter.
 */
import { PAGE_SHIFT, PAGE_SIZE } from '../util/page.js';

export const CHUNK_SIZE = PAGE_SIZE;
export const CHUNK_SHIFT = PAGE_SHIFT;

const ZEROS = Buffer.alloc(CHUNK_SIZE * 256);

export function chunkCount(size: number): number {
  return Math.ceil(size / CHUNK_SIZE);
}

/** Length of chunk `index` in a target of `size` bytes (0 past the end). */
export function chunkLength(size: number, index: number): number {
  const start = index * CHUNK_SIZE;
  if (start >= size) return 0;
  return Math.min(CHUNK_SIZE, size - start);
}

/** True when every byte is zero; memcmp against a static zero buffer is the fastest way in JS. */
export function isZero(buf: Uint8Array): boolean {
  let off = 0;
  while (off < buf.length) {
    const n = Math.min(ZEROS.length, buf.length - off);
    if (!ZEROS.subarray(0, n).equals(buf.subarray(off, off + n))) return false;
    off += n;
  }
  return true;
}

/** Chunk index ranges [first, end) touched by byte extents, merged and ascending. */
export function extentsToChunkRanges(
  extents: ReadonlyArray<{ start: number; length: number }>,
  size: number,
): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  const limit = chunkCount(size);
  for (const e of extents) {
    if (e.length <= 0) continue;
    const first = Math.floor(e.start / CHUNK_SIZE);
    const end = Math.min(limit, Math.ceil((e.start + e.length) / CHUNK_SIZE));
    if (first >= end) continue;
    const last = out[out.length - 1];
    if (last && first <= last[1]) last[1] = Math.max(last[1], end);
    else out.push([first, end]);
  }
  return out;
}
