/**
 * The rebuild pipeline: overlay segments as they arrive (OverlayStreamReader) → decoded on
 * worker threads (decode-worker.ts, piscina; several segments in flight) → assembled in file
 * order on this thread (delta/assemble.ts), which feeds the outputs and proves every target.
 * With `threads: 0` segments are decoded on this thread (small jobs, no worker start-up).
 *
 * Memory stays bounded: at most `inflight` compressed segments plus their decoded results at
 * a time, whatever the overlay's size; the source is not read ahead further (backpressure).
 */
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import type { Piscina as PiscinaPool } from 'piscina';
import { Assembler, type AssembleResult, type AssemblyOutput } from '../delta/assemble.js';
import type { ChunkStore } from '../delta/chunk-store.js';
import { decodeSegment, type DecodeContext, type DecodedSegment, type SegmentInput } from '../delta/segment-decode.js';
import type { BaseTarget } from '../delta/target.js';
import { initXdelta3 } from '../delta/xdelta3.js';
import type { OverlayHeader } from '../overlay/format.js';
import type { OverlayStreamReader, OverlayTrailer, StreamedSegment } from '../overlay/stream-reader.js';
import type { Progress } from '../util/progress.js';
import { openBaseSources, type BaseSourceSpec } from '../targets/base-sources.js';
import type { DecodeAnswer, DecodeTask, DecodeWorkerData } from './decode-worker.js';
import { deserializeError } from '../util/errors.js';

/** Decoded bytes per worker call; a segment that expands further is decoded in slices. */
const MAX_DATA = 64 << 20;

export interface RebuildOptions {
  reader: OverlayStreamReader;
  header: OverlayHeader;
  /** The base as the assembler sees it (maps, sources) and as workers open it. */
  base: readonly BaseTarget[];
  baseSources: readonly BaseSourceSpec[];
  /** The outputs per target; `blob` gives blob targets already assembled (the stream pieces). */
  outputs: (blob: BlobLookup) => ReadonlyArray<AssemblyOutput | undefined>;
  store: ChunkStore;
  /** Decode threads; 0 decodes on this thread. Default: every core. */
  threads?: number;
  progress?: Progress;
  onTargetDone?: (target: number) => void | Promise<void>;
  /** From a trusted index (early start): complete each target right after its last segment. */
  lastSegment?: readonly number[];
  /** Told the assembler as soon as it exists (early start reads rebuilt chunks from it). */
  onAssembler?: (assembler: Assembler) => void;
  /** Called as segments are assembled: bytes of the overlay consumed so far. */
  onBytes?: (n: number) => void;
}

export interface RebuildResult extends AssembleResult {
  trailer: OverlayTrailer;
  segments: number;
  stats: RebuildStats;
}

/** Where the pipeline's time went (milliseconds; JSON names). */
export interface RebuildStats {
  segments: number;
  threads: number;
  /** Start → first segment decoded (includes worker start-up). */
  first_segment_ms: number;
  /** Waiting for decoded segments (the workers were the bottleneck). */
  decode_wait_ms: number;
  /** Assembling on this thread, outputs included (a QEMU loading slowly shows here). */
  assemble_ms: number;
  /** Waiting for overlay bytes (the source — a network link — was the bottleneck). */
  read_wait_ms: number;
  /** Decoding, summed over the workers. */
  decode_ms: number;
}

/** Decodes segments: on a piscina pool or inline. */
interface Decoder {
  decode(task: DecodeTask): Promise<DecodedSegment>;
  close(): Promise<void>;
}

export function defaultThreads(): number {
  return availableParallelism();
}

async function makeDecoder(
  threads: number,
  header: OverlayHeader,
  baseSources: readonly BaseSourceSpec[],
): Promise<Decoder> {
  const targets = header.targets.map((t) => ({ name: t.name, kind: t.kind, size: t.size }));
  if (threads <= 0) {
    await initXdelta3();
    const opened = await openBaseSources(baseSources);
    const ctx: DecodeContext = { targets, base: opened.targets };
    return {
      decode: (t) => decodeSegment(t.input, ctx, t.fromRecord, t.maxData),
      close: () => opened.close(),
    };
  }
  const { Piscina } = await import('piscina');
  const workerData: DecodeWorkerData = { base: [...baseSources], targets };
  const pool: PiscinaPool = new Piscina({
    filename: fileURLToPath(new URL('./decode-worker.js', import.meta.url)),
    minThreads: threads,
    maxThreads: threads,
    workerData,
    // One task per thread at a time: the order of results matters, queueing here gains nothing.
    concurrentTasksPerWorker: 1,
    // Workers sleep on their message port between tasks instead of spinning on Atomics.wait.
    atomics: 'disabled',
  });
  return {
    decode: (task) => {
      const p = pool.run(task, { transferList: [task.input.frame.buffer as ArrayBuffer] }) as Promise<DecodeAnswer>;
      return p.then((a) => {
        if (!a.ok) throw deserializeError(a.error);
        return a.segment;
      });
    },
    close: () => pool.destroy(),
  };
}

/** Copies a streamed segment into a buffer of its own (it is transferred to a worker). */
function taskOf(seg: StreamedSegment, fromRecord = 0): DecodeTask {
  const frame = new Uint8Array(seg.frame.length);
  frame.set(seg.frame);
  const input: SegmentInput = {
    segment: seg.index,
    frame,
    rawLength: seg.rawLength,
    records: seg.records,
    sha256: new Uint8Array(seg.sha256),
  };
  return { input, fromRecord, maxData: MAX_DATA };
}

export async function rebuild(opts: RebuildOptions): Promise<RebuildResult> {
  const threads = opts.threads ?? defaultThreads();
  const decoder = await makeDecoder(threads, opts.header, opts.baseSources);
  const assembler = new Assembler(opts.base, opts.header.targets, {
    passes: opts.header.version[0] >= 2,
    store: opts.store,
    onTargetDone: opts.onTargetDone,
    lastSegment: opts.lastSegment,
  });
  assembler.attach(opts.outputs((name) => assembler.blob(name)));
  opts.onAssembler?.(assembler);
  const inflight = Math.max(2, threads * 2);
  let segments = 0;
  const waits = { decode: 0, assemble: 0, read: 0, first: 0, worker: 0 };
  const tStart = performance.now();
  const consume = async (seg: StreamedSegment, result: Promise<DecodedSegment>): Promise<void> => {
    const w0 = performance.now();
    let decoded = await result;
    const w1 = performance.now();
    if (segments === 0) waits.first = w1 - tStart;
    waits.worker += decoded.decodeMs;
    await assembler.add(decoded);
    waits.decode += w1 - w0;
    waits.assemble += performance.now() - w1;
    // A segment that expanded beyond MAX_DATA: the rest of it before any later segment.
    while (decoded.nextRecord < decoded.records) {
      decoded = await decoder.decode(taskOf(seg, decoded.nextRecord));
      await assembler.add(decoded);
    }
    segments++;
    opts.onBytes?.(seg.compLength);
  };
  // Segments are assembled in order as soon as each is decoded, while later ones are read and
  // decoded (a stream that pauses must not hold back what has arrived: early start waits for
  // it). A failed assembly stops the reading at once, even one waiting for bytes.
  let chain: Promise<void> = Promise.resolve();
  const pending: Array<Promise<void>> = [];
  let failNow!: (err: unknown) => void;
  const failed = new Promise<never>((_, reject) => (failNow = reject));
  failed.catch(() => undefined);
  try {
    const it = opts.reader.segments()[Symbol.asyncIterator]();
    for (;;) {
      const r0 = performance.now();
      const next = it.next();
      next.catch(() => undefined);
      const r = await Promise.race([next, failed]);
      waits.read += performance.now() - r0;
      if (r.done) break;
      const seg = r.value;
      const result = decoder.decode(taskOf(seg));
      // Rejections are handled when consumed, in order; do not let them surface earlier.
      result.catch(() => undefined);
      chain = chain.then(() => consume(seg, result));
      chain.catch(failNow);
      pending.push(chain);
      while (pending.length >= inflight) await Promise.race([pending.shift()!, failed]);
    }
    await chain;
    const trailer = opts.reader.trailer;
    const done = await assembler.finish();
    const ms = (x: number): number => Math.round(x);
    const stats: RebuildStats = {
      segments,
      threads,
      first_segment_ms: ms(waits.first),
      decode_wait_ms: ms(waits.decode),
      assemble_ms: ms(waits.assemble),
      read_wait_ms: ms(waits.read),
      decode_ms: ms(waits.worker),
    };
    return { ...done, trailer, segments, stats };
  } finally {
    // Nothing may still write to the outputs once the caller sees the end (or the error).
    await chain.catch(() => undefined);
    await decoder.close();
  }
}

/** The assembler's blob lookup for outputs that need the stream pieces early. */
export type BlobLookup = (name: string) => Buffer;
