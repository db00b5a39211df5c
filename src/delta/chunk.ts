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

/**
 * `ranges` ([first, end) chunk ranges, ascending) without the chunks of `runs` (ascending
 * {first, count}); also how many chunks were taken out.
 */
export function subtractChunkRuns(
  ranges: ReadonlyArray<[number, number]>,
  runs: ReadonlyArray<{ first: number; count: number }>,
): { ranges: Array<[number, number]>; removed: number } {
  const out: Array<[number, number]> = [];
  let removed = 0;
  let r = 0;
  for (const [first, end] of ranges) {
    let pos = first;
    while (r < runs.length && runs[r]!.first + runs[r]!.count <= pos) r++;
    for (let k = r; k < runs.length && runs[k]!.first < end; k++) {
      const a = Math.max(pos, runs[k]!.first);
      const b = Math.min(end, runs[k]!.first + runs[k]!.count);
      if (a >= b) continue;
      if (a > pos) out.push([pos, a]);
      removed += b - a;
      pos = b;
    }
    if (pos < end) out.push([pos, end]);
  }
  return { ranges: out, removed };
}

/** Whether chunk `index` is in one of `runs` (ascending {first, count}): binary search. */
export function inChunkRuns(runs: ReadonlyArray<{ first: number; count: number }>, index: number): boolean {
  let lo = 0;
  let hi = runs.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const run = runs[mid]!;
    if (index < run.first) hi = mid - 1;
    else if (index >= run.first + run.count) lo = mid + 1;
    else return true;
  }
  return false;
}

/** Throws RangeError unless `runs` are ascending, non-empty and do not overlap. */
export function checkChunkRuns(runs: ReadonlyArray<{ first: number; count: number }>, what: string): void {
  let end = 0;
  for (const r of runs) {
    if (!Number.isSafeInteger(r.first) || !Number.isSafeInteger(r.count) || r.count <= 0 || r.first < end) {
      throw new RangeError(`${what}: chunk runs must be ascending, non-empty and disjoint`);
    }
    end = r.first + r.count;
  }
}
