/**
 * Reads a virtual disk described as a table of pieces: each range of the disk is either zero or
 * stored plainly at some offset of some host file. A raw image is one piece; a qcow2 chain whose
 * clusters `qemu-img map` locates is many pieces over several files (one per layer).
 */
import type { FileHandle } from 'node:fs/promises';
import { readFully } from './io.js';

export interface Piece {
  start: number;
  length: number;
  /** Index into the reader's file list, or -1 for a range that reads as zero. */
  file: number;
  /** Byte offset in that file of the piece's first byte. */
  offset: number;
}

export class PieceReader {
  private readonly starts: Float64Array;

  /** `pieces` must be ascending and contiguous from 0; bytes past the last one read as zero. */
  constructor(
    private readonly pieces: readonly Piece[],
    private readonly files: readonly FileHandle[],
  ) {
    this.starts = Float64Array.from(pieces, (p) => p.start);
  }

  async read(offset: number, length: number, buf: Buffer): Promise<void> {
    if (length > buf.length) throw new RangeError(`read of ${length} bytes into a ${buf.length}-byte buffer`);
    const end = offset + length;
    let pos = offset;
    let i = this.indexOf(offset);
    while (pos < end) {
      const p = i < this.pieces.length ? this.pieces[i] : undefined;
      if (!p || pos < p.start) {
        buf.fill(0, pos - offset, end - offset);
        return;
      }
      const n = Math.min(end, p.start + p.length) - pos;
      if (n <= 0) {
        i++;
        continue;
      }
      const file = p.file >= 0 ? this.files[p.file] : undefined;
      if (file) await readFully(file, buf, pos - offset, n, p.offset + (pos - p.start));
      else buf.fill(0, pos - offset, pos - offset + n);
      pos += n;
      i++;
    }
  }

  /** Index of the piece holding `offset` (the last piece starting at or before it). */
  private indexOf(offset: number): number {
    let lo = 0;
    let hi = this.starts.length - 1;
    let best = 0;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.starts[mid] ?? 0) <= offset) {
        best = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    return best;
  }
}
