/**
 * The per-chunk decision ladder, in order of cost: zero (a ZERO record only where the base has
 * data) → unchanged (equal to the base at the same place: no record) → found anywhere in the
 * base (BASE_REF) → found earlier in this overlay (SELF_REF) → the smallest literal
 * (literal.ts), or a shifted copy (shifter.ts) when that is smaller still. Blob targets have a
 * ladder of one step: whole, or a zstd delta against the base's blob.
 */
import type { AnchorIndex } from './anchors.js';
import { CHUNK_SIZE } from './chunk.js';
import { HASH_SIZE, type TargetDigest } from './hash.js';
import type { HashIndex } from './hash-index.js';
import type { LiteralEncoding, LiteralOptions } from './literal.js';
import { ANCHOR_ROW, CHUNK_ROW, Kind, LIT_SKIPPED, SHIFT_WORTH, type Proposals } from './propose.js';
import type { SharedHashes } from './shared-hashes.js';
import { Encoding, type ChunkRecord } from './record.js';
import type { RunMerger } from './runs.js';
import type { Shifter } from './shifter.js';
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
    private readonly selfIndex: HashIndex,
    private readonly selfAnchors: AnchorIndex,
    private readonly shifter: Shifter,
    private readonly runs: RunMerger,
    private readonly opt: LadderOptions,
    /** Told every literal's hash, so that proposals for later batches can skip their repeats. */
    private readonly known: SharedHashes | undefined,
  ) {}

  /**
   * Decides chunk `c` from what propose.ts found (row `k` of `p`): `data` is its customized
   * bytes, `basePos` its position in the base's chunk map (-1: zero in the base). False (and
   * nothing done) when the proposal skipped the literal on a wrong hint: propose it again fully.
   */
  async chunk(scan: TargetScan, c: number, data: Buffer, basePos: number, p: Proposals, k: number): Promise<boolean> {
    const { target: t, stats, digest } = scan;
    const row = k * CHUNK_ROW;
    const kind = p.chunks[row]!;
    const inBase = basePos >= 0 && eligible(scan.same, scan.size, c);
    if (kind === Kind.zero) {
      if (inBase) {
        stats.changedChunks++;
        await this.runs.zero(t, c);
      }
      return true;
    }
    const hi = p.chunks[row + 1]!;
    const h = p.hashes.subarray(hi * HASH_SIZE, (hi + 1) * HASH_SIZE);
    const own = kind === Kind.data && this.opt.selfRefs ? this.selfIndex.get(h) : undefined;
    if (kind === Kind.data && p.chunks[row + 2]! < 0 && !own && p.chunks[row + 4] === LIT_SKIPPED) return false;
    stats.dataChunks++;
    if (kind === Kind.unchanged && scan.same) {
      digest.add(c, scan.same.map.hashAt(basePos));
      return true;
    }
    stats.changedChunks++;
    digest.add(c, h);
    if (p.chunks[row + 2]! >= 0) {
      await this.runs.ref(Encoding.baseRef, t, c, p.chunks[row + 2]!, p.chunks[row + 3]!);
      return true;
    }
    if (own) {
      await this.runs.ref(Encoding.selfRef, t, c, own.target, own.chunk);
      return true;
    }
    const enc = p.chunks[row + 4]! as LiteralEncoding;
    const cost = p.chunks[row + 7]!;
    const off = p.chunks[row + 5]!;
    const first = p.chunks[row + 8]!;
    const anchors = p.chunks[row + 9]!;
    const moved =
      this.opt.shifted && cost > SHIFT_WORTH ? await this.shifter.find(data, t, c, cost, p, first, anchors) : undefined;
    const payload = Buffer.from(p.payloads.buffer, p.payloads.byteOffset + off, p.chunks[row + 6]);
    await this.runs.push(moved ?? { enc, target: t, chunk: c, payload: Buffer.from(payload) }, 1);
    if (this.opt.selfRefs) {
      this.selfIndex.add(h, t, c);
      this.known?.add(h);
    }
    if (this.opt.shifted) {
      for (let i = first; i < first + anchors; i++) {
        const a = i * ANCHOR_ROW;
        this.selfAnchors.add(p.anchors[a + 1]!, p.anchors[a + 2]!, t, c * CHUNK_SIZE + p.anchors[a]!);
      }
    }
    return true;
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
