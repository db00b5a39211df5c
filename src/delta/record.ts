/**
 * Records: the unit of an overlay body. Each says how to rebuild one chunk (or a run of
 * chunks) of one target. Byte layout (all integers unsigned LEB128 varints):
 *
 *   u8 encoding, target, chunk, then per encoding:
 *   ZERO       count                          chunks [chunk, chunk+count) are all zero
 *   BASE_REF   baseTarget, baseChunk, count   copies of base chunks baseChunk… (same length)
 *   SELF_REF   srcTarget, srcChunk, count     copies of chunks rebuilt earlier in this overlay
 *   RAW        len, bytes                     the chunk itself
 *   XOR        len, bytes                     chunk XOR base chunk at the same place
 *   XDELTA3    len, bytes                     VCDIFF against the base chunk at the same place
 *   ZSTD_DICT  len, bytes                     zstd frame, base chunk at the same place as dictionary
 *   BLOB       len, bytes                     a whole blob target (chunk = 0)
 *   BLOB_ZSTD_DICT len, bytes                 a blob as zstd frame with the base blob as dictionary
 *   SHIFT_REF  from, srcTarget, srcOffset     the chunk's bytes sit at byte srcOffset of a base
 *                                             target (from 0) or of a target rebuilt earlier (1)
 *   SHIFT_DELTA from, srcTarget, srcOffset, len, bytes   zstd frame with those bytes as dictionary
 */
import type { ByteReader } from './varint.js';
import { uvarintLength, writeUvarint } from './varint.js';
import { CorruptInputError } from '../util/errors.js';

export const Encoding = {
  zero: 0,
  baseRef: 1,
  selfRef: 2,
  raw: 3,
  xor: 4,
  xdelta3: 5,
  zstdDict: 6,
  blob: 7,
  blobZstdDict: 8,
  shiftRef: 9,
  shiftDelta: 10,
} as const;
export type Encoding = (typeof Encoding)[keyof typeof Encoding];

export const encodingNames: { readonly [K in Encoding]: string } = {
  0: 'zero',
  1: 'base_ref',
  2: 'self_ref',
  3: 'raw',
  4: 'xor',
  5: 'xdelta3',
  6: 'zstd_dict',
  7: 'blob',
  8: 'blob_zstd_dict',
  9: 'shift_ref',
  10: 'shift_delta',
};

/** Where SHIFT_* source bytes come from. */
export const ShiftFrom = { base: 0, self: 1 } as const;

export type ChunkRecord =
  | { enc: typeof Encoding.zero; target: number; chunk: number; count: number }
  | {
      enc: typeof Encoding.baseRef | typeof Encoding.selfRef;
      target: number;
      chunk: number;
      srcTarget: number;
      srcChunk: number;
      count: number;
    }
  | {
      enc: typeof Encoding.shiftRef | typeof Encoding.shiftDelta;
      target: number;
      chunk: number;
      from: number;
      srcTarget: number;
      srcOffset: number;
      /** Empty for SHIFT_REF. */
      payload: Buffer;
    }
  | {
      enc:
        | typeof Encoding.raw
        | typeof Encoding.xor
        | typeof Encoding.xdelta3
        | typeof Encoding.zstdDict
        | typeof Encoding.blob
        | typeof Encoding.blobZstdDict;
      target: number;
      chunk: number;
      payload: Buffer;
    };

/** Where the differ sends records, in order (the overlay writer). */
export interface RecordSink {
  push(r: ChunkRecord): Promise<void>;
}

/** Number of target chunks a record covers. */
export function recordCount(r: ChunkRecord): number {
  return 'count' in r ? r.count : 1;
}

export function encodedLength(r: ChunkRecord): number {
  const n = 1 + uvarintLength(r.target) + uvarintLength(r.chunk);
  switch (r.enc) {
    case Encoding.zero:
      return n + uvarintLength(r.count);
    case Encoding.baseRef:
    case Encoding.selfRef:
      return n + uvarintLength(r.srcTarget) + uvarintLength(r.srcChunk) + uvarintLength(r.count);
    case Encoding.shiftRef:
      return n + uvarintLength(r.from) + uvarintLength(r.srcTarget) + uvarintLength(r.srcOffset);
    case Encoding.shiftDelta:
      return (
        n +
        uvarintLength(r.from) +
        uvarintLength(r.srcTarget) +
        uvarintLength(r.srcOffset) +
        uvarintLength(r.payload.length) +
        r.payload.length
      );
    default:
      return n + uvarintLength(r.payload.length) + r.payload.length;
  }
}

/** Writes `r` at `pos` (the buffer must have encodedLength(r) bytes free); returns new pos. */
export function writeRecord(buf: Buffer, pos: number, r: ChunkRecord): number {
  buf[pos++] = r.enc;
  pos = writeUvarint(buf, pos, r.target);
  pos = writeUvarint(buf, pos, r.chunk);
  switch (r.enc) {
    case Encoding.zero:
      return writeUvarint(buf, pos, r.count);
    case Encoding.baseRef:
    case Encoding.selfRef:
      pos = writeUvarint(buf, pos, r.srcTarget);
      pos = writeUvarint(buf, pos, r.srcChunk);
      return writeUvarint(buf, pos, r.count);
    case Encoding.shiftRef:
    case Encoding.shiftDelta:
      pos = writeUvarint(buf, pos, r.from);
      pos = writeUvarint(buf, pos, r.srcTarget);
      pos = writeUvarint(buf, pos, r.srcOffset);
      if (r.enc === Encoding.shiftRef) return pos;
      pos = writeUvarint(buf, pos, r.payload.length);
      r.payload.copy(buf, pos);
      return pos + r.payload.length;
    default:
      pos = writeUvarint(buf, pos, r.payload.length);
      r.payload.copy(buf, pos);
      return pos + r.payload.length;
  }
}

/** Reads one record; payloads are views into the reader's buffer. */
export function readRecord(rd: ByteReader): ChunkRecord {
  const at = rd.pos;
  const enc = rd.u8();
  const target = rd.uvarint();
  const chunk = rd.uvarint();
  switch (enc) {
    case Encoding.zero:
      return { enc, target, chunk, count: rd.uvarint() };
    case Encoding.baseRef:
    case Encoding.selfRef: {
      const srcTarget = rd.uvarint();
      const srcChunk = rd.uvarint();
      return { enc, target, chunk, srcTarget, srcChunk, count: rd.uvarint() };
    }
    case Encoding.shiftRef:
    case Encoding.shiftDelta: {
      const from = rd.uvarint();
      const srcTarget = rd.uvarint();
      const srcOffset = rd.uvarint();
      const payload = enc === Encoding.shiftRef ? Buffer.alloc(0) : rd.bytes(rd.uvarint());
      return { enc, target, chunk, from, srcTarget, srcOffset, payload };
    }
    case Encoding.raw:
    case Encoding.xor:
    case Encoding.xdelta3:
    case Encoding.zstdDict:
    case Encoding.blob:
    case Encoding.blobZstdDict: {
      const len = rd.uvarint();
      return { enc, target, chunk, payload: rd.bytes(len) };
    }
    default:
      throw new CorruptInputError(`${rd.where}: unknown record encoding ${enc}`, { offset: at });
  }
}
