/**
 * RAM blocks as raw files. writeRamFile() turns one block of a full snapshot into a page-aligned
 * file whose zero pages are holes — what QEMU maps with memory-backend-file (share=off) as the
 * base of a sparse resume. openRamFile() reads such a file back as a ChunkSource.
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { ChunkSource, Extent } from '../../delta/source.js';
import { AtomicFile } from '../../util/atomic.js';
import { pread } from '../disk/io.js';
import { CloudletError, NotFoundError, UnsupportedError } from '../../util/errors.js';
import { PAGE_SIZE } from '../../util/page.js';
import { ZERO_PAGE_ENTRY } from './page-table.js';
import type { MemorySnapshot } from './snapshot.js';

/** Pages handled per step: one read of the stream, a few writes. */
const WINDOW_PAGES = 1024;
/**
 * Zero runs shorter than this (64 KiB) between non-zero pages are written as zeros rather than
 * left as holes: one write instead of many tiny ones, at a negligible cost in file blocks.
 */
const MIN_HOLE_PAGES = 16;

export interface RamFileStats {
  /** File size: the block length. */
  size: number;
  /** Pages written (non-zero pages, and short zero runs between them); the rest are holes. */
  writtenPages: number;
}

/**
 * Writes block `blockName` of `snapshot` to `path` atomically. Refuses snapshots in which pages
 * of the block were never sent (they would silently read as zero).
 */
export async function writeRamFile(snapshot: MemorySnapshot, blockName: string, path: string): Promise<RamFileStats> {
  const states = snapshot.pages(blockName);
  const unsent = states.counts().unsent;
  if (unsent > 0) {
    throw new UnsupportedError(
      `RAM block ${blockName}: ${unsent} pages are not in the stream; a full snapshot is needed`,
      {
        block: blockName,
        unsent,
      },
    );
  }
  const source = snapshot.block(blockName);
  const file = await AtomicFile.create(path);
  try {
    await file.handle.truncate(source.size);
    const buf = Buffer.allocUnsafe(WINDOW_PAGES * PAGE_SIZE);
    let written = 0;
    for (let first = 0; first < states.pages; first += WINDOW_PAGES) {
      const last = Math.min(first + WINDOW_PAGES, states.pages);
      const runs: [number, number][] = [];
      for (let page = first; page < last; page++) {
        const e = states.entry(page);
        if (!(e > 0 || (e < 0 && e !== ZERO_PAGE_ENTRY))) continue;
        const run = runs[runs.length - 1];
        if (run !== undefined && page - run[1] < MIN_HOLE_PAGES) run[1] = page + 1;
        else runs.push([page, page + 1]);
      }
      if (runs.length === 0) continue;
      const from = runs[0]![0];
      const to = runs[runs.length - 1]![1];
      await source.read(from * PAGE_SIZE, (to - from) * PAGE_SIZE, buf);
      for (const [a, b] of runs) {
        await writeAll(file.handle, buf.subarray((a - from) * PAGE_SIZE, (b - from) * PAGE_SIZE), a * PAGE_SIZE);
        written += b - a;
      }
    }
    await file.commit();
    return { size: source.size, writtenPages: written };
  } catch (err) {
    await file.abort();
    throw err;
  }
}

async function writeAll(handle: FileHandle, data: Buffer, position: number): Promise<void> {
  for (let done = 0; done < data.length;) {
    const { bytesWritten } = await handle.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
}

/** A raw RAM file opened as a ChunkSource; close() releases it. */
export interface RamFile extends ChunkSource {
  close(): Promise<void>;
}

/** Opens a raw RAM file (e.g. a base's pc.ram). Bytes past the end of the file read as zero. */
export async function openRamFile(path: string, name = 'pc.ram'): Promise<RamFile> {
  let handle: FileHandle;
  try {
    handle = await open(path, 'r');
  } catch (err) {
    throw new NotFoundError(`cannot open RAM file ${path}`, { path }, { cause: err });
  }
  const { size } = await handle.stat();
  return {
    name,
    size,
    async read(offset: number, length: number, buf: Buffer): Promise<void> {
      if (offset < 0 || length < 0 || buf.length < length) {
        throw new CloudletError('RamFile.read: bad arguments', { offset, length });
      }
      let done = 0;
      while (done < length && offset + done < size) {
        const bytesRead = await pread(handle, buf, done, Math.min(length - done, size - offset - done), offset + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      buf.fill(0, done, length);
    },
    // Node cannot ask for SEEK_DATA holes; the interface allows "everything may be data".
    async dataExtents(): Promise<Extent[]> {
      return size > 0 ? [{ start: 0, length: size }] : [];
    },
    async close(): Promise<void> {
      await handle.close();
    },
  };
}
