/**
 * The differ: walks each customized target chunk by chunk against the base and emits records.
 * Per chunk, in order of cost: unchanged (equal to the base at the same place: no record) →
 * zero → found anywhere in the base (disk or memory) → found earlier in this overlay (either
 * target) → smallest literal (literal.ts). Only data extents are read; base chunks that turn
 * into zeros are found from the base's chunk map without reading.
 */
import { CHUNK_SIZE, chunkCount, chunkLength, extentsToChunkRanges, isZero } from './chunk.js';
import { TargetDigest, chunkHash, sha256Hex } from './hash.js';
import { HashIndex } from './hash-index.js';
import { defaultLiteralOptions, encodeLiteral, type LiteralOptions } from './literal.js';
import { Encoding, ShiftFrom, type ChunkRecord } from './record.js';
import { AnchorIndex, anchorKey, forEachAnchor } from './anchors.js';
import { countRecord, emptyStats, type DiffStats } from './stats.js';
import { compressedSize, compressWithDict } from './zstd.js';
import { eligible, findSamePlace, type BaseTarget, type TargetInfo, type TargetKind } from './target.js';
import type { ChunkSource, Extent } from './source.js';

export interface RecordSink {
  push(r: ChunkRecord): Promise<void>;
}

/** A customized target to diff. */
export interface NewTarget {
  name: string;
  kind: TargetKind;
  source?: ChunkSource;
  blob?: Buffer;
  /**
   * Byte ranges outside of which the target is known to equal the base at the same place
   * (e.g. a qcow2 whose backing file is the base: only its own clusters can differ). Used
   * only when the base target has the same size.
   */
  changedHint?: Extent[];
}

export interface DiffOptions extends LiteralOptions {
  /** Look chunks up in the base index (off only for benchmarks). */
  baseRefs: boolean;
  /** Look chunks up among those already in this overlay. */
  selfRefs: boolean;
  /** Look for new content at any byte offset of the base or of this overlay (anchors.ts). */
  shifted: boolean;
  /** Anchors of the base targets (target = position in the base list). */
  baseAnchors?: AnchorIndex;
  /** Called with bytes of customized data processed. */
  onProgress?: (bytes: number) => void;
}

export const defaultDiffOptions: DiffOptions = { ...defaultLiteralOptions, baseRefs: true, selfRefs: true, shifted: true };

export interface DiffResult {
  targets: TargetInfo[];
  stats: DiffStats;
}

/** Builds the hash index over every chunked base target (target = position in `base`). */
export function indexBase(base: readonly BaseTarget[]): HashIndex {
  const total = base.reduce((n, b) => n + (b.map?.count ?? 0), 0);
  const index = new HashIndex(total);
  // Memory first: Elijah found modified chunks most often in base memory.
  const order = base.map((b, i) => ({ b, i })).sort((x, y) => rank(x.b.kind) - rank(y.b.kind));
  for (const { b, i } of order) if (b.map) index.addMap(b.map, i);
  return index;
}

function rank(kind: TargetKind): number {
  return kind === 'ram' ? 0 : kind === 'disk' ? 1 : 2;
}

const BATCH_CHUNKS = 256;
/** Literals already this small are not worth a search for shifted copies. */
const SHIFT_WORTH = 48;
/** Candidate sources tried per chunk. */
const SHIFT_TRIES = 4;

/**
 * Finds a chunk's bytes at any byte offset of the base or of a target already emitted, through
 * anchors: an exact copy becomes SHIFT_REF, a similar region the dictionary of SHIFT_DELTA.
 */
class Shifter {
  private readonly src = Buffer.alloc(CHUNK_SIZE);

  constructor(
    private readonly base: readonly BaseTarget[],
    private readonly targets: readonly NewTarget[],
    private readonly baseAnchors: AnchorIndex | undefined,
    private readonly selfAnchors: AnchorIndex,
  ) {}

  async find(data: Buffer, t: number, c: number, limit: number): Promise<ChunkRecord | undefined> {
    const cands: Array<{ from: number; target: number; offset: number }> = [];
    forEachAnchor(data, 0, data.length, (pos) => {
      if (cands.length >= SHIFT_TRIES) return;
      const [k0, k1] = anchorKey(data, pos);
      const b = this.baseAnchors?.get(k0, k1);
      if (b) cands.push({ from: ShiftFrom.base, target: b.target, offset: b.offset - pos });
      const s = this.selfAnchors.get(k0, k1);
      if (s) cands.push({ from: ShiftFrom.self, target: s.target, offset: s.offset - pos });
    });
    let best: ChunkRecord | undefined;
    let bestCost = limit;
    const len = data.length;
    const src = this.src.subarray(0, len);
    const seen = new Set<string>();
    for (const k of cands) {
      const key = `${k.from}:${k.target}:${k.offset}`;
      if (seen.has(key) || k.offset < 0) continue;
      seen.add(key);
      if (k.from === ShiftFrom.base) {
        const b = this.base[k.target];
        if (!b?.source || k.offset + len > b.size) continue;
        await b.source.read(k.offset, len, src);
      } else {
        const s = this.targets[k.target];
        const end = k.offset + len;
        if (!s?.source || k.target > t || end > s.source.size || (k.target === t && end > c * CHUNK_SIZE)) continue;
        await s.source.read(k.offset, len, src);
      }
      const r = { target: t, chunk: c, from: k.from, srcTarget: k.target, srcOffset: k.offset };
      if (src.equals(data)) return { enc: Encoding.shiftRef, ...r, payload: Buffer.alloc(0) };
      const d = compressWithDict(data, src, 3);
      if (d.length + 8 < bestCost) {
        bestCost = d.length + 8;
        best = { enc: Encoding.shiftDelta, ...r, payload: d };
      }
    }
    return best;
  }
}

/** Anchors of every chunked base target, read in 1 MiB batches (target = position in `base`). */
export async function anchorBase(base: readonly BaseTarget[], onBytes: (n: number) => void = () => undefined): Promise<AnchorIndex> {
  const total = base.reduce((n, b) => n + (b.map?.count ?? 0), 0);
  const index = new AnchorIndex(total * 2);
  const step = 256 * CHUNK_SIZE;
  const buf = Buffer.alloc(step);
  for (const [i, b] of base.entries()) {
    if (!b.source) continue;
    for (const [first, end] of extentsToChunkRanges(await b.source.dataExtents(), b.size)) {
      for (let off = first * CHUNK_SIZE; off < Math.min(end * CHUNK_SIZE, b.size); off += step) {
        const len = Math.min(step, b.size - off, end * CHUNK_SIZE - off);
        await b.source.read(off, len, buf);
        index.addAll(buf, 0, len, i, off);
        onBytes(len);
      }
    }
  }
  return index;
}

export async function diff(
  base: readonly BaseTarget[],
  baseIndex: HashIndex,
  targets: readonly NewTarget[],
  sink: RecordSink,
  options: Partial<DiffOptions> = {},
): Promise<DiffResult> {
  const opt: DiffOptions = { ...defaultDiffOptions, ...options };
  const stats = emptyStats();
  const selfIndex = new HashIndex(4096);
  const selfAnchors = new AnchorIndex(4096);
  const shifter = new Shifter(base, targets, opt.baseAnchors, selfAnchors);
  const infos: TargetInfo[] = [];
  const runs = new RunMerger(sink, stats);

  for (let t = 0; t < targets.length; t++) {
    const target = targets[t]!;
    const bi = findSamePlace(base, target);
    const same = bi >= 0 ? base[bi] : undefined;
    if (target.kind === 'blob') {
      const blob = target.blob ?? Buffer.alloc(0);
      await runs.push(blobRecord(t, blob, same?.blob), 1);
      infos.push({ name: target.name, kind: target.kind, size: blob.length, digest: sha256Hex(blob) });
      stats.targets[target.name] = { kind: 'blob', size: blob.length, dataChunks: 1, changedChunks: 1 };
      opt.onProgress?.(blob.length);
      continue;
    }
    const source = target.source;
    if (!source) throw new Error(`diff: target ${target.name} has no source`);
    if (chunkCount(source.size) > 0xffffffff) throw new RangeError(`${target.name}: larger than 16 TiB`);
    const ts = (stats.targets[target.name] = { kind: target.kind, size: source.size, dataChunks: 0, changedChunks: 0 });
    const digest = new TargetDigest(source.size);
    const baseMap = same?.map;
    const n = chunkCount(source.size);

    const hinted = target.changedHint !== undefined && same !== undefined && same.size === source.size;
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
        } else if (i < n && eligible(same, source.size, i)) {
          ts.changedChunks++;
          await runs.zero(t, i);
        }
        mapPos++;
      }
    };

    const ranges = extentsToChunkRanges(hinted ? target.changedHint! : await source.dataExtents(), source.size);
    const reader = new PairReader(source, same?.source, stats);
    // Progress counts skipped (zero or unchanged) ranges too, so it ends at the target's size.
    let reported = 0;
    const reportTo = (byte: number): void => {
      if (byte > reported) opt.onProgress?.(byte - reported);
      reported = Math.max(reported, byte);
    };
    for (const [first, end] of ranges) {
      await gapUntil(first);
      reportTo(first * CHUNK_SIZE);
      reader.start(first, end);
      for (let c = first; c < end; ) {
        const batch = await reader.next();
        for (let k = 0; k < batch.count; k++, c++) {
          const len = chunkLength(source.size, c);
          const data = batch.cust.subarray(k * CHUNK_SIZE, k * CHUNK_SIZE + len);
          // Keep the map cursor in step: entries before c were handled as gaps or below.
          while (baseMap && mapPos < baseMap.count && baseMap.indexes[mapPos]! < c) mapPos++;
          const basePos = baseMap && mapPos < baseMap.count && baseMap.indexes[mapPos] === c ? mapPos : -1;
          if (basePos >= 0) mapPos++; // consumed here, so zeroUntil() never sees it again
          const isEligible = eligible(same, source.size, c);
          if (isZero(data)) {
            if (isEligible && basePos >= 0) {
              ts.changedChunks++;
              await runs.zero(t, c);
            }
            continue;
          }
          ts.dataChunks++;
          const baseLen = same ? chunkLength(same.size, c) : 0;
          const baseData = baseLen > 0 && batch.base ? batch.base.subarray(k * CHUNK_SIZE, k * CHUNK_SIZE + baseLen) : undefined;
          if (isEligible && basePos >= 0 && baseData && baseData.equals(data)) {
            digest.add(c, baseMap!.hashAt(basePos));
            continue;
          }
          ts.changedChunks++;
          const h = chunkHash(data);
          digest.add(c, h);
          const hit = opt.baseRefs ? baseIndex.get(h) : undefined;
          if (hit) {
            await runs.ref(Encoding.baseRef, t, c, hit.target, hit.chunk);
            continue;
          }
          const own = opt.selfRefs ? selfIndex.get(h) : undefined;
          if (own) {
            await runs.ref(Encoding.selfRef, t, c, own.target, own.chunk);
            continue;
          }
          const chunk = Buffer.from(data);
          const lit = encodeLiteral(chunk, baseData && basePos >= 0 ? Buffer.from(baseData) : undefined, opt);
          const moved = opt.shifted && lit.cost > SHIFT_WORTH ? await shifter.find(chunk, t, c, lit.cost) : undefined;
          await runs.push(moved ?? { enc: lit.enc, target: t, chunk: c, payload: lit.payload }, 1);
          if (opt.selfRefs) selfIndex.add(h, t, c);
          if (opt.shifted) selfAnchors.addAll(chunk, 0, chunk.length, t, c * CHUNK_SIZE);
        }
        reportTo(Math.min(source.size, c * CHUNK_SIZE));
      }
    }
    await gapUntil(n);
    reportTo(source.size);
    await runs.flush();
    infos.push({ name: target.name, kind: target.kind, size: source.size, digest: digest.finish() });
  }
  await runs.flush();
  return { targets: infos, stats };
}

function blobRecord(t: number, blob: Buffer, baseBlob: Buffer | undefined): ChunkRecord {
  if (baseBlob && baseBlob.length > 0 && blob.length > 0) {
    const d = compressWithDict(blob, baseBlob, 19);
    if (d.length < compressedSize(blob, 19)) return { enc: Encoding.blobZstdDict, target: t, chunk: 0, payload: d };
  }
  return { enc: Encoding.blob, target: t, chunk: 0, payload: blob };
}

/** Reads the customized target and the base at the same place in 1 MiB batches, one ahead. */
class PairReader {
  private end = 0;
  private pos = 0;
  private pending: Promise<Batch> | undefined;

  constructor(
    private readonly cust: ChunkSource,
    private readonly base: ChunkSource | undefined,
    private readonly stats: DiffStats,
  ) {}

  start(first: number, end: number): void {
    this.pos = first;
    this.end = end;
    this.pending = this.load();
  }

  async next(): Promise<Batch> {
    const b = await this.pending!;
    this.pending = this.pos < this.end ? this.load() : undefined;
    return b;
  }

  private load(): Promise<Batch> {
    const first = this.pos;
    const count = Math.min(BATCH_CHUNKS, this.end - first);
    this.pos += count;
    return this.read(first, count);
  }

  private async read(first: number, count: number): Promise<Batch> {
    const off = first * CHUNK_SIZE;
    const len = Math.min(count * CHUNK_SIZE, this.cust.size - off);
    const cust = Buffer.alloc(count * CHUNK_SIZE);
    const jobs: Array<Promise<void>> = [this.cust.read(off, len, cust)];
    let base: Buffer | undefined;
    if (this.base && off < this.base.size) {
      base = Buffer.alloc(count * CHUNK_SIZE);
      const blen = Math.min(count * CHUNK_SIZE, this.base.size - off);
      jobs.push(this.base.read(off, blen, base));
      this.stats.bytesRead += blen;
    }
    await Promise.all(jobs);
    this.stats.bytesRead += len;
    return { cust, base, count, bytes: len };
  }
}

interface Batch {
  cust: Buffer;
  base: Buffer | undefined;
  count: number;
  bytes: number;
}

/** Merges consecutive zero chunks and consecutive references into runs before emitting. */
class RunMerger {
  private run: Extract<ChunkRecord, { count: number }> | undefined;

  constructor(private readonly sink: RecordSink, private readonly stats: DiffStats) {}

  async zero(target: number, chunk: number): Promise<void> {
    const r = this.run;
    if (r && r.enc === Encoding.zero && r.target === target && r.chunk + r.count === chunk) {
      r.count++;
      countRecord(this.stats, Encoding.zero, 1, 0, false);
      return;
    }
    await this.flush();
    this.run = { enc: Encoding.zero, target, chunk, count: 1 };
    countRecord(this.stats, Encoding.zero, 1, 0, true);
  }

  async ref(
    enc: typeof Encoding.baseRef | typeof Encoding.selfRef,
    target: number,
    chunk: number,
    srcTarget: number,
    srcChunk: number,
  ): Promise<void> {
    const r = this.run;
    if (
      r &&
      r.enc === enc &&
      r.target === target &&
      r.chunk + r.count === chunk &&
      r.srcTarget === srcTarget &&
      r.srcChunk + r.count === srcChunk
    ) {
      r.count++;
      countRecord(this.stats, enc, 1, 0, false);
      return;
    }
    await this.flush();
    this.run = { enc, target, chunk, srcTarget, srcChunk, count: 1 };
    countRecord(this.stats, enc, 1, 0, true);
  }

  async push(r: ChunkRecord, chunks: number): Promise<void> {
    await this.flush();
    countRecord(this.stats, r.enc, chunks, 'payload' in r ? r.payload.length : 0, true);
    await this.sink.push(r);
  }

  async flush(): Promise<void> {
    const r = this.run;
    this.run = undefined;
    if (r) await this.sink.push(r);
  }
}
