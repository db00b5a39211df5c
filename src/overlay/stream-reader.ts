/**
 * Reads an overlay front to back from a byte stream (a file, an HTTP body, an upload) without
 * random access: the header first, then each segment's frame as it completes, then the index
 * and footer, which are checked against everything seen before. Memory is bounded by one
 * segment frame (≤ the format's limits), whatever the stream or the header declares.
 *
 * What is checked here: magics, lengths, the header checksum, the index frame's checksum, that
 * the index describes exactly the segments that came (offsets, lengths, record counts, frame
 * checksums) and that the footer belongs to the header. A segment frame's own sha256 is checked
 * where it is decoded (segment-decode.ts, on a worker), against the value its frame header
 * carries; the index comparison then ties those values to the index.
 */
import { createHash } from 'node:crypto';
import { decompress } from '../delta/zstd.js';
import { CorruptInputError, UnsupportedError, check } from '../util/errors.js';
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
  type FrameHeader,
  type OverlayHeader,
  type OverlayIndex,
} from './format.js';
import { parseHeader, parseIndex } from './validate.js';
import { checkIndexHash, verifyHeaderSignature, type SignatureStatus } from './signature.js';
import type { TrustedKey } from '../util/sign.js';

/** A compressed segment as it arrived: its frame header fields and the zstd frame. */
export interface StreamedSegment {
  index: number;
  /** File offset of the segment's frame header. */
  offset: number;
  compLength: number;
  rawLength: number;
  records: number;
  /** sha256 the frame header claims for the frame (checked by the decoder). */
  sha256: Buffer;
  frame: Buffer;
}

/** A zstd frame never grows much beyond its content; anything larger is not a real segment. */
const MAX_FRAME = MAX_SEGMENT_RAW + (MAX_SEGMENT_RAW >> 7) + (1 << 20);

/** Exact reads over an async iterable of arbitrarily cut buffers. */
class ExactReader {
  private readonly it: AsyncIterator<Uint8Array>;
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  /** Bytes handed out so far: the file offset of the next read. */
  position = 0;
  private ended = false;

  constructor(source: AsyncIterable<Uint8Array>) {
    this.it = source[Symbol.asyncIterator]();
  }

  /** Exactly `n` bytes, or CorruptInputError naming `what` if the stream ends first. */
  async read(n: number, what: string): Promise<Buffer> {
    while (this.pendingBytes < n) {
      if (this.ended) {
        throw new CorruptInputError(
          `overlay ends inside the ${what} at byte ${this.position + this.pendingBytes} (truncated?)`,
          {
            offset: this.position + this.pendingBytes,
          },
        );
      }
      const r = await this.it.next();
      if (r.done) {
        this.ended = true;
        continue;
      }
      const b = Buffer.isBuffer(r.value)
        ? r.value
        : Buffer.from(r.value.buffer, r.value.byteOffset, r.value.byteLength);
      if (b.length > 0) {
        this.pending.push(b);
        this.pendingBytes += b.length;
      }
    }
    let out: Buffer;
    if (this.pending[0]!.length >= n) {
      const first = this.pending[0]!;
      out = first.subarray(0, n);
      if (first.length === n) this.pending.shift();
      else this.pending[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const first = this.pending[0]!;
        const take = Math.min(first.length, n - filled);
        first.copy(out, filled, 0, take);
        filled += take;
        if (take === first.length) this.pending.shift();
        else this.pending[0] = first.subarray(take);
      }
    }
    this.pendingBytes -= n;
    this.position += n;
    return out;
  }

  /** Peeks at the next `n` bytes without consuming them (n small). */
  async peek(n: number, what: string): Promise<Buffer> {
    const b = Buffer.from(await this.read(n, what));
    this.pending.unshift(b);
    this.pendingBytes += n;
    this.position -= n;
    return b;
  }

  /** True when nothing follows (consumes nothing). */
  async atEnd(): Promise<boolean> {
    while (this.pendingBytes === 0 && !this.ended) {
      const r = await this.it.next();
      if (r.done) this.ended = true;
      else if (r.value.length > 0) {
        const v = r.value;
        this.pending.push(Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength));
        this.pendingBytes += v.length;
      }
    }
    return this.pendingBytes === 0;
  }

  async close(): Promise<void> {
    await this.it.return?.();
  }
}

export interface OverlayTrailer {
  index: OverlayIndex;
  indexOffset: number;
  /** Total bytes of the overlay. */
  size: number;
}

/**
 * One pass over an overlay stream: `open()` reads the header, `segments()` yields each segment
 * as it arrives, and `trailer` holds the checked index and footer once `segments()` is done.
 */
export class OverlayStreamReader {
  private headerHash: Buffer | undefined;
  private headerBytes = 0;
  private done: OverlayTrailer | undefined;
  private readonly rd: ExactReader;
  private header: OverlayHeader | undefined;
  /** What the signature check found (set by open()). */
  signature: SignatureStatus | undefined;

  /**
   * `trust`: with trusted keys, an unsigned or wrongly signed overlay is refused in open(),
   * right after the header (overlay/signature.ts); the index is checked against the header's
   * index_sha256 when it arrives, which ties every segment's checksum to the signed header.
   */
  constructor(
    source: AsyncIterable<Uint8Array>,
    private readonly opts: { trust?: readonly TrustedKey[] } = {},
  ) {
    this.rd = new ExactReader(source);
  }

  /** Bytes consumed so far. */
  get position(): number {
    return this.rd.position;
  }

  get trailer(): OverlayTrailer {
    if (!this.done) throw new CorruptInputError('overlay stream: trailer read before the last segment');
    return this.done;
  }

  async open(): Promise<{ header: OverlayHeader; headerLength: number }> {
    const fixed = await this.rd.read(HEADER_FIXED, 'header');
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
    const rest = await this.rd.read(jsonLen + HASH_LEN, 'header');
    const body = Buffer.concat([fixed, rest.subarray(0, jsonLen)]);
    check(
      createHash('sha256').update(body).digest().equals(rest.subarray(jsonLen)),
      'header: checksum mismatch (damaged overlay)',
    );
    const header = parseHeader(rest.subarray(0, jsonLen));
    check(header.version[0] === major && header.version[1] === minor, 'header: version fields disagree');
    this.signature = verifyHeaderSignature(rest.subarray(0, jsonLen), header, this.opts.trust ?? []);
    this.header = header;
    this.headerBytes = HEADER_FIXED + jsonLen + HASH_LEN;
    this.headerHash = createHash('sha256').update(body).update(rest.subarray(jsonLen)).digest();
    return { header, headerLength: this.headerBytes };
  }

  /** Every segment in file order; afterwards `trailer` is set (index and footer checked). */
  async *segments(): AsyncGenerator<StreamedSegment> {
    if (!this.headerHash) throw new CorruptInputError('overlay stream: segments() before open()');
    const seen: Array<{ offset: number; head: FrameHeader }> = [];
    for (;;) {
      const offset = this.rd.position;
      const headBytes = await this.rd.read(FRAME_HEADER, `frame header at byte ${offset}`);
      const head = decodeFrameHeader(headBytes);
      if (head.magic.equals(INDEX_MAGIC)) {
        this.done = await this.finish(offset, head, headBytes, seen);
        return;
      }
      const n = seen.length;
      check(head.magic.equals(SEGMENT_MAGIC), `segment ${n}: no segment at byte ${offset}`, { segment: n, offset });
      check(head.rawLength <= MAX_SEGMENT_RAW && head.compLength <= MAX_FRAME, `segment ${n}: implausibly large`, {
        segment: n,
        offset,
      });
      const frame = await this.rd.read(head.compLength, `segment ${n}`);
      seen.push({ offset, head: { ...head, sha256: Buffer.from(head.sha256) } });
      yield {
        index: n,
        offset,
        compLength: head.compLength,
        rawLength: head.rawLength,
        records: head.records,
        sha256: Buffer.from(head.sha256),
        frame,
      };
    }
  }

  async close(): Promise<void> {
    await this.rd.close();
  }

  private async finish(
    offset: number,
    head: FrameHeader,
    headBytes: Buffer,
    seen: Array<{ offset: number; head: FrameHeader }>,
  ): Promise<OverlayTrailer> {
    check(head.rawLength <= MAX_INDEX_RAW && head.compLength <= MAX_FRAME, 'index: implausible size', { offset });
    const frame = await this.rd.read(head.compLength, 'index');
    check(
      createHash('sha256').update(frame).digest().equals(head.sha256),
      'index: checksum mismatch (damaged overlay)',
      { offset },
    );
    if (this.header) checkIndexHash(this.header, [headBytes, frame]);
    const index = parseIndex(decompress(frame, head.rawLength, 'index'));
    check(
      index.segments.length === seen.length,
      `index lists ${index.segments.length} segments, the stream held ${seen.length}`,
    );
    for (const [i, s] of index.segments.entries()) {
      const got = seen[i]!;
      check(
        s.offset === got.offset &&
          s.length === got.head.compLength &&
          s.rawLength === got.head.rawLength &&
          s.records === got.head.records &&
          s.sha256 === got.head.sha256.toString('hex'),
        `index: segment ${i} disagrees with the segment in the stream`,
        { segment: i },
      );
    }
    const footer = await this.rd.read(FOOTER_SIZE, 'footer');
    const size = this.rd.position;
    check(footer.subarray(0, 8).equals(FOOTER_MAGIC), 'overlay is truncated or damaged: no footer at the end');
    check(
      footer.subarray(32, 64).equals(this.headerHash!),
      'footer does not belong to this header (damaged or spliced file)',
    );
    check(
      footer.readUInt16LE(28) === VERSION_MAJOR && footer.readUInt16LE(30) === this.header?.version[1],
      'footer: format version differs from the header',
    );
    check(
      Number(footer.readBigUInt64LE(8)) === offset &&
        Number(footer.readBigUInt64LE(16)) === FRAME_HEADER + head.compLength,
      'footer: index position is inconsistent',
      { offset },
    );
    check(footer.readUInt32LE(24) === seen.length, 'footer: segment count disagrees with the stream');
    check(await this.rd.atEnd(), `overlay has bytes after its footer (at byte ${size})`, { offset: size });
    return { index, indexOffset: offset, size };
  }
}
