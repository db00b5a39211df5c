/**
 * The assembler: takes decoded segments (segment-decode.ts) in file order, enforces the rules
 * that span records (order, overlap, references only to what was rebuilt before), resolves
 * references to rebuilt chunks, hands every rebuilt chunk to its target's output and proves
 * every target against the digest the overlay recorded when the target is complete.
 *
 * Each target keeps what its records said as runs — a literal chunk kept in the ChunkStore, a
 * zero run, a run of base chunks — with references resolved to those three when they arrive,
 * so a chain of references costs nothing later and work is bounded by the records and the
 * base's data, not by the sizes a header declares. Format 1 requires a target's records to be
 * one ascending pass and targets in header order (a later target completes the earlier ones);
 * format 2 allows interleaved targets and up to MAX_PASSES ascending passes per target, ended
 * by a target-done mark or the end of the overlay.
 */
import { CHUNK_SIZE, chunkCount, chunkLength, isZero } from './chunk.js';
import type { ChunkStore } from './chunk-store.js';
import { HASH_SIZE, TargetDigest, chunkHash, sha256Hex } from './hash.js';
import { Op, ROW, type DecodedSegment } from './segment-decode.js';
import { eligible, findSamePlace, type BaseChunkedTarget, type BaseTarget, type TargetInfo } from './target.js';
import { decompressWithDict } from './zstd.js';
import { CorruptInputError, HashMismatchError, UnsupportedError } from '../util/errors.js';

/** Where one rebuilt target goes. */
export interface AssemblyOutput {
  /** True: every chunk of the target, once (unchanged ones when the target completes). */
  readonly everyChunk: boolean;
  /** True: chunks must come in ascending order (a streaming disk writer). */
  readonly ordered: boolean;
  /** `data` null: the chunk is all zero. `data` is only valid during the call. */
  put(chunk: number, data: Buffer | null): Promise<void>;
  finish(): Promise<void>;
}

export interface AssembleOptions {
  /** Format 2 rules: interleaved targets, several passes per target, target-done marks. */
  passes: boolean;
  store: ChunkStore;
  /** Called once per target when it is complete and proven. */
  onTargetDone?: (target: number) => void | Promise<void>;
  /**
   * From a trusted index: per target, the last segment with records for it (-1: none). A
   * target is then completed right after that segment, which early start waits for.
   */
  lastSegment?: readonly number[];
}

export interface AssembleResult {
  /** Blob targets by name. */
  blobs: Map<string, Buffer>;
  /** Chunks covered by records, per target name. */
  changedChunks: { [name: string]: number };
}

export const MAX_PASSES = 16;
/** Chunks handed out between two yields to the event loop (a zero run does no I/O at all). */
const YIELD_EVERY = 1 << 14;

/** Lets timers and signal handlers run (SIGINT must work during a long run of zero chunks). */
function yieldToLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

const R_DATA = 0;
const R_ZERO = 1;
const R_BASE = 2;

/** Disjoint ascending runs of one pass over a target. */
class RunList {
  first = new Float64Array(64);
  count = new Float64Array(64);
  kind = new Uint8Array(64);
  /** DATA: store location; BASE: base target. */
  a = new Float64Array(64);
  /** DATA: hash index; BASE: base chunk. */
  b = new Float64Array(64);
  n = 0;

  get end(): number {
    return this.n === 0 ? 0 : this.first[this.n - 1]! + this.count[this.n - 1]!;
  }

  push(first: number, count: number, kind: number, a: number, b: number): void {
    const i = this.n - 1;
    if (
      i >= 0 &&
      this.kind[i] === kind &&
      kind !== R_DATA &&
      this.first[i]! + this.count[i]! === first &&
      (kind === R_ZERO || (this.a[i] === a && this.b[i]! + this.count[i]! === b))
    ) {
      this.count[i] = this.count[i]! + count;
      return;
    }
    if (this.n === this.first.length) this.grow();
    this.first[this.n] = first;
    this.count[this.n] = count;
    this.kind[this.n] = kind;
    this.a[this.n] = a;
    this.b[this.n] = b;
    this.n++;
  }

  /** Index of the run holding chunk c, or -1. */
  find(c: number): number {
    const i = this.lowerBound(c + 1) - 1;
    return i >= 0 && this.first[i]! + this.count[i]! > c ? i : -1;
  }

  /** First run whose first chunk is ≥ c. */
  lowerBound(c: number): number {
    let lo = 0;
    let hi = this.n;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.first[mid]! < c) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** True when some run intersects [c, end). */
  overlaps(c: number, end: number): boolean {
    const i = this.lowerBound(c + 1) - 1;
    if (i >= 0 && this.first[i]! + this.count[i]! > c) return true;
    const j = this.lowerBound(c);
    return j < this.n && this.first[j]! < end;
  }

  private grow(): void {
    const g = <T extends Float64Array | Uint8Array>(x: T, make: (n: number) => T): T => {
      const y = make(x.length * 2);
      y.set(x);
      return y;
    };
    this.first = g(this.first, (n) => new Float64Array(n));
    this.count = g(this.count, (n) => new Float64Array(n));
    this.kind = g(this.kind, (n) => new Uint8Array(n));
    this.a = g(this.a, (n) => new Float64Array(n));
    this.b = g(this.b, (n) => new Float64Array(n));
  }
}

interface ChunkedState {
  kind: 'chunked';
  info: TargetInfo;
  n: number;
  same: BaseChunkedTarget | undefined;
  sameIndex: number;
  passes: RunList[];
  /** End of the last record (format 1: chunks below it without a record are unchanged). */
  cursor: number;
  output: AssemblyOutput | undefined;
  changed: number;
  done: boolean;
}

interface BlobState {
  kind: 'blob';
  info: TargetInfo;
  blob: Buffer | undefined;
  done: boolean;
}

type State = ChunkedState | BlobState;

function asBuffer(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

/** A stretch of a target with one meaning: a kept chunk, zeros, base chunks, or no record yet. */
interface Piece {
  kind: typeof R_DATA | typeof R_ZERO | typeof R_BASE | 'gap';
  len: number;
  a: number;
  b: number;
}

export class Assembler {
  private readonly states: State[];
  /** Format 1: the target records currently go to. */
  private current = 0;
  private hashes = Buffer.allocUnsafe(HASH_SIZE * 4096);
  private hashCount = 0;
  private readonly scratch = Buffer.allocUnsafe(CHUNK_SIZE * 256);
  private readonly one = Buffer.allocUnsafe(CHUNK_SIZE);
  private steps = 0;

  constructor(
    private readonly base: readonly BaseTarget[],
    targets: readonly TargetInfo[],
    private readonly opts: AssembleOptions,
  ) {
    this.states = targets.map((info): State => {
      if (info.kind === 'blob') return { kind: 'blob', info, blob: undefined, done: false };
      const sameIndex = findSamePlace(base, info);
      const same = sameIndex >= 0 ? base[sameIndex] : undefined;
      return {
        kind: 'chunked',
        info,
        n: chunkCount(info.size),
        same: same && same.kind !== 'blob' ? same : undefined,
        sameIndex: same && same.kind !== 'blob' ? sameIndex : -1,
        passes: [new RunList()],
        cursor: 0,
        output: undefined,
        changed: 0,
        done: false,
      };
    });
  }

  /**
   * Where each target goes (by target index; undefined: only proven). Given after construction
   * so that outputs can ask for blobs (the stream pieces) as the assembler rebuilds them.
   */
  attach(outputs: ReadonlyArray<AssemblyOutput | undefined>): void {
    outputs.forEach((output, i) => {
      const st = this.states[i];
      if (!output || !st || st.kind === 'blob') return;
      if (output.ordered && output.everyChunk)
        throw new UnsupportedError(`output for ${st.info.name}: ordered outputs cannot take every chunk`);
      st.output = output;
    });
  }

  /** The blob target `name`, once its record was assembled. */
  blob(name: string): Buffer {
    const st = this.states.find((s): s is BlobState => s.kind === 'blob' && s.info.name === name);
    if (!st?.blob) throw new CorruptInputError(`overlay has no ${name} before the records that need it`);
    return st.blob;
  }

  isDone(target: number): boolean {
    return this.states[target]?.done ?? false;
  }

  /**
   * Chunk `c` of chunked target `t` as rebuilt so far, into out[0, its length): true when its
   * content is settled (a record for it was assembled, or no record can come any more), false
   * when it may still change. For serving a disk while its overlay is still arriving.
   */
  async readRebuilt(t: number, c: number, out: Buffer): Promise<boolean> {
    const s = this.states[t];
    if (!s || s.kind === 'blob' || c >= s.n) throw new RangeError(`readRebuilt: no chunk ${t}#${c}`);
    const len = chunkLength(s.info.size, c);
    const buf = out.subarray(0, len);
    const pc = this.piece(s, c, 1);
    if (pc.kind === R_DATA) await this.opts.store.read(pc.a, len, buf);
    else if (pc.kind === R_BASE) await (this.base[pc.a] as BaseChunkedTarget).source.read(pc.b * CHUNK_SIZE, len, buf);
    else if (pc.kind === R_ZERO) buf.fill(0);
    else {
      if (!(s.done || (!this.opts.passes && t === this.current && c < s.cursor))) return false;
      if (s.same && eligible(s.same, s.info.size, c)) await s.same.source.read(c * CHUNK_SIZE, len, buf);
      else buf.fill(0);
    }
    return true;
  }

  /** Applies one decoded segment (or slice of one); segments must come in file order. */
  async add(seg: DecodedSegment): Promise<void> {
    await this.addOps(seg);
    const last = this.opts.lastSegment;
    if (!last || seg.nextRecord < seg.records) return;
    // The index says no later segment has records for these targets: they are complete now,
    // not only when a record of a later target (or the end) arrives.
    for (let t = 0; t < this.states.length; t++) {
      if (!this.states[t]!.done && (last[t] ?? Infinity) <= seg.segment) await this.complete(t);
    }
  }

  private async addOps(seg: DecodedSegment): Promise<void> {
    const ops = seg.ops;
    const bufs = [asBuffer(seg.raw), asBuffer(seg.extra)] as const;
    const hashes = asBuffer(seg.hashes);
    // The segment's decoded bytes are kept whole (adopted, not copied) on first use.
    const kept: Array<number | undefined> = [undefined, undefined];
    const keep = async (which: number): Promise<number> => (kept[which] ??= await this.opts.store.adopt(bufs[which]!));
    for (let i = 0; i < seg.opCount; i++) {
      const r = i * ROW;
      const op = ops[r]!;
      const t = ops[r + 1]!;
      const chunk = ops[r + 2]!;
      const count = ops[r + 3]!;
      const a = ops[r + 4]!;
      const b = ops[r + 5]!;
      const c = ops[r + 6]!;
      const d = ops[r + 7]!;
      const where = `segment ${seg.segment} offset ${ops[r + 8]!}`;
      const st = await this.enter(t, chunk, count, where);
      if (st.kind === 'blob') {
        if (op !== Op.blob) throw new CorruptInputError(`${where}: chunk record for blob ${st.info.name}`);
        st.blob = Buffer.from(bufs[d]!.subarray(a, a + b));
        await this.complete(t);
        continue;
      }
      st.changed += count;
      switch (op) {
        case Op.data: {
          const bytes = bufs[d]!.subarray(a, a + b);
          const loc = (await keep(d)) + a;
          st.passes[st.passes.length - 1]!.push(
            chunk,
            1,
            R_DATA,
            loc,
            this.keepHash(hashes.subarray(c * HASH_SIZE, (c + 1) * HASH_SIZE)),
          );
          await st.output?.put(chunk, bytes);
          break;
        }
        case Op.zero:
          st.passes[st.passes.length - 1]!.push(chunk, count, R_ZERO, 0, 0);
          await this.emitZero(st, chunk, count);
          break;
        case Op.baseRef:
          st.passes[st.passes.length - 1]!.push(chunk, count, R_BASE, b, c);
          await this.emitBase(st, chunk, count, b, c, a >= 0 ? bufs[1].subarray(a, a + count * CHUNK_SIZE) : undefined);
          break;
        case Op.selfRef:
          await this.selfRef(st, chunk, count, a, b, where);
          break;
        case Op.shiftSelf: {
          const len = chunkLength(st.info.size, chunk);
          if (a === t && b + len > chunk * CHUNK_SIZE) {
            throw new CorruptInputError(`${where}: shifted reference to bytes not rebuilt before it`);
          }
          const src = await this.bytesOf(a, b, len, where);
          const bytes = c < 0 ? src : decompressWithDict(bufs[0].subarray(c, c + d), src, len, where);
          if (isZero(bytes)) {
            st.passes[st.passes.length - 1]!.push(chunk, 1, R_ZERO, 0, 0);
            await this.emitZero(st, chunk, 1);
          } else {
            const loc = await this.opts.store.adopt(bytes);
            st.passes[st.passes.length - 1]!.push(chunk, 1, R_DATA, loc, this.keepHash(chunkHash(bytes)));
            await st.output?.put(chunk, bytes);
          }
          break;
        }
        default:
          throw new CorruptInputError(`${where}: unknown op ${op}`);
      }
    }
  }

  /** Completes a target (format 2's target-done mark). */
  async targetDone(t: number, where: string): Promise<void> {
    const st = this.states[t];
    if (!st) throw new CorruptInputError(`${where}: target-done mark for unknown target ${t}`);
    if (st.done) throw new CorruptInputError(`${where}: ${st.info.name} marked done twice`);
    await this.complete(t);
  }

  /** Completes every target and proves each; the overlay is fully applied. */
  async finish(): Promise<AssembleResult> {
    for (let t = 0; t < this.states.length; t++) if (!this.states[t]!.done) await this.complete(t);
    const blobs = new Map<string, Buffer>();
    const changedChunks: { [name: string]: number } = {};
    for (const st of this.states) {
      if (st.kind === 'blob') {
        blobs.set(st.info.name, st.blob!);
        changedChunks[st.info.name] = 1;
      } else changedChunks[st.info.name] = st.changed;
    }
    return { blobs, changedChunks };
  }

  /** Checks a record's place (order, overlap) and returns its target's state. */
  private async enter(t: number, chunk: number, count: number, where: string): Promise<State> {
    const st = this.states[t];
    if (!st) throw new CorruptInputError(`${where}: record for unknown target ${t}`);
    if (st.done) throw new CorruptInputError(`${where}: record for ${st.info.name}, which is already complete`);
    if (!this.opts.passes) {
      if (t < this.current) throw new CorruptInputError(`${where}: records out of target order`);
      while (this.current < t) {
        if (!this.states[this.current]!.done) await this.complete(this.current);
        this.current++;
      }
    }
    if (st.kind === 'blob') return st;
    if (chunk < st.cursor) {
      if (!this.opts.passes)
        throw new CorruptInputError(`${where}: ${st.info.name} chunk ${chunk}+${count} out of order`);
      if (st.output?.ordered) {
        throw new UnsupportedError(`${where}: ${st.info.name} records are not in order, which this output cannot take`);
      }
      if (st.passes.some((p) => p.overlaps(chunk, chunk + count))) {
        throw new CorruptInputError(`${where}: ${st.info.name} chunk ${chunk}+${count} has a record already`);
      }
      if (st.passes.length >= MAX_PASSES)
        throw new CorruptInputError(`${where}: ${st.info.name} has more than ${MAX_PASSES} passes`);
      st.passes.push(new RunList());
    } else if (st.passes.length > 1 && st.passes.slice(0, -1).some((p) => p.overlaps(chunk, chunk + count))) {
      throw new CorruptInputError(`${where}: ${st.info.name} chunk ${chunk}+${count} has a record already`);
    }
    st.cursor = chunk + count;
    return st;
  }

  private keepHash(h: Uint8Array): number {
    if ((this.hashCount + 1) * HASH_SIZE > this.hashes.length) {
      const g = Buffer.allocUnsafe(this.hashes.length * 2);
      this.hashes.copy(g, 0, 0, this.hashCount * HASH_SIZE);
      this.hashes = g;
    }
    this.hashes.set(h, this.hashCount * HASH_SIZE);
    return this.hashCount++;
  }

  private hashAt(i: number): Buffer {
    return this.hashes.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE);
  }

  /** Zero chunks to the output: every one for everyChunk outputs, else only where the base had data. */
  private async emitZero(st: ChunkedState, first: number, count: number): Promise<void> {
    const out = st.output;
    if (!out) return;
    if (out.everyChunk) {
      for (let c = first; c < first + count; c++) {
        await out.put(c, null);
        if (++this.steps >= YIELD_EVERY) {
          this.steps = 0;
          await yieldToLoop();
        }
      }
      return;
    }
    const map = st.same?.map;
    if (!map) return;
    for (let p = map.lowerBound(first); p < map.count && map.indexes[p]! < first + count; p++) {
      const c = map.indexes[p]!;
      if (eligible(st.same, st.info.size, c)) await out.put(c, null);
    }
  }

  /**
   * Base chunks [bc, bc+count) of base target bt as chunks [first, …) of the output; `bytes`,
   * when given, holds them already (read on a worker), else they are read here.
   */
  private async emitBase(
    st: ChunkedState,
    first: number,
    count: number,
    bt: number,
    bc: number,
    bytes?: Buffer,
  ): Promise<void> {
    const out = st.output;
    if (!out) return;
    const b = this.base[bt] as BaseChunkedTarget;
    const map = b.map;
    let p = map.lowerBound(bc);
    for (let k = 0; k < count;) {
      // Zero chunks of the base run: no read.
      if (p >= map.count || map.indexes[p]! > bc + k) {
        const upto = p < map.count ? Math.min(count, map.indexes[p]! - bc) : count;
        for (; k < upto; k++) await out.put(first + k, null);
        continue;
      }
      // A stretch of consecutive non-zero base chunks: one read (or none).
      let m = 1;
      while (k + m < count && m < 256 && p + m < map.count && map.indexes[p + m] === bc + k + m) m++;
      let from: Buffer = this.scratch;
      let at = 0;
      if (bytes) {
        from = bytes;
        at = k * CHUNK_SIZE;
      } else {
        await b.source.read((bc + k) * CHUNK_SIZE, Math.min(m * CHUNK_SIZE, b.size - (bc + k) * CHUNK_SIZE), from);
      }
      for (let j = 0; j < m; j++) {
        const clen = chunkLength(st.info.size, first + k + j);
        await out.put(first + k + j, from.subarray(at + j * CHUNK_SIZE, at + j * CHUNK_SIZE + clen));
      }
      k += m;
      p += m;
    }
  }

  /** The stretch of target t from chunk c with one meaning, at most `max` chunks long. */
  private piece(s: ChunkedState, c: number, max: number): Piece {
    let gapEnd = c + max;
    for (const p of s.passes) {
      const i = p.find(c);
      if (i >= 0) {
        const off = c - p.first[i]!;
        const kind = p.kind[i] as Piece['kind'];
        const len = Math.min(max, p.count[i]! - off);
        if (kind === R_BASE) return { kind, len, a: p.a[i]!, b: p.b[i]! + off };
        if (kind === R_DATA) return { kind, len: 1, a: p.a[i]!, b: p.b[i]! };
        return { kind, len, a: 0, b: 0 };
      }
      const j = p.lowerBound(c);
      if (j < p.n) gapEnd = Math.min(gapEnd, p.first[j]!);
    }
    return { kind: 'gap', len: gapEnd - c, a: 0, b: 0 };
  }

  /** A gap of target s (no record) may be read only where its content is settled. */
  private checkGap(s: ChunkedState, index: number, c: number, where: string): void {
    const settled = s.done || (!this.opts.passes && index === this.current && c < s.cursor);
    if (!settled)
      throw new CorruptInputError(`${where}: reference to ${s.info.name}#${c}, which is not rebuilt before it`);
  }

  private async selfRef(
    st: ChunkedState,
    first: number,
    count: number,
    srcTarget: number,
    srcChunk: number,
    where: string,
  ): Promise<void> {
    const s = this.states[srcTarget];
    if (!s || s.kind === 'blob') throw new CorruptInputError(`${where}: reference to an invalid earlier chunk`);
    if (s === st && srcChunk + count > first)
      throw new CorruptInputError(`${where}: reference to a chunk not rebuilt before it`);
    const pass = () => st.passes[st.passes.length - 1]!;
    for (let k = 0; k < count;) {
      const pc = this.piece(s, srcChunk + k, count - k);
      const at = first + k;
      switch (pc.kind) {
        case R_DATA: {
          pass().push(at, 1, R_DATA, pc.a, pc.b);
          if (st.output) {
            const len = chunkLength(st.info.size, at);
            await this.opts.store.read(pc.a, len, this.one);
            await st.output.put(at, this.one.subarray(0, len));
          }
          break;
        }
        case R_ZERO:
          pass().push(at, pc.len, R_ZERO, 0, 0);
          await this.emitZero(st, at, pc.len);
          break;
        case R_BASE:
          pass().push(at, pc.len, R_BASE, pc.a, pc.b);
          await this.emitBase(st, at, pc.len, pc.a, pc.b);
          break;
        case 'gap': {
          this.checkGap(s, srcTarget, srcChunk + k, where);
          // Unchanged chunks of the source: its base chunks where eligible, else zero.
          for (let j = 0; j < pc.len; j++) {
            const sc = srcChunk + k + j;
            if (s.same && eligible(s.same, s.info.size, sc)) {
              pass().push(at + j, 1, R_BASE, s.sameIndex, sc);
              await this.emitBase(st, at + j, 1, s.sameIndex, sc);
            } else {
              pass().push(at + j, 1, R_ZERO, 0, 0);
              await this.emitZero(st, at + j, 1);
            }
          }
          break;
        }
      }
      k += pc.len;
    }
  }

  /** `len` bytes of rebuilt target t from byte `offset` (for SHIFT_* from rebuilt targets). */
  private async bytesOf(t: number, offset: number, len: number, where: string): Promise<Buffer> {
    const s = this.states[t];
    if (!s || s.kind === 'blob' || offset + len > s.info.size)
      throw new CorruptInputError(`${where}: shifted reference outside the rebuilt targets`);
    const out = Buffer.alloc(len);
    const first = Math.floor(offset / CHUNK_SIZE);
    const last = Math.floor((offset + len - 1) / CHUNK_SIZE);
    for (let c = first; c <= last; c++) {
      const clen = chunkLength(s.info.size, c);
      const pc = this.piece(s, c, 1);
      const buf = this.one.subarray(0, clen);
      if (pc.kind === R_DATA) await this.opts.store.read(pc.a, clen, buf);
      else if (pc.kind === R_BASE)
        await (this.base[pc.a] as BaseChunkedTarget).source.read(pc.b * CHUNK_SIZE, clen, buf);
      else if (pc.kind === 'gap') {
        this.checkGap(s, t, c, where);
        if (s.same && eligible(s.same, s.info.size, c)) await s.same.source.read(c * CHUNK_SIZE, clen, buf);
        else buf.fill(0);
      } else buf.fill(0);
      const from = Math.max(offset, c * CHUNK_SIZE);
      const to = Math.min(offset + len, c * CHUNK_SIZE + clen);
      buf.copy(out, from - offset, from - c * CHUNK_SIZE, to - c * CHUNK_SIZE);
    }
    return out;
  }

  /** Sends a complete target's unchanged chunks where wanted, proves its digest, finishes its output. */
  private async complete(t: number): Promise<void> {
    const st = this.states[t]!;
    if (st.done) return;
    st.done = true;
    if (st.kind === 'blob') {
      if (!st.blob) throw new CorruptInputError(`overlay has no record for ${st.info.name}`);
      if (sha256Hex(st.blob) !== st.info.digest) {
        throw new HashMismatchError(`${st.info.name}: rebuilt bytes do not match the overlay's checksum`, {
          target: st.info.name,
        });
      }
      await this.opts.onTargetDone?.(t);
      return;
    }
    const runs = this.sortedRuns(st);
    if (st.output?.everyChunk) await this.emitGaps(st, runs);
    const got = this.digestOf(st, runs);
    if (got !== st.info.digest) {
      throw new HashMismatchError(
        `${st.info.name}: rebuilt ${st.info.kind} does not match the overlay's checksum (wrong or damaged base?)`,
        { target: st.info.name, expected: st.info.digest, actual: got },
      );
    }
    await st.output?.finish();
    await this.opts.onTargetDone?.(t);
  }

  /** Every run of every pass, ascending (they are disjoint). */
  private sortedRuns(st: ChunkedState): Array<{ p: RunList; i: number }> {
    const all: Array<{ p: RunList; i: number }> = [];
    for (const p of st.passes) for (let i = 0; i < p.n; i++) all.push({ p, i });
    if (st.passes.length > 1) all.sort((x, y) => x.p.first[x.i]! - y.p.first[y.i]!);
    return all;
  }

  private async emitGaps(st: ChunkedState, runs: Array<{ p: RunList; i: number }>): Promise<void> {
    const out = st.output!;
    let c = 0;
    const gap = async (end: number): Promise<void> => {
      while (c < end) {
        if (st.same && eligible(st.same, st.info.size, c)) {
          // Unchanged chunks: runs of base chunks read in one go by emitBase.
          let m = 1;
          while (c + m < end && m < 256 && eligible(st.same, st.info.size, c + m)) m++;
          await this.emitBase(st, c, m, st.sameIndex, c);
          c += m;
          this.steps += m;
        } else {
          await out.put(c, null);
          c++;
          this.steps++;
        }
        if (this.steps >= YIELD_EVERY) {
          this.steps = 0;
          await yieldToLoop();
        }
      }
    };
    for (const { p, i } of runs) {
      await gap(p.first[i]!);
      c = p.first[i]! + p.count[i]!;
    }
    await gap(st.n);
  }

  private digestOf(st: ChunkedState, runs: Array<{ p: RunList; i: number }>): string {
    const d = new TargetDigest(st.info.size);
    const sameMap = st.same?.map;
    let pos = 0;
    const gap = (from: number, end: number): void => {
      if (!sameMap) return;
      for (let p = sameMap.lowerBound(from); p < sameMap.count && sameMap.indexes[p]! < end; p++) {
        const c = sameMap.indexes[p]!;
        if (eligible(st.same, st.info.size, c)) d.add(c, sameMap.hashAt(p));
      }
    };
    for (const { p, i } of runs) {
      const first = p.first[i]!;
      const count = p.count[i]!;
      gap(pos, first);
      const kind = p.kind[i];
      if (kind === R_DATA) d.add(first, this.hashAt(p.b[i]!));
      else if (kind === R_BASE) {
        const map = (this.base[p.a[i]!] as BaseChunkedTarget).map;
        const bc = p.b[i]!;
        for (let q = map.lowerBound(bc); q < map.count && map.indexes[q]! < bc + count; q++)
          d.add(first + map.indexes[q]! - bc, map.hashAt(q));
      }
      pos = first + count;
    }
    gap(pos, st.n);
    return d.finish();
  }
}
