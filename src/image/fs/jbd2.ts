/**
 * The jbd2 journal superblock of an ext3/ext4 internal journal: found through the journal inode
 * (extent tree or block map, first logical block only), checked for magic, block size and — with
 * csum v2/v3 — its crc32c. What free-block reading needs from it is `s_start`: 0 means the journal
 * holds nothing to replay (jbd2_mark_journal_empty, fs/jbd2/journal.c, writes 0 on unmount, on
 * jbd2_journal_flush — e.g. from ext4_freeze — and after recovery).
 *
 * The journal superblock is big-endian (include/linux/jbd2.h, journal_superblock_t).
 */
import type { ChunkSource } from '../../delta/source.js';
import { crc32cRaw } from './crc.js';
import { FsFormatError, readBytes } from './io.js';

export const JBD2_MAGIC = 0xc03b3998;
const JBD2_SUPERBLOCK_V1 = 3;
const JBD2_SUPERBLOCK_V2 = 4;
const JBD2_FEATURE_INCOMPAT_CSUM_V2 = 0x8;
const JBD2_FEATURE_INCOMPAT_CSUM_V3 = 0x10;
const JBD2_CRC32C_CHKSUM = 4;

const EXT4_EXTENTS_FL = 0x80000;
const EXT4_INLINE_DATA_FL = 0x10000000;
const EXTENT_MAGIC = 0xf30a;
const MAX_EXTENT_DEPTH = 5;

export interface JournalSuper {
  /** Physical block (of the file system) holding the journal superblock. */
  block: number;
  blockSize: number;
  /** First block of the log still needed; 0: the journal is empty (nothing to replay). */
  start: number;
  sequence: number;
  errno: number;
  version: 1 | 2;
}

/** What the journal reader needs to know about the file system it lives in. */
export interface JournalContext {
  source: ChunkSource;
  /** Byte offset of the file system in the image. */
  offset: number;
  blockSize: number;
  blocks: number;
  /** The journal inode's bytes (at least the first 128). */
  inode: Buffer;
}

/** Reads and checks the journal superblock; throws FsFormatError with the reason. */
export async function readJournalSuper(ctx: JournalContext): Promise<JournalSuper> {
  const block = await firstBlockOf(ctx);
  const raw = await readBytes(ctx.source, ctx.offset + block * ctx.blockSize, 1024);
  if (raw.readUInt32BE(0) !== JBD2_MAGIC) throw new FsFormatError(`no jbd2 superblock magic at block ${block}`);
  const type = raw.readUInt32BE(4);
  if (type !== JBD2_SUPERBLOCK_V1 && type !== JBD2_SUPERBLOCK_V2) {
    throw new FsFormatError(`jbd2 superblock of unknown type ${type}`);
  }
  const blockSize = raw.readUInt32BE(0xc);
  if (blockSize !== ctx.blockSize) {
    throw new FsFormatError(`journal block size ${blockSize} differs from the file system's ${ctx.blockSize}`);
  }
  if (type === JBD2_SUPERBLOCK_V2) {
    const incompat = raw.readUInt32BE(0x28);
    if (incompat & (JBD2_FEATURE_INCOMPAT_CSUM_V2 | JBD2_FEATURE_INCOMPAT_CSUM_V3)) {
      if (raw[0x50] !== JBD2_CRC32C_CHKSUM) throw new FsFormatError(`journal checksum type ${raw[0x50]}`);
      const copy = Buffer.from(raw);
      copy.writeUInt32BE(0, 0xfc);
      if (crc32cRaw(0xffffffff, copy) !== raw.readUInt32BE(0xfc)) {
        throw new FsFormatError('journal superblock checksum mismatch');
      }
    }
  }
  return {
    block,
    blockSize,
    start: raw.readUInt32BE(0x1c),
    sequence: raw.readUInt32BE(0x18),
    errno: raw.readInt32BE(0x20),
    version: type === JBD2_SUPERBLOCK_V2 ? 2 : 1,
  };
}

/** Physical block of logical block 0 of the journal inode. */
async function firstBlockOf(ctx: JournalContext): Promise<number> {
  const flags = ctx.inode.readUInt32LE(0x20);
  if (flags & EXT4_INLINE_DATA_FL) throw new FsFormatError('journal inode has inline data');
  const iBlock = ctx.inode.subarray(0x28, 0x28 + 60);
  let block: number;
  if (flags & EXT4_EXTENTS_FL) {
    block = await extentLookup(ctx, iBlock, -1, 0);
  } else {
    block = iBlock.readUInt32LE(0); // i_block[0]: the first direct block
  }
  if (block === 0 || block >= ctx.blocks) throw new FsFormatError(`journal starts at block ${block}`);
  return block;
}

/** Walks an extent tree node to the extent mapping logical block 0. */
async function extentLookup(ctx: JournalContext, node: Buffer, expectDepth: number, level: number): Promise<number> {
  if (level > MAX_EXTENT_DEPTH) throw new FsFormatError('journal extent tree too deep');
  if (node.readUInt16LE(0) !== EXTENT_MAGIC) throw new FsFormatError('journal extent header magic');
  const entries = node.readUInt16LE(2);
  const depth = node.readUInt16LE(6);
  if (12 * (entries + 1) > node.length || (expectDepth >= 0 && depth !== expectDepth)) {
    throw new FsFormatError('journal extent header inconsistent');
  }
  if (depth === 0) {
    for (let i = 0; i < entries; i++) {
      const e = node.subarray(12 + 12 * i, 24 + 12 * i);
      const first = e.readUInt32LE(0);
      let len = e.readUInt16LE(4);
      if (len > 32768) len -= 32768; // unwritten extent
      const start = e.readUInt16LE(6) * 2 ** 32 + e.readUInt32LE(8);
      if (first === 0 && len > 0) return start;
    }
    throw new FsFormatError('journal has no block 0');
  }
  // Index node: the entry covering logical block 0 is the first (entries ascend by ei_block).
  if (entries === 0) throw new FsFormatError('empty journal extent index');
  const idx = node.subarray(12, 24);
  if (idx.readUInt32LE(0) !== 0) throw new FsFormatError('journal has no block 0');
  const leaf = idx.readUInt16LE(8) * 2 ** 32 + idx.readUInt32LE(4);
  if (leaf === 0 || leaf >= ctx.blocks) throw new FsFormatError(`journal extent index points to block ${leaf}`);
  const child = await readBytes(ctx.source, ctx.offset + leaf * ctx.blockSize, ctx.blockSize);
  return extentLookup(ctx, child, depth - 1, level + 1);
}
