/**
 * The disk of a VM that runs before its overlay has fully arrived ("early start"): served over
 * NBD from this process. A read gets, per chunk: what the assembler already rebuilt; else, when
 * the overlay's index says no record for that chunk is still to come, the base's chunk (or
 * zeros); else the segment that holds its record, fetched now out of turn (a ranged read of the
 * file or URL), checked against the index's sha256, decoded, and the record resolved — through
 * references to memory (complete before the VM runs), to the base, or to other chunks, the same
 * way, recursively. The background stream still rebuilds and proves everything in order; the
 * whole disk's digest is proven when it completes (docs/early-start.md: the trust model).
 */
import type { Assembler } from '../delta/assemble.js';
import { CHUNK_SIZE, chunkLength } from '../delta/chunk.js';
import { Op, ROW, decodeSegment, type DecodeContext, type DecodedSegment } from '../delta/segment-decode.js';
import { eligible, findSamePlace, type BaseChunkedTarget, type BaseTarget } from '../delta/target.js';
import { decompressWithDict } from '../delta/zstd.js';
import type { OverlayReader } from '../overlay/reader.js';
import { CorruptInputError } from '../util/errors.js';

/** Bound on references to references (a corrupt overlay could chain them without end). */
const MAX_DEPTH = 32;
/** Decoded segments kept for further reads. */
const CACHE = 16;

export interface EarlyDiskStats {
  /** Segments fetched out of turn, and their bytes. */
  fetched: number;
  fetchedBytes: number;
  /** Chunks served from the rebuilt state, from a fetched segment, from the base or as zeros. */
  rebuilt: number;
  onDemand: number;
}

export class EarlyDisk {
  readonly readOnly = true;
  readonly size: number;
  readonly stats: EarlyDiskStats = { fetched: 0, fetchedBytes: 0, rebuilt: 0, onDemand: 0 };
  private readonly cache = new Map<number, Promise<DecodedSegment[]>>();

  constructor(
    private readonly asm: Assembler,
    private readonly target: number,
    private readonly random: OverlayReader,
    private readonly ctx: DecodeContext,
    private readonly base: readonly BaseTarget[],
  ) {
    const info = random.header.targets[target];
    if (!info || info.kind !== 'disk') throw new RangeError('EarlyDisk: not a disk target');
    this.size = info.size;
  }

  async read(offset: number, length: number, buf: Buffer): Promise<void> {
    const first = Math.floor(offset / CHUNK_SIZE);
    const last = Math.floor((offset + length - 1) / CHUNK_SIZE);
    const tmp = Buffer.allocUnsafe(CHUNK_SIZE);
    for (let c = first; c <= last; c++) {
      const clen = chunkLength(this.size, c);
      await this.chunk(this.target, c, tmp, 0);
      const from = Math.max(offset, c * CHUNK_SIZE);
      const to = Math.min(offset + length, c * CHUNK_SIZE + clen);
      tmp.copy(buf, from - offset, from - c * CHUNK_SIZE, to - c * CHUNK_SIZE);
    }
  }

  /** Chunk c of target t into out (its length). */
  private async chunk(t: number, c: number, out: Buffer, depth: number): Promise<void> {
    if (depth > MAX_DEPTH) throw new CorruptInputError(`references nest deeper than ${MAX_DEPTH}`);
    if (await this.asm.readRebuilt(t, c, out)) {
      if (depth === 0) this.stats.rebuilt++;
      return;
    }
    const info = this.random.header.targets[t]!;
    const len = chunkLength(info.size, c);
    // An index range is loose (it spans gaps between records): the segments whose ranges hold
    // c are where its one record can be; none of them holding one means there is none.
    for (const seg of this.segmentsFor(t, c)) {
      for (const d of await this.decoded(seg)) {
        for (let i = 0; i < d.opCount; i++) {
          const r = i * ROW;
          const op = d.ops[r]!;
          const chunk = d.ops[r + 2]!;
          const count = d.ops[r + 3]!;
          if (d.ops[r + 1] !== t || c < chunk || c >= chunk + count) continue;
          if (depth === 0) this.stats.onDemand++;
          await this.resolve(d, r, op, c - chunk, len, out, depth);
          return;
        }
      }
    }
    // No record anywhere: the chunk keeps the base's bytes at the same place, or is zero.
    const si = findSamePlace(this.base, info);
    const same = si >= 0 ? this.base[si] : undefined;
    if (same && same.kind !== 'blob' && eligible(same, info.size, c)) {
      await same.source.read(c * CHUNK_SIZE, len, out.subarray(0, len));
    } else out.fill(0, 0, len);
  }

  private async resolve(
    d: DecodedSegment,
    r: number,
    op: number,
    k: number,
    len: number,
    out: Buffer,
    depth: number,
  ): Promise<void> {
    const a = d.ops[r + 4]!;
    const b = d.ops[r + 5]!;
    const c = d.ops[r + 6]!;
    const dd = d.ops[r + 7]!;
    const bufs = [d.raw, d.extra];
    switch (op) {
      case Op.data: {
        const from = bufs[dd]!;
        out.set(from.subarray(a, a + b));
        return;
      }
      case Op.zero:
        out.fill(0, 0, len);
        return;
      case Op.baseRef: {
        if (a >= 0) {
          out.set(d.extra.subarray(a + k * CHUNK_SIZE, a + k * CHUNK_SIZE + len));
          return;
        }
        const bt = this.base[b] as BaseChunkedTarget;
        await bt.source.read((c + k) * CHUNK_SIZE, len, out.subarray(0, len));
        return;
      }
      case Op.selfRef:
        await this.chunk(a, b + k, out, depth + 1);
        return;
      case Op.shiftSelf: {
        const src = await this.bytesOf(a, b, len, depth + 1);
        const bytes =
          c < 0 ? src : decompressWithDict(Buffer.from(d.raw.subarray(c, c + dd)), src, len, 'shifted record');
        out.set(bytes);
        return;
      }
      default:
        throw new CorruptInputError(`unexpected op ${op} for a disk chunk`);
    }
  }

  private async bytesOf(t: number, offset: number, len: number, depth: number): Promise<Buffer> {
    const out = Buffer.alloc(len);
    const size = this.random.header.targets[t]?.size ?? 0;
    if (offset + len > size) throw new CorruptInputError('shifted reference outside the rebuilt targets');
    const first = Math.floor(offset / CHUNK_SIZE);
    const last = Math.floor((offset + len - 1) / CHUNK_SIZE);
    for (let c = first; c <= last; c++) {
      const buf = Buffer.alloc(CHUNK_SIZE);
      await this.chunk(t, c, buf, depth);
      const from = Math.max(offset, c * CHUNK_SIZE);
      const to = Math.min(offset + len, (c + 1) * CHUNK_SIZE);
      buf.copy(out, from - offset, from - c * CHUNK_SIZE, to - c * CHUNK_SIZE);
    }
    return out;
  }

  /** The segments whose index ranges hold chunk c of target t. */
  private segmentsFor(t: number, c: number): number[] {
    const found: number[] = [];
    this.random.index.segments.forEach((seg, i) => {
      if (seg.covers.some(([ct, first, end]) => ct === t && c >= first && c < end)) found.push(i);
    });
    return found;
  }

  /** A segment fetched now and decoded (all its slices), cached. */
  private decoded(n: number): Promise<DecodedSegment[]> {
    let p = this.cache.get(n);
    if (!p) {
      p = (async () => {
        const f = await this.random.frame(n);
        this.stats.fetched++;
        this.stats.fetchedBytes += f.frame.length;
        const input = { segment: n, frame: f.frame, rawLength: f.rawLength, records: f.records, sha256: f.sha256 };
        const parts: DecodedSegment[] = [];
        let from = 0;
        do {
          const d = await decodeSegment(input, this.ctx, from);
          parts.push(d);
          from = d.nextRecord;
        } while (from < input.records);
        return parts;
      })();
      p.catch(() => this.cache.delete(n));
      this.cache.set(n, p);
      if (this.cache.size > CACHE) this.cache.delete(this.cache.keys().next().value!);
    }
    return p;
  }
}
