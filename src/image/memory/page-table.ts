/**
 * Where each 4 KiB page of one RAM block lives: an index into the stream file instead of a copy
 * of the page. One number per page (8 bytes per 4 KiB, 0.2 %):
 *   0          never sent in this stream
 *   -(f + 1)   a ZERO record: the page is filled with byte f (f = 0 for ordinary zero pages)
 *   > 0        file offset of the page's 4096 data bytes (a PAGE record's payload)
 * The table is allocated in segments on first touch, so a huge (or garbled) block length costs
 * nothing until records actually land in it.
 */

export const NEVER_SENT = 0;
/** The entry of an ordinary zero page. */
export const ZERO_PAGE_ENTRY = -1;

/** Pages per lazily allocated segment: 16 MiB of guest RAM, 32 KiB of table. */
const SEGMENT_PAGES = 4096;

export function fillEntry(fill: number): number {
  return -(fill + 1);
}

/** Read-only per-page view of one block, for fast iteration by callers. */
export interface PageStates {
  /** Number of pages in the block. */
  readonly pages: number;
  /** Raw entry (see the encoding above). */
  entry(page: number): number;
  isSent(page: number): boolean;
  /** A PAGE record: the data sits in the file. */
  isData(page: number): boolean;
  /** Reads as all zero bytes: a ZERO record with fill 0, or never sent. */
  isZero(page: number): boolean;
  /** The fill byte of a ZERO record, or undefined for data and never-sent pages. */
  fillByte(page: number): number | undefined;
  /** File offset of a data page's bytes, or undefined. */
  dataOffset(page: number): number | undefined;
  counts(): PageCounts;
}

export interface PageCounts {
  data: number;
  /** ZERO records with fill byte 0. */
  zero: number;
  /** ZERO records with a non-zero fill byte. */
  fill: number;
  unsent: number;
}

export class PageTable implements PageStates {
  private readonly segments = new Map<number, Float64Array>();
  private lastIndex = -1;
  private lastSegment: Float64Array = new Float64Array(0);

  constructor(readonly pages: number) {}

  entry(page: number): number {
    const seg = this.findSegment(page);
    return seg === undefined ? NEVER_SENT : seg[page - Math.floor(page / SEGMENT_PAGES) * SEGMENT_PAGES]!;
  }

  /** Sets an entry; returns the previous one (non-zero means the page was sent before). */
  set(page: number, value: number): number {
    const seg = this.segmentFor(page);
    const at = page - Math.floor(page / SEGMENT_PAGES) * SEGMENT_PAGES;
    const prev = seg[at]!;
    seg[at] = value;
    return prev;
  }

  isSent(page: number): boolean {
    return this.entry(page) !== NEVER_SENT;
  }

  isData(page: number): boolean {
    return this.entry(page) > 0;
  }

  isZero(page: number): boolean {
    const e = this.entry(page);
    return e === ZERO_PAGE_ENTRY || e === NEVER_SENT;
  }

  fillByte(page: number): number | undefined {
    const e = this.entry(page);
    return e < 0 ? -e - 1 : undefined;
  }

  dataOffset(page: number): number | undefined {
    const e = this.entry(page);
    return e > 0 ? e : undefined;
  }

  counts(): PageCounts {
    const c: PageCounts = { data: 0, zero: 0, fill: 0, unsent: this.pages };
    for (const seg of this.segments.values()) {
      for (let i = 0; i < seg.length; i++) {
        const e = seg[i]!;
        if (e === NEVER_SENT) continue;
        c.unsent--;
        if (e > 0) c.data++;
        else if (e === ZERO_PAGE_ENTRY) c.zero++;
        else c.fill++;
      }
    }
    return c;
  }

  /**
   * Calls fn(firstPage, entries) for each allocated segment in ascending order; pages of
   * segments not visited were never sent. Lets callers skip untouched address space.
   */
  forEachSegment(fn: (firstPage: number, entries: Float64Array) => void): void {
    const list = [...this.segments.entries()].sort(([a], [b]) => a - b);
    for (const [k, seg] of list) fn(k * SEGMENT_PAGES, seg);
  }

  /** The segment holding `page`, or undefined when none of its pages was set. */
  private findSegment(page: number): Float64Array | undefined {
    const index = Math.floor(page / SEGMENT_PAGES);
    if (index === this.lastIndex) return this.lastSegment;
    const seg = this.segments.get(index);
    if (seg !== undefined) this.remember(index, seg);
    return seg;
  }

  /** The segment holding `page`, allocated on first use. */
  private segmentFor(page: number): Float64Array {
    const index = Math.floor(page / SEGMENT_PAGES);
    if (index === this.lastIndex) return this.lastSegment;
    let seg = this.segments.get(index);
    if (seg === undefined) {
      seg = new Float64Array(Math.min(SEGMENT_PAGES, this.pages - index * SEGMENT_PAGES));
      this.segments.set(index, seg);
    }
    this.remember(index, seg);
    return seg;
  }

  /** Pages come in runs: the last segment used is checked before the map. */
  private remember(index: number, seg: Float64Array): void {
    this.lastIndex = index;
    this.lastSegment = seg;
  }
}
