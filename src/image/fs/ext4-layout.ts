/**
 * The on-disk layout of ext2/3/4 as far as free-block reading needs it: the superblock, its
 * geometry and checksum, and where group descriptors, superblock backups and reserved GDT blocks
 * are — computed as the kernel computes them (fs/ext4/super.c descriptor_loc, balloc.c
 * ext4_bg_has_super / ext4_bg_num_gdb / ext4_num_base_meta_clusters).
 *
 * Every field is little-endian; offsets are those of struct ext4_super_block (fs/ext4/ext4.h).
 */
import { crc32cRaw } from './crc.js';
import { FsFormatError } from './io.js';

export const EXT_MAGIC = 0xef53;
/** The primary superblock is always 1024 bytes into the file system, 1024 bytes long. */
export const SUPERBLOCK_OFFSET = 1024;
export const SUPERBLOCK_SIZE = 1024;

export const STATE_VALID = 0x0001;
export const STATE_ERROR = 0x0002;
export const STATE_ORPHAN = 0x0004;

export const COMPAT = {
  HAS_JOURNAL: 0x4,
  SPARSE_SUPER2: 0x200,
  ORPHAN_FILE: 0x1000,
} as const;

export const INCOMPAT = {
  COMPRESSION: 0x1,
  FILETYPE: 0x2,
  RECOVER: 0x4,
  JOURNAL_DEV: 0x8,
  META_BG: 0x10,
  EXTENTS: 0x40,
  BIT64: 0x80,
  MMP: 0x100,
  FLEX_BG: 0x200,
  EA_INODE: 0x400,
  DIRDATA: 0x1000,
  CSUM_SEED: 0x2000,
  LARGEDIR: 0x4000,
  INLINE_DATA: 0x8000,
  ENCRYPT: 0x10000,
  CASEFOLD: 0x20000,
} as const;

export const RO_COMPAT = {
  SPARSE_SUPER: 0x1,
  LARGE_FILE: 0x2,
  BTREE_DIR: 0x4,
  HUGE_FILE: 0x8,
  GDT_CSUM: 0x10,
  DIR_NLINK: 0x20,
  EXTRA_ISIZE: 0x40,
  HAS_SNAPSHOT: 0x80,
  QUOTA: 0x100,
  BIGALLOC: 0x200,
  METADATA_CSUM: 0x400,
  REPLICA: 0x800,
  READONLY: 0x1000,
  PROJECT: 0x2000,
  SHARED_BLOCKS: 0x4000,
  VERITY: 0x8000,
  ORPHAN_PRESENT: 0x10000,
} as const;

/**
 * Incompat features whose meaning for block allocation we know: none of them changes what a set
 * bit in a block bitmap means. RECOVER is judged on its own; COMPRESSION and JOURNAL_DEV are not
 * here on purpose, nor is any bit we have never heard of.
 */
const KNOWN_INCOMPAT =
  INCOMPAT.FILETYPE |
  INCOMPAT.RECOVER |
  INCOMPAT.META_BG |
  INCOMPAT.EXTENTS |
  INCOMPAT.BIT64 |
  INCOMPAT.MMP |
  INCOMPAT.FLEX_BG |
  INCOMPAT.EA_INODE |
  INCOMPAT.DIRDATA |
  INCOMPAT.CSUM_SEED |
  INCOMPAT.LARGEDIR |
  INCOMPAT.INLINE_DATA |
  INCOMPAT.ENCRYPT |
  INCOMPAT.CASEFOLD;

/**
 * Read-only-compatible features we can read past. Not here: HAS_SNAPSHOT (the never-merged
 * ext4 snapshot patches keep blocks outside the bitmaps), BIGALLOC (bitmaps of clusters; not
 * implemented), REPLICA, and unknown bits.
 */
const KNOWN_RO_COMPAT =
  RO_COMPAT.SPARSE_SUPER |
  RO_COMPAT.LARGE_FILE |
  RO_COMPAT.BTREE_DIR |
  RO_COMPAT.HUGE_FILE |
  RO_COMPAT.GDT_CSUM |
  RO_COMPAT.DIR_NLINK |
  RO_COMPAT.EXTRA_ISIZE |
  RO_COMPAT.QUOTA |
  RO_COMPAT.METADATA_CSUM |
  RO_COMPAT.READONLY |
  RO_COMPAT.PROJECT |
  RO_COMPAT.SHARED_BLOCKS |
  RO_COMPAT.VERITY |
  RO_COMPAT.ORPHAN_PRESENT;

export const BG_INODE_UNINIT = 0x1;
export const BG_BLOCK_UNINIT = 0x2;

export interface Superblock {
  raw: Buffer;
  inodesCount: number;
  blocksCount: number;
  freeBlocksCount: number;
  firstDataBlock: number;
  blockSize: number;
  blocksPerGroup: number;
  clustersPerGroup: number;
  inodesPerGroup: number;
  state: number;
  revLevel: number;
  inodeSize: number;
  compat: number;
  incompat: number;
  roCompat: number;
  uuid: Buffer;
  label: string;
  journalUuid: Buffer;
  journalInum: number;
  journalDev: number;
  lastOrphan: number;
  descSize: number;
  firstMetaBg: number;
  reservedGdtBlocks: number;
  backupBgs: [number, number];
  checksumType: number;
  checksum: number;
  /** Seed of every metadata_csum checksum but the superblock's own. */
  csumSeed: number;
  logBlockSize: number;
  logClusterSize: number;
}

/** Geometry derived from the superblock, after validation. */
export interface Geometry {
  sb: Superblock;
  blockSize: number;
  blocks: number;
  groups: number;
  descSize: number;
  descsPerBlock: number;
  /** Number of group descriptor blocks. */
  gdbCount: number;
  /** Inode table blocks per group. */
  itbPerGroup: number;
  metaBg: boolean;
  sparseSuper: boolean;
  sparseSuper2: boolean;
  metadataCsum: boolean;
  /** metadata_csum or gdt_csum (uninit_bg): descriptors carry checksums, BLOCK_UNINIT is honoured. */
  groupDescCsum: boolean;
}

/** True when the 1024 bytes carry the ext2/3/4 magic number. */
export function hasExtMagic(raw: Buffer): boolean {
  return raw.length >= 0x3a && raw.readUInt16LE(0x38) === EXT_MAGIC;
}

export function parseSuperblock(raw: Buffer): Superblock {
  if (raw.length < SUPERBLOCK_SIZE || !hasExtMagic(raw)) throw new FsFormatError('no ext2/3/4 superblock magic');
  const u32 = (o: number): number => raw.readUInt32LE(o);
  const u16 = (o: number): number => raw.readUInt16LE(o);
  const incompat = u32(0x60);
  const bit64 = (incompat & INCOMPAT.BIT64) !== 0;
  const hi = (o: number): number => (bit64 ? u32(o) * 2 ** 32 : 0);
  const uuid = Buffer.from(raw.subarray(0x68, 0x78));
  const revLevel = u32(0x4c);
  const sb: Superblock = {
    raw,
    inodesCount: u32(0x0),
    blocksCount: u32(0x4) + hi(0x150),
    freeBlocksCount: u32(0xc) + hi(0x158),
    firstDataBlock: u32(0x14),
    logBlockSize: u32(0x18),
    logClusterSize: u32(0x1c),
    blockSize: 0,
    blocksPerGroup: u32(0x20),
    clustersPerGroup: u32(0x24),
    inodesPerGroup: u32(0x28),
    state: u16(0x3a),
    revLevel,
    inodeSize: revLevel === 0 ? 128 : u16(0x58),
    compat: revLevel === 0 ? 0 : u32(0x5c),
    incompat: revLevel === 0 ? 0 : incompat,
    roCompat: revLevel === 0 ? 0 : u32(0x64),
    uuid,
    label: raw.toString('latin1', 0x78, 0x88).replace(/\0.*$/s, ''),
    journalUuid: Buffer.from(raw.subarray(0xd0, 0xe0)),
    journalInum: u32(0xe0),
    journalDev: u32(0xe4),
    lastOrphan: u32(0xe8),
    descSize: bit64 ? u16(0xfe) : 32,
    firstMetaBg: u32(0x104),
    reservedGdtBlocks: u16(0xce),
    backupBgs: [u32(0x24c), u32(0x250)],
    checksumType: raw[0x175] ?? 0,
    checksum: u32(0x3fc),
    csumSeed: 0,
  };
  sb.blockSize = sb.logBlockSize <= 6 ? 1024 << sb.logBlockSize : 0;
  sb.csumSeed = (sb.incompat & INCOMPAT.CSUM_SEED) !== 0 ? u32(0x270) : crc32cRaw(0xffffffff, uuid);
  return sb;
}

/** metadata_csum superblock checksum: crc32c(~0, bytes before s_checksum). */
export function superblockChecksumOk(sb: Superblock): boolean {
  return crc32cRaw(0xffffffff, sb.raw.subarray(0, 0x3fc)) === sb.checksum;
}

/** Feature bits we do not understand well enough to read the bitmaps, as a phrase; null if none. */
export function unsupportedFeatures(sb: Superblock): string | null {
  const parts: string[] = [];
  const inc = sb.incompat & ~KNOWN_INCOMPAT;
  if (inc & INCOMPAT.JOURNAL_DEV) parts.push('journal_dev (this is an external journal, not a file system)');
  if (inc & INCOMPAT.COMPRESSION) parts.push('compression');
  const otherInc = inc & ~(INCOMPAT.JOURNAL_DEV | INCOMPAT.COMPRESSION);
  if (otherInc) parts.push(`unknown incompat features 0x${otherInc.toString(16)}`);
  const ro = sb.roCompat & ~KNOWN_RO_COMPAT;
  if (ro & RO_COMPAT.BIGALLOC) parts.push('bigalloc (cluster bitmaps are not supported)');
  if (ro & RO_COMPAT.HAS_SNAPSHOT) parts.push('has_snapshot');
  if (ro & RO_COMPAT.REPLICA) parts.push('replica');
  const otherRo = ro & ~(RO_COMPAT.BIGALLOC | RO_COMPAT.HAS_SNAPSHOT | RO_COMPAT.REPLICA);
  if (otherRo) parts.push(`unknown ro_compat features 0x${otherRo.toString(16)}`);
  return parts.length ? parts.join(', ') : null;
}

/**
 * The geometry, checked the way the kernel's ext4_fill_super checks it (and mke2fs's limits);
 * `room` is how many bytes the image gives the file system. Throws FsFormatError with the reason.
 */
export function geometry(sb: Superblock, room: number): Geometry {
  const bad = (why: string): never => {
    throw new FsFormatError(`superblock: ${why}`);
  };
  if (sb.revLevel > 1) bad(`revision level ${sb.revLevel}`);
  if (sb.blockSize === 0) bad(`block size 2^(10+${sb.logBlockSize})`);
  const bs = sb.blockSize;
  if (sb.blocksPerGroup < 256 || sb.blocksPerGroup > 8 * bs || sb.blocksPerGroup % 8 !== 0) {
    bad(`${sb.blocksPerGroup} blocks per group`);
  }
  if (sb.clustersPerGroup !== sb.blocksPerGroup || sb.logClusterSize !== sb.logBlockSize) {
    bad('cluster size differs from block size without bigalloc');
  }
  if (sb.firstDataBlock !== (bs === 1024 ? 1 : 0)) bad(`first data block ${sb.firstDataBlock}`);
  if (sb.blocksCount <= sb.firstDataBlock + 1) bad(`${sb.blocksCount} blocks`);
  if (sb.blocksCount * bs > room) {
    bad(`the file system (${sb.blocksCount * bs} bytes) is larger than the space the image gives it (${room})`);
  }
  const groups = Math.ceil((sb.blocksCount - sb.firstDataBlock) / sb.blocksPerGroup);
  if (sb.inodesPerGroup === 0 || sb.inodesPerGroup > 8 * bs) bad(`${sb.inodesPerGroup} inodes per group`);
  if (sb.inodesCount !== groups * sb.inodesPerGroup) {
    bad(`inode count ${sb.inodesCount} is not ${groups} groups × ${sb.inodesPerGroup}`);
  }
  if (sb.inodeSize < 128 || sb.inodeSize > bs || (sb.inodeSize & (sb.inodeSize - 1)) !== 0) {
    bad(`inode size ${sb.inodeSize}`);
  }
  const descSize = sb.descSize;
  if ((sb.incompat & INCOMPAT.BIT64) !== 0) {
    if (descSize < 64 || descSize > 1024 || (descSize & (descSize - 1)) !== 0) bad(`descriptor size ${descSize}`);
  }
  if (descSize > bs) bad(`descriptor size ${descSize} larger than a block`);
  const descsPerBlock = bs / descSize;
  const gdbCount = Math.ceil(groups / descsPerBlock);
  const metaBg = (sb.incompat & INCOMPAT.META_BG) !== 0;
  if (sb.reservedGdtBlocks > bs / 4) bad(`${sb.reservedGdtBlocks} reserved GDT blocks`);
  if (metaBg) {
    if (sb.firstMetaBg > gdbCount) bad(`first meta block group ${sb.firstMetaBg} past ${gdbCount} descriptor blocks`);
  } else if (1 + gdbCount + sb.reservedGdtBlocks >= sb.blocksPerGroup) {
    bad(`${gdbCount} descriptor blocks do not fit in group 0`);
  }
  const metadataCsum = (sb.roCompat & RO_COMPAT.METADATA_CSUM) !== 0;
  return {
    sb,
    blockSize: bs,
    blocks: sb.blocksCount,
    groups,
    descSize,
    descsPerBlock,
    gdbCount,
    itbPerGroup: Math.ceil((sb.inodesPerGroup * sb.inodeSize) / bs),
    metaBg,
    sparseSuper: (sb.roCompat & RO_COMPAT.SPARSE_SUPER) !== 0,
    sparseSuper2: (sb.compat & COMPAT.SPARSE_SUPER2) !== 0,
    metadataCsum,
    groupDescCsum: metadataCsum || (sb.roCompat & RO_COMPAT.GDT_CSUM) !== 0,
  };
}

export function groupFirstBlock(g: Geometry, group: number): number {
  return g.sb.firstDataBlock + group * g.sb.blocksPerGroup;
}

/** Blocks in a group (the last one may be short). */
export function groupBlocks(g: Geometry, group: number): number {
  return Math.min(g.sb.blocksPerGroup, g.blocks - groupFirstBlock(g, group));
}

function isPowerOf(n: number, base: number): boolean {
  let x = n;
  while (x > 1 && x % base === 0) x /= base;
  return x === 1;
}

/** ext4_bg_has_super: does this group hold a superblock copy? */
export function groupHasSuper(g: Geometry, group: number): boolean {
  if (group === 0) return true;
  if (g.sparseSuper2) return group === g.sb.backupBgs[0] || group === g.sb.backupBgs[1];
  if (group <= 1 || !g.sparseSuper) return true;
  if (group % 2 === 0) return false;
  return isPowerOf(group, 3) || isPowerOf(group, 5) || isPowerOf(group, 7);
}

/** ext4_bg_num_gdb: descriptor blocks (primary or backup) this group holds. */
function groupNumGdb(g: Geometry, group: number): number {
  const metagroup = Math.floor(group / g.descsPerBlock);
  if (!g.metaBg || metagroup < g.sb.firstMetaBg) {
    if (!groupHasSuper(g, group)) return 0;
    return g.metaBg ? g.sb.firstMetaBg : g.gdbCount;
  }
  const first = metagroup * g.descsPerBlock;
  return group === first || group === first + 1 || group === first + g.descsPerBlock - 1 ? 1 : 0;
}

/**
 * ext4_num_base_meta_clusters: the blocks at the start of a group taken by the superblock copy,
 * descriptor blocks and reserved GDT blocks. They are always in use.
 */
export function baseMetaBlocks(g: Geometry, group: number): number {
  let n = groupHasSuper(g, group) ? 1 : 0;
  if (!g.metaBg || group < g.sb.firstMetaBg * g.descsPerBlock) {
    if (n) n += groupNumGdb(g, group) + g.sb.reservedGdtBlocks;
  } else {
    n += groupNumGdb(g, group);
  }
  return n;
}

/** descriptor_loc: where descriptor block `nr` (of gdbCount) lives. */
export function descriptorBlock(g: Geometry, nr: number): number {
  const sbBlock = g.sb.firstDataBlock;
  if (!g.metaBg || nr < g.sb.firstMetaBg) return sbBlock + nr + 1;
  const bg = g.descsPerBlock * nr;
  let hasSuper = groupHasSuper(g, bg) ? 1 : 0;
  if (g.blockSize === 1024 && nr === 0 && g.sb.firstDataBlock === 0) hasSuper++;
  return hasSuper + groupFirstBlock(g, bg);
}

/** The "8-4-4-4-12" form dumpe2fs prints. */
export function uuidString(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}
