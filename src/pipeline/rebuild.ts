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
import type { DecodeTask, DecodeWorkerData } from './decode-worker.js';

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
  /** Called as segments are assembled: bytes of the overlay consumed so far. */
  onBytes?: (n: number) => void;
}

export interface RebuildResult extends AssembleResult {
  trailer: OverlayTrailer;
  segments: number;
}

/** Decodes segments: on a piscina pool or inline. */
interface Decoder {
  decode(task: DecodeTask): Promise<DecodedSegment>;
  close(): Promise<void>;
}

export function defaultThreads(): number {
  return availableParallelism();
}

async function makeDecoder(threads: number, header: OverlayHeader, baseSources: readonly BaseSourceSpec[]): Promise<Decoder> {
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
  });
  return {
    decode: (task) => pool.run(task, { transferList: [task.input.frame.buffer as ArrayBuffer] }) as Promise<DecodedSegment>,
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
  });
  assembler.attach(opts.outputs((name) => assembler.blob(name)));
  const inflight = Math.max(2, threads * 2);
  const queue: Array<{ seg: StreamedSegment; result: Promise<DecodedSegment> }> = [];
  let segments = 0;
  const consume = async (): Promise<void> => {
    const { seg, result } = queue.shift()!;
    let decoded = await result;
    await assembler.add(decoded);
    // A segment that expanded beyond MAX_DATA: the rest of it before any later segment.
    while (decoded.nextRecord < decoded.records) {
      decoded = await decoder.decode(taskOf(seg, decoded.nextRecord));
      await assembler.add(decoded);
    }
    segments++;
    opts.onBytes?.(seg.compLength);
  };
  try {
    for await (const seg of opts.reader.segments()) {
      const result = decoder.decode(taskOf(seg));
      // Rejections are handled when consumed, in order; do not let them surface earlier.
      result.catch(() => undefined);
      queue.push({ seg, result });
      while (queue.length >= inflight) await consume();
    }
    while (queue.length > 0) await consume();
    const trailer = opts.reader.trailer;
    const done = await assembler.finish();
    return { ...done, trailer, segments };
  } finally {
    await decoder.close();
  }
}

/** The assembler's blob lookup for outputs that need the stream pieces early. */
export type BlobLookup = (name: string) => Buffer;
