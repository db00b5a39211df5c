/**
 * A decode worker (piscina): opens the base once from the plain description it is started
 * with, then decodes segments (segment-decode.ts) and hands the results back by transfer.
 */
import { move, transferableSymbol, valueSymbol, workerData } from 'piscina';
import { decodeSegment, type DecodeContext, type DecodedSegment, type SegmentInput } from '../delta/segment-decode.js';
import { initXdelta3 } from '../delta/xdelta3.js';
import { openBaseSources, type BaseSourceSpec } from '../targets/base-sources.js';
import { serializeError, type SerializedError } from '../util/errors.js';

export interface DecodeWorkerData {
  base: BaseSourceSpec[];
  targets: DecodeContext['targets'];
}

export interface DecodeTask {
  input: SegmentInput;
  fromRecord: number;
  maxData: number;
}

const data = workerData as DecodeWorkerData;
await initXdelta3();
const opened = await openBaseSources(data.base);
const ctx: DecodeContext = { targets: data.targets, base: opened.targets };

/** What a task answers: the decoded segment, or why not (errors keep their class this way). */
export type DecodeAnswer = { ok: true; segment: DecodedSegment } | { ok: false; error: SerializedError };

export default async function decode(task: DecodeTask): Promise<unknown> {
  let r: DecodedSegment;
  try {
    r = await decodeSegment(task.input, ctx, task.fromRecord, task.maxData);
  } catch (err) {
    const answer: DecodeAnswer = { ok: false, error: serializeError(err) };
    return answer;
  }
  const answer: DecodeAnswer = { ok: true, segment: r };
  // move() marks the object as one piscina transfers (its buffers) rather than clones.
  return move({
    get [transferableSymbol]() {
      return [r.ops.buffer, r.raw.buffer, r.extra.buffer, r.hashes.buffer];
    },
    get [valueSymbol]() {
      return answer;
    },
  });
}
