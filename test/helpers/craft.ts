/**
 * Hand-made overlay files for hostile-input tests, the fuzz corpus and scripts/fuzz.ts: any
 * header JSON (sizes and counts it declares need not be true) and any raw segment contents,
 * framed and checksummed like the writer does, so a reader gets past the checksums and meets
 * the lie itself.
 */
import { createHash } from 'node:crypto';
import { compress } from '../../src/delta/zstd.js';
import { FOOTER_MAGIC, FOOTER_SIZE, INDEX_MAGIC, SEGMENT_MAGIC, encodeFrameHeader } from '../../src/overlay/format.js';
import { headerBytesFromJson } from '../../src/overlay/writer.js';

export interface CraftOptions {
  /** The header as JSON (index_sha256 is filled in unless `noIndexHash`). */
  header: Record<string, unknown>;
  /**
   * Or the header's JSON bytes as they are (any text, valid or not); an `"index_sha256":"<64
   * hex>"` in it gets the real value.
   */
  headerJson?: Buffer;
  /** Raw (uncompressed) record bytes of each segment, and the record count its header claims. */
  segments: Array<{ raw: Buffer; records: number }>;
  noIndexHash?: boolean;
}

const sha = (b: Buffer): Buffer => createHash('sha256').update(b).digest();

export function craftOverlay(o: CraftOptions): Buffer {
  const frames = o.segments.map((s) => ({ frame: compress(s.raw, 3), ...s }));
  const placeholder = { ...o.header, ...(o.noIndexHash ? {} : { index_sha256: '0'.repeat(64) }) };
  const headerLen = o.headerJson
    ? headerBytesFromJson(o.headerJson).length
    : headerBytesFromJson(Buffer.from(JSON.stringify(placeholder))).length;
  let pos = headerLen;
  const entries = frames.map((f) => {
    const e = {
      offset: pos,
      length: f.frame.length,
      rawLength: f.raw.length,
      records: f.records,
      sha256: sha(f.frame).toString('hex'),
      covers: [],
    };
    pos += 48 + f.frame.length;
    return e;
  });
  const rawIndex = Buffer.from(JSON.stringify({ segments: entries, stats: {} }));
  const indexFrame = compress(rawIndex, 3);
  const indexHead = encodeFrameHeader(INDEX_MAGIC, indexFrame, rawIndex.length, 0, sha(indexFrame));
  const indexSha = sha(Buffer.concat([indexHead, indexFrame])).toString('hex');
  const header = o.noIndexHash ? o.header : { ...o.header, index_sha256: indexSha };
  let json = Buffer.from(JSON.stringify(header));
  if (o.headerJson) {
    json = Buffer.from(o.headerJson);
    const text = json.toString('latin1');
    const at = text.indexOf('"index_sha256":"');
    if (at >= 0 && /^[0-9a-f]{64}"/.test(text.slice(at + 16, at + 81))) json.write(indexSha, at + 16, 'latin1');
  }
  const hb = headerBytesFromJson(json);
  if (hb.length !== headerLen) throw new Error('craft: header length changed');
  const parts: Buffer[] = [hb];
  for (const f of frames)
    parts.push(encodeFrameHeader(SEGMENT_MAGIC, f.frame, f.raw.length, f.records, sha(f.frame)), f.frame);
  const indexOffset = pos;
  parts.push(indexHead, indexFrame);
  const footer = Buffer.alloc(FOOTER_SIZE);
  FOOTER_MAGIC.copy(footer, 0);
  footer.writeBigUInt64LE(BigInt(indexOffset), 8);
  footer.writeBigUInt64LE(BigInt(48 + indexFrame.length), 16);
  footer.writeUInt32LE(frames.length, 24);
  footer.writeUInt16LE(1, 28);
  footer.writeUInt16LE(1, 30);
  sha(hb).copy(footer, 32);
  parts.push(footer);
  return Buffer.concat(parts);
}

/** A header JSON of the given targets over the given base targets. */
export function headerOf(
  baseId: string,
  baseTargets: Array<{ name: string; kind: string; size: number; digest: string }>,
  targets: Array<{ name: string; kind: string; size: number; digest?: string }>,
  extra: Record<string, unknown> = {},
): Record<string, unknown> {
  return {
    format: 'cloudlet-overlay',
    version: [1, 1],
    createdAt: '2026-01-01T00:00:00.000Z',
    creator: 'crafted',
    chunkSize: 4096,
    base: { id: baseId, targets: baseTargets },
    targets: targets.map((t) => ({ digest: '0'.repeat(64), ...t })),
    compression: { codec: 'zstd', level: 3 },
    ...extra,
  };
}
