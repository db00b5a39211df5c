/**
 * The differ: walks each customized target chunk by chunk against the base and emits records.
 * Only data extents are read (pair-reader.ts); every chunk read goes down the decision ladder
 * (ladder.ts); base chunks between the extents read, which become zeros, are found from the
 * base's chunk map without reading. Consecutive zeros and references merge into runs (runs.ts).
 */
import { AnchorIndex } from './anchors.js';
import { CHUNK_SIZE, chunkCount, chunkLength, extentsToChunkRanges } from './chunk.js';
import { TargetDigest, sha256Hex } from './hash.js';
import { HashIndex } from './hash-index.js';
import { ChunkLadder, blobRecord, type LadderOptions, type TargetScan } from './ladder.js';
import { defaultLiteralOptions } from './literal.js';
import { PairReader } from './pair-reader.js';
import type { RecordSink } from './record.js';
import { RunMerger } from './runs.js';
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

export interface DiffOptions extends LadderOptions {
  /** Anchors of the base targets (target = position in the base list). */
  baseAnchors?: AnchorIndex;
  /** Called with bytes of customized data processed. */
  onProgress?: (bytes: number) => void;
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
  const shifter = new Shifter(base, targets, opt.baseAnchors, selfAnchors);
  const ladder = new ChunkLadder(baseIndex, new HashIndex(4096), selfAnchors, shifter, runs, opt);
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
    await scanTarget(target, scan, ladder, runs, stats, opt.onProgress);
    await runs.flush();
    infos.push({ name: target.name, kind: target.kind, size, digest: scan.digest.finish() });
  }
  await runs.flush();
  return { targets: infos, stats };
}

/** Sends every chunk of one chunked target down the ladder, reading only where data may be. */
async function scanTarget(
  target: NewChunkedTarget,
  scan: TargetScan,
  ladder: ChunkLadder,
  runs: RunMerger,
  stats: DiffStats,
  onProgress: ((bytes: number) => void) | undefined,
): Promise<void> {
  const { target: t, same, size, digest } = scan;
  const ts = scan.stats;
  const baseMap = same?.map;
  const n = chunkCount(size);

  const hinted = target.changedHint !== undefined && same !== undefined && same.size === size;
  // Chunks between the ranges read below: with a hint they equal the base (digest from the
  // base's map); otherwise they read as zero, so non-zero base chunks there become ZERO runs.
  let mapPos = 0;
  const gapUntil = async (end: number): Promise<void> => {
    if (!same || !baseMap) return;
    while (mapPos < baseMap.count && baseMap.indexes[mapPos]! < end) {
      const i = baseMap.indexes[mapPos]!;
      if (i < n && hinted) {
        ts.dataChunks++;
        digest.add(i, baseMap.hashAt(mapPos));
      } else if (i < n && eligible(same, size, i)) {
        ts.changedChunks++;
        await runs.zero(t, i);
      }
      mapPos++;
    }
  };

  const extents = hinted && target.changedHint ? target.changedHint : await target.source.dataExtents();
  const ranges = extentsToChunkRanges(extents, size);
  const reader = new PairReader(target.source, same?.source, stats);
  // Progress counts skipped (zero or unchanged) ranges too, so it ends at the target's size.
  let reported = 0;
  const reportTo = (byte: number): void => {
    if (byte > reported) onProgress?.(byte - reported);
    reported = Math.max(reported, byte);
  };
  for (const [first, end] of ranges) {
    await gapUntil(first);
    reportTo(first * CHUNK_SIZE);
    reader.start(first, end);
    for (let c = first; c < end;) {
      const batch = await reader.next();
      for (let k = 0; k < batch.count; k++, c++) {
        const len = chunkLength(size, c);
        const data = batch.cust.subarray(k * CHUNK_SIZE, k * CHUNK_SIZE + len);
        // Keep the map cursor in step: entries before c were handled as gaps or below.
        while (baseMap && mapPos < baseMap.count && baseMap.indexes[mapPos]! < c) mapPos++;
        const basePos = baseMap && mapPos < baseMap.count && baseMap.indexes[mapPos] === c ? mapPos : -1;
        if (basePos >= 0) mapPos++; // consumed here, so gapUntil() never sees it again
        const baseLen = same ? chunkLength(same.size, c) : 0;
        const baseData =
          baseLen > 0 && batch.base ? batch.base.subarray(k * CHUNK_SIZE, k * CHUNK_SIZE + baseLen) : undefined;
        await ladder.chunk(scan, c, data, baseData, basePos);
      }
      reportTo(Math.min(size, c * CHUNK_SIZE));
    }
  }
  await gapUntil(n);
  reportTo(size);
}
