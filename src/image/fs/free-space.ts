/**
 * freeSpace(): which byte ranges of a disk image lie in blocks its guest's file systems mark free,
 * and whether each answer can be trusted (docs/free-blocks.md).
 *
 * Finds a whole-disk ext2/3/4, or the ext2/3/4 file systems in the partitions of an MBR (with
 * logical partitions) or GPT, reads each (./ext4.ts) and returns every file system with its verdict
 * and the union of the free ranges of the trusted ones. freeChunkRanges() turns those into whole
 * 4 KiB chunks, the unit the delta library works in.
 *
 * Never throws for what the image contains: garbage, truncated or non-ext images give a result
 * with no file systems (and notes). Errors reading the source itself propagate.
 */
import type { ChunkSource, Extent } from '../../delta/source.js';
import { probeExt, readExt, type ExtFileSystem } from './ext4.js';
import { FsFormatError } from './io.js';
import { readPartitionTable, type Partition, type PartitionTable } from './partitions.js';

export type { Verdict, ExtFileSystem, ExtState } from './ext4.js';
export type { Partition } from './partitions.js';

export interface FreeSpaceOptions {
  /**
   * Bound on the free extents kept per file system (memory: ~60 bytes each). A file system with
   * more is reported untrusted rather than read partially. Default 1,000,000.
   */
  maxExtents?: number;
}

export interface FileSystemReport extends ExtFileSystem {
  /** The partition holding it; null for a file system on the whole disk. */
  partition: Partition | null;
}

export interface FreeSpaceResult {
  /** Image size in bytes (source.size). */
  size: number;
  scheme: PartitionTable['scheme'];
  partitions: Partition[];
  /** Every ext2/3/4 file system found, in image order, each with its verdict. */
  filesystems: FileSystemReport[];
  /** Free byte ranges of the trusted file systems, ascending and merged. */
  free: Extent[];
  freeBytes: number;
  /** What was odd: damaged partition tables, partitions without a file system we read. */
  notes: string[];
}

/** A run of whole chunks: chunk indices [first, first + count). */
export interface ChunkRange {
  first: number;
  count: number;
}

export const DEFAULT_MAX_EXTENTS = 1_000_000;

export async function freeSpace(source: ChunkSource, opts: FreeSpaceOptions = {}): Promise<FreeSpaceResult> {
  const readOpts = { maxExtents: opts.maxExtents ?? DEFAULT_MAX_EXTENTS };
  const notes: string[] = [];
  let table: PartitionTable;
  try {
    table = await readPartitionTable(source);
  } catch (err) {
    if (!(err instanceof FsFormatError)) throw err;
    table = { scheme: 'none', partitions: [], notes: [`partition table: ${err.message}`] };
  }
  notes.push(...table.notes);

  const found: FileSystemReport[] = [];
  const read = async (offset: number, room: number, partition: Partition | null): Promise<void> => {
    try {
      if (!(await probeExt(source, offset, room))) {
        if (partition) {
          notes.push(`${partition.scheme} partition ${partition.number} (type ${partition.type}): no ext2/3/4`);
        }
        return;
      }
      found.push({ ...(await readExt(source, offset, room, readOpts)), partition });
    } catch (err) {
      if (!(err instanceof FsFormatError)) throw err;
      notes.push(`${partition ? `${partition.scheme} partition ${partition.number}` : 'whole disk'}: ${err.message}`);
    }
  };
  await read(0, source.size, null);
  for (const p of table.partitions) await read(p.start, p.length, p);

  // Ranges two owners claim cannot be trusted to either: a stale whole-disk superblock under a
  // partition table (mke2fs zeroes sector 0 of a whole disk, so the table came later), or
  // overlapping partition entries.
  for (const fs of found) {
    if (!fs.partition && table.scheme !== 'none' && fs.verdict.trusted) {
      const first = table.partitions[0];
      const what = first ? `${first.scheme} partition ${first.number}` : `${table.scheme}, no usable partitions`;
      fs.verdict = { trusted: false, reason: `a partition table (${what}) also describes this disk` };
      fs.free = [];
      fs.freeBytes = 0;
      continue;
    }
    const end = fs.offset + Math.max(fs.size, 1);
    const clash = table.partitions.find((p) => p !== fs.partition && p.start < end && fs.offset < p.start + p.length);
    if (clash && fs.verdict.trusted) {
      const why = fs.partition
        ? `it overlaps ${clash.scheme} partition ${clash.number}`
        : `a partition table (${clash.scheme} partition ${clash.number}) also describes this disk`;
      fs.verdict = { trusted: false, reason: why };
      fs.free = [];
      fs.freeBytes = 0;
    }
  }

  const free = mergeSorted(found.flatMap((fs) => fs.free));
  return {
    size: source.size,
    scheme: table.scheme,
    partitions: table.partitions,
    filesystems: found.sort((a, b) => a.offset - b.offset),
    free,
    freeBytes: free.reduce((a, e) => a + e.length, 0),
    notes,
  };
}

function mergeSorted(list: Extent[]): Extent[] {
  const sorted = [...list].sort((a, b) => a.start - b.start);
  const out: Extent[] = [];
  for (const e of sorted) {
    const last = out[out.length - 1];
    if (last && e.start <= last.start + last.length) {
      last.length = Math.max(last.length, e.start + e.length - last.start);
    } else {
      out.push({ start: e.start, length: e.length });
    }
  }
  return out;
}

/**
 * The chunks lying wholly in free bytes: a chunk counts only if every one of its bytes is in
 * `free` (ascending, merged, as FreeSpaceResult.free is). Ascending, merged chunk ranges.
 */
export function freeChunkRanges(free: readonly Extent[], chunkSize = 4096): ChunkRange[] {
  if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0) throw new RangeError(`chunk size ${chunkSize}`);
  const out: ChunkRange[] = [];
  for (const e of free) {
    const first = Math.ceil(e.start / chunkSize);
    const end = Math.floor((e.start + e.length) / chunkSize);
    if (end <= first) continue;
    const last = out[out.length - 1];
    if (last && last.first + last.count >= first) last.count = Math.max(last.count, end - last.first);
    else out.push({ first, count: end - first });
  }
  return out;
}

/** Is chunk `index` in the ranges (ascending, as freeChunkRanges returns them)? Binary search. */
export function isChunkFree(ranges: readonly ChunkRange[], index: number): boolean {
  let lo = 0;
  let hi = ranges.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    const r = ranges[mid] as ChunkRange;
    if (index < r.first) hi = mid;
    else if (index >= r.first + r.count) lo = mid + 1;
    else return true;
  }
  return false;
}
