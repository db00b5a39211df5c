/**
 * Writes an overlay file front to back: the header first (with placeholder digests, index hash
 * and signature of the same length, patched in place at the end), then segments of ~1 MiB of
 * records, each its own zstd frame, then the index and the footer. With a signing key the final
 * header is signed (signature.ts). The file appears atomically on finish().
 */
import { createHash } from 'node:crypto';
import { AtomicFile } from '../util/atomic.js';
import { compress as compressSync } from '../delta/zstd.js';
import { encodedLength, recordCount, writeRecord, type ChunkRecord, type RecordSink } from '../delta/record.js';
import type { DiffStats } from '../delta/stats.js';
import type { TargetInfo } from '../delta/target.js';
import type { SigningKey } from '../util/sign.js';
import { ZERO_SHA256, signHeader, signatureDraft } from './signature.js';
import {
  FOOTER_MAGIC,
  FOOTER_SIZE,
  HEADER_FIXED,
  INDEX_MAGIC,
  MAGIC,
  SEGMENT_MAGIC,
  SEGMENT_TARGET,
  VERSION_MAJOR,
  VERSION_MINOR,
  encodeFrameHeader,
  type OverlayHeader,
  type OverlayIndex,
  type SegmentEntry,
} from './format.js';

const PLACEHOLDER = '0'.repeat(64);

/** Compresses one segment's records (zstd at `level`): inline, or on a worker thread. */
export type SegmentCompressor = (raw: Buffer, level: number) => Promise<Buffer>;

export interface WriterOptions {
  /** Default: zstd on this thread. */
  compress?: SegmentCompressor;
  /** Segments compressing ahead of the one being written (default 0: one at a time). */
  depth?: number;
  /** Sign the header (format 1.1 signature, overlay/signature.ts). */
  sign?: SigningKey;
  /** Replace an existing file (default: refused, BusyError). */
  force?: boolean;
}

/** A closed segment waiting for its frame. */
interface Queued {
  rawLength: number;
  records: number;
  covers: Array<[number, number, number]>;
  frame: Promise<Buffer>;
}

export class OverlayWriter implements RecordSink {
  private buf = Buffer.alloc(SEGMENT_TARGET + 64 * 1024);
  private fill = 0;
  /** Whether the records in buf are disk records (see push). */
  private fillIsDisk = false;
  private records = 0;
  private covers: Array<[number, number, number]> = [];
  private pos: number;
  private readonly segments: SegmentEntry[] = [];
  private failed = false;
  private readonly queue: Queued[] = [];

  private constructor(
    private readonly file: AtomicFile,
    private readonly header: OverlayHeader,
    private readonly headerLength: number,
    private readonly level: number,
    private readonly opts: WriterOptions,
  ) {
    this.pos = headerLength;
  }

  /**
   * Creates the file (under a temp name) and writes the header with placeholder digests (and,
   * with `sign`, a placeholder signature). Without `force` an existing file is refused now and
   * again at commit (BusyError).
   */
  static async create(path: string, header: OverlayHeader, opts: WriterOptions = {}): Promise<OverlayWriter> {
    const file = await AtomicFile.create(path, { force: opts.force ?? false });
    try {
      const draft: OverlayHeader = {
        ...header,
        version: [VERSION_MAJOR, VERSION_MINOR],
        targets: header.targets.map((t) => ({ ...t, digest: PLACEHOLDER })),
        index_sha256: ZERO_SHA256,
      };
      if (opts.sign) draft.signature = signatureDraft(opts.sign);
      else delete draft.signature;
      const bytes = headerBytes(draft);
      await file.handle.write(bytes, 0, bytes.length, 0);
      return new OverlayWriter(file, draft, bytes.length, header.compression.level, opts);
    } catch (err) {
      await file.abort();
      throw err;
    }
  }

  async push(r: ChunkRecord): Promise<void> {
    this.guard();
    const n = encodedLength(r);
    // A segment holds disk records or memory records, never both: a stream can then prove the
    // memory (and an early-started VM run) as soon as its last segment arrived.
    const disk = this.header.targets[r.target]?.kind === 'disk';
    if (this.fill > 0 && disk !== this.fillIsDisk) await this.flushSegment();
    this.fillIsDisk = disk;
    if (this.fill + n > this.buf.length) {
      if (this.fill > 0) await this.flushSegment();
      if (n > this.buf.length) this.buf = Buffer.alloc(n);
    }
    writeRecord(this.buf, this.fill, r);
    this.fill += n;
    this.records++;
    const last = this.covers[this.covers.length - 1];
    const end = r.chunk + recordCount(r);
    if (last && last[0] === r.target && last[2] <= r.chunk) last[2] = end;
    else this.covers.push([r.target, r.chunk, end]);
    if (this.fill >= SEGMENT_TARGET) await this.flushSegment();
  }

  /** Bytes written so far (header + segments), and records not yet compressed. */
  get bytesWritten(): number {
    return this.pos + this.fill;
  }

  /** Writes the last segment, the index and footer, patches the digests in; commits the file. */
  async finish(targets: readonly TargetInfo[], stats: DiffStats): Promise<{ size: number; header: OverlayHeader }> {
    this.guard();
    try {
      if (this.fill > 0) await this.flushSegment();
      while (this.queue.length > 0) await this.writeOldest();
      const finalHeader: OverlayHeader = {
        ...this.header,
        targets: this.header.targets.map((t, i) => {
          const info = targets[i];
          if (!info || info.name !== t.name || info.kind !== t.kind || info.size !== t.size) {
            throw new Error(`overlay writer: diff result does not match header target ${t.name}`);
          }
          return { ...t, digest: info.digest };
        }),
      };
      const index: OverlayIndex = { segments: this.segments, stats };
      const raw = Buffer.from(JSON.stringify(index), 'utf8');
      const frame = compressSync(raw, 19);
      const sha = createHash('sha256').update(frame).digest();
      const indexHead = encodeFrameHeader(INDEX_MAGIC, frame, raw.length, 0, sha);
      finalHeader.index_sha256 = createHash('sha256').update(indexHead).update(frame).digest('hex');

      let json: Buffer = Buffer.from(JSON.stringify(finalHeader), 'utf8');
      if (this.opts.sign) json = signHeader(json, this.opts.sign);
      const hb = headerBytesFromJson(json);
      if (hb.length !== this.headerLength) throw new Error('overlay writer: header changed length');
      await this.file.handle.write(hb, 0, hb.length, 0);

      const indexOffset = this.pos;
      await this.append(indexHead);
      await this.append(frame);

      const footer = Buffer.alloc(FOOTER_SIZE);
      FOOTER_MAGIC.copy(footer, 0);
      footer.writeBigUInt64LE(BigInt(indexOffset), 8);
      footer.writeBigUInt64LE(BigInt(this.pos - indexOffset), 16);
      footer.writeUInt32LE(this.segments.length, 24);
      footer.writeUInt16LE(VERSION_MAJOR, 28);
      footer.writeUInt16LE(VERSION_MINOR, 30);
      createHash('sha256').update(hb).digest().copy(footer, 32);
      await this.append(footer);
      await this.file.commit();
      const signature = this.opts.sign ? (JSON.parse(json.toString('utf8')) as OverlayHeader).signature : undefined;
      return { size: this.pos, header: signature ? { ...finalHeader, signature } : finalHeader };
    } catch (err) {
      this.failed = true;
      await this.file.abort();
      throw err;
    }
  }

  async abort(): Promise<void> {
    this.failed = true;
    await this.file.abort();
  }

  private guard(): void {
    // After a write error the file is in an unknown state: refuse to go on (restic does too).
    if (this.failed) throw new Error('overlay writer: used after a failure');
  }

  /** Closes the current segment: its frame compresses (maybe on a worker) while records go on. */
  private async flushSegment(): Promise<void> {
    const raw = Buffer.from(this.buf.subarray(0, this.fill));
    const compress = this.opts.compress ?? ((r: Buffer, level: number) => Promise.resolve(compressSync(r, level)));
    const frame = compress(raw, this.level);
    frame.catch(() => undefined); // awaited in order by writeOldest()
    this.queue.push({ rawLength: raw.length, records: this.records, covers: this.covers, frame });
    this.fill = 0;
    this.records = 0;
    this.covers = [];
    while (this.queue.length > (this.opts.depth ?? 0)) await this.writeOldest();
  }

  /** Writes the oldest closed segment once its frame is ready; segments keep their order. */
  private async writeOldest(): Promise<void> {
    const q = this.queue.shift()!;
    try {
      const frame = await q.frame;
      const sha = createHash('sha256').update(frame).digest();
      this.segments.push({
        offset: this.pos,
        length: frame.length,
        rawLength: q.rawLength,
        records: q.records,
        sha256: sha.toString('hex'),
        covers: q.covers,
      });
      await this.append(encodeFrameHeader(SEGMENT_MAGIC, frame, q.rawLength, q.records, sha));
      await this.append(frame);
    } catch (err) {
      this.failed = true;
      throw err;
    }
  }

  private async append(b: Buffer): Promise<void> {
    await this.file.handle.write(b, 0, b.length, this.pos);
    this.pos += b.length;
  }
}

export function headerBytes(header: OverlayHeader): Buffer {
  return headerBytesFromJson(Buffer.from(JSON.stringify(header), 'utf8'));
}

/** The stored header around its JSON: magic, version, length, the JSON, its checksum. */
export function headerBytesFromJson(json: Buffer): Buffer {
  const out = Buffer.alloc(HEADER_FIXED + json.length + 32);
  MAGIC.copy(out, 0);
  out.writeUInt16LE(VERSION_MAJOR, 8);
  out.writeUInt16LE(VERSION_MINOR, 10);
  out.writeUInt32LE(json.length, 12);
  json.copy(out, HEADER_FIXED);
  createHash('sha256')
    .update(out.subarray(0, HEADER_FIXED + json.length))
    .digest()
    .copy(out, HEADER_FIXED + json.length);
  return out;
}
