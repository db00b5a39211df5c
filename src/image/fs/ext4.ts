/**
 * Free blocks of one ext2/3/4 file system in an image, and whether the on-disk bitmaps can be
 * believed. The rule is in docs/free-blocks.md ("When the bitmaps are current"); in short a file
 * system is trusted only when all of these hold:
 *
 * - the superblock is well-formed (geometry as the kernel checks it, fits in its partition) and,
 *   with metadata_csum, its crc32c matches;
 * - every incompat / ro_compat feature is one whose effect on allocation we know;
 * - s_state has VALID_FS and neither ERROR_FS nor ORPHAN_FS;
 * - needs_recovery (INCOMPAT_RECOVER) is clear: the kernel sets it for as long as it has the file
 *   system mounted read-write with a journal and clears it only on unmount, freeze and read-only
 *   remount, each after flushing the journal;
 * - the journal is internal and its jbd2 superblock says it is empty (s_start == 0) with no error;
 * - every group descriptor checksum (metadata_csum or gdt_csum) and, with metadata_csum, every
 *   block bitmap checksum matches;
 * - per group, the free count in the descriptor equals the zero bits of the bitmap, and no block the
 *   layout reserves (superblock copies, descriptors, reserved GDT, bitmaps, inode tables) is free.
 *
 * BLOCK_UNINIT groups (with a descriptor checksum feature, as the kernel requires) get the bitmap
 * the kernel's ext4_init_block_bitmap would build: their own metadata in use, the rest free.
 *
 * Cost: the superblock, the descriptor blocks, one inode, the journal superblock and one bitmap
 * block per initialized group, read in batches of adjacent blocks. Memory: ~40 bytes per group
 * plus the free extents; the group count is bounded by the image size (≥ 256 KiB per group).
 */
import type { ChunkSource, Extent } from '../../delta/source.js';
import { crc16, crc32cRaw } from './crc.js';
import {
  BG_BLOCK_UNINIT,
  COMPAT,
  INCOMPAT,
  RO_COMPAT,
  STATE_ERROR,
  STATE_ORPHAN,
  STATE_VALID,
  SUPERBLOCK_OFFSET,
  SUPERBLOCK_SIZE,
  baseMetaBlocks,
  descriptorBlock,
  geometry,
  groupBlocks,
  groupFirstBlock,
  hasExtMagic,
  parseSuperblock,
  superblockChecksumOk,
  unsupportedFeatures,
  uuidString,
  type Geometry,
  type Superblock,
} from './ext4-layout.js';
import { FsFormatError, readBlocks, readBytes } from './io.js';
import { readJournalSuper } from './jbd2.js';

/** Whether a file system's free-block map may be used. */
export type Verdict = { trusted: true } | { trusted: false; reason: string };

export interface ExtState {
  /** s_state has VALID_FS: cleanly unmounted, or mounted with a journal (the kernel keeps it then). */
  valid: boolean;
  /** s_state has ERROR_FS: the kernel saw corruption; e2fsck must run. */
  errors: boolean;
  /** INCOMPAT_RECOVER: mounted read-write (and not frozen) when the image was taken, or crashed. */
  needsRecovery: boolean;
  journal: 'none' | 'internal' | 'external';
  /** The internal journal's s_start == 0 (nothing to replay); null when not read. */
  journalEmpty: boolean | null;
  /** Orphan inodes are recorded (s_last_orphan, or ORPHAN_PRESENT with an orphan file). */
  orphans: boolean;
  /** s_state has ORPHAN_FS: orphan processing was under way. */
  orphanRecovery: boolean;
}

export interface ExtFileSystem {
  type: 'ext2' | 'ext3' | 'ext4';
  /** Byte offset of the file system in the image. */
  offset: number;
  /** Bytes the file system spans (blocks × block size). */
  size: number;
  blockSize: number;
  blocks: number;
  groups: number;
  uuid: string;
  label: string;
  state: ExtState;
  verdict: Verdict;
  /** Facts worth telling that do not affect the verdict (orphans, counters). */
  notes: string[];
  /** Free blocks as byte ranges of the image, ascending and merged; empty unless trusted. */
  free: Extent[];
  freeBytes: number;
}

export interface ExtReadOptions {
  /** Past this many free extents the file system is reported untrusted (memory bound). */
  maxExtents: number;
}

/** Groups whose descriptors are kept in memory at most (≥ 512 GiB even at the smallest geometry). */
const MAX_GROUPS = 1 << 21;
/** Groups whose bitmaps are read in one batch. */
const GROUP_BATCH = 256;

/** Is there an ext2/3/4 superblock magic at `offset` + 1024? */
export async function probeExt(source: ChunkSource, offset: number, room: number): Promise<boolean> {
  if (room < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE || offset + SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE > source.size) {
    return false;
  }
  return hasExtMagic(await readBytes(source, offset + SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE));
}

/**
 * Reads the file system whose superblock magic probeExt found. `room` is how many bytes from
 * `offset` belong to it (its partition, or the rest of the image). Never throws for malformed
 * content: that becomes an untrusted verdict. Read errors of the source propagate.
 */
export async function readExt(
  source: ChunkSource,
  offset: number,
  room: number,
  opts: ExtReadOptions,
): Promise<ExtFileSystem> {
  const sb = parseSuperblock(await readBytes(source, offset + SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE));
  const reasons: string[] = [];
  const notes: string[] = [];
  const state = stateOf(sb);
  const report: ExtFileSystem = {
    type: typeOf(sb),
    offset,
    size: sb.blockSize ? sb.blocksCount * sb.blockSize : 0,
    blockSize: sb.blockSize,
    blocks: sb.blocksCount,
    groups: 0,
    uuid: uuidString(sb.uuid),
    label: sb.label,
    state,
    verdict: { trusted: true },
    notes,
    free: [],
    freeBytes: 0,
  };

  if (sb.roCompat & RO_COMPAT.METADATA_CSUM) {
    if (sb.checksumType !== 1) reasons.push(`superblock checksum type ${sb.checksumType} is not crc32c`);
    else if (!superblockChecksumOk(sb)) reasons.push('superblock checksum mismatch');
  }
  const unsupported = unsupportedFeatures(sb);
  if (unsupported) reasons.push(`unsupported features: ${unsupported}`);
  reasons.push(...stateReasons(state));
  if (state.orphans) {
    notes.push(
      'orphan inodes are recorded (files deleted while still open, or an interrupted truncate): ' +
        'their blocks still count as in use here; the guest frees them when the files close or at its next mount',
    );
  }
  if (sb.roCompat & RO_COMPAT.READONLY) notes.push('the file system is marked read-only');

  let geo: Geometry | null = null;
  try {
    geo = geometry(sb, room);
    if (geo.groups > MAX_GROUPS) throw new FsFormatError(`${geo.groups} block groups (at most ${MAX_GROUPS} read)`);
    report.groups = geo.groups;
  } catch (err) {
    if (!(err instanceof FsFormatError)) throw err;
    reasons.push(err.message);
    geo = null;
  }

  if (geo) {
    const g = geo;
    try {
      const groups = await readDescriptors(source, offset, g);
      const sum = groups.freeBlocks.reduce((a, b) => a + b, 0);
      if (sum !== sb.freeBlocksCount) {
        notes.push(`superblock free block count ${sb.freeBlocksCount} differs from the groups' ${sum} (kept lazily)`);
      }
      if (state.journal === 'internal') reasons.push(...(await journalReasons(source, offset, g, groups, state)));
      if (reasons.length === 0) {
        const free = await scanBitmaps(source, offset, g, groups, opts);
        report.free = free.extents;
        report.freeBytes = free.bytes;
      }
    } catch (err) {
      if (!(err instanceof FsFormatError)) throw err;
      reasons.push(err.message);
    }
  }

  if (reasons.length > 0) {
    report.verdict = { trusted: false, reason: reasons.join('; ') };
    report.free = [];
    report.freeBytes = 0;
  }
  return report;
}

function typeOf(sb: Superblock): 'ext2' | 'ext3' | 'ext4' {
  const ext4Incompat = INCOMPAT.EXTENTS | INCOMPAT.BIT64 | INCOMPAT.FLEX_BG | INCOMPAT.META_BG | INCOMPAT.INLINE_DATA;
  const ext4Ro =
    RO_COMPAT.HUGE_FILE |
    RO_COMPAT.GDT_CSUM |
    RO_COMPAT.DIR_NLINK |
    RO_COMPAT.EXTRA_ISIZE |
    RO_COMPAT.METADATA_CSUM |
    RO_COMPAT.BIGALLOC;
  if (sb.incompat & ext4Incompat || sb.roCompat & ext4Ro) return 'ext4';
  return sb.compat & COMPAT.HAS_JOURNAL ? 'ext3' : 'ext2';
}

function stateOf(sb: Superblock): ExtState {
  const hasJournal = (sb.compat & COMPAT.HAS_JOURNAL) !== 0;
  const external = sb.journalInum === 0 || sb.journalDev !== 0;
  return {
    valid: (sb.state & STATE_VALID) !== 0,
    errors: (sb.state & STATE_ERROR) !== 0,
    needsRecovery: (sb.incompat & INCOMPAT.RECOVER) !== 0,
    journal: !hasJournal ? 'none' : external ? 'external' : 'internal',
    journalEmpty: null,
    orphans: sb.lastOrphan !== 0 || (sb.roCompat & RO_COMPAT.ORPHAN_PRESENT) !== 0,
    orphanRecovery: (sb.state & STATE_ORPHAN) !== 0,
  };
}

function stateReasons(s: ExtState): string[] {
  const out: string[] = [];
  if (s.errors) out.push('the file system has errors (s_state ERROR_FS): e2fsck must run first');
  if (!s.valid) {
    out.push(
      s.journal === 'none'
        ? 'not cleanly unmounted (s_state lacks VALID_FS): mounted read-write, or crashed, and it has no journal'
        : 'not cleanly unmounted (s_state lacks VALID_FS)',
    );
  }
  if (s.orphanRecovery) out.push('orphan processing was under way (s_state ORPHAN_FS)');
  if (s.needsRecovery) {
    out.push(
      'the journal needs recovery (needs_recovery set): the file system was mounted read-write and not frozen ' +
        "when the image was taken, or crashed; the bitmaps on disk may be older than the guest's",
    );
  }
  if (s.journal === 'external') {
    out.push('the journal is on another device: its state cannot be checked from this image');
  }
  return out;
}

/** The per-group fields free-block reading needs, one typed array each. */
interface Groups {
  blockBitmap: Float64Array;
  inodeBitmap: Float64Array;
  inodeTable: Float64Array;
  freeBlocks: Uint32Array;
  flags: Uint16Array;
  bitmapCsum: Uint32Array;
}

async function readDescriptors(source: ChunkSource, offset: number, g: Geometry): Promise<Groups> {
  const n = g.groups;
  const groups: Groups = {
    blockBitmap: new Float64Array(n),
    inodeBitmap: new Float64Array(n),
    inodeTable: new Float64Array(n),
    freeBlocks: new Uint32Array(n),
    flags: new Uint16Array(n),
    bitmapCsum: new Uint32Array(n),
  };
  const big = g.descSize >= 64;
  const le32 = Buffer.alloc(4);
  const uuidCrc16 = crc16(0xffff, g.sb.uuid);
  const batch = Math.max(1, Math.floor((1 << 20) / g.blockSize));
  for (let first = 0; first < g.gdbCount; first += batch) {
    const nrs: number[] = [];
    for (let nr = first; nr < Math.min(g.gdbCount, first + batch); nr++) nrs.push(nr);
    const locations = nrs.map((nr) => descriptorBlock(g, nr));
    for (const b of locations) {
      if (b >= g.blocks) throw new FsFormatError(`group descriptor block ${b} lies outside the file system`);
    }
    const blocks = await readBlocks(source, offset, g.blockSize, locations);
    nrs.forEach((nr, k) => {
      const block = blocks.get(locations[k] as number) as Buffer;
      for (let i = 0; i < g.descsPerBlock; i++) {
        const group = nr * g.descsPerBlock + i;
        if (group >= n) break;
        const d = block.subarray(i * g.descSize, (i + 1) * g.descSize);
        const hi32 = (o: number): number => (big ? d.readUInt32LE(o) * 2 ** 32 : 0);
        const hi16 = (o: number): number => (big ? d.readUInt16LE(o) * 65536 : 0);
        groups.blockBitmap[group] = d.readUInt32LE(0x0) + hi32(0x20);
        groups.inodeBitmap[group] = d.readUInt32LE(0x4) + hi32(0x24);
        groups.inodeTable[group] = d.readUInt32LE(0x8) + hi32(0x28);
        groups.freeBlocks[group] = d.readUInt16LE(0xc) + hi16(0x2c);
        groups.flags[group] = d.readUInt16LE(0x12);
        groups.bitmapCsum[group] = d.readUInt16LE(0x18) + (g.descSize >= 0x3a ? d.readUInt16LE(0x38) * 65536 : 0);
        if (g.groupDescCsum) {
          le32.writeUInt32LE(group);
          const stored = d.readUInt16LE(0x1e);
          if (descChecksum(g, d, le32, uuidCrc16) !== stored) {
            throw new FsFormatError(`group descriptor ${group} checksum mismatch`);
          }
        }
        checkDescriptor(g, groups, group);
      }
    });
  }
  return groups;
}

/** ext4_group_desc_csum: crc32c (metadata_csum) or crc16 (gdt_csum) over group number and descriptor. */
function descChecksum(g: Geometry, d: Buffer, le32: Buffer, uuidCrc16: number): number {
  const zero = Buffer.alloc(2);
  if (g.metadataCsum) {
    let c = crc32cRaw(g.sb.csumSeed, le32);
    c = crc32cRaw(c, d.subarray(0, 0x1e));
    c = crc32cRaw(c, zero);
    if (g.descSize > 0x20) c = crc32cRaw(c, d.subarray(0x20, g.descSize));
    return c & 0xffff;
  }
  let c = crc16(uuidCrc16, le32);
  c = crc16(c, d.subarray(0, 0x1e));
  if ((g.sb.incompat & INCOMPAT.BIT64) !== 0 && g.descSize > 0x20) c = crc16(c, d.subarray(0x20, g.descSize));
  return c;
}

function checkDescriptor(g: Geometry, groups: Groups, group: number): void {
  const inFs = (b: number, count: number): boolean => b >= g.sb.firstDataBlock && b + count <= g.blocks;
  const bb = groups.blockBitmap[group] as number;
  const ib = groups.inodeBitmap[group] as number;
  const it = groups.inodeTable[group] as number;
  if (!inFs(bb, 1)) throw new FsFormatError(`group ${group}: block bitmap at ${bb} lies outside the file system`);
  if (!inFs(ib, 1)) throw new FsFormatError(`group ${group}: inode bitmap at ${ib} lies outside the file system`);
  if (!inFs(it, g.itbPerGroup)) {
    throw new FsFormatError(`group ${group}: inode table at ${it} lies outside the file system`);
  }
  if ((groups.freeBlocks[group] as number) > groupBlocks(g, group)) {
    throw new FsFormatError(`group ${group}: descriptor claims ${groups.freeBlocks[group]} free blocks`);
  }
}

/** Reasons the internal journal makes the bitmaps untrustworthy (empty when it is empty and sound). */
async function journalReasons(
  source: ChunkSource,
  offset: number,
  g: Geometry,
  groups: Groups,
  state: ExtState,
): Promise<string[]> {
  const ino = g.sb.journalInum;
  const group = Math.floor((ino - 1) / g.sb.inodesPerGroup);
  if (ino < 1 || group >= g.groups) return [`journal inode ${ino} does not exist`];
  const index = (ino - 1) % g.sb.inodesPerGroup;
  const at = offset + (groups.inodeTable[group] as number) * g.blockSize + index * g.sb.inodeSize;
  const inode = await readBytes(source, at, Math.min(g.sb.inodeSize, 256));
  try {
    const js = await readJournalSuper({ source, offset, blockSize: g.blockSize, blocks: g.blocks, inode });
    state.journalEmpty = js.start === 0;
    const out: string[] = [];
    if (js.start !== 0 && !state.needsRecovery) {
      out.push(`the journal holds transactions (s_start ${js.start}) although needs_recovery is clear`);
    }
    if (js.errno !== 0) out.push(`the journal recorded an error (errno ${js.errno}): the file system was aborted`);
    return out;
  } catch (err) {
    if (!(err instanceof FsFormatError)) throw err;
    return [`journal: ${err.message}`];
  }
}

/** Sorted, merged block ranges [start, end) that the layout reserves, for the "never free" check. */
function metadataRanges(g: Geometry, groups: Groups): Float64Array {
  const list: number[] = [];
  const add = (start: number, count: number): void => {
    if (count <= 0) return;
    list.push(start, start + count);
  };
  for (let group = 0; group < g.groups; group++) {
    add(groupFirstBlock(g, group), baseMetaBlocks(g, group));
    add(groups.blockBitmap[group] as number, 1);
    add(groups.inodeBitmap[group] as number, 1);
    add(groups.inodeTable[group] as number, g.itbPerGroup);
  }
  const order = Array.from({ length: list.length / 2 }, (_, i) => i).sort(
    (a, b) => (list[2 * a] as number) - (list[2 * b] as number),
  );
  const merged: number[] = [];
  for (const i of order) {
    const s = list[2 * i] as number;
    const e = list[2 * i + 1] as number;
    const last = merged.length - 1;
    if (last > 0 && s <= (merged[last] as number)) merged[last] = Math.max(merged[last] as number, e);
    else merged.push(s, e);
  }
  return Float64Array.from(merged);
}

/** Index of the first range whose end is > block, in a flat [s0, e0, s1, e1…] array. */
function firstEndingAfter(ranges: Float64Array, block: number): number {
  let lo = 0;
  let hi = ranges.length / 2;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if ((ranges[2 * mid + 1] as number) > block) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

/** ext4_init_block_bitmap: the bitmap of a BLOCK_UNINIT group. */
function uninitBitmap(g: Geometry, groups: Groups, group: number): Uint8Array {
  const bits = new Uint8Array(g.blockSize);
  const set = (bit: number): void => {
    bits[bit >> 3] = (bits[bit >> 3] as number) | (1 << (bit & 7));
  };
  const base = baseMetaBlocks(g, group);
  if (base >> 3 >= g.blockSize) throw new FsFormatError(`group ${group}: ${base} metadata blocks`);
  for (let b = 0; b < base; b++) set(b);
  const start = groupFirstBlock(g, group);
  const count = groupBlocks(g, group);
  const mark = (b: number): void => {
    if (b >= start && b < start + count) set(b - start);
  };
  mark(groups.blockBitmap[group] as number);
  mark(groups.inodeBitmap[group] as number);
  const it = groups.inodeTable[group] as number;
  for (let b = it; b < it + g.itbPerGroup; b++) mark(b);
  return bits;
}

async function scanBitmaps(
  source: ChunkSource,
  offset: number,
  g: Geometry,
  groups: Groups,
  opts: ExtReadOptions,
): Promise<{ extents: Extent[]; bytes: number }> {
  const meta = metadataRanges(g, groups);
  const extents: Extent[] = [];
  let bytes = 0;
  const bs = g.blockSize;
  const bitmapBytes = g.sb.clustersPerGroup / 8;
  const addRun = (group: number, first: number, count: number): void => {
    // No reserved block may be free: that would be a corrupt bitmap.
    const i = firstEndingAfter(meta, first);
    if (2 * i < meta.length && (meta[2 * i] as number) < first + count) {
      const b = Math.max(first, meta[2 * i] as number);
      throw new FsFormatError(`group ${group}: the block bitmap marks metadata block ${b} free`);
    }
    const start = offset + first * bs;
    const length = count * bs;
    bytes += length;
    const last = extents[extents.length - 1];
    if (last && last.start + last.length === start) {
      last.length += length;
      return;
    }
    if (extents.length >= opts.maxExtents) {
      throw new FsFormatError(`more than ${opts.maxExtents} free extents (raise maxExtents to read them)`);
    }
    extents.push({ start, length });
  };
  for (let first = 0; first < g.groups; first += GROUP_BATCH) {
    const last = Math.min(g.groups, first + GROUP_BATCH);
    const uninit = (group: number): boolean =>
      g.groupDescCsum && ((groups.flags[group] as number) & BG_BLOCK_UNINIT) !== 0;
    const wanted: number[] = [];
    for (let group = first; group < last; group++) if (!uninit(group)) wanted.push(groups.blockBitmap[group] as number);
    const blocks = await readBlocks(source, offset, bs, wanted);
    for (let group = first; group < last; group++) {
      let bitmap: Uint8Array;
      if (uninit(group)) {
        bitmap = uninitBitmap(g, groups, group);
      } else {
        bitmap = blocks.get(groups.blockBitmap[group] as number) as Buffer;
        if (g.metadataCsum) {
          let c = crc32cRaw(g.sb.csumSeed, bitmap.subarray(0, bitmapBytes));
          if (g.descSize < 0x3a) c &= 0xffff;
          if (c !== groups.bitmapCsum[group]) throw new FsFormatError(`group ${group}: block bitmap checksum mismatch`);
        }
      }
      const gFirst = groupFirstBlock(g, group);
      const free = scanGroup(bitmap, groupBlocks(g, group), (s, n) => addRun(group, gFirst + s, n));
      if (free !== groups.freeBlocks[group]) {
        throw new FsFormatError(
          `group ${group}: the descriptor counts ${groups.freeBlocks[group]} free blocks, the bitmap ${free}`,
        );
      }
    }
  }
  return { extents, bytes };
}

/** Calls onRun(firstBit, count) for each run of zero bits below nbits; returns how many there are. */
function scanGroup(bitmap: Uint8Array, nbits: number, onRun: (first: number, count: number) => void): number {
  let free = 0;
  let run = -1;
  const fullBytes = nbits >> 3;
  for (let i = 0; i < fullBytes; i++) {
    const v = bitmap[i] as number;
    const base = i << 3;
    if (v === 0) {
      if (run < 0) run = base;
      free += 8;
    } else if (v === 0xff) {
      if (run >= 0) {
        onRun(run, base - run);
        run = -1;
      }
    } else {
      for (let k = 0; k < 8; k++) {
        if (v & (1 << k)) {
          if (run >= 0) {
            onRun(run, base + k - run);
            run = -1;
          }
        } else {
          if (run < 0) run = base + k;
          free++;
        }
      }
    }
  }
  for (let bit = fullBytes << 3; bit < nbits; bit++) {
    if ((bitmap[bit >> 3] as number) & (1 << (bit & 7))) {
      if (run >= 0) {
        onRun(run, bit - run);
        run = -1;
      }
    } else {
      if (run < 0) run = bit;
      free++;
    }
  }
  if (run >= 0) onRun(run, nbits - run);
  return free;
}
