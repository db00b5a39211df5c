/**
 * Structural checks of a record stream without the base: every record's target, chunk range
 * and order, reference bounds (against the base targets' declared sizes), literal lengths, and
 * that SELF_REFs point at literal chunks earlier in the stream. `verify` uses it; the patcher
 * performs the same checks (and more) while rebuilding.
 */
import { CHUNK_SIZE, chunkCount, chunkLength } from './chunk.js';
import { sha256Hex } from './hash.js';
import { Encoding, ShiftFrom, recordCount, type ChunkRecord } from './record.js';
import type { TargetInfo } from './target.js';

export class RecordChecker {
  private current = 0;
  private readonly next: number[];

  constructor(
    private readonly targets: readonly TargetInfo[],
    private readonly base: readonly TargetInfo[],
  ) {
    this.next = targets.map(() => 0);
  }

  /** Returns a description of what is wrong with `r`, or undefined. */
  check(r: ChunkRecord): string | undefined {
    const t = this.targets[r.target];
    if (!t) return `record for unknown target ${r.target}`;
    if (r.target < this.current) return `records out of target order (${t.name} after target ${this.current})`;
    this.current = r.target;
    const n = t.kind === 'blob' ? 1 : chunkCount(t.size);
    const count = recordCount(r);
    if (count < 1 || r.chunk < this.next[r.target]! || r.chunk + count > n) {
      return `${t.name}: chunk ${r.chunk}+${count} out of order or range`;
    }
    this.next[r.target] = r.chunk + count;
    const isBlobRecord = r.enc === Encoding.blob || r.enc === Encoding.blobZstdDict;
    if ((t.kind === 'blob') !== isBlobRecord) return `${t.name}: ${t.kind} target with a record of encoding ${r.enc}`;
    const len = chunkLength(t.size, r.chunk);
    switch (r.enc) {
      case Encoding.zero:
        return undefined;
      case Encoding.baseRef: {
        const b = this.base[r.srcTarget];
        if (!b || b.kind === 'blob') return `${t.name}: reference to unknown base target ${r.srcTarget}`;
        for (let k = 0; k < count; k++) {
          if (chunkLength(b.size, r.srcChunk + k) !== chunkLength(t.size, r.chunk + k)) {
            return `${t.name}#${r.chunk + k}: base reference of the wrong length`;
          }
        }
        return undefined;
      }
      case Encoding.selfRef: {
        const src = this.targets[r.srcTarget];
        if (!src || src.kind === 'blob') return `${t.name}: reference to unknown target ${r.srcTarget}`;
        for (let k = 0; k < count; k++) {
          if (!this.rebuilt(r.srcTarget, r.srcChunk + k, r.target, r.chunk + k))
            return `${t.name}#${r.chunk + k}: reference to a chunk not rebuilt before it`;
          if (chunkLength(src.size, r.srcChunk + k) !== chunkLength(t.size, r.chunk + k)) {
            return `${t.name}#${r.chunk + k}: reference of the wrong length`;
          }
        }
        return undefined;
      }
      case Encoding.shiftRef:
      case Encoding.shiftDelta: {
        if (r.from === ShiftFrom.base) {
          const b = this.base[r.srcTarget];
          if (!b || b.kind === 'blob' || r.srcOffset + len > b.size)
            return `${t.name}#${r.chunk}: shifted reference outside the base`;
        } else {
          const src = this.targets[r.srcTarget];
          const last = Math.floor((r.srcOffset + len - 1) / CHUNK_SIZE);
          if (
            r.from !== ShiftFrom.self ||
            !src ||
            src.kind === 'blob' ||
            r.srcOffset + len > src.size ||
            !this.rebuilt(r.srcTarget, last, r.target, r.chunk)
          ) {
            return `${t.name}#${r.chunk}: shifted reference to bytes not rebuilt before it`;
          }
        }
        if (r.enc === Encoding.shiftDelta && r.payload.length > 2 * len + 64)
          return `${t.name}#${r.chunk}: implausible delta size`;
        return undefined;
      }
      case Encoding.raw:
      case Encoding.xor:
        if (r.payload.length !== len)
          return `${t.name}#${r.chunk}: ${r.payload.length}-byte payload for a ${len}-byte chunk`;
        return undefined;
      case Encoding.xdelta3:
      case Encoding.zstdDict:
        if (r.payload.length > 2 * len + 64) return `${t.name}#${r.chunk}: implausible delta size`;
        return undefined;
      case Encoding.blob:
        if (r.payload.length !== t.size) return `${t.name}: blob of ${r.payload.length} bytes, header says ${t.size}`;
        if (sha256Hex(r.payload) !== t.digest) return `${t.name}: blob checksum mismatch`;
        return undefined;
      case Encoding.blobZstdDict:
        return undefined;
    }
  }

  /** Chunk `c` of target `t` is rebuilt before chunk `at` of target `cur` (`next` is already past this record). */
  private rebuilt(t: number, c: number, cur: number, at: number): boolean {
    if (t < cur) return true;
    return t === cur && c < at;
  }

  /** Targets whose records were cut short (blob targets must have their one record). */
  missing(): string[] {
    return this.targets.filter((t, i) => t.kind === 'blob' && this.next[i] === 0).map((t) => t.name);
  }
}
