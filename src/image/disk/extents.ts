/** Small helpers over sorted lists of byte ranges (see Extent in src/delta/source.ts). */
import type { Extent } from '../../delta/source.js';

/** Joins touching or overlapping extents of an ascending list; drops empty ones. */
export function mergeExtents(list: readonly Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of list) {
    if (e.length <= 0) continue;
    const last = out[out.length - 1];
    if (last && e.start <= last.start + last.length) {
      last.length = Math.max(last.length, e.start + e.length - last.start);
    } else {
      out.push({ start: e.start, length: e.length });
    }
  }
  return out;
}

/** Cuts an ascending list to [0, size). */
export function clipExtents(list: readonly Extent[], size: number): Extent[] {
  const out: Extent[] = [];
  for (const e of list) {
    if (e.start >= size) break;
    out.push({ start: e.start, length: Math.min(e.length, size - e.start) });
  }
  return out;
}
