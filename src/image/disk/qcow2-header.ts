/**
 * The qcow2 v3 header cluster we write (QEMU docs/interop/qcow2.txt), and a decoder used to
 * re-read and check it before the image is committed.
 *
 * Cluster 0:  header (112 bytes: v3 fields + compression_type 0 = zlib + padding, the length
 *             QEMU ≥ 5.1 writes itself) · backing-format extension · end-of-extensions ·
 *             backing file name (not NUL-terminated), all inside the first cluster.
 */
import { CorruptInputError, UnsupportedError } from '../../util/errors.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const HEADER_LENGTH = 112;
const EXT_END = 0x00000000;
const EXT_BACKING_FORMAT = 0xe2792aca;
/** qcow2.txt: a backing file name must not be longer than 1023 bytes. */
const MAX_BACKING_NAME = 1023;

export interface Qcow2Header {
  clusterBits: number;
  virtualSize: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  backingFile?: string;
  backingFormat?: string;
}

/** One cluster holding the header, its extensions and the backing file name. */
export function encodeHeader(h: Qcow2Header): Buffer {
  const clusterSize = 2 ** h.clusterBits;
  const buf = Buffer.alloc(clusterSize);
  let pos = HEADER_LENGTH;
  if (h.backingFormat !== undefined) {
    const fmt = Buffer.from(h.backingFormat, 'utf8');
    buf.writeUInt32BE(EXT_BACKING_FORMAT, pos);
    buf.writeUInt32BE(fmt.length, pos + 4);
    fmt.copy(buf, pos + 8);
    pos += 8 + align8(fmt.length);
  }
  buf.writeUInt32BE(EXT_END, pos);
  buf.writeUInt32BE(0, pos + 4);
  pos += 8;

  let backingOffset = 0;
  let backingLength = 0;
  if (h.backingFile !== undefined) {
    const name = Buffer.from(h.backingFile, 'utf8');
    if (name.length === 0 || name.length > MAX_BACKING_NAME) {
      throw new UnsupportedError(`backing file name must be 1–${MAX_BACKING_NAME} bytes (got ${name.length})`);
    }
    if (pos + name.length > clusterSize) {
      throw new UnsupportedError(`backing file name does not fit in a ${clusterSize}-byte header cluster`);
    }
    name.copy(buf, pos);
    backingOffset = pos;
    backingLength = name.length;
  }

  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(3, 4); // version
  writeU64(buf, 8, backingOffset);
  buf.writeUInt32BE(backingLength, 16);
  buf.writeUInt32BE(h.clusterBits, 20);
  writeU64(buf, 24, h.virtualSize);
  buf.writeUInt32BE(0, 32); // crypt_method: none
  buf.writeUInt32BE(h.l1Size, 36);
  writeU64(buf, 40, h.l1TableOffset);
  writeU64(buf, 48, h.refcountTableOffset);
  buf.writeUInt32BE(h.refcountTableClusters, 56);
  buf.writeUInt32BE(0, 60); // nb_snapshots
  writeU64(buf, 64, 0); // snapshots_offset
  writeU64(buf, 72, 0); // incompatible_features: none (not dirty, no extended L2, zlib)
  writeU64(buf, 80, 0); // compatible_features: no lazy refcounts
  writeU64(buf, 88, 0); // autoclear_features
  buf.writeUInt32BE(4, 96); // refcount_order: 16-bit refcounts
  buf.writeUInt32BE(HEADER_LENGTH, 100);
  buf.writeUInt8(0, 104); // compression_type: zlib (we never compress); 105–111 padding
  return buf;
}

/** Parses a v3 header cluster of the kind encodeHeader writes; rejects anything else. */
export function decodeHeader(buf: Buffer): Qcow2Header {
  const bad = (why: string): CorruptInputError => new CorruptInputError(`qcow2 header: ${why}`);
  if (buf.length < HEADER_LENGTH) throw bad('truncated');
  if (buf.readUInt32BE(0) !== QCOW2_MAGIC) throw bad('bad magic');
  if (buf.readUInt32BE(4) !== 3) throw bad(`version ${buf.readUInt32BE(4)}, expected 3`);
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21) throw bad(`cluster_bits ${clusterBits}`);
  const clusterSize = 2 ** clusterBits;
  if (buf.length < clusterSize) throw bad('shorter than one cluster');
  for (const [at, name] of [
    [72, 'incompatible'],
    [80, 'compatible'],
    [88, 'autoclear'],
  ] as const) {
    if (readU64(buf, at) !== 0) throw bad(`${name}_features set`);
  }
  if (buf.readUInt32BE(32) !== 0) throw bad('encrypted');
  if (buf.readUInt32BE(96) !== 4) throw bad(`refcount_order ${buf.readUInt32BE(96)}`);
  const headerLength = buf.readUInt32BE(100);
  if (headerLength < 104 || headerLength % 8 !== 0 || headerLength > clusterSize)
    throw bad(`header_length ${headerLength}`);

  const h: Qcow2Header = {
    clusterBits,
    virtualSize: readU64(buf, 24),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: readU64(buf, 40),
    refcountTableOffset: readU64(buf, 48),
    refcountTableClusters: buf.readUInt32BE(56),
  };
  const backingOffset = readU64(buf, 8);
  const backingLength = buf.readUInt32BE(16);
  if (backingOffset !== 0) {
    if (backingLength > MAX_BACKING_NAME || backingOffset + backingLength > clusterSize)
      throw bad('backing file name out of range');
    h.backingFile = buf.toString('utf8', backingOffset, backingOffset + backingLength);
  }
  const extEnd = backingOffset !== 0 ? backingOffset : clusterSize;
  let pos = headerLength;
  for (;;) {
    if (pos + 8 > extEnd) throw bad('header extensions run past their area');
    const type = buf.readUInt32BE(pos);
    const len = buf.readUInt32BE(pos + 4);
    if (type === EXT_END) break;
    if (pos + 8 + len > extEnd) throw bad('header extension runs past its area');
    if (type === EXT_BACKING_FORMAT) h.backingFormat = buf.toString('utf8', pos + 8, pos + 8 + len);
    pos += 8 + align8(len);
  }
  return h;
}

function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** Offsets and sizes stay below 2^53: plain numbers are exact. */
function writeU64(buf: Buffer, at: number, v: number): void {
  buf.writeUInt32BE(Math.floor(v / 2 ** 32), at);
  buf.writeUInt32BE(v % 2 ** 32, at + 4);
}

function readU64(buf: Buffer, at: number): number {
  const hi = buf.readUInt32BE(at);
  const lo = buf.readUInt32BE(at + 4);
  if (hi >= 2 ** 21) throw new CorruptInputError(`qcow2 header: 64-bit field at ${at} exceeds 2^53`);
  return hi * 2 ** 32 + lo;
}
