/**
 * The patcher: rebuilds targets from base + records, hands each rebuilt chunk to an output and
 * proves every target against the digest the overlay recorded. It checks every record against
 * what it may refer to (target, chunk ranges, lengths, order) before using it, so a corrupt
 * overlay fails with CorruptInputError rather than writing garbage or allocating wildly.
 * References to chunks rebuilt earlier (SELF_REF) are resolved by decoding their record again
 * from its segment: no output has to support reading back.
 */
import { CHUNK_SIZE, chunkCount, chunkLength, isZero } from './chunk.js';
import { TargetDigest, chunkHash, sha256Hex } from './hash.js';
import { decodeDelta } from './literal.js';
import { Encoding, ShiftFrom, readRecord, recordCount, type ChunkRecord } from './record.js';
import { ByteReader } from './varint.js';
import { decompressWithDict } from './zstd.js';
import { eligible, findSamePlace, type BaseChunkedTarget, type BaseTarget, type TargetInfo } from './target.js';
import { CorruptInputError, HashMismatchError } from '../util/errors.js';

/** Receives the chunks of one rebuilt target in ascending order. */
export interface TargetOutput {
  /** True: put() is called for every chunk, unchanged ones too; false: only for changed ones. */
  readonly wantsAll: boolean;
  /** `data` null means the chunk is all zero. */
  put(index: number, data: Buffer | null): Promise<void>;
  finish(): Promise<void>;
}

/** Decompressed segments by number, for resolving references to earlier records. */
export interface SegmentStore {
  get(segment: number): Promise<Buffer>;
}

export interface PositionedRecord {
  record: ChunkRecord;
  segment: number;
  /** Byte offset of the record in its decompressed segment. */
  offset: number;
}

export interface PatchResult {
  /** Blob targets by name. */
  blobs: Map<string, Buffer>;
  /** Chunks rebuilt from records, per target name. */
  changedChunks: { [name: string]: number };
}

const MAX_BLOB = 256 * 1024 * 1024;
/** Loop iterations between two yields to the event loop. */
const YIELD_EVERY = 1 << 14;

function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
/** Bound on references to references (a corrupt overlay could chain them without end). */
const MAX_DEPTH = 32;

interface CommonState {
  info: TargetInfo;
  n: number;
  /** Next chunk not yet handled. */
  next: number;
  output: TargetOutput | undefined;
  changed: number;
  done: boolean;
}

interface BlobState extends CommonState {
  kind: 'blob';
  /** The base's blob at the same place (the dictionary of BLOB_ZSTD_DICT). */
  sameBlob: Buffer | undefined;
}

interface ChunkedState extends CommonState {
  kind: 'chunked';
  same: BaseChunkedTarget | undefined;
  digest: TargetDigest;
  /** Position in the base's chunk map (of `same`) of the next base chunk to account for. */
  mapPos: number;
  /** Every record of this target so far, as runs [first, end) → location (segment·2³² + offset). */
  runFirst: Float64Array;
  runEnd: Float64Array;
  runLoc: Float64Array;
  runCount: number;
}

type State = BlobState | ChunkedState;

export class Patcher {
  private readonly states: State[];
  private current = 0;
  private readonly blobs = new Map<string, Buffer>();
  /** Read buffer of emitUnchanged (called once per record: allocate it once). */
  private batch: Buffer | undefined;

  constructor(
    private readonly base: readonly BaseTarget[],
    targets: readonly TargetInfo[],
    outputs: ReadonlyArray<TargetOutput | undefined>,
    private readonly segments: SegmentStore,
  ) {
    this.states = targets.map((info, i): State => {
      const same = base[findSamePlace(base, info)];
      const common = { info, next: 0, output: outputs[i], changed: 0, done: false };
      if (info.kind === 'blob') {
        return { ...common, kind: 'blob', n: 1, sameBlob: same?.kind === 'blob' ? same.blob : undefined };
      }
      return {
        ...common,
        kind: 'chunked',
        n: chunkCount(info.size),
        same: same?.kind === 'blob' ? undefined : same,
        digest: new TargetDigest(info.size),
        mapPos: 0,
        runFirst: new Float64Array(64),
        runEnd: new Float64Array(64),
        runLoc: new Float64Array(64),
        runCount: 0,
      };
    });
  }

  async add(at: PositionedRecord): Promise<void> {
    const r = at.record;
    const where = `segment ${at.segment} offset ${at.offset}`;
    const st = this.states[r.target];
    if (!st) throw new CorruptInputError(`${where}: record for unknown target ${r.target}`);
    if (r.target < this.current) throw new CorruptInputError(`${where}: records out of target order`);
    while (this.current < r.target) await this.finishTarget(this.states[this.current++]!);
    const count = recordCount(r);
    if (count < 1 || r.chunk < st.next || r.chunk + count > st.n) {
      throw new CorruptInputError(`${where}: ${st.info.name} chunk ${r.chunk}+${count} out of order or range`);
    }

    if (st.kind === 'blob') {
      this.blobs.set(st.info.name, this.decodeBlob(st, r, where));
      st.next = 1;
      st.changed++;
      return;
    }
    if (r.enc === Encoding.blob || r.enc === Encoding.blobZstdDict) {
      throw new CorruptInputError(`${where}: blob record for chunked target ${st.info.name}`);
    }
    await this.advance(st, r.chunk);
    this.remember(st, r.chunk, count, at);
    for (let k = 0; k < count; k++) {
      const c = r.chunk + k;
      const data = await this.decodeChunk(st, r, k, where, 0);
      st.changed++;
      if (data) st.digest.add(c, chunkHash(data));
      if (st.output) await st.output.put(c, data);
      st.next = c + 1;
    }
    this.skipMap(st, st.next);
  }

  /** A blob target rebuilt so far (blobs come first in an overlay, before any chunk). */
  blob(name: string): Buffer {
    const b = this.blobs.get(name);
    if (!b) throw new CorruptInputError(`overlay has no ${name} before the records that need it`);
    return b;
  }

  /** Finishes every target and proves each against its recorded digest. */
  async finish(): Promise<PatchResult> {
    while (this.current < this.states.length) await this.finishTarget(this.states[this.current++]!);
    const changedChunks: { [name: string]: number } = {};
    for (const st of this.states) changedChunks[st.info.name] = st.changed;
    return { blobs: this.blobs, changedChunks };
  }

  private async finishTarget(st: State): Promise<void> {
    if (st.done) return;
    st.done = true;
    if (st.kind === 'blob') {
      const blob = this.blobs.get(st.info.name);
      if (!blob) throw new CorruptInputError(`overlay has no record for ${st.info.name}`);
      if (sha256Hex(blob) !== st.info.digest) {
        throw new HashMismatchError(`${st.info.name}: rebuilt bytes do not match the overlay's checksum`, {
          target: st.info.name,
        });
      }
    } else {
      await this.advance(st, st.n);
      const got = st.digest.finish();
      if (got !== st.info.digest) {
        throw new HashMismatchError(
          `${st.info.name}: rebuilt ${st.info.kind} does not match the overlay's checksum (wrong or damaged base?)`,
          { target: st.info.name, expected: st.info.digest, actual: got },
        );
      }
    }
    if (st.output) await st.output.finish();
  }

  /** Handles chunks [st.next, end) that have no record: unchanged where eligible, else zero. */
  private async advance(st: ChunkedState, end: number): Promise<void> {
    const map = st.same?.map;
    if (st.output?.wantsAll) {
      await this.emitUnchanged(st, st.output, end);
    } else if (map) {
      while (st.mapPos < map.count && map.indexes[st.mapPos]! < end) {
        const i = map.indexes[st.mapPos]!;
        if (i >= st.next && eligible(st.same, st.info.size, i)) st.digest.add(i, map.hashAt(st.mapPos));
        st.mapPos++;
      }
    }
    st.next = Math.max(st.next, end);
  }

  /** For outputs that want every chunk: reads unchanged base chunks in 1 MiB batches. */
  private async emitUnchanged(st: ChunkedState, output: TargetOutput, end: number): Promise<void> {
    const same = st.same;
    const map = same?.map;
    const buf = (this.batch ??= Buffer.alloc(256 * CHUNK_SIZE));
    let c = st.next;
    let steps = 0;
    while (c < end) {
      // Long runs of zero chunks do no I/O: yield now and then, so signals (SIGINT) are handled.
      if (++steps % YIELD_EVERY === 0) await yieldToEventLoop();
      // Zero run up to the next non-zero eligible base chunk.
      while (map && st.mapPos < map.count && map.indexes[st.mapPos]! < c) st.mapPos++;
      const nextData = map && st.mapPos < map.count ? map.indexes[st.mapPos]! : Infinity;
      if (!same || !map || nextData > c || !eligible(same, st.info.size, c)) {
        await output.put(c, null);
        c++;
        continue;
      }
      // A run of consecutive non-zero base chunks.
      let runEnd = c;
      let p = st.mapPos;
      while (
        runEnd < end &&
        runEnd - c < 256 &&
        p < map.count &&
        map.indexes[p] === runEnd &&
        eligible(same, st.info.size, runEnd)
      ) {
        runEnd++;
        p++;
      }
      const len = Math.min((runEnd - c) * CHUNK_SIZE, st.info.size - c * CHUNK_SIZE);
      await same.source.read(c * CHUNK_SIZE, len, buf);
      for (let i = c; i < runEnd; i++, st.mapPos++) {
        const at = (i - c) * CHUNK_SIZE;
        const data = Buffer.from(buf.subarray(at, at + chunkLength(st.info.size, i)));
        st.digest.add(i, map.hashAt(st.mapPos));
        await output.put(i, data);
      }
      c = runEnd;
    }
  }

  private skipMap(st: ChunkedState, upTo: number): void {
    const map = st.same?.map;
    if (!map) return;
    while (st.mapPos < map.count && map.indexes[st.mapPos]! < upTo) st.mapPos++;
  }

  private async decodeChunk(
    st: ChunkedState,
    r: ChunkRecord,
    k: number,
    where: string,
    depth: number,
  ): Promise<Buffer | null> {
    const c = r.chunk + k;
    const len = chunkLength(st.info.size, c);
    switch (r.enc) {
      case Encoding.zero:
        return null;
      case Encoding.baseRef: {
        const b = this.base[r.srcTarget];
        if (!b || b.kind === 'blob') {
          throw new CorruptInputError(`${where}: reference to unknown base target ${r.srcTarget}`);
        }
        const sc = r.srcChunk + k;
        if (chunkLength(b.size, sc) !== len) {
          throw new CorruptInputError(`${where}: base reference ${b.name}#${sc} has the wrong length`);
        }
        return readChunk(b, sc, len);
      }
      case Encoding.selfRef: {
        const src = this.states[r.srcTarget];
        const sc = r.srcChunk + k;
        if (!src || src.kind === 'blob' || chunkLength(src.info.size, sc) !== len) {
          throw new CorruptInputError(`${where}: reference to an invalid earlier chunk`);
        }
        const data = await this.rebuiltChunk(src, sc, where, depth + 1);
        return isZero(data) ? null : data;
      }
      case Encoding.shiftRef:
      case Encoding.shiftDelta: {
        const src = await this.shiftSource(r, len, where, depth);
        const data = r.enc === Encoding.shiftRef ? src : decompressWithDict(r.payload, src, len, where);
        return isZero(data) ? null : data;
      }
      default:
        return this.decodeLiteral(st, r, c, where);
    }
  }

  /** The bytes a SHIFT_* record copies or uses as dictionary. */
  private async shiftSource(
    r: Extract<ChunkRecord, { from: number }>,
    len: number,
    where: string,
    depth: number,
  ): Promise<Buffer> {
    if (r.from === ShiftFrom.base) {
      const b = this.base[r.srcTarget];
      if (!b || b.kind === 'blob' || r.srcOffset + len > b.size) {
        throw new CorruptInputError(`${where}: shifted reference outside the base`);
      }
      const buf = Buffer.alloc(len);
      await b.source.read(r.srcOffset, len, buf);
      return buf;
    }
    const src = this.states[r.srcTarget];
    if (r.from !== ShiftFrom.self || !src || src.kind === 'blob' || r.srcOffset + len > src.info.size) {
      throw new CorruptInputError(`${where}: shifted reference outside the rebuilt targets`);
    }
    const out = Buffer.alloc(len);
    const first = Math.floor(r.srcOffset / CHUNK_SIZE);
    const last = Math.floor((r.srcOffset + len - 1) / CHUNK_SIZE);
    for (let c = first; c <= last; c++) {
      const data = await this.rebuiltChunk(src, c, where, depth + 1);
      const from = Math.max(r.srcOffset, c * CHUNK_SIZE);
      const to = Math.min(r.srcOffset + len, c * CHUNK_SIZE + data.length);
      data.copy(out, from - r.srcOffset, from - c * CHUNK_SIZE, to - c * CHUNK_SIZE);
    }
    return out;
  }

  /**
   * Chunk `c` of a target as rebuilt so far: its record decoded again from its segment, else
   * the base's chunk or zeros. Only chunks already rebuilt may be asked for.
   */
  private async rebuiltChunk(st: ChunkedState, c: number, where: string, depth: number): Promise<Buffer> {
    if (depth > MAX_DEPTH) throw new CorruptInputError(`${where}: references nest deeper than ${MAX_DEPTH}`);
    const index = this.states.indexOf(st);
    if (index > this.current || (index === this.current && c >= st.next) || c >= st.n) {
      throw new CorruptInputError(`${where}: reference to ${st.info.name}#${c}, which is not rebuilt before it`);
    }
    const len = chunkLength(st.info.size, c);
    const run = this.findRun(st, c);
    if (run >= 0) {
      const loc = st.runLoc[run]!;
      const segment = Math.floor(loc / 2 ** 32);
      const offset = loc % 2 ** 32;
      const rd = new ByteReader(await this.segments.get(segment), `segment ${segment}`);
      rd.pos = offset;
      const rec = readRecord(rd);
      if (rec.target !== index || rec.chunk !== st.runFirst[run])
        throw new CorruptInputError(`segment ${segment} offset ${offset}: record moved`);
      const data = await this.decodeChunk(st, rec, c - rec.chunk, `segment ${segment} offset ${offset}`, depth);
      return data ?? Buffer.alloc(len);
    }
    if (st.same && eligible(st.same, st.info.size, c)) return readChunk(st.same, c, len);
    return Buffer.alloc(len);
  }

  private async decodeLiteral(st: ChunkedState, r: ChunkRecord, c: number, where: string): Promise<Buffer | null> {
    const len = chunkLength(st.info.size, c);
    if (!('payload' in r) || r.chunk !== c)
      throw new CorruptInputError(`${where}: not a literal record for chunk ${c}`);
    let data: Buffer;
    if (r.enc === Encoding.raw) {
      if (r.payload.length !== len)
        throw new CorruptInputError(`${where}: raw chunk of ${r.payload.length} bytes, expected ${len}`);
      data = Buffer.from(r.payload);
    } else if (r.enc === Encoding.xor || r.enc === Encoding.xdelta3 || r.enc === Encoding.zstdDict) {
      const same = st.same;
      const baseLen = same ? chunkLength(same.size, c) : 0;
      if (!same || baseLen === 0) {
        throw new CorruptInputError(`${where}: delta record for ${st.info.name}#${c} has no base chunk`);
      }
      data = decodeDelta(r.enc, r.payload, await readChunk(same, c, baseLen), len, where);
    } else {
      throw new CorruptInputError(`${where}: blob record for a chunked target`);
    }
    return isZero(data) ? null : data;
  }

  private decodeBlob(st: BlobState, r: ChunkRecord, where: string): Buffer {
    if (r.chunk !== 0 || !('payload' in r))
      throw new CorruptInputError(`${where}: bad record for blob ${st.info.name}`);
    if (st.info.size > MAX_BLOB) throw new CorruptInputError(`${where}: blob ${st.info.name} too large`);
    if (r.enc === Encoding.blob) {
      if (r.payload.length !== st.info.size)
        throw new CorruptInputError(`${where}: blob ${st.info.name} has the wrong size`);
      return Buffer.from(r.payload);
    }
    if (r.enc === Encoding.blobZstdDict) {
      const baseBlob = st.sameBlob;
      if (!baseBlob) throw new CorruptInputError(`${where}: blob delta for ${st.info.name} without a base blob`);
      return decompressWithDict(r.payload, baseBlob, st.info.size, where);
    }
    throw new CorruptInputError(`${where}: chunk record for blob ${st.info.name}`);
  }

  private remember(st: ChunkedState, first: number, count: number, at: PositionedRecord): void {
    if (st.runCount === st.runFirst.length) {
      const grow = (a: Float64Array): Float64Array => {
        const g = new Float64Array(a.length * 2);
        g.set(a);
        return g;
      };
      st.runFirst = grow(st.runFirst);
      st.runEnd = grow(st.runEnd);
      st.runLoc = grow(st.runLoc);
    }
    st.runFirst[st.runCount] = first;
    st.runEnd[st.runCount] = first + count;
    st.runLoc[st.runCount] = at.segment * 2 ** 32 + at.offset;
    st.runCount++;
  }

  /** The run holding chunk c, or -1 (runs are ascending and disjoint). */
  private findRun(st: ChunkedState, c: number): number {
    let lo = 0;
    let hi = st.runCount - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (st.runEnd[mid]! <= c) lo = mid + 1;
      else if (st.runFirst[mid]! > c) hi = mid - 1;
      else return mid;
    }
    return -1;
  }
}

async function readChunk(b: BaseChunkedTarget, index: number, len: number): Promise<Buffer> {
  const buf = Buffer.alloc(len);
  await b.source.read(index * CHUNK_SIZE, len, buf);
  return buf;
}
