/**
 * Worker threads for create: they propose batches of chunks (hashes, literals, shifted copies in
 * the base) and compress segments, while the main thread decides each chunk in order and writes
 * the overlay. The result does not depend on the number of threads: the same functions run
 * inline with `threads: 1`.
 */
import { fileURLToPath } from 'node:url';
import type { Piscina as PiscinaPool } from 'piscina';
import type { AnchorIndex } from '../delta/anchors.js';
import type { Proposer } from '../delta/diff.js';
import type { HashIndex } from '../delta/hash-index.js';
import type { LadderOptions } from '../delta/ladder.js';
import type { SharedHashes } from '../delta/shared-hashes.js';
import type { SegmentCompressor } from '../overlay/writer.js';
import type { BaseSourceSpec } from '../targets/base-sources.js';
import { deserializeError } from '../util/errors.js';
import type { CreateAnswer, CreateTask, CreateWorkerData } from './create-worker.js';

/** The ArrayBuffer of a view that owns all of it (else the view is copied). */
function ownBuffer(v: Uint8Array): ArrayBuffer {
  if (v.byteOffset !== 0 || v.buffer.byteLength !== v.byteLength || !(v.buffer instanceof ArrayBuffer)) {
    throw new Error('create pool: a batch buffer must own its memory');
  }
  return v.buffer;
}

export interface CreatePool {
  propose: Proposer;
  compress: SegmentCompressor;
  close(): Promise<void>;
}

export async function createPool(
  threads: number,
  base: readonly BaseSourceSpec[],
  baseIndex: HashIndex | undefined,
  baseAnchors: AnchorIndex | undefined,
  known: SharedHashes,
  opt: LadderOptions,
): Promise<CreatePool> {
  const { Piscina } = await import('piscina');
  const workerData: CreateWorkerData = {
    base: [...base],
    baseIndex: baseIndex?.toShared(),
    baseAnchors: baseAnchors?.toShared(),
    known: known.buffer,
    opt: {
      baseRefs: opt.baseRefs,
      selfRefs: opt.selfRefs,
      shifted: opt.shifted,
      zstdDict: opt.zstdDict,
      xor: opt.xor,
      xdelta3: opt.xdelta3,
    },
  };
  const pool: PiscinaPool = new Piscina({
    filename: fileURLToPath(new URL('./create-worker.js', import.meta.url)),
    minThreads: threads,
    maxThreads: threads,
    workerData,
    concurrentTasksPerWorker: 1,
    atomics: 'disabled',
  });
  const run = async (task: CreateTask, transfer: ArrayBuffer[]): Promise<Extract<CreateAnswer, { ok: true }>> => {
    const a = (await pool.run(task, { transferList: transfer })) as CreateAnswer;
    if (!a.ok) throw deserializeError(a.error);
    return a;
  };
  return {
    async propose(input) {
      // The batch goes to the worker and comes back with its proposals (no copy either way).
      const transfer = [input.cust, input.inBase, ...(input.base ? [input.base] : [])].map(ownBuffer);
      const a = await run({ kind: 'propose', input }, transfer);
      if (a.kind !== 'propose') throw new Error('create worker: unexpected answer');
      return a.proposals;
    },
    async compress(raw, level) {
      const copy = new Uint8Array(raw);
      const a = await run({ kind: 'compress', raw: copy, level }, [copy.buffer]);
      if (a.kind !== 'compress') throw new Error('create worker: unexpected answer');
      return Buffer.from(a.frame.buffer, a.frame.byteOffset, a.frame.byteLength);
    },
    close: () => pool.destroy(),
  };
}
