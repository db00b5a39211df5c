/**
 * Decoding one overlay segment as far as the segment and the base allow, with no knowledge of
 * other segments: what a worker thread does while the main thread assembles earlier ones. The
 * frame's sha256 is checked, the frame decompressed, every record parsed and checked on its
 * own (target, ranges, lengths, encodings), literal chunks decoded (RAW, XOR, XDELTA3,
 * ZSTD_DICT, SHIFT_* from the base) and hashed. What needs chunks rebuilt from other records
 * (SELF_REF, SHIFT_* from rebuilt targets) is passed on as an op for the assembler; so are
 * BASE_REF and ZERO runs, which cost nothing to describe and whose hashes the base map holds.
 *
 * The result is plain typed arrays and buffers, so it crosses a worker boundary by transfer.
 * Output per call is bounded (`maxData` bytes of decoded chunks): a segment whose records
 * expand to more — tiny delta payloads decoding to full chunks — is decoded in slices.
 */
import { createHash } from 'node:crypto';
import { CHUNK_SIZE, chunkCount, chunkLength, isZero } from './chunk.js';
import { HASH_SIZE, chunkHash } from './hash.js';
import { decodeDelta } from './literal.js';
import { Encoding, ShiftFrom, readRecord, type ChunkRecord } from './record.js';
import type { ChunkSource } from './source.js';
import type { ChunkedKind, TargetKind } from './target.js';
import { ByteReader } from './varint.js';
import { decompress, decompressWithDict } from './zstd.js';
import { CorruptInputError } from '../util/errors.js';

/** Blobs (stream header, RAM setup, device state) are small; a bigger one is not a real VM's. */
export const MAX_BLOB = 64 * 1024 * 1024;

/** What the decoder may read of the base: chunked targets as bytes, blobs whole. */
export type DecodeBaseTarget =
  | { kind: ChunkedKind; name: string; size: number; source: ChunkSource }
  | { kind: 'blob'; name: string; size: number; blob: Buffer };

export interface DecodeContext {
  /** The overlay's targets (header order). */
  targets: ReadonlyArray<{ name: string; kind: TargetKind; size: number }>;
  /** The base's targets (header base order). */
  base: readonly DecodeBaseTarget[];
}

/** Op codes of a decoded segment's rows. */
export const Op = {
  /** One chunk decoded: a = offset, b = length, c = hash index, d = 0 in `raw`, 1 in `extra`. */
  data: 0,
  /** `count` zero chunks. */
  zero: 1,
  /** `count` chunks equal to base target b's chunks from c; their bytes at `extra` offset a. */
  baseRef: 2,
  /** `count` chunks equal to rebuilt target a's chunks from b. */
  selfRef: 3,
  /** One chunk from rebuilt target a's bytes at offset b; c = payload offset in `raw` (-1: exact copy), d = length. */
  shiftSelf: 4,
  /** A whole blob: a = offset, b = length, c = hash index, d = 0 in `raw`, 1 in `extra`. */
  blob: 5,
} as const;
export type Op = (typeof Op)[keyof typeof Op];

/** Fields per row: op, target, chunk, count, a, b, c, d, record offset in the segment. */
export const ROW = 9;

export interface DecodedSegment {
  segment: number;
  /** ROW numbers per op, in record order. */
  ops: Float64Array;
  opCount: number;
  /** The decompressed records: RAW payloads and shift payloads are read from here, not copied. */
  raw: Uint8Array;
  /** Bytes decoded from deltas, shifted copies and base references. */
  extra: Uint8Array;
  /** sha256 of each data/blob op's bytes. */
  hashes: Uint8Array;
  /** Records consumed so far in this segment; equals `records` when the segment is done. */
  nextRecord: number;
  records: number;
  /** Time this call took (for statistics). */
  decodeMs: number;
}

export interface SegmentInput {
  segment: number;
  frame: Uint8Array;
  rawLength: number;
  records: number;
  /** The frame's sha256 as its frame header states it. */
  sha256: Uint8Array;
}

/** A Uint8Array over an ArrayBuffer of its own (transferable without taking anything else along). */
function own(b: Uint8Array): Uint8Array {
  if (b.byteOffset === 0 && b.buffer.byteLength === b.byteLength) return b;
  const out = new Uint8Array(b.byteLength);
  out.set(b);
  return out;
}

/** Bytes a record adds to `extra` (0 when it decodes in place or needs no bytes). */
function extraBytes(r: ChunkRecord, ctx: DecodeContext): number {
  const info = ctx.targets[r.target];
  if (!info) return 0;
  switch (r.enc) {
    case Encoding.xor:
    case Encoding.xdelta3:
    case Encoding.zstdDict:
    case Encoding.shiftDelta:
      return CHUNK_SIZE;
    case Encoding.shiftRef:
      return r.from === ShiftFrom.base ? CHUNK_SIZE : 0;
    case Encoding.baseRef:
      return r.count * CHUNK_SIZE;
    case Encoding.blobZstdDict:
      return Math.min(info.size, MAX_BLOB);
    default:
      return 0;
  }
}

/**
 * Decodes records [fromRecord, …) of a segment until the segment ends or about `maxData` bytes
 * of decoded chunks were produced. Throws CorruptInputError for anything a record cannot mean.
 */
export async function decodeSegment(
  input: SegmentInput,
  ctx: DecodeContext,
  fromRecord = 0,
  maxData = 64 << 20,
): Promise<DecodedSegment> {
  const t0 = performance.now();
  const where = `segment ${input.segment}`;
  const frame = Buffer.from(input.frame.buffer, input.frame.byteOffset, input.frame.byteLength);
  const sha = createHash('sha256').update(frame).digest();
  if (!sha.equals(Buffer.from(input.sha256.buffer, input.sha256.byteOffset, input.sha256.byteLength))) {
    throw new CorruptInputError(`${where}: checksum mismatch (damaged overlay)`, { segment: input.segment });
  }
  const rawOwn = own(decompress(frame, input.rawLength, where));
  const raw = Buffer.from(rawOwn.buffer, rawOwn.byteOffset, rawOwn.byteLength);

  // Pass 1: parse the slice's records and size its outputs exactly.
  const rd = new ByteReader(raw, where);
  let record = 0;
  while (rd.remaining > 0 && record < fromRecord) {
    readRecord(rd);
    record++;
  }
  const records: Array<{ r: ChunkRecord; at: number }> = [];
  let extraSize = 0;
  let hashCount = 0;
  while (rd.remaining > 0) {
    if (record >= input.records) {
      throw new CorruptInputError(`${where}: holds more records than its header says (${input.records})`, {
        segment: input.segment,
      });
    }
    if (extraSize > 0 && extraSize >= maxData) break;
    const at = rd.pos;
    const r = readRecord(rd);
    record++;
    const n = extraBytes(r, ctx);
    // A run too long for one slice is cut at the slice's end (records are never split: a long
    // base reference is read later, by the assembler, when it does not fit).
    extraSize += n <= maxData ? n : 0;
    hashCount++;
    records.push({ r, at });
  }
  if (rd.remaining === 0 && record !== input.records) {
    throw new CorruptInputError(`${where}: holds ${record} records, its header says ${input.records}`, {
      segment: input.segment,
    });
  }

  // Pass 2: decode into buffers of the right size.
  const out: Output = {
    ops: new Float64Array(ROW * Math.max(1, records.length)),
    opCount: 0,
    raw,
    extra: Buffer.allocUnsafe(extraSize),
    extraUsed: 0,
    hashes: Buffer.allocUnsafe(HASH_SIZE * hashCount),
    hashCount: 0,
    maxData,
  };
  for (const { r, at } of records) await decodeRecord(r, ctx, `${where} offset ${at}`, at, out);
  return {
    segment: input.segment,
    ops: out.ops.subarray(0, out.opCount * ROW),
    opCount: out.opCount,
    raw: rawOwn,
    extra: own(out.extra.subarray(0, out.extraUsed)),
    hashes: own(out.hashes.subarray(0, out.hashCount * HASH_SIZE)),
    nextRecord: record,
    records: input.records,
    decodeMs: performance.now() - t0,
  };
}

interface Output {
  ops: Float64Array;
  opCount: number;
  raw: Buffer;
  extra: Buffer;
  extraUsed: number;
  hashes: Buffer;
  hashCount: number;
  maxData: number;
}

function row(o: Output, op: Op, t: number, chunk: number, count: number, a = 0, b = 0, c = 0, d = 0, at = 0): void {
  if ((o.opCount + 1) * ROW > o.ops.length) {
    const next = new Float64Array(o.ops.length * 2);
    next.set(o.ops);
    o.ops = next;
  }
  const i = o.opCount * ROW;
  const ops = o.ops;
  ops[i] = op;
  ops[i + 1] = t;
  ops[i + 2] = chunk;
  ops[i + 3] = count;
  ops[i + 4] = a;
  ops[i + 5] = b;
  ops[i + 6] = c;
  ops[i + 7] = d;
  ops[i + 8] = at;
  o.opCount++;
}

/** Room for `n` bytes in `extra`. */
function reserve(o: Output, n: number): number {
  const at = o.extraUsed;
  o.extraUsed += n;
  return at;
}

function hashOf(o: Output, bytes: Uint8Array): number {
  const h = chunkHash(bytes);
  h.copy(o.hashes, o.hashCount * HASH_SIZE);
  return o.hashCount++;
}

/** A decoded chunk: in `raw` (a RAW payload) or `extra` (written there already). */
function dataOp(o: Output, t: number, chunk: number, bytes: Buffer, inExtra: boolean, at: number): void {
  // A chunk that decodes to zeros is a zero chunk: digests leave zero chunks out.
  if (isZero(bytes)) return row(o, Op.zero, t, chunk, 1, 0, 0, 0, 0, at);
  const off = inExtra ? bytes.byteOffset - o.extra.byteOffset : bytes.byteOffset - o.raw.byteOffset;
  row(o, Op.data, t, chunk, 1, off, bytes.length, hashOf(o, bytes), inExtra ? 1 : 0, at);
}

/** Copies `bytes` into `extra` (decoders that return a fresh buffer). */
function toExtra(o: Output, bytes: Buffer): Buffer {
  const at = reserve(o, bytes.length);
  bytes.copy(o.extra, at);
  return o.extra.subarray(at, at + bytes.length);
}

function samePlace(ctx: DecodeContext, t: { name: string; kind: TargetKind }): DecodeBaseTarget | undefined {
  return ctx.base.find((b) => b.name === t.name && b.kind === t.kind);
}

async function readBase(
  b: DecodeBaseTarget,
  offset: number,
  length: number,
  into: Buffer,
  where: string,
): Promise<void> {
  if (b.kind === 'blob') throw new CorruptInputError(`${where}: reference into base blob ${b.name}`);
  await b.source.read(offset, length, into);
}

async function decodeRecord(r: ChunkRecord, ctx: DecodeContext, where: string, at: number, o: Output): Promise<void> {
  const info = ctx.targets[r.target];
  if (!info) throw new CorruptInputError(`${where}: record for unknown target ${r.target}`);
  if (info.kind === 'blob') {
    if (r.chunk !== 0 || (r.enc !== Encoding.blob && r.enc !== Encoding.blobZstdDict)) {
      throw new CorruptInputError(`${where}: bad record for blob ${info.name}`);
    }
    if (info.size > MAX_BLOB) throw new CorruptInputError(`${where}: blob ${info.name} too large`);
    if (r.enc === Encoding.blob) {
      if (r.payload.length !== info.size) throw new CorruptInputError(`${where}: blob ${info.name} has the wrong size`);
      row(o, Op.blob, r.target, 0, 1, r.payload.byteOffset - o.raw.byteOffset, info.size, hashOf(o, r.payload), 0, at);
      return;
    }
    const same = samePlace(ctx, info);
    if (!same || same.kind !== 'blob') {
      throw new CorruptInputError(`${where}: blob delta for ${info.name} without a base blob`);
    }
    const bytes = toExtra(o, decompressWithDict(r.payload, same.blob, info.size, where));
    row(o, Op.blob, r.target, 0, 1, bytes.byteOffset - o.extra.byteOffset, info.size, hashOf(o, bytes), 1, at);
    return;
  }
  if (r.enc === Encoding.blob || r.enc === Encoding.blobZstdDict) {
    throw new CorruptInputError(`${where}: blob record for chunked target ${info.name}`);
  }
  const n = chunkCount(info.size);
  const count = 'count' in r ? r.count : 1;
  if (count < 1 || r.chunk + count > n) {
    throw new CorruptInputError(`${where}: ${info.name} chunk ${r.chunk}+${count} out of range`);
  }
  const len = chunkLength(info.size, r.chunk);
  switch (r.enc) {
    case Encoding.zero:
      row(o, Op.zero, r.target, r.chunk, count, 0, 0, 0, 0, at);
      return;
    case Encoding.baseRef: {
      const b = ctx.base[r.srcTarget];
      if (!b || b.kind === 'blob') {
        throw new CorruptInputError(`${where}: reference to unknown base target ${r.srcTarget}`);
      }
      const last = count - 1;
      if (
        r.srcChunk + count > chunkCount(b.size) ||
        chunkLength(b.size, r.srcChunk + last) !== chunkLength(info.size, r.chunk + last)
      ) {
        throw new CorruptInputError(
          `${where}: base reference ${b.name}#${r.srcChunk}+${count} has the wrong length or range`,
        );
      }
      // Consecutive base chunks: one read, here on the worker (-1: too long, read by the assembler).
      let off = -1;
      if (count * CHUNK_SIZE <= o.maxData) {
        off = reserve(o, count * CHUNK_SIZE);
        const bytes = Math.min(count * CHUNK_SIZE, b.size - r.srcChunk * CHUNK_SIZE);
        await readBase(b, r.srcChunk * CHUNK_SIZE, bytes, o.extra.subarray(off, off + bytes), where);
      }
      row(o, Op.baseRef, r.target, r.chunk, count, off, r.srcTarget, r.srcChunk, 0, at);
      return;
    }
    case Encoding.selfRef: {
      const s = ctx.targets[r.srcTarget];
      const last = count - 1;
      if (
        !s ||
        s.kind === 'blob' ||
        r.srcChunk + count > chunkCount(s.size) ||
        chunkLength(s.size, r.srcChunk + last) !== chunkLength(info.size, r.chunk + last)
      ) {
        throw new CorruptInputError(`${where}: reference to an invalid earlier chunk`);
      }
      row(o, Op.selfRef, r.target, r.chunk, count, r.srcTarget, r.srcChunk, 0, 0, at);
      return;
    }
    case Encoding.shiftRef:
    case Encoding.shiftDelta: {
      if (r.from === ShiftFrom.base) {
        const b = ctx.base[r.srcTarget];
        if (!b || b.kind === 'blob' || r.srcOffset + len > b.size) {
          throw new CorruptInputError(`${where}: shifted reference outside the base`);
        }
        const at0 = reserve(o, CHUNK_SIZE);
        if (r.enc === Encoding.shiftRef) {
          const slot = o.extra.subarray(at0, at0 + len);
          await readBase(b, r.srcOffset, len, slot, where);
          dataOp(o, r.target, r.chunk, slot, true, at);
        } else {
          const dict = await baseCopy(b, r.srcOffset, len, where);
          dataOp(o, r.target, r.chunk, toExtraAt(o, at0, decompressWithDict(r.payload, dict, len, where)), true, at);
        }
        return;
      }
      const s = ctx.targets[r.srcTarget];
      if (r.from !== ShiftFrom.self || !s || s.kind === 'blob' || r.srcOffset + len > s.size) {
        throw new CorruptInputError(`${where}: shifted reference outside the rebuilt targets`);
      }
      const p = r.enc === Encoding.shiftRef ? -1 : r.payload.byteOffset - o.raw.byteOffset;
      const plen = r.enc === Encoding.shiftRef ? 0 : r.payload.length;
      row(o, Op.shiftSelf, r.target, r.chunk, 1, r.srcTarget, r.srcOffset, p, plen, at);
      return;
    }
    case Encoding.raw:
      if (r.payload.length !== len) {
        throw new CorruptInputError(`${where}: raw chunk of ${r.payload.length} bytes, expected ${len}`);
      }
      dataOp(o, r.target, r.chunk, r.payload, false, at);
      return;
    case Encoding.xor:
    case Encoding.xdelta3:
    case Encoding.zstdDict: {
      const same = samePlace(ctx, info);
      const baseLen = same && same.kind !== 'blob' ? chunkLength(same.size, r.chunk) : 0;
      if (!same || baseLen === 0) {
        throw new CorruptInputError(`${where}: delta record for ${info.name}#${r.chunk} has no base chunk`);
      }
      const base = await baseCopy(same, r.chunk * CHUNK_SIZE, baseLen, where);
      const at0 = reserve(o, CHUNK_SIZE);
      const bytes = toExtraAt(o, at0, decodeDelta(r.enc, r.payload, base, len, where));
      dataOp(o, r.target, r.chunk, bytes, true, at);
      return;
    }
  }
}

/** Base bytes into a buffer of their own (a delta's dictionary). */
async function baseCopy(b: DecodeBaseTarget, offset: number, length: number, where: string): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(length);
  await readBase(b, offset, length, buf, where);
  return buf;
}

/** Puts decoded bytes at a reserved place of `extra`. */
function toExtraAt(o: Output, at: number, bytes: Buffer): Buffer {
  bytes.copy(o.extra, at);
  return o.extra.subarray(at, at + bytes.length);
}
