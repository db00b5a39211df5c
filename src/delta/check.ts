/**
 * Structural checks of a record stream without the base: every record's target, chunk range
 * and order, reference bounds (against the base targets' declared sizes), literal lengths, and
 * that SELF_REFs point at literal chunks earlier in the stream. `verify` uses it; the patcher
 * performs the same checks (and more) while rebuilding.
 */
import { chunkCount, chunkLength } from './chunk.js';
import { sha256Hex } from './hash.js';
import { Encoding, recordCount, type ChunkRecord } from './record.js';
import type { TargetInfo } from './target.js';

export class RecordChecker {
  private current = 0;
  private readonly next: number[];
  private readonly literals: Array<Set<number>>;

  constructor(
    private readonly targets: readonly TargetInfo[],
    private readonly base: readonly TargetInfo[],
  ) {
    this.next = targets.map(() => 0);
    this.literals = targets.map(() => new Set<number>());
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
        const set = this.literals[r.srcTarget];
        const src = this.targets[r.srcTarget];
        if (!set || !src) return `${t.name}: reference to unknown target ${r.srcTarget}`;
        for (let k = 0; k < count; k++) {
          if (!set.has(r.srcChunk + k)) return `${t.name}#${r.chunk + k}: reference to a chunk not rebuilt before it`;
          if (chunkLength(src.size, r.srcChunk + k) !== chunkLength(t.size, r.chunk + k)) {
            return `${t.name}#${r.chunk + k}: reference of the wrong length`;
          }
        }
        return undefined;
      }
      case Encoding.raw:
      case Encoding.xor:
        if (r.payload.length !== len) return `${t.name}#${r.chunk}: ${r.payload.length}-byte payload for a ${len}-byte chunk`;
        this.literals[r.target]!.add(r.chunk);
        return undefined;
      case Encoding.xdelta3:
      case Encoding.zstdDict:
        if (r.payload.length > 2 * len + 64) return `${t.name}#${r.chunk}: implausible delta size`;
        this.literals[r.target]!.add(r.chunk);
        return undefined;
      case Encoding.blob:
        if (r.payload.length !== t.size) return `${t.name}: blob of ${r.payload.length} bytes, header says ${t.size}`;
        if (sha256Hex(r.payload) !== t.digest) return `${t.name}: blob checksum mismatch`;
        return undefined;
      case Encoding.blobZstdDict:
        return undefined;
    }
  }

  /** Targets whose records were cut short (blob targets must have their one record). */
  missing(): string[] {
    return this.targets.filter((t, i) => t.kind === 'blob' && this.next[i] === 0).map((t) => t.name);
  }
}
