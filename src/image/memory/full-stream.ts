/**
 * Full streams: every page of every block re-emitted through MigrationStreamWriter (zero pages as
 * ZERO records). What synthesis writes when no base RAM file is used, and the round-trip test.
 */
import { PAGE_SIZE } from '../../util/page.js';
import type { MemorySnapshot } from './snapshot.js';
import { MigrationStreamWriter } from './writer.js';

/** Pages per read: 1 MiB. */
const WINDOW_PAGES = 256;

/** Writes every page of one block of `snapshot` to `writer`, zero pages as ZERO records. */
export async function copyBlock(snapshot: MemorySnapshot, name: string, writer: MigrationStreamWriter): Promise<void> {
  const states = snapshot.pages(name);
  const source = snapshot.block(name);
  const window = Buffer.allocUnsafe(WINDOW_PAGES * PAGE_SIZE);
  for (let first = 0; first < states.pages; first += WINDOW_PAGES) {
    const count = Math.min(WINDOW_PAGES, states.pages - first);
    await source.read(first * PAGE_SIZE, count * PAGE_SIZE, window);
    for (let i = 0; i < count; i++) {
      const page = first + i;
      await writer.writePage(
        name,
        page,
        states.isZero(page) ? null : window.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE),
      );
    }
  }
}

/** Writes the full stream of `snapshot` (every page of every block) to `outPath`. */
export async function writeFullStream(snapshot: MemorySnapshot, outPath: string): Promise<void> {
  snapshot.assertComplete();
  const writer = new MigrationStreamWriter(outPath);
  try {
    await writer.begin(await snapshot.prefixBytes(), await snapshot.startSectionBytes(), snapshot.ramSectionId);
    for (const block of snapshot.blocks) await copyBlock(snapshot, block.name, writer);
    await writer.finish(await snapshot.tail());
  } catch (err) {
    await writer.abort();
    throw err;
  }
}
