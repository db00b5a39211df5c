/** info and verify: what an overlay holds, who signed it, and whether it is intact (no base needed). */
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { OverlayReader } from '../overlay/reader.js';
import type { OverlayHeader, OverlayIndex } from '../overlay/format.js';
import { checkHeaderSignature, type SignatureStatus } from '../overlay/signature.js';
import type { TrustedKey } from '../util/sign.js';
import { RecordChecker } from '../delta/check.js';
import { CloudletError } from '../util/errors.js';
import { ByteReader } from '../delta/varint.js';
import { readRecord } from '../delta/record.js';
import { silent, type Progress } from '../util/progress.js';

export interface InfoResult {
  message_type: 'info';
  path: string;
  size: number;
  format_version: string;
  created_at: string;
  creator: string;
  base_id: string;
  base_targets: OverlayHeader['base']['targets'];
  targets: Array<OverlayHeader['targets'][number] & { changed_chunks?: number; data_chunks?: number }>;
  memory?: OverlayHeader['memory'];
  compression: OverlayHeader['compression'];
  segments: number;
  encodings: OverlayIndex['stats']['encodings'];
  /** Overlay bytes / bytes of the customized targets. */
  ratio: number;
  /** Who signed it, and whether a trusted key verifies it (info never refuses). */
  signature: SignatureStatus;
}

export async function overlayInfo(path: string, trust: readonly TrustedKey[] = []): Promise<InfoResult> {
  const r = await OverlayReader.open(path);
  try {
    const h = r.header;
    const stats = r.index.stats;
    const total = h.targets.reduce((n, t) => n + t.size, 0);
    return {
      message_type: 'info',
      path,
      size: r.fileSize,
      format_version: h.version.join('.'),
      created_at: h.createdAt,
      creator: h.creator,
      base_id: h.base.id,
      base_targets: h.base.targets,
      targets: h.targets.map((t) => ({
        ...t,
        changed_chunks: stats.targets?.[t.name]?.changedChunks,
        data_chunks: stats.targets?.[t.name]?.dataChunks,
      })),
      memory: h.memory,
      compression: h.compression,
      segments: r.index.segments.length,
      encodings: stats.encodings ?? {},
      ratio: total > 0 ? r.fileSize / total : 0,
      signature: checkHeaderSignature(r.headerJson, h, trust),
    };
  } finally {
    await r.close();
  }
}

export interface VerifyProblem {
  segment?: number;
  message: string;
}

export interface VerifyResult {
  message_type: 'verify';
  path: string;
  ok: boolean;
  segments: number;
  records: number;
  /** The first MAX_PROBLEMS problems found. */
  problems: VerifyProblem[];
  /** Problems found beyond those listed. */
  problems_omitted: number;
  signature: SignatureStatus;
}

/** Problems `verify` lists; a crafted overlay can hold millions, the count says how many more. */
export const MAX_PROBLEMS = 100;
/** Records checked between two yields to the event loop (so SIGINT and SIGTERM are handled). */
const YIELD_EVERY = 1 << 16;

/** A list that keeps its first `max` entries and counts the rest. */
class Capped<T> {
  readonly items: T[] = [];
  omitted = 0;
  constructor(private readonly max: number) {}
  push(item: T): void {
    if (this.items.length < this.max) this.items.push(item);
    else this.omitted++;
  }
  get total(): number {
    return this.items.length + this.omitted;
  }
}

/**
 * Checks every segment's checksum and every record's structure; keeps going past errors. With
 * trusted keys the signature must verify (refused on open otherwise).
 */
export async function verifyOverlay(
  path: string,
  progress: Progress = silent,
  opts: { trust?: readonly TrustedKey[] } = {},
): Promise<VerifyResult> {
  const r = await OverlayReader.open(path, { trust: opts.trust }); // header, footer, index, signature
  const problems = new Capped<VerifyProblem>(MAX_PROBLEMS);
  let records = 0;
  try {
    const checker = new RecordChecker(r.header.targets, r.header.base.targets);
    progress.step('verifying overlay', r.fileSize);
    for (let n = 0; n < r.index.segments.length; n++) {
      progress.advance(r.index.segments[n]!.length);
      try {
        const seg = await r.get(n);
        const rd = new ByteReader(seg, `segment ${n}`);
        let count = 0;
        while (rd.remaining > 0) {
          const rec = readRecord(rd);
          count++;
          const bad = checker.check(rec);
          if (bad) problems.push({ segment: n, message: bad });
          if (count % YIELD_EVERY === 0) await yieldToLoop();
        }
        records += count;
        if (count !== r.index.segments[n]!.records) {
          problems.push({
            segment: n,
            message: `holds ${count} records, its header says ${r.index.segments[n]!.records}`,
          });
        }
      } catch (err) {
        if (!(err instanceof CloudletError)) throw err;
        problems.push({ segment: n, message: err.message });
      }
    }
    for (const name of checker.missing()) problems.push({ message: `no record for ${name}` });
    if (problems.total) progress.fail(`${problems.total} problem(s)`);
    else progress.done('overlay verified');
  } finally {
    await r.close();
  }
  return {
    message_type: 'verify',
    path,
    ok: problems.total === 0,
    segments: r.index.segments.length,
    records,
    problems: problems.items,
    problems_omitted: problems.omitted,
    signature: r.signature,
  };
}
