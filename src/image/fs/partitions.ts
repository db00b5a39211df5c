/**
 * Partition tables of a disk image: MBR (primary entries and the logical partitions of an
 * extended partition's EBR chain) and GPT (header and entry-array CRC32 checked; a damaged
 * primary falls back to the backup at the end of the disk; both damaged: no partitions).
 *
 * Sectors are 512 bytes for MBR; GPT is looked for with 512- and 4096-byte sectors. Every
 * offset is checked against the image size, every loop is bounded: garbage gives "no table" or
 * a note, never an exception.
 */
import type { ChunkSource } from '../../delta/source.js';
import { crc32 } from './crc.js';
import { FsFormatError, readBytes } from './io.js';

export interface Partition {
  scheme: 'mbr' | 'gpt';
  /** As Linux numbers them: MBR 1–4 primary, 5… logical in chain order; GPT entry index + 1. */
  number: number;
  /** Byte range in the image (clipped to the image when the table claims more). */
  start: number;
  length: number;
  /** MBR: the type byte ("0x83"); GPT: the type GUID ("0FC63DAF-8483-4772-8E79-3D69D8477DE4"). */
  type: string;
}

export interface PartitionTable {
  scheme: 'mbr' | 'gpt' | 'none';
  partitions: Partition[];
  /** What was odd or refused: damaged headers, entries past the end, loops. */
  notes: string[];
}

const SECTOR = 512;
/** Bound on EBRs followed in one extended partition. */
const MAX_LOGICAL = 128;
/** Bound on the GPT entry array (the usual one is 128 × 128 bytes = 16 KiB). */
const MAX_GPT_ARRAY = 1 << 20;
const EXTENDED = new Set([0x05, 0x0f, 0x85]);
const GPT_PROTECTIVE = 0xee;

export async function readPartitionTable(source: ChunkSource): Promise<PartitionTable> {
  const notes: string[] = [];
  if (source.size < 2 * SECTOR) return { scheme: 'none', partitions: [], notes };
  const mbr = await readBytes(source, 0, SECTOR);
  const entries = mbrEntries(mbr);
  if (entries && entries.some((e) => e.type === GPT_PROTECTIVE)) {
    return gptOrRefuse(source, notes);
  }
  if (entries && entries.length > 0) {
    return { scheme: 'mbr', partitions: await mbrPartitions(source, entries, notes), notes };
  }
  // No usable MBR: a GPT without a protective MBR is still a GPT (some tools write none).
  const gpt = await readGpt(source, notes);
  if (gpt) return gpt;
  return { scheme: 'none', partitions: [], notes };
}

interface MbrEntry {
  index: number;
  type: number;
  /** In sectors. */
  lba: number;
  sectors: number;
}

/** The non-empty entries of a boot sector, or null when it is not an MBR. */
function mbrEntries(sector: Buffer): MbrEntry[] | null {
  if (sector[510] !== 0x55 || sector[511] !== 0xaa) return null;
  const out: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const e = sector.subarray(446 + 16 * i, 446 + 16 * (i + 1));
    const status = e[0];
    // A boot flag other than 0x00/0x80 means this is not a partition table (a FAT boot sector…).
    if (status !== 0 && status !== 0x80) return null;
    const type = e[4] ?? 0;
    const lba = e.readUInt32LE(8);
    const sectors = e.readUInt32LE(12);
    if (type === 0 || sectors === 0) continue;
    out.push({ index: i, type, lba, sectors });
  }
  return out;
}

async function mbrPartitions(source: ChunkSource, entries: MbrEntry[], notes: string[]): Promise<Partition[]> {
  const out: Partition[] = [];
  for (const e of entries) {
    if (EXTENDED.has(e.type)) {
      out.push(...(await logicalPartitions(source, e, notes)));
      continue;
    }
    const p = clipped(source, 'mbr', e.index + 1, e.lba, e.sectors, hexType(e.type), notes);
    if (p) out.push(p);
  }
  return out.sort((a, b) => a.number - b.number);
}

/** The EBR chain of an extended partition: each EBR's first entry is a logical partition. */
async function logicalPartitions(source: ChunkSource, ext: MbrEntry, notes: string[]): Promise<Partition[]> {
  const out: Partition[] = [];
  const seen = new Set<number>();
  let ebr = ext.lba;
  let number = 5;
  for (let n = 0; n < MAX_LOGICAL; n++) {
    if (seen.has(ebr)) {
      notes.push(`extended partition ${ext.index + 1}: EBR chain loops at sector ${ebr}`);
      return out;
    }
    seen.add(ebr);
    if ((ebr + 1) * SECTOR > source.size) {
      notes.push(`extended partition ${ext.index + 1}: EBR at sector ${ebr} lies past the end of the image`);
      return out;
    }
    const list = mbrEntries(await readBytes(source, ebr * SECTOR, SECTOR));
    if (!list) {
      notes.push(`extended partition ${ext.index + 1}: no valid EBR at sector ${ebr}`);
      return out;
    }
    const logical = list.find((e) => e.index === 0 && !EXTENDED.has(e.type));
    if (logical) {
      const p = clipped(source, 'mbr', number, ebr + logical.lba, logical.sectors, hexType(logical.type), notes);
      if (p) out.push(p);
      number++;
    }
    const next = list.find((e) => e.index === 1 && EXTENDED.has(e.type));
    if (!next) return out;
    ebr = ext.lba + next.lba;
    if (next.lba === 0 || ebr >= ext.lba + ext.sectors) {
      notes.push(`extended partition ${ext.index + 1}: EBR link to sector ${ebr} leaves the extended partition`);
      return out;
    }
  }
  notes.push(`extended partition ${ext.index + 1}: more than ${MAX_LOGICAL} logical partitions; the rest ignored`);
  return out;
}

async function gptOrRefuse(source: ChunkSource, notes: string[]): Promise<PartitionTable> {
  const gpt = await readGpt(source, notes, true);
  if (gpt) return gpt;
  notes.push('protective MBR but no valid GPT (primary and backup damaged or missing): no partitions read');
  return { scheme: 'gpt', partitions: [], notes };
}

interface GptHeader {
  myLba: number;
  alternateLba: number;
  entriesLba: number;
  count: number;
  entrySize: number;
  entriesCrc: number;
}

/** A GPT with 512- or 4096-byte sectors, primary first, then the backup; null when none is valid. */
async function readGpt(source: ChunkSource, notes: string[], expected = false): Promise<PartitionTable | null> {
  for (const ss of [512, 4096]) {
    if (source.size < 3 * ss) continue;
    const primary = await gptHeader(source, ss, 1);
    if (primary.header) {
      const parts = await gptEntries(source, ss, primary.header, notes);
      if (parts) return { scheme: 'gpt', partitions: parts, notes };
      notes.push(`GPT (${ss}-byte sectors): primary entry array fails its CRC32`);
    } else if (primary.signature) {
      notes.push(`GPT (${ss}-byte sectors): primary header damaged (${primary.problem})`);
    }
    // Without a primary signature, look for a backup only where a protective MBR promised a GPT.
    if (!primary.signature && !expected) continue;
    const lastLba = Math.floor(source.size / ss) - 1;
    const candidates = [primary.header?.alternateLba, lastLba].filter(
      (v, i, a): v is number => v !== undefined && v > 1 && v <= lastLba && a.indexOf(v) === i,
    );
    for (const lba of candidates) {
      const backup = await gptHeader(source, ss, lba);
      if (!backup.header) continue;
      const parts = await gptEntries(source, ss, backup.header, notes);
      if (parts) {
        notes.push(`GPT (${ss}-byte sectors): using the backup header at sector ${lba}`);
        return { scheme: 'gpt', partitions: parts, notes };
      }
    }
    if (!primary.signature) continue;
    notes.push(`GPT (${ss}-byte sectors): backup header missing or damaged too`);
    return null;
  }
  return null;
}

async function gptHeader(
  source: ChunkSource,
  ss: number,
  lba: number,
): Promise<{ header: GptHeader | null; signature: boolean; problem: string }> {
  const none = { header: null, signature: false, problem: 'no signature' };
  if ((lba + 1) * ss > source.size) return none;
  const b = await readBytes(source, lba * ss, ss);
  if (b.toString('latin1', 0, 8) !== 'EFI PART') return none;
  const bad = (problem: string): { header: null; signature: true; problem: string } => ({
    header: null,
    signature: true,
    problem,
  });
  const size = b.readUInt32LE(12);
  if (size < 92 || size > ss) return bad(`header size ${size}`);
  const copy = Buffer.from(b.subarray(0, size));
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== b.readUInt32LE(16)) return bad('header CRC32 mismatch');
  const u64 = (off: number): number => {
    const v = b.readBigUInt64LE(off);
    return v > BigInt(Number.MAX_SAFE_INTEGER) ? -1 : Number(v);
  };
  const header: GptHeader = {
    myLba: u64(24),
    alternateLba: u64(32),
    entriesLba: u64(72),
    count: b.readUInt32LE(80),
    entrySize: b.readUInt32LE(84),
    entriesCrc: b.readUInt32LE(88),
  };
  if (header.myLba !== lba) return bad(`header says it is at sector ${header.myLba}, found at ${lba}`);
  if (header.entrySize < 128 || header.entrySize % 8 !== 0) return bad(`entry size ${header.entrySize}`);
  if (header.count * header.entrySize > MAX_GPT_ARRAY) return bad(`entry array of ${header.count} entries`);
  if (header.entriesLba < 0) return bad('entry array position');
  return { header, signature: true, problem: '' };
}

/** The used entries of a header's array, or null when the array fails its CRC or lies outside. */
async function gptEntries(source: ChunkSource, ss: number, h: GptHeader, notes: string[]): Promise<Partition[] | null> {
  const bytes = h.count * h.entrySize;
  const start = h.entriesLba * ss;
  if (start + bytes > source.size) return null;
  const arr = await readBytes(source, start, bytes);
  if (crc32(arr) !== h.entriesCrc) return null;
  const out: Partition[] = [];
  for (let i = 0; i < h.count; i++) {
    const e = arr.subarray(i * h.entrySize, (i + 1) * h.entrySize);
    const type = e.subarray(0, 16);
    if (type.every((x) => x === 0)) continue;
    const first = e.readBigUInt64LE(32);
    const last = e.readBigUInt64LE(40);
    if (last < first || last > BigInt(Number.MAX_SAFE_INTEGER)) {
      notes.push(`GPT entry ${i + 1}: bad range ${first}..${last}`);
      continue;
    }
    const p = clipped(source, 'gpt', i + 1, Number(first), Number(last - first) + 1, guid(type), notes, ss);
    if (p) out.push(p);
  }
  return out;
}

/** A partition's byte range, clipped to the image (with a note), or null when it starts past it. */
function clipped(
  source: ChunkSource,
  scheme: 'mbr' | 'gpt',
  number: number,
  lba: number,
  sectors: number,
  type: string,
  notes: string[],
  ss = SECTOR,
): Partition | null {
  const start = lba * ss;
  let length = sectors * ss;
  if (!Number.isSafeInteger(start + length)) throw new FsFormatError('partition range overflows');
  if (start >= source.size) {
    notes.push(`${scheme} partition ${number} starts past the end of the image`);
    return null;
  }
  if (start + length > source.size) {
    notes.push(`${scheme} partition ${number} runs past the end of the image; cut to the image`);
    length = source.size - start;
  }
  return { scheme, number, start, length, type };
}

function hexType(t: number): string {
  return `0x${t.toString(16).padStart(2, '0')}`;
}

/** A GUID in its usual text form (the first three fields are little-endian on disk). */
export function guid(b: Buffer): string {
  const hex = (from: number, to: number, reverse: boolean): string => {
    const part = Buffer.from(b.subarray(from, to));
    if (reverse) part.reverse();
    return part.toString('hex');
  };
  return [hex(0, 4, true), hex(4, 6, true), hex(6, 8, true), hex(8, 10, false), hex(10, 16, false)]
    .join('-')
    .toUpperCase();
}
