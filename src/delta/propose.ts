/**
 * The parallel half of the differ: everything the decision ladder (ladder.ts) needs to know
 * about one batch of chunks that depends only on those chunks and the base — zero or not,
 * unchanged or not, the sha256, a hit in the base's hash index, the smallest literal against
 * the base chunk at the same place, the chunk's content anchors, and the shifted copies found
 * in the base. Worker threads compute these for batches ahead; the ladder then decides each
 * chunk in order, adding only what depends on earlier chunks of this overlay (references to
 * them). The same functions run inline with one thread, so the overlay's bytes do not depend
 * on the number of threads.
 */
import type { AnchorIndex } from './anchors.js';
import { anchorKey, forEachAnchor } from './anchors.js';
import { CHUNK_SIZE, chunkLength, isZero } from './chunk.js';
import { HASH_SIZE, chunkHash } from './hash.js';
import type { HashIndex } from './hash-index.js';
import { encodeLiteral } from './literal.js';
import type { LadderOptions } from './ladder.js';
import type { ChunkSource } from './source.js';
import type { SharedHashes } from './shared-hashes.js';
import { compressWithDict } from './zstd.js';

/** Literals already this small are not worth a search for shifted copies. */
export const SHIFT_WORTH = 48;
/** Candidate sources tried per chunk (base and earlier overlay chunks together). */
export const SHIFT_TRIES = 4;

/** A batch of consecutive chunks of one target, with the base's bytes at the same place. */
export interface ProposeInput {
  /** Target size in bytes (the last chunk may be short). */
  size: number;
  first: number;
  count: number;
  cust: Uint8Array;
  /** The base's bytes at the same place (zeros where it has none), and the base target's size. */
  base: Uint8Array | undefined;
  baseSize: number;
  /**
   * Per chunk: bit 0 — the base has a non-zero chunk there (a delta may use it); bit 1 — of the
   * same length too (the chunk may be unchanged).
   */
  inBase: Uint8Array;
}

export interface ProposeContext {
  opt: LadderOptions;
  /** Hashes the ladder emitted as literals: chunks with these become references (a hint). */
  known?: SharedHashes;
  baseIndex: HashIndex | undefined;
  baseAnchors: AnchorIndex | undefined;
  /** Base targets by position (undefined: a blob), to read shifted copies from. */
  baseSources: ReadonlyArray<{ size: number; source: ChunkSource } | undefined>;
}

/** Literal encoding field of a chunk the ladder is expected to find earlier in the overlay. */
export const LIT_SKIPPED = -2;

/** Per-chunk kinds. */
export const Kind = { zero: 0, unchanged: 1, data: 2 } as const;

/** Fields per chunk row (see Proposals). */
export const CHUNK_ROW = 10;
/** Fields per anchor row (see Proposals). */
export const ANCHOR_ROW = 8;

/** How a base shift candidate turned out. */
export const Eval = { none: 0, exact: 1, delta: 2, invalid: 3 } as const;

/**
 * Per chunk (CHUNK_ROW numbers): kind, hash index, base hit target (-1 none), base hit chunk,
 * literal encoding (-1: not computed), literal payload offset, its length, its estimated cost,
 * first anchor row, anchor rows. Per anchor (ANCHOR_ROW numbers): position in the chunk, key
 * (two u32), base candidate target (-1 none), its byte offset, Eval, payload offset, length.
 */
export interface Proposals {
  /** The batch's bytes, handed back (they travel to a worker and return). */
  cust: Uint8Array;
  base: Uint8Array | undefined;
  chunks: Float64Array;
  anchors: Float64Array;
  anchorCount: number;
  hashes: Uint8Array;
  payloads: Uint8Array;
}

class Bytes {
  buf: Buffer = Buffer.allocUnsafe(64 * 1024);
  length = 0;
  put(b: Uint8Array): number {
    if (this.length + b.length > this.buf.length) {
      const next = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.length + b.length));
      this.buf.copy(next, 0, 0, this.length);
      this.buf = next;
    }
    this.buf.set(b, this.length);
    this.length += b.length;
    return this.length - b.length;
  }
  take(): Uint8Array {
    const out = new Uint8Array(this.length);
    out.set(this.buf.subarray(0, this.length));
    return out;
  }
}

export async function proposeBatch(input: ProposeInput, ctx: ProposeContext): Promise<Proposals> {
  const { opt } = ctx;
  const chunks = new Float64Array(CHUNK_ROW * input.count);
  let anchors = new Float64Array(ANCHOR_ROW * 64);
  let anchorCount = 0;
  const hashes = Buffer.allocUnsafe(HASH_SIZE * input.count);
  let hashCount = 0;
  const payloads = new Bytes();
  const cust = Buffer.from(input.cust.buffer, input.cust.byteOffset, input.cust.byteLength);
  const base = input.base ? Buffer.from(input.base.buffer, input.base.byteOffset, input.base.byteLength) : undefined;
  const src = Buffer.allocUnsafe(CHUNK_SIZE);
  const seen = new Set<string>();
  // Hashes of this batch's chunks that will be literals: a repeat of one becomes a reference.
  const inBatch = new Set<string>();

  for (let k = 0; k < input.count; k++) {
    const c = input.first + k;
    const row = k * CHUNK_ROW;
    const len = chunkLength(input.size, c);
    const data = cust.subarray(k * CHUNK_SIZE, k * CHUNK_SIZE + len);
    chunks[row + 2] = -1;
    chunks[row + 4] = -1;
    if (isZero(data)) {
      chunks[row] = Kind.zero;
      continue;
    }
    const flags = input.inBase[k]!;
    const baseLen = chunkLength(input.baseSize, c);
    const baseData = base && flags & 1 ? base.subarray(k * CHUNK_SIZE, k * CHUNK_SIZE + baseLen) : undefined;
    if (baseData && flags & 2 && baseData.equals(data)) {
      chunks[row] = Kind.unchanged;
      continue;
    }
    chunks[row] = Kind.data;
    const h = chunkHash(data);
    h.copy(hashes, hashCount * HASH_SIZE);
    chunks[row + 1] = hashCount++;
    const hit = opt.baseRefs ? ctx.baseIndex?.get(h) : undefined;
    if (hit) {
      chunks[row + 2] = hit.target;
      chunks[row + 3] = hit.chunk;
      continue;
    }
    if (opt.selfRefs) {
      const key = h.toString('latin1', 0, 16);
      if (inBatch.has(key) || ctx.known?.has(h)) {
        chunks[row + 4] = LIT_SKIPPED;
        continue;
      }
      inBatch.add(key);
    }
    // The literal, and what a shifted copy in the base would cost (used when the ladder does not
    // find the chunk earlier in the overlay).
    const lit = encodeLiteral(data, baseData, opt);
    chunks[row + 4] = lit.enc;
    chunks[row + 5] = payloads.put(lit.payload);
    chunks[row + 6] = lit.payload.length;
    chunks[row + 7] = lit.cost;
    chunks[row + 8] = anchorCount;
    if (!opt.shifted) continue;
    const search = lit.cost > SHIFT_WORTH;
    let baseCands = 0;
    seen.clear();
    const positions: number[] = [];
    forEachAnchor(data, 0, data.length, (pos) => positions.push(pos));
    for (const pos of positions) {
      if ((anchorCount + 1) * ANCHOR_ROW > anchors.length) {
        const next = new Float64Array(anchors.length * 2);
        next.set(anchors);
        anchors = next;
      }
      const [k0, k1] = anchorKey(data, pos);
      const a = anchorCount++ * ANCHOR_ROW;
      anchors[a] = pos;
      anchors[a + 1] = k0;
      anchors[a + 2] = k1;
      anchors[a + 3] = -1;
      // Only the first SHIFT_TRIES base candidates can ever be tried (ladder.ts stops there).
      const b = search && baseCands < SHIFT_TRIES ? ctx.baseAnchors?.get(k0, k1) : undefined;
      if (!b) continue;
      baseCands++;
      const offset = b.offset - pos;
      anchors[a + 3] = b.target;
      anchors[a + 4] = offset;
      const key = `${b.target}:${offset}`;
      const source = ctx.baseSources[b.target];
      if (seen.has(key) || offset < 0) continue; // the ladder skips these too (Eval.none)
      seen.add(key);
      if (!source || offset + len > source.size) {
        anchors[a + 5] = Eval.invalid;
        continue;
      }
      const s = src.subarray(0, len);
      await source.source.read(offset, len, s);
      if (s.equals(data)) {
        anchors[a + 5] = Eval.exact;
        continue;
      }
      const d = compressWithDict(data, s, 3);
      anchors[a + 5] = Eval.delta;
      anchors[a + 6] = payloads.put(d);
      anchors[a + 7] = d.length;
    }
    chunks[row + 9] = anchorCount - chunks[row + 8]!;
  }
  return {
    cust: input.cust,
    base: input.base,
    chunks,
    anchors: anchors.slice(0, anchorCount * ANCHOR_ROW),
    anchorCount,
    hashes: new Uint8Array(hashes.subarray(0, hashCount * HASH_SIZE)),
    payloads: payloads.take(),
  };
}
