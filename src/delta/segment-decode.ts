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
  /** One chunk decoded: a = data offset, b = length, c = hash index. */
  data: 0,
  /** `count` zero chunks. */
  zero: 1,
  /** `count` chunks equal to base target a's chunks from b. */
  baseRef: 2,
  /** `count` chunks equal to rebuilt target a's chunks from b. */
  selfRef: 3,
  /** One chunk from rebuilt target a's bytes at offset b; c = payload offset (-1: exact copy), d = payload length. */
  shiftSelf: 4,
  /** A whole blob: a = data offset, b = length, c = hash index. */
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
  /** Decoded chunk and blob bytes, back to back. */
  data: Uint8Array;
  /** sha256 of each data/blob op's bytes. */
  hashes: Uint8Array;
  /** Payloads of shiftSelf ops. */
  payloads: Uint8Array;
  /** Records consumed so far in this segment; equals `records` when the segment is done. */
  nextRecord: number;
  records: number;
}

export interface SegmentInput {
  segment: number;
  frame: Uint8Array;
  rawLength: number;
  records: number;
  /** The frame's sha256 as its frame header states it. */
  sha256: Uint8Array;
}

class Growable {
  buf: Buffer;
  length = 0;
  constructor(initial: number) {
    this.buf = Buffer.allocUnsafe(initial);
  }
  reserve(n: number): number {
    if (this.length + n > this.buf.length) {
      const next = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.length + n));
      this.buf.copy(next, 0, 0, this.length);
      this.buf = next;
    }
    const at = this.length;
    this.length += n;
    return at;
  }
  put(b: Uint8Array): number {
    const at = this.reserve(b.length);
    this.buf.set(b, at);
    return at;
  }
  /** A copy of the used part in its own ArrayBuffer (transferable, nothing else shares it). */
  take(): Uint8Array {
    const out = new Uint8Array(this.length);
    out.set(this.buf.subarray(0, this.length));
    return out;
  }
}

/**
 * Decodes records [fromRecord, …) of a segment until the segment ends or `maxData` bytes of
 * chunks were produced. Throws CorruptInputError for anything a record cannot mean.
 */
export async function decodeSegment(
  input: SegmentInput,
  ctx: DecodeContext,
  fromRecord = 0,
  maxData = 64 << 20,
): Promise<DecodedSegment> {
  const where = `segment ${input.segment}`;
  const frame = Buffer.from(input.frame.buffer, input.frame.byteOffset, input.frame.byteLength);
  const sha = createHash('sha256').update(frame).digest();
  if (!sha.equals(Buffer.from(input.sha256.buffer, input.sha256.byteOffset, input.sha256.byteLength))) {
    throw new CorruptInputError(`${where}: checksum mismatch (damaged overlay)`, { segment: input.segment });
  }
  const raw = decompress(frame, input.rawLength, where);
  const rd = new ByteReader(raw, where);
  let ops = new Float64Array(ROW * 256);
  let opCount = 0;
  const data = new Growable(Math.min(maxData, raw.length + CHUNK_SIZE) + CHUNK_SIZE);
  const hashes = new Growable(HASH_SIZE * 256);
  const payloads = new Growable(1024);
  const row = (op: Op, target: number, chunk: number, count: number, a = 0, b = 0, c = 0, d = 0, at = 0): void => {
    if ((opCount + 1) * ROW > ops.length) {
      const next = new Float64Array(ops.length * 2);
      next.set(ops);
      ops = next;
    }
    ops.set([op, target, chunk, count, a, b, c, d, at], opCount * ROW);
    opCount++;
  };
  const putData = (op: typeof Op.data | typeof Op.blob, target: number, chunk: number, bytes: Uint8Array, at: number): void => {
    // A chunk that decodes to zeros is a zero chunk: digests leave zero chunks out.
    if (op === Op.data && isZero(bytes)) return row(Op.zero, target, chunk, 1, 0, 0, 0, 0, at);
    const off = data.put(bytes);
    const h = hashes.put(chunkHash(bytes));
    row(op, target, chunk, 1, off, bytes.length, h / HASH_SIZE, 0, at);
  };

  let record = 0;
  while (rd.remaining > 0 && record < fromRecord) {
    readRecord(rd);
    record++;
  }
  while (rd.remaining > 0) {
    if (record >= input.records) {
      throw new CorruptInputError(`${where}: holds more records than its header says (${input.records})`, { segment: input.segment });
    }
    if (data.length >= maxData) break;
    const at = rd.pos;
    const r = readRecord(rd);
    record++;
    await decodeRecord(r, ctx, `${where} offset ${at}`, at, row, putData, payloads);
  }
  if (rd.remaining === 0 && record !== input.records) {
    throw new CorruptInputError(`${where}: holds ${record} records, its header says ${input.records}`, { segment: input.segment });
  }
  return {
    segment: input.segment,
    ops: ops.slice(0, opCount * ROW),
    opCount,
    data: data.take(),
    hashes: hashes.take(),
    payloads: payloads.take(),
    nextRecord: record,
    records: input.records,
  };
}

type RowFn = (op: Op, target: number, chunk: number, count: number, a?: number, b?: number, c?: number, d?: number, at?: number) => void;
type DataFn = (op: typeof Op.data | typeof Op.blob, target: number, chunk: number, bytes: Uint8Array, at: number) => void;

function samePlace(ctx: DecodeContext, t: { name: string; kind: TargetKind }): DecodeBaseTarget | undefined {
  return ctx.base.find((b) => b.name === t.name && b.kind === t.kind);
}

async function readBase(b: DecodeBaseTarget, offset: number, length: number, where: string): Promise<Buffer> {
  if (b.kind === 'blob') throw new CorruptInputError(`${where}: reference into base blob ${b.name}`);
  const buf = Buffer.alloc(length);
  await b.source.read(offset, length, buf);
  return buf;
}

async function decodeRecord(
  r: ChunkRecord,
  ctx: DecodeContext,
  where: string,
  at: number,
  row: RowFn,
  putData: DataFn,
  payloads: Growable,
): Promise<void> {
  const info = ctx.targets[r.target];
  if (!info) throw new CorruptInputError(`${where}: record for unknown target ${r.target}`);
  if (info.kind === 'blob') {
    if (r.chunk !== 0 || (r.enc !== Encoding.blob && r.enc !== Encoding.blobZstdDict)) {
      throw new CorruptInputError(`${where}: bad record for blob ${info.name}`);
    }
    if (info.size > MAX_BLOB) throw new CorruptInputError(`${where}: blob ${info.name} too large`);
    let bytes: Buffer;
    if (r.enc === Encoding.blob) {
      if (r.payload.length !== info.size) throw new CorruptInputError(`${where}: blob ${info.name} has the wrong size`);
      bytes = r.payload;
    } else {
      const same = samePlace(ctx, info);
      if (!same || same.kind !== 'blob') throw new CorruptInputError(`${where}: blob delta for ${info.name} without a base blob`);
      bytes = decompressWithDict(r.payload, same.blob, info.size, where);
    }
    putData(Op.blob, r.target, 0, bytes, at);
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
      row(Op.zero, r.target, r.chunk, count, 0, 0, 0, 0, at);
      return;
    case Encoding.baseRef: {
      const b = ctx.base[r.srcTarget];
      if (!b || b.kind === 'blob') throw new CorruptInputError(`${where}: reference to unknown base target ${r.srcTarget}`);
      const last = count - 1;
      if (r.srcChunk + count > chunkCount(b.size) || chunkLength(b.size, r.srcChunk + last) !== chunkLength(info.size, r.chunk + last)) {
        throw new CorruptInputError(`${where}: base reference ${b.name}#${r.srcChunk}+${count} has the wrong length or range`);
      }
      row(Op.baseRef, r.target, r.chunk, count, r.srcTarget, r.srcChunk, 0, 0, at);
      return;
    }
    case Encoding.selfRef: {
      const s = ctx.targets[r.srcTarget];
      const last = count - 1;
      if (!s || s.kind === 'blob' || r.srcChunk + count > chunkCount(s.size) ||
        chunkLength(s.size, r.srcChunk + last) !== chunkLength(info.size, r.chunk + last)) {
        throw new CorruptInputError(`${where}: reference to an invalid earlier chunk`);
      }
      row(Op.selfRef, r.target, r.chunk, count, r.srcTarget, r.srcChunk, 0, 0, at);
      return;
    }
    case Encoding.shiftRef:
    case Encoding.shiftDelta: {
      if (r.from === ShiftFrom.base) {
        const b = ctx.base[r.srcTarget];
        if (!b || b.kind === 'blob' || r.srcOffset + len > b.size) {
          throw new CorruptInputError(`${where}: shifted reference outside the base`);
        }
        const src = await readBase(b, r.srcOffset, len, where);
        const bytes = r.enc === Encoding.shiftRef ? src : decompressWithDict(r.payload, src, len, where);
        putData(Op.data, r.target, r.chunk, bytes, at);
        return;
      }
      const s = ctx.targets[r.srcTarget];
      if (r.from !== ShiftFrom.self || !s || s.kind === 'blob' || r.srcOffset + len > s.size) {
        throw new CorruptInputError(`${where}: shifted reference outside the rebuilt targets`);
      }
      const p = r.enc === Encoding.shiftRef ? -1 : payloads.put(r.payload);
      row(Op.shiftSelf, r.target, r.chunk, 1, r.srcTarget, r.srcOffset, p, r.enc === Encoding.shiftRef ? 0 : r.payload.length, at);
      return;
    }
    case Encoding.raw:
      if (r.payload.length !== len) throw new CorruptInputError(`${where}: raw chunk of ${r.payload.length} bytes, expected ${len}`);
      putData(Op.data, r.target, r.chunk, r.payload, at);
      return;
    case Encoding.xor:
    case Encoding.xdelta3:
    case Encoding.zstdDict: {
      const same = samePlace(ctx, info);
      const baseLen = same && same.kind !== 'blob' ? chunkLength(same.size, r.chunk) : 0;
      if (!same || baseLen === 0) throw new CorruptInputError(`${where}: delta record for ${info.name}#${r.chunk} has no base chunk`);
      const base = await readBase(same, r.chunk * CHUNK_SIZE, baseLen, where);
      putData(Op.data, r.target, r.chunk, decodeDelta(r.enc, r.payload, base, len, where), at);
      return;
    }
  }
}
