/**
 * The sparse resume stream (DESIGN.md): QEMU maps the base's pc.ram file copy-on-write
 * (memory-backend-file, share=off) and `-incoming` loads only what differs from it. For the base
 * block that means every page whose bytes differ from the base file — including pages that
 * became zero, sent as ZERO records: QEMU only writes what it receives, so an omitted page keeps
 * the base's bytes. Every page of every other block is sent, because QEMU does not refill ROM
 * blocks (pc.bios, pc.rom, ACPI tables) on incoming.
 */
import type { ChunkSource } from '../../delta/source.js';
import { BaseMismatchError } from '../../util/errors.js';
import { PAGE_SIZE } from '../../util/page.js';
import type { MemorySnapshot } from './snapshot.js';
import { copyBlock } from './full-stream.js';
import { MigrationStreamWriter } from './writer.js';

/** Pages compared per window: 4 MiB reads of both sides. */
const WINDOW_PAGES = 1024;

export interface SparsePage {
  pageIndex: number;
  /** null: the page is zero in the customized snapshot. */
  data: Buffer | null;
}

/**
 * Yields the pages of `blockName` in `customized` that differ from `base`, ascending. Each
 * yielded buffer belongs to the caller (it is not reused).
 */
export async function* sparseStreamPagesVsBase(
  customized: MemorySnapshot,
  blockName: string,
  base: ChunkSource,
): AsyncGenerator<SparsePage> {
  const states = customized.pages(blockName);
  const target = customized.block(blockName);
  if (base.size !== target.size) {
    throw new BaseMismatchError(`base RAM file has ${base.size} bytes, block ${blockName} has ${target.size}`, {
      block: blockName,
      baseSize: base.size,
      size: target.size,
    });
  }
  for (let first = 0; first < states.pages; first += WINDOW_PAGES) {
    const count = Math.min(WINDOW_PAGES, states.pages - first);
    const bytes = count * PAGE_SIZE;
    const mine = Buffer.allocUnsafe(bytes);
    const theirs = Buffer.allocUnsafe(bytes);
    await Promise.all([target.read(first * PAGE_SIZE, bytes, mine), base.read(first * PAGE_SIZE, bytes, theirs)]);
    if (mine.equals(theirs)) continue;
    for (let i = 0; i < count; i++) {
      const a = mine.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
      const b = theirs.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
      if (a.equals(b)) continue;
      yield { pageIndex: first + i, data: states.isZero(first + i) ? null : a };
    }
  }
}

export interface SparseStreamStats {
  /** Pages of the base block sent because they differ from the base (data or ZERO). */
  changedPages: number;
  /** Of those, pages that are zero in the customized snapshot. */
  zeroedPages: number;
  /** Pages of the other blocks (all of them). */
  otherPages: number;
  bytes: number;
}

/**
 * Writes the sparse stream for `customized` resumed on top of `base` (the base's copy of
 * `baseBlock`, normally pc.ram, as written by writeRamFile). `customized` must be complete.
 */
export async function writeSparseStream(
  customized: MemorySnapshot,
  base: ChunkSource,
  outPath: string,
  baseBlock = 'pc.ram',
): Promise<SparseStreamStats> {
  customized.assertComplete();
  customized.pages(baseBlock); // NotFoundError before anything is written
  const writer = new MigrationStreamWriter(outPath);
  const stats: SparseStreamStats = { changedPages: 0, zeroedPages: 0, otherPages: 0, bytes: 0 };
  try {
    await writer.begin(await customized.prefixBytes(), await customized.startSectionBytes(), customized.ramSectionId);
    for (const block of customized.blocks) {
      if (block.name === baseBlock) {
        for await (const p of sparseStreamPagesVsBase(customized, baseBlock, base)) {
          await writer.writePage(baseBlock, p.pageIndex, p.data);
          stats.changedPages++;
          if (p.data === null) stats.zeroedPages++;
        }
      } else {
        await copyBlock(customized, block.name, writer);
        stats.otherPages += block.pages;
      }
    }
    stats.bytes = (await writer.finish(await customized.tail())).bytes;
    return stats;
  } catch (err) {
    await writer.abort();
    throw err;
  }
}
