/**
 * A RAM block of a parsed stream as a ChunkSource: reads assemble pages straight from the
 * stream file (positional reads, neighbouring pages fetched in one read), ZERO/fill pages and
 * pages never sent are synthesized. Nothing is cached: the page table is the whole state.
 */
import type { ChunkSource, Extent } from '../../delta/source.js';
import { CloudletError, CorruptInputError } from '../../util/errors.js';
import type { SnapshotBytes } from './snapshot-bytes.js';
import { PAGE_SIZE } from '../../util/page.js';
import { ZERO_PAGE_ENTRY, type PageTable } from './page-table.js';

/** Data pages at most this far apart in the file are fetched with one read. */
const MAX_GAP = 64 * 1024;
/** Upper bound on one such combined read. */
const MAX_SPAN = 4 * 1024 * 1024;

interface Piece {
  file: number;
  dst: number;
  length: number;
}

export class BlockSource implements ChunkSource {
  readonly size: number;

  constructor(
    readonly name: string,
    private readonly table: PageTable,
    private readonly source: SnapshotBytes,
  ) {
    this.size = table.pages * PAGE_SIZE;
  }

  async read(offset: number, length: number, buf: Buffer): Promise<void> {
    const valid = Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0;
    if (!valid || buf.length < length) {
      throw new CloudletError('BlockSource.read: bad arguments', { offset, length, bufLength: buf.length });
    }
    const stop = Math.min(offset + length, this.size);
    if (offset + length > stop) buf.fill(0, Math.max(0, stop - offset), length);

    const reads: Promise<void>[] = [];
    let group: Piece[] = [];
    let gStart = 0;
    let gEnd = 0;
    const flush = (): void => {
      if (group.length > 0) reads.push(this.fetch(group, gStart, gEnd, buf));
      group = [];
    };

    for (let pos = offset; pos < stop;) {
      const page = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - page * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, stop - pos);
      const dst = pos - offset;
      const e = this.table.entry(page);
      if (e > 0) {
        const file = e + inPage;
        if (group.length === 0 || file < gEnd || file - gEnd > MAX_GAP || file + n - gStart > MAX_SPAN) {
          flush();
          gStart = file;
        }
        group.push({ file, dst, length: n });
        gEnd = file + n;
      } else {
        buf.fill(e === ZERO_PAGE_ENTRY || e === 0 ? 0 : -e - 1, dst, dst + n);
      }
      pos += n;
    }
    flush();
    await Promise.all(reads);
  }

  async dataExtents(): Promise<Extent[]> {
    const out: Extent[] = [];
    let runStart = -1;
    let runEnd = -1;
    this.table.forEachSegment((first, entries) => {
      for (let i = 0; i < entries.length; i++) {
        const e = entries[i]!;
        if (e > 0 || (e < 0 && e !== ZERO_PAGE_ENTRY)) {
          const page = first + i;
          if (page !== runEnd) {
            if (runStart >= 0) out.push({ start: runStart * PAGE_SIZE, length: (runEnd - runStart) * PAGE_SIZE });
            runStart = page;
          }
          runEnd = page + 1;
        }
      }
    });
    if (runStart >= 0) out.push({ start: runStart * PAGE_SIZE, length: (runEnd - runStart) * PAGE_SIZE });
    return out;
  }

  private async fetch(group: Piece[], start: number, end: number, buf: Buffer): Promise<void> {
    if (group.length === 1) {
      const p = group[0]!;
      await this.readExactly(buf, p.dst, p.length, p.file);
      return;
    }
    const scratch = Buffer.allocUnsafe(end - start);
    await this.readExactly(scratch, 0, scratch.length, start);
    for (const p of group) scratch.copy(buf, p.dst, p.file - start, p.file - start + p.length);
  }

  private async readExactly(buf: Buffer, at: number, length: number, position: number): Promise<void> {
    const got = await this.source.readAt(buf, at, length, position);
    if (got !== length) {
      throw new CorruptInputError(`memory snapshot shrank: page data missing at offset ${position + got}`, {
        offset: position + got,
        block: this.name,
      });
    }
  }
}
