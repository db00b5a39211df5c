/**
 * The differ: walks each customized target chunk by chunk against the base and emits records.
 * Only data extents are read (pair-reader.ts); every chunk read goes down the decision ladder
 * (ladder.ts); base chunks between the extents read, which become zeros, are found from the
 * base's chunk map without reading. Consecutive zeros and references merge into runs (runs.ts).
 */
import { AnchorIndex } from './anchors.js';
import {
  CHUNK_SIZE,
  checkChunkRuns,
  chunkCount,
  chunkLength,
  extentsToChunkRanges,
  inChunkRuns,
  subtractChunkRuns,
} from './chunk.js';
import { TargetDigest, sha256Hex } from './hash.js';
import { HashIndex } from './hash-index.js';
import { ChunkLadder, blobRecord, type LadderOptions, type TargetScan } from './ladder.js';
import { defaultLiteralOptions } from './literal.js';
import { PairReader, type Batch } from './pair-reader.js';
import { proposeBatch, type ProposeContext, type ProposeInput, type Proposals } from './propose.js';
import type { RecordSink } from './record.js';
import { RunMerger } from './runs.js';
import { SharedHashes } from './shared-hashes.js';
import { Shifter } from './shifter.js';
import { emptyStats, type DiffStats } from './stats.js';
import {
  eligible,
  findSamePlace,
  type BaseTarget,
  type NewChunkedTarget,
  type NewTarget,
  type TargetInfo,
} from './target.js';

/** Computes a batch's proposals (propose.ts): inline, or on worker threads. */
export type Proposer = (input: ProposeInput) => Promise<Proposals>;

export interface DiffOptions extends LadderOptions {
  /** Anchors of the base targets (target = position in the base list). */
  baseAnchors?: AnchorIndex;
  /** Called with bytes of customized data processed. */
  onProgress?: (bytes: number) => void;
  /** Default: proposeBatch on this thread. */
  proposer?: Proposer;
  /** Batches (1 MiB each) proposed ahead of the one being decided. Default 1. */
  depth?: number;
  /** Literal hashes shared with the proposer's threads (default: one made here). */
  known?: SharedHashes;
}

export const defaultDiffOptions: DiffOptions = {
  ...defaultLiteralOptions,
  baseRefs: true,
  selfRefs: true,
  shifted: true,
};

export interface DiffResult {
  targets: TargetInfo[];
  stats: DiffStats;
}

/** Diffs `targets` against `base` (indexed by indexBase) into `sink`, target by target. */
export async function diff(
  base: readonly BaseTarget[],
  baseIndex: HashIndex,
  targets: readonly NewTarget[],
  sink: RecordSink,
  options: Partial<DiffOptions> = {},
): Promise<DiffResult> {
  const opt: DiffOptions = { ...defaultDiffOptions, ...options };
  const stats = emptyStats();
  const selfAnchors = new AnchorIndex(4096);
  const runs = new RunMerger(sink, stats);
  const shifter = new Shifter(targets, selfAnchors);
  const known = opt.known ?? new SharedHashes(chunkTotal(targets));
  const ladder = new ChunkLadder(new HashIndex(4096), selfAnchors, shifter, runs, opt, known);
  const ctx: ProposeContext = {
    opt,
    known,
    baseIndex,
    baseAnchors: opt.baseAnchors,
    baseSources: base.map((b) => (b.kind === 'blob' ? undefined : b)),
  };
  const propose: Proposer = opt.proposer ?? ((input) => proposeBatch(input, ctx));
  // A proposal that skipped a literal on a wrong hint is redone here, fully.
  const full: ProposeContext = { ...ctx, known: undefined };
  const infos: TargetInfo[] = [];

  for (const [t, target] of targets.entries()) {
    const same = base[findSamePlace(base, target)];
    if (target.kind === 'blob') {
      const blob = target.blob;
      await runs.push(blobRecord(t, blob, same?.kind === 'blob' ? same.blob : undefined), 1);
      infos.push({ name: target.name, kind: target.kind, size: blob.length, digest: sha256Hex(blob) });
      stats.targets[target.name] = { kind: 'blob', size: blob.length, dataChunks: 1, changedChunks: 1 };
      opt.onProgress?.(blob.length);
      continue;
    }
    const size = target.source.size;
    if (chunkCount(size) > 0xffffffff) throw new RangeError(`${target.name}: larger than 16 TiB`);
    const scan: TargetScan = {
      target: t,
      size,
      same: same?.kind === 'blob' ? undefined : same,
      digest: new TargetDigest(size),
      stats: (stats.targets[target.name] = { kind: target.kind, size, dataChunks: 0, changedChunks: 0 }),
    };
    await scanTarget(target, scan, ladder, runs, stats, opt.onProgress, propose, full, opt.depth ?? 1);
    await runs.flush();
    infos.push({ name: target.name, kind: target.kind, size, digest: scan.digest.finish() });
  }
  await runs.flush();
  return { targets: infos, stats };
}

function asRuns(ranges: ReadonlyArray<[number, number]>): Array<{ first: number; count: number }> {
  return ranges.map(([a, b]) => ({ first: a, count: b - a }));
}

/** Chunks of all chunked targets: the most literals an overlay can hold. */
function chunkTotal(targets: readonly NewTarget[]): number {
  return targets.reduce((n, t) => n + (t.kind === 'blob' ? 0 : chunkCount(t.source.size)), 0);
}

/** A batch read and being proposed, or the gap before the next range read. */
type Pending =
  | {
      kind: 'batch';
      first: number;
      batch: Batch;
      basePos: Int32Array;
      inBase: Uint8Array;
      proposals: Promise<Proposals>;
    }
  | { kind: 'gap'; end: number };

/**
 * Sends every chunk of one chunked target down the ladder, reading only where data may be.
 * Batches are read and proposed up to `depth` ahead (on workers, when the proposer uses them)
 * and decided strictly in order, gaps between ranges included, so the records come out the same.
 */
async function scanTarget(
  target: NewChunkedTarget,
  scan: TargetScan,
  ladder: ChunkLadder,
  runs: RunMerger,
  stats: DiffStats,
  onProgress: ((bytes: number) => void) | undefined,
  propose: Proposer,
  full: ProposeContext,
  depth: number,
): Promise<void> {
  const { target: t, same, size, digest } = scan;
  const ts = scan.stats;
  const baseMap = same?.map;
  const n = chunkCount(size);

  const hinted = target.changedHint !== undefined && same !== undefined && same.size === size;
  // Chunks whose content does not matter are not read at all: they sit in the gaps, as the base.
  const dontCare = target.dontCare ?? [];
  checkChunkRuns(dontCare, target.name);
  // Chunks between the ranges read below: with a hint they equal the base (digest from the
  // base's map), unless the image says they hold no data; otherwise they read as zero, so
  // non-zero base chunks there become ZERO runs — except where the content does not matter:
  // the base's chunk stays.
  // The map is walked twice, in order: ahead, to tell proposals where the base has data, and
  // behind, as chunks are decided and gaps settled.
  let mapPos = 0;
  let zeroInHint: Array<{ first: number; count: number }> = [];
  const gapUntil = async (end: number): Promise<void> => {
    if (!same || !baseMap) return;
    while (mapPos < baseMap.count && baseMap.indexes[mapPos]! < end) {
      const i = baseMap.indexes[mapPos]!;
      const asBase = hinted && (zeroInHint.length === 0 || !inChunkRuns(zeroInHint, i));
      if (i < n && (asBase || (dontCare.length > 0 && eligible(same, size, i) && inChunkRuns(dontCare, i)))) {
        ts.dataChunks++;
        digest.add(i, baseMap.hashAt(mapPos));
      } else if (i < n && eligible(same, size, i)) {
        ts.changedChunks++;
        await runs.zero(t, i);
      }
      mapPos++;
    }
  };
  let aheadPos = 0;
  const basePositions = (first: number, count: number): Int32Array => {
    const out = new Int32Array(count).fill(-1);
    if (!baseMap) return out;
    while (aheadPos < baseMap.count && baseMap.indexes[aheadPos]! < first) aheadPos++;
    for (let p = aheadPos; p < baseMap.count && baseMap.indexes[p]! < first + count; p++) {
      out[baseMap.indexes[p]! - first] = p;
    }
    return out;
  };

  let ranges = extentsToChunkRanges(await target.source.dataExtents(), size);
  if (hinted && target.changedHint) {
    // Hinted chunks without a byte of data (zero clusters of the image's own layer: trimmed,
    // discarded, written as zeroes) read as zero: they are settled as gaps too, not read.
    const hint = extentsToChunkRanges(target.changedHint, size);
    zeroInHint = asRuns(subtractChunkRuns(hint, asRuns(ranges)).ranges);
    ranges = subtractChunkRuns(hint, zeroInHint).ranges;
  }
  if (target.dontCare) {
    const cut = subtractChunkRuns(ranges, dontCare);
    ranges = cut.ranges;
    ts.dontCareChunks = cut.removed;
  }
  const reader = new PairReader(target.source, same?.source, stats);
  // Progress counts skipped (zero or unchanged) ranges too, so it ends at the target's size.
  let reported = 0;
  const reportTo = (byte: number): void => {
    if (byte > reported) onProgress?.(byte - reported);
    reported = Math.max(reported, byte);
  };
  const pending: Pending[] = [];
  const decide = async (item: Pending): Promise<void> => {
    if (item.kind === 'gap') {
      await gapUntil(item.end);
      reportTo(item.end * CHUNK_SIZE);
      return;
    }
    const p = await item.proposals;
    const { batch, first, basePos } = item;
    // The batch's bytes as they came back with the proposals (a worker may have had them).
    const cust = Buffer.from(p.cust.buffer, p.cust.byteOffset, p.cust.byteLength);
    for (let k = 0; k < batch.count; k++) {
      const c = first + k;
      const len = chunkLength(size, c);
      // Map entries of decided chunks are consumed here, so gapUntil() never sees them.
      while (baseMap && mapPos < baseMap.count && baseMap.indexes[mapPos]! <= c) mapPos++;
      const data = cust.subarray(k * CHUNK_SIZE, k * CHUNK_SIZE + len);
      if (await ladder.chunk(scan, c, data, basePos[k]!, p, k)) continue;
      const one = await proposeBatch(
        {
          size,
          first: c,
          count: 1,
          cust: Buffer.from(data),
          base: p.base?.slice(k * CHUNK_SIZE, (k + 1) * CHUNK_SIZE),
          baseSize: same?.size ?? 0,
          inBase: item.inBase.slice(k, k + 1),
        },
        full,
      );
      await ladder.chunk(scan, c, data, basePos[k]!, one, 0);
    }
    reportTo(Math.min(size, (first + batch.count) * CHUNK_SIZE));
  };
  for (const [first, end] of ranges) {
    pending.push({ kind: 'gap', end: first });
    reader.start(first, end);
    for (let c = first; c < end;) {
      const batch = await reader.next();
      const basePos = basePositions(c, batch.count);
      const inBase = new Uint8Array(batch.count);
      for (let k = 0; k < batch.count; k++) {
        if (basePos[k]! >= 0 && same && chunkLength(same.size, c + k) > 0 && batch.base) {
          inBase[k] = eligible(same, size, c + k) ? 3 : 1;
        }
      }
      const proposals = propose({
        size,
        first: c,
        count: batch.count,
        cust: batch.cust,
        base: batch.base,
        baseSize: same?.size ?? 0,
        inBase: inBase.slice(),
      });
      proposals.catch(() => undefined); // awaited in order by decide()
      pending.push({ kind: 'batch', first: c, batch, basePos, inBase, proposals });
      c += batch.count;
      while (pending.length > depth) await decide(pending.shift()!);
    }
  }
  pending.push({ kind: 'gap', end: n });
  while (pending.length > 0) await decide(pending.shift()!);
  reportTo(size);
}
