/** info and verify: what an overlay holds, and whether it is intact (no base needed). */
import { OverlayReader } from '../overlay/reader.js';
import type { OverlayHeader, OverlayIndex } from '../overlay/format.js';
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
}

export async function overlayInfo(path: string): Promise<InfoResult> {
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
  problems: VerifyProblem[];
}

/** Checks every segment's checksum and every record's structure; keeps going past errors. */
export async function verifyOverlay(path: string, progress: Progress = silent): Promise<VerifyResult> {
  const r = await OverlayReader.open(path); // header, footer and index problems throw here
  const problems: VerifyProblem[] = [];
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
    if (problems.length) progress.fail(`${problems.length} problem(s)`);
    else progress.done('overlay verified');
  } finally {
    await r.close();
  }
  return {
    message_type: 'verify',
    path,
    ok: problems.length === 0,
    segments: r.index.segments.length,
    records,
    problems,
  };
}
