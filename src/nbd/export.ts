/**
 * What the NBD server serves: an export is a size plus async callbacks, so the synthesizer can
 * answer a read from chunks already rebuilt, from the base disk, or by fetching a segment now,
 * without the server knowing which. `chunkSourceExport` adapts any ChunkSource (a buffer, a
 * disk image) into a read-only export whose zero ranges show up in `base:allocation`.
 */
import type { ChunkSource, Extent } from '../delta/source.js';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from './protocol.js';

/** One block-status extent: `length` bytes with base:allocation `flags` (NBD_STATE_HOLE/ZERO). */
export interface NbdExtent {
  length: number;
  flags: number;
}

export interface NbdExport {
  /** Size in bytes; requests past it are refused with EINVAL before any callback runs. */
  readonly size: number;
  /** Read-only exports refuse WRITE, TRIM and WRITE_ZEROES with EPERM. */
  readonly readOnly: boolean;
  /**
   * Fills buf[0, length) with the bytes at [offset, offset + length); every byte must be written
   * (the buffer is not pre-zeroed). Called concurrently for different ranges, at most 32 MiB each,
   * always inside [0, size). A rejection becomes EIO for that request and is reported via onError.
   * The buffer stays valid until the promise settles, even if the client has gone away.
   */
  read(offset: number, length: number, buf: Buffer): Promise<void>;
  /** Writable exports: stores `data` at `offset`; with `fua`, durably before resolving. */
  write?(offset: number, data: Buffer, fua: boolean): Promise<void>;
  /** Makes every completed write durable. Without it, FLUSH succeeds at once. */
  flush?(): Promise<void>;
  /** Writable exports: the range is no longer needed (advertised only when present). */
  trim?(offset: number, length: number): Promise<void>;
  /** Writable exports: the range must read as zero (advertised only when present). */
  writeZeroes?(offset: number, length: number, fua: boolean): Promise<void>;
  /**
   * base:allocation for [offset, offset + length): consecutive extents starting at `offset`,
   * at least one, each of non-zero length. They may cover less than asked (the client asks
   * again) or more (the server trims). Without this callback `base:allocation` is not offered.
   */
  blockStatus?(offset: number, length: number): Promise<NbdExtent[]>;
}

/** At most this many extents per block-status answer; clients ask again for the rest. */
const MAX_EXTENTS = 1024;

/**
 * A read-only export over a ChunkSource. Block status comes from `dataExtents()` (read once,
 * on the first query): inside an extent "data", outside "hole, reads as zero".
 */
export function chunkSourceExport(source: ChunkSource): NbdExport {
  let extents: Promise<Extent[]> | null = null;
  return {
    size: source.size,
    readOnly: true,
    read: (offset, length, buf) => source.read(offset, length, buf),
    async blockStatus(offset, length) {
      extents ??= source.dataExtents();
      return allocationStatus(await extents, offset, Math.min(length, source.size - offset));
    },
  };
}

/**
 * Describes [offset, offset + length) against sorted, non-overlapping data extents: data as
 * flags 0, gaps as HOLE|ZERO; adjacent equal states merged; at most MAX_EXTENTS entries.
 */
export function allocationStatus(data: readonly Extent[], offset: number, length: number): NbdExtent[] {
  const out: NbdExtent[] = [];
  const end = offset + length;
  const push = (len: number, flags: number): void => {
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += len;
    else out.push({ length: len, flags });
  };
  let pos = offset;
  for (let i = firstEndingAfter(data, offset); i < data.length && pos < end && out.length < MAX_EXTENTS; i++) {
    const e = data[i]!;
    const start = Math.max(e.start, pos);
    if (start >= end) break;
    if (start > pos) push(start - pos, NBD_STATE_HOLE | NBD_STATE_ZERO);
    const stop = Math.min(e.start + e.length, end);
    push(stop - start, 0);
    pos = stop;
  }
  if (pos < end && out.length < MAX_EXTENTS) push(end - pos, NBD_STATE_HOLE | NBD_STATE_ZERO);
  return out;
}

/** Index of the first extent whose end lies after `offset` (binary search). */
function firstEndingAfter(data: readonly Extent[], offset: number): number {
  let lo = 0;
  let hi = data.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    const e = data[mid]!;
    if (e.start + e.length <= offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
