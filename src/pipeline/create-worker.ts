/**
 * A create worker (piscina): opens the base once from the plain description it is started with
 * (its hash index and content anchors arrive in shared memory), then proposes batches of chunks
 * (delta/propose.ts) and compresses segments for the main thread, which keeps the order.
 */
import { move, transferableSymbol, valueSymbol, workerData } from 'piscina';
import { AnchorIndex, type SharedAnchors } from '../delta/anchors.js';
import { HashIndex, type SharedIndex } from '../delta/hash-index.js';
import type { LadderOptions } from '../delta/ladder.js';
import { SharedHashes } from '../delta/shared-hashes.js';
import { proposeBatch, type ProposeContext, type ProposeInput, type Proposals } from '../delta/propose.js';
import { initXdelta3 } from '../delta/xdelta3.js';
import { compress } from '../delta/zstd.js';
import { openBaseSources, type BaseSourceSpec } from '../targets/base-sources.js';
import { serializeError, type SerializedError } from '../util/errors.js';

export interface CreateWorkerData {
  base: BaseSourceSpec[];
  baseIndex: SharedIndex | undefined;
  baseAnchors: SharedAnchors | undefined;
  /** The main thread's literal hashes (SharedHashes.buffer). */
  known: SharedArrayBuffer;
  opt: LadderOptions;
}

export type CreateTask =
  { kind: 'propose'; input: ProposeInput } | { kind: 'compress'; raw: Uint8Array; level: number };

export type CreateAnswer =
  | { ok: true; kind: 'propose'; proposals: Proposals }
  | { ok: true; kind: 'compress'; frame: Uint8Array }
  | { ok: false; error: SerializedError };

const data = workerData as CreateWorkerData;
await initXdelta3();
const opened = await openBaseSources(data.base);
const ctx: ProposeContext = {
  opt: data.opt,
  known: new SharedHashes(0, data.known),
  baseIndex: data.baseIndex ? HashIndex.fromShared(data.baseIndex) : undefined,
  baseAnchors: data.baseAnchors ? AnchorIndex.fromShared(data.baseAnchors) : undefined,
  baseSources: opened.targets.map((t) => (t.kind === 'blob' ? undefined : t)),
};

export default async function run(task: CreateTask): Promise<unknown> {
  let answer: CreateAnswer;
  let transfer: ArrayBufferLike[];
  try {
    if (task.kind === 'propose') {
      const p = await proposeBatch(task.input, ctx);
      answer = { ok: true, kind: 'propose', proposals: p };
      transfer = [p.cust.buffer, p.chunks.buffer, p.anchors.buffer, p.hashes.buffer, p.payloads.buffer];
    } else {
      const f = compress(task.raw, task.level);
      const frame = new Uint8Array(f.length);
      frame.set(f);
      answer = { ok: true, kind: 'compress', frame };
      transfer = [frame.buffer];
    }
  } catch (err) {
    return { ok: false, error: serializeError(err) } satisfies CreateAnswer;
  }
  return move({
    get [transferableSymbol]() {
      return transfer;
    },
    get [valueSymbol]() {
      return answer;
    },
  });
}
