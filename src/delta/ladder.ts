/**
 * The per-chunk decision ladder, in order of cost: zero (a ZERO record only where the base has
 * data) → unchanged (equal to the base at the same place: no record) → found anywhere in the
 * base (BASE_REF) → found earlier in this overlay (SELF_REF) → the smallest literal
 * (literal.ts), or a shifted copy (shifter.ts) when that is smaller still. Blob targets have a
 * ladder of one step: whole, or a zstd delta against the base's blob.
 */
import type { AnchorIndex } from './anchors.js';
import { CHUNK_SIZE, isZero } from './chunk.js';
import { chunkHash, type TargetDigest } from './hash.js';
import type { HashIndex } from './hash-index.js';
import { encodeLiteral, type LiteralOptions } from './literal.js';
import { Encoding, type ChunkRecord } from './record.js';
import type { RunMerger } from './runs.js';
import { SHIFT_WORTH, type Shifter } from './shifter.js';
import type { TargetStats } from './stats.js';
import { eligible, type BaseChunkedTarget } from './target.js';
import { compressedSize, compressWithDict } from './zstd.js';

/** Which steps of the ladder are tried (benchmarks switch them off one at a time). */
export interface LadderOptions extends LiteralOptions {
  baseRefs: boolean;
  selfRefs: boolean;
  shifted: boolean;
}

/** One chunked target while its chunks go down the ladder. */
export interface TargetScan {
  /** Position of the target in the overlay. */
  readonly target: number;
  readonly size: number;
  /** The base target at the same place, when there is one. */
  readonly same: BaseChunkedTarget | undefined;
  readonly digest: TargetDigest;
  readonly stats: TargetStats;
}

export class ChunkLadder {
  constructor(
    private readonly baseIndex: HashIndex,
    private readonly selfIndex: HashIndex,
    private readonly selfAnchors: AnchorIndex,
    private readonly shifter: Shifter,
    private readonly runs: RunMerger,
    private readonly opt: LadderOptions,
  ) {}

  /**
   * Decides chunk `c`: `data` is its customized bytes, `baseData` the base's bytes at the same
   * place (when read), `basePos` its position in the base's chunk map (-1: zero in the base).
   */
  async chunk(scan: TargetScan, c: number, data: Buffer, baseData: Buffer | undefined, basePos: number): Promise<void> {
    const { target: t, stats, digest } = scan;
    const inBase = basePos >= 0 && eligible(scan.same, scan.size, c);
    if (isZero(data)) {
      if (inBase) {
        stats.changedChunks++;
        await this.runs.zero(t, c);
      }
      return;
    }
    stats.dataChunks++;
    if (inBase && scan.same && baseData && baseData.equals(data)) {
      digest.add(c, scan.same.map.hashAt(basePos));
      return;
    }
    stats.changedChunks++;
    const h = chunkHash(data);
    digest.add(c, h);
    const hit = this.opt.baseRefs ? this.baseIndex.get(h) : undefined;
    if (hit) {
      await this.runs.ref(Encoding.baseRef, t, c, hit.target, hit.chunk);
      return;
    }
    const own = this.opt.selfRefs ? this.selfIndex.get(h) : undefined;
    if (own) {
      await this.runs.ref(Encoding.selfRef, t, c, own.target, own.chunk);
      return;
    }
    const chunk = Buffer.from(data);
    const lit = encodeLiteral(chunk, baseData && basePos >= 0 ? Buffer.from(baseData) : undefined, this.opt);
    const moved =
      this.opt.shifted && lit.cost > SHIFT_WORTH ? await this.shifter.find(chunk, t, c, lit.cost) : undefined;
    await this.runs.push(moved ?? { enc: lit.enc, target: t, chunk: c, payload: lit.payload }, 1);
    if (this.opt.selfRefs) this.selfIndex.add(h, t, c);
    if (this.opt.shifted) this.selfAnchors.addAll(chunk, 0, chunk.length, t, c * CHUNK_SIZE);
  }
}

/** A blob target's record: whole, or a zstd frame with the base's blob as dictionary when smaller. */
export function blobRecord(t: number, blob: Buffer, baseBlob: Buffer | undefined): ChunkRecord {
  if (baseBlob && baseBlob.length > 0 && blob.length > 0) {
    const d = compressWithDict(blob, baseBlob, 19);
    if (d.length < compressedSize(blob, 19)) return { enc: Encoding.blobZstdDict, target: t, chunk: 0, payload: d };
  }
  return { enc: Encoding.blob, target: t, chunk: 0, payload: blob };
}
