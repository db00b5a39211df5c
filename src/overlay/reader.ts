/**
 * Random access to an overlay file: validates header, footer and index on open (before anything
 * else happens) and reads any one segment, checking its sha256 before decompressing it. Every
 * length is checked against the file and the format's limits before it is trusted. `info` and
 * `verify` use it, and apply checks a local file with it before streaming it
 * (stream-reader.ts reads overlays front to back).
 */
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { CorruptInputError, NotFoundError, UnsupportedError, check } from '../util/errors.js';
import { decompress } from '../delta/zstd.js';
import {
  FOOTER_MAGIC,
  FOOTER_SIZE,
  FRAME_HEADER,
  HASH_LEN,
  HEADER_FIXED,
  INDEX_MAGIC,
  MAGIC,
  MAX_HEADER_JSON,
  MAX_INDEX_RAW,
  MAX_SEGMENT_RAW,
  SEGMENT_MAGIC,
  VERSION_MAJOR,
  decodeFrameHeader,
  type OverlayHeader,
  type OverlayIndex,
  type SegmentEntry,
} from './format.js';
import { parseHeader, parseIndex } from './validate.js';
import { checkIndexHash, verifyHeaderSignature, type SignatureStatus } from './signature.js';
import type { TrustedKey } from '../util/sign.js';

export interface ReaderOptions {
  /**
   * Trusted keys (util/sign.ts). Non-empty: an unsigned or wrongly signed overlay is refused on
   * open (UntrustedError), before anything else is read.
   */
  trust?: readonly TrustedKey[];
}

/** Random-access bytes of an overlay: a local file, or ranged GETs of a URL. */
export interface RangeSource {
  readonly size: number;
  /** Exactly `length` bytes from `offset` (within size). */
  read(offset: number, length: number): Promise<Buffer>;
  close(): Promise<void>;
}

async function fileRange(path: string): Promise<RangeSource> {
  let fh: FileHandle;
  try {
    // O_NONBLOCK: a FIFO given as an overlay must not block the open.
    fh = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOENT') throw new NotFoundError(`overlay not found: ${path}`, { path });
    throw new NotFoundError(`cannot read overlay ${path}: ${e.message}`, { path });
  }
  const st = await fh.stat();
  if (!st.isFile()) {
    await fh.close();
    if (st.isDirectory()) throw new NotFoundError(`${path} is a directory, not an overlay file`, { path });
    throw new NotFoundError(`${path} is not a regular file`, { path });
  }
  const size = st.size;
  return {
    size,
    async read(offset, length) {
      const buf = Buffer.alloc(length);
      const { bytesRead } = await fh.read(buf, 0, length, offset);
      check(bytesRead === length, `short read at ${offset} (file truncated?)`, { offset });
      return buf;
    },
    close: () => fh.close(),
  };
}

/** A segment's frame as it is stored, with what its index entry says about it. */
export interface SegmentFrame {
  segment: number;
  frame: Buffer;
  rawLength: number;
  records: number;
  /** The index's sha256 of the frame (decodeSegment checks the frame against it). */
  sha256: Buffer;
}

export class OverlayReader {
  private cache = new Map<number, Buffer>();
  private static readonly CACHE_SEGMENTS = 32;

  private constructor(
    readonly path: string,
    private readonly fh: RangeSource,
    readonly fileSize: number,
    readonly header: OverlayHeader,
    readonly headerLength: number,
    readonly index: OverlayIndex,
    readonly indexOffset: number,
    /** What the signature check found (signature.ts). */
    readonly signature: SignatureStatus,
    /** The header JSON exactly as stored. */
    readonly headerJson: Buffer,
  ) {}

  static async open(path: string, opts: ReaderOptions = {}): Promise<OverlayReader> {
    return OverlayReader.fromRange(await fileRange(path), path, opts);
  }

  /** Opens an overlay on any random-access source (it is closed with the reader, or on failure). */
  static async fromRange(src: RangeSource, name: string, opts: ReaderOptions = {}): Promise<OverlayReader> {
    try {
      const size = src.size;
      const { header, json, length: headerLength, hash } = await readHeader(src, size);
      const signature = verifyHeaderSignature(json, header, opts.trust ?? []);
      const { index, offset } = await readTrailer(src, size, headerLength, hash, header);
      return new OverlayReader(name, src, size, header, headerLength, index, offset, signature, json);
    } catch (err) {
      await src.close();
      throw err;
    }
  }

  async close(): Promise<void> {
    this.cache.clear();
    await this.fh.close();
  }

  /** Reads, checks and decompresses segment `n`. */
  async get(n: number): Promise<Buffer> {
    const hit = this.cache.get(n);
    if (hit) {
      this.cache.delete(n);
      this.cache.set(n, hit);
      return hit;
    }
    const seg = this.index.segments[n];
    if (!seg) throw new CorruptInputError(`reference to segment ${n}, which does not exist`);
    const raw = await this.readSegment(n, seg);
    this.cache.set(n, raw);
    if (this.cache.size > OverlayReader.CACHE_SEGMENTS) {
      const oldest = this.cache.keys().next().value;
      if (oldest !== undefined) this.cache.delete(oldest);
    }
    return raw;
  }

  /** Segment `n`'s frame, checked against the index (its checksum is checked by the decoder). */
  async frame(n: number): Promise<SegmentFrame> {
    const seg = this.index.segments[n];
    if (!seg) throw new CorruptInputError(`reference to segment ${n}, which does not exist`);
    const where = `segment ${n}`;
    const head = decodeFrameHeader(await readExact(this.fh, seg.offset, FRAME_HEADER, this.fileSize, where));
    check(head.magic.equals(SEGMENT_MAGIC) && head.compLength === seg.length, `${where}: disagrees with the index`, {
      segment: n,
    });
    const frame = await readExact(this.fh, seg.offset + FRAME_HEADER, seg.length, this.fileSize, where);
    return {
      segment: n,
      frame,
      rawLength: seg.rawLength,
      records: seg.records,
      sha256: Buffer.from(seg.sha256, 'hex'),
    };
  }

  private async readSegment(n: number, seg: SegmentEntry): Promise<Buffer> {
    const where = `segment ${n}`;
    const head = await readExact(this.fh, seg.offset, FRAME_HEADER, this.fileSize, where);
    const fh = decodeFrameHeader(head);
    check(fh.magic.equals(SEGMENT_MAGIC), `${where}: no segment at offset ${seg.offset}`, {
      segment: n,
      offset: seg.offset,
    });
    check(
      fh.compLength === seg.length && fh.rawLength === seg.rawLength && fh.records === seg.records,
      `${where}: header disagrees with the index`,
      { segment: n },
    );
    const frame = await readExact(this.fh, seg.offset + FRAME_HEADER, seg.length, this.fileSize, where);
    const sha = createHash('sha256').update(frame).digest();
    check(
      sha.equals(fh.sha256) && sha.toString('hex') === seg.sha256,
      `${where}: checksum mismatch (damaged overlay)`,
      {
        segment: n,
        offset: seg.offset,
      },
    );
    return decompress(frame, seg.rawLength, where);
  }
}

async function readExact(
  fh: RangeSource,
  offset: number,
  length: number,
  fileSize: number,
  where: string,
): Promise<Buffer> {
  check(
    offset >= 0 && length >= 0 && offset + length <= fileSize,
    `${where}: runs past the end of the file (truncated?)`,
    {
      offset,
    },
  );
  const buf = await fh.read(offset, length);
  check(buf.length === length, `${where}: short read (file truncated?)`, { offset });
  return buf;
}

async function readHeader(
  fh: RangeSource,
  size: number,
): Promise<{ header: OverlayHeader; json: Buffer; length: number; hash: Buffer }> {
  check(size >= HEADER_FIXED, 'not an overlay: file too short');
  const fixed = await readExact(fh, 0, HEADER_FIXED, size, 'header');
  check(fixed.subarray(0, 8).equals(MAGIC), 'not a cloudlet-overlay file (bad magic)');
  const major = fixed.readUInt16LE(8);
  const minor = fixed.readUInt16LE(10);
  if (major !== VERSION_MAJOR) {
    throw new UnsupportedError(
      `overlay format version ${major}.${minor} is not supported (this tool reads ${VERSION_MAJOR}.x)`,
      {
        version: `${major}.${minor}`,
      },
    );
  }
  const jsonLen = fixed.readUInt32LE(12);
  check(jsonLen <= MAX_HEADER_JSON, 'header: implausible length', { length: jsonLen });
  const rest = await readExact(fh, HEADER_FIXED, jsonLen + HASH_LEN, size, 'header');
  const whole = Buffer.concat([fixed, rest]);
  const hash = createHash('sha256')
    .update(whole.subarray(0, HEADER_FIXED + jsonLen))
    .digest();
  check(hash.equals(whole.subarray(HEADER_FIXED + jsonLen)), 'header: checksum mismatch (damaged overlay)');
  const json = whole.subarray(HEADER_FIXED, HEADER_FIXED + jsonLen);
  const header = parseHeader(json);
  check(header.version[0] === major && header.version[1] === minor, 'header: version fields disagree');
  return { header, json, length: whole.length, hash: createHash('sha256').update(whole).digest() };
}

async function readTrailer(
  fh: RangeSource,
  size: number,
  headerLength: number,
  headerHash: Buffer,
  header: OverlayHeader,
): Promise<{ index: OverlayIndex; offset: number }> {
  check(size >= headerLength + FOOTER_SIZE, 'overlay is truncated: no footer');
  const footer = await readExact(fh, size - FOOTER_SIZE, FOOTER_SIZE, size, 'footer');
  check(footer.subarray(0, 8).equals(FOOTER_MAGIC), 'overlay is truncated or damaged: no footer at the end');
  check(footer.subarray(32, 64).equals(headerHash), 'footer does not belong to this header (damaged or spliced file)');
  // Both halves of the version: no byte of the file goes unchecked.
  check(
    footer.readUInt16LE(28) === VERSION_MAJOR && footer.readUInt16LE(30) === header.version[1],
    'footer: format version differs from the header',
  );
  const offset = Number(footer.readBigUInt64LE(8));
  const length = Number(footer.readBigUInt64LE(16));
  const segments = footer.readUInt32LE(24);
  check(
    offset >= headerLength && length >= FRAME_HEADER && offset + length === size - FOOTER_SIZE,
    'footer: index position is inconsistent',
    { offset },
  );
  const headBytes = await readExact(fh, offset, FRAME_HEADER, size, 'index');
  const head = decodeFrameHeader(headBytes);
  check(head.magic.equals(INDEX_MAGIC), 'index: bad magic', { offset });
  check(head.compLength === length - FRAME_HEADER, 'index: length disagrees with the footer', { offset });
  check(head.rawLength <= MAX_INDEX_RAW, 'index: implausible size', { offset });
  const frame = await readExact(fh, offset + FRAME_HEADER, head.compLength, size, 'index');
  check(createHash('sha256').update(frame).digest().equals(head.sha256), 'index: checksum mismatch (damaged overlay)', {
    offset,
  });
  // The header (signed, when it is) names the index's hash: the index, and through it every
  // segment's checksum, is authenticated before it is decompressed.
  checkIndexHash(header, [headBytes, frame]);
  const index = parseIndex(decompress(frame, head.rawLength, 'index'));
  check(index.segments.length === segments, 'index: segment count disagrees with the footer');
  let expect = headerLength;
  for (const [i, s] of index.segments.entries()) {
    check(s.offset === expect, `index: segment ${i} is not where the previous one ends`, { segment: i });
    check(s.rawLength <= MAX_SEGMENT_RAW, `index: segment ${i} is implausibly large`, { segment: i });
    expect = s.offset + FRAME_HEADER + s.length;
  }
  check(expect === offset, 'index: segments do not end where the index starts');
  return { index, offset };
}
