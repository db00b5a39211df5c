/**
 * Choosing the smallest encoding for a chunk that is new content (not zero, not found in the
 * base or earlier in the overlay): raw, or a delta against the base chunk at the same place —
 * zstd with that chunk as dictionary, XOR (few scattered byte changes compress to almost
 * nothing), or xdelta3. Sizes are compared as they will end up after segment compression,
 * estimated by compressing each candidate alone at a fast level.
 */
import { CHUNK_SIZE } from './chunk.js';
import { Encoding } from './record.js';
import { compressedSize, compressWithDict, decompressWithDict } from './zstd.js';
import { xdelta3Decode, xdelta3Encode } from './xdelta3.js';
import { CorruptInputError } from '../util/errors.js';

export interface LiteralOptions {
  /** Encoders to try (benchmarks switch them off one at a time). */
  zstdDict: boolean;
  xor: boolean;
  xdelta3: boolean;
}

export const defaultLiteralOptions: LiteralOptions = { zstdDict: true, xor: true, xdelta3: true };

export type LiteralEncoding =
  typeof Encoding.raw | typeof Encoding.xor | typeof Encoding.xdelta3 | typeof Encoding.zstdDict;

export interface Literal {
  enc: LiteralEncoding;
  payload: Buffer;
  /** Estimated bytes in the compressed overlay. */
  cost: number;
}

/** Level of the per-chunk estimates and zstd deltas: level 3 gives the same sizes as 9 on 4 KiB. */
const CHUNK_LEVEL = 3;
/** A dictionary that saves less than this fraction means the chunk is unrelated to its base. */
const RELATED = 0.9;

export function xorBuffers(a: Uint8Array, b: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i]! ^ b[i]!;
  return out;
}

export function encodeLiteral(data: Buffer, base: Buffer | undefined, opt: LiteralOptions): Literal {
  const rawCost = compressedSize(data, CHUNK_LEVEL);
  let best: Literal = { enc: Encoding.raw, payload: data, cost: rawCost };
  if (!base || base.length === 0) return best;

  if (opt.zstdDict) {
    const d = compressWithDict(data, base, CHUNK_LEVEL);
    // An unrelated chunk: no delta will help; skip the slower encoders (xdelta3 runs at
    // ~10 k/s on dissimilar pairs against ~100 k/s on similar ones).
    if (d.length >= rawCost * RELATED) return best;
    if (d.length < best.cost) best = { enc: Encoding.zstdDict, payload: d, cost: d.length };
  }
  if (opt.xor && base.length === data.length) {
    const x = xorBuffers(data, base);
    const cost = compressedSize(x, CHUNK_LEVEL);
    if (cost < best.cost) best = { enc: Encoding.xor, payload: x, cost };
  }
  if (opt.xdelta3 && data.length <= CHUNK_SIZE && base.length <= CHUNK_SIZE) {
    const v = xdelta3Encode(data, base, best.cost);
    if (v && v.length < best.cost) best = { enc: Encoding.xdelta3, payload: v, cost: v.length };
  }
  return best;
}

/** Inverse of encodeLiteral for the delta encodings. */
export function decodeDelta(
  enc: typeof Encoding.xor | typeof Encoding.xdelta3 | typeof Encoding.zstdDict,
  payload: Buffer,
  base: Buffer,
  length: number,
  where: string,
): Buffer {
  switch (enc) {
    case Encoding.xor:
      if (payload.length !== length || base.length !== length) {
        throw new CorruptInputError(`${where}: XOR record of ${payload.length} bytes for a ${length}-byte chunk`);
      }
      return xorBuffers(payload, base);
    case Encoding.xdelta3:
      return xdelta3Decode(payload, base, length, where);
    case Encoding.zstdDict:
      return decompressWithDict(payload, base, length, where);
  }
}
