/**
 * The overlay file's byte layout (docs/FORMAT.md is the spec; keep both in step).
 *
 *   header    "CLOVERLY" u16 major u16 minor u32 jsonLength  JSON  sha256(all before)
 *   segments  "CSEG" u32 compLen u32 rawLen u32 records  sha256(frame)  zstd frame of records
 *   index     "CIDX" u32 compLen u32 rawLen u32 0        sha256(frame)  zstd frame of JSON
 *   footer    "CLOVEND\0" u64 indexOffset u64 indexLength u32 segments u16 major u16 minor
 *             sha256(header)                                       (64 bytes, at EOF)
 *
 * All integers little-endian. The header alone is enough to start streaming; the footer and
 * index give random access to any segment (e.g. by HTTP Range) and the stats.
 */
import type { TargetInfo, TargetKind } from '../delta/target.js';
import type { DiffStats } from '../delta/stats.js';

export const MAGIC = Buffer.from('CLOVERLY', 'latin1');
export const FOOTER_MAGIC = Buffer.from('CLOVEND\0', 'latin1');
export const SEGMENT_MAGIC = Buffer.from('CSEG', 'latin1');
export const INDEX_MAGIC = Buffer.from('CIDX', 'latin1');

export const VERSION_MAJOR = 1;
/** 1.1 adds `index_sha256` and the optional `signature` block (1.0 readers ignore both). */
export const VERSION_MINOR = 1;

export const HEADER_FIXED = 16;
export const HASH_LEN = 32;
export const FRAME_HEADER = 16 + HASH_LEN;
export const FOOTER_SIZE = 64;

/** Target size of a segment's records before compression. */
export const SEGMENT_TARGET = 1 << 20;
/** Limits a reader enforces before allocating anything a corrupt file asks for. */
export const MAX_HEADER_JSON = 16 << 20;
export const MAX_SEGMENT_RAW = 300 << 20;
export const MAX_INDEX_RAW = 256 << 20;
/** Targets one overlay may rebuild (a VM has a disk, three stream blobs and a few RAM blocks). */
export const MAX_TARGETS = 1024;
/** Largest disk target (64 TiB): a declared size is checked before anything is sized from it. */
export const MAX_DISK_SIZE = 2 ** 46;

export interface OverlayTarget extends TargetInfo {
  kind: TargetKind;
}

export interface OverlayHeader {
  format: 'cloudlet-overlay';
  version: [number, number];
  createdAt: string;
  creator: string;
  chunkSize: number;
  base: {
    /** Base VM id: sha256 over the base targets' kinds, names and digests (see FORMAT.md). */
    id: string;
    targets: OverlayTarget[];
  };
  targets: OverlayTarget[];
  memory?: {
    /** Machine type from the stream's configuration section, e.g. pc-q35-7.2. */
    machine: string;
    /** The RAM block a synthesized VM maps from the base RAM file (largest block). */
    mainBlock: string;
    ramSectionId: number;
  };
  compression: { codec: 'zstd'; level: number };
  /**
   * 1.1: SHA-256 of the index as stored (its 48-byte frame header and frame), hex. Written as a
   * placeholder of the same length and patched in at the end, like the target digests.
   */
  index_sha256?: string;
  /** 1.1, optional: an ed25519 signature over the header (overlay/signature.ts, FORMAT.md). */
  signature?: HeaderSignature;
}

export interface HeaderSignature {
  alg: 'ed25519';
  /** SHA-256 of the raw 32-byte public key, hex. */
  key_id: string;
  /** The signing key file's name (informational; covered by the signature). */
  signer?: string;
  /** 128 hex digits; while the header is signed, 128 zeros. */
  sig: string;
}

export interface SegmentEntry {
  offset: number;
  /** Bytes of the frame (without the 48-byte segment header). */
  length: number;
  rawLength: number;
  records: number;
  sha256: string;
  /** [target, first chunk, end chunk) ranges the segment's records cover. */
  covers: Array<[number, number, number]>;
}

export interface OverlayIndex {
  segments: SegmentEntry[];
  stats: DiffStats;
}

/** Frame header of a segment or the index. */
export interface FrameHeader {
  magic: Buffer;
  compLength: number;
  rawLength: number;
  records: number;
  sha256: Buffer;
}

export function encodeFrameHeader(
  magic: Buffer,
  comp: Buffer,
  rawLength: number,
  records: number,
  sha: Buffer,
): Buffer {
  const h = Buffer.alloc(FRAME_HEADER);
  magic.copy(h, 0);
  h.writeUInt32LE(comp.length, 4);
  h.writeUInt32LE(rawLength, 8);
  h.writeUInt32LE(records, 12);
  sha.copy(h, 16);
  return h;
}

export function decodeFrameHeader(b: Buffer): FrameHeader {
  return {
    magic: b.subarray(0, 4),
    compLength: b.readUInt32LE(4),
    rawLength: b.readUInt32LE(8),
    records: b.readUInt32LE(12),
    sha256: b.subarray(16, 16 + HASH_LEN),
  };
}
