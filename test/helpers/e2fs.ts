/**
 * Real ext2/3/4 images for the free-block reader's tests, made and inspected with Debian's
 * e2fsprogs (mke2fs, debugfs, dumpe2fs), which serve as the oracle. A file system at an offset
 * inside an image (a partition) is addressed as "image?offset=N", which every e2fsprogs tool
 * accepts (unix_io's io options).
 */
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import type { ChunkSource, Extent } from '../../src/delta/source.js';

/** Inclusive block range, as dumpe2fs prints them. */
export type BlockRange = [first: number, last: number];

export function run(cmd: string, args: string[], input?: string): string {
  return execFileSync(cmd, args, {
    encoding: 'utf8',
    input,
    stdio: ['pipe', 'pipe', 'pipe'],
    maxBuffer: 256 * 1024 * 1024,
  });
}

export function hasTool(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** e2fsprogs' name for the file system at `offset` of `image`. */
export function dev(image: string, offset = 0): string {
  return offset ? `${image}?offset=${offset}` : image;
}

/** mke2fs -t TYPE -q -F [options] [-E offset=…] image size (e.g. "300M"). */
export function mkfs(
  image: string,
  size: string,
  options: string[],
  opts: { offset?: number; type?: string } = {},
): void {
  const ext = opts.offset ? ['-E', `offset=${opts.offset}`] : [];
  run('mke2fs', ['-t', opts.type ?? 'ext4', '-q', '-F', ...options, ...ext, image, size]);
}

/** Runs debugfs commands (-w: read-write) on the file system, via a command file. */
export function debugfs(image: string, cmds: string[], opts: { offset?: number; write?: boolean } = {}): string {
  const w = opts.write ? ['-w'] : [];
  // One command: -R, whose output is the command's alone (-f echoes every command line).
  if (cmds.length === 1) return run('debugfs', [...w, '-R', cmds[0] as string, dev(image, opts.offset)]);
  const file = `${image}.debugfs-cmds`;
  writeFileSync(file, cmds.join('\n') + '\n');
  return run('debugfs', [...w, '-f', file, dev(image, opts.offset)]);
}

export interface DumpInfo {
  blockSize: number;
  blocks: number;
  /** Free block ranges from the per-group "Free blocks:" lines, merged across groups. */
  free: BlockRange[];
  /** Groups flagged BLOCK_UNINIT. */
  blockUninit: number;
  groups: number;
  features: string[];
}

/** dumpe2fs's view of the file system: the oracle. */
export function dumpe2fs(image: string, offset = 0): DumpInfo {
  const out = run('dumpe2fs', [dev(image, offset)]);
  const num = (label: string): number => {
    const m = new RegExp(`^${label}:\\s+(\\d+)`, 'm').exec(out);
    if (!m) throw new Error(`dumpe2fs printed no ${label}`);
    return Number(m[1]);
  };
  const ranges: BlockRange[] = [];
  for (const m of out.matchAll(/^ {2}Free blocks: ?(.*)$/gm)) {
    const list = (m[1] ?? '').trim();
    if (!list) continue;
    for (const part of list.split(/,\s*/)) {
      const [a, b] = part.split('-').map(Number) as [number, number | undefined];
      ranges.push([a, b ?? a]);
    }
  }
  const features = (/^Filesystem features:\s+(.*)$/m.exec(out)?.[1] ?? '').trim().split(/\s+/);
  return {
    blockSize: num('Block size'),
    blocks: num('Block count'),
    free: mergeRanges(ranges),
    blockUninit: [...out.matchAll(/^Group \d+:.*BLOCK_UNINIT/gm)].length,
    groups: [...out.matchAll(/^Group \d+:/gm)].length,
    features,
  };
}

export function mergeRanges(list: BlockRange[]): BlockRange[] {
  const sorted = [...list].sort((x, y) => x[0] - y[0]);
  const out: BlockRange[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r[0] <= last[1] + 1) last[1] = Math.max(last[1], r[1]);
    else out.push([r[0], r[1]]);
  }
  return out;
}

/** Byte extents of the image (for a file system at `offset`) as inclusive block ranges. */
export function extentsToBlocks(free: readonly Extent[], offset: number, blockSize: number): BlockRange[] {
  return mergeRanges(
    free.map((e) => {
      if ((e.start - offset) % blockSize !== 0 || e.length % blockSize !== 0) {
        throw new Error(`extent ${e.start}+${e.length} is not block-aligned`);
      }
      const first = (e.start - offset) / blockSize;
      return [first, first + e.length / blockSize - 1] as BlockRange;
    }),
  );
}

/** Data blocks of a file (debugfs "blocks"), plus its extent-tree/indirect blocks (debugfs "stat"). */
export function fileBlocks(image: string, path: string, offset = 0): number[] {
  const data = debugfs(image, [`blocks ${path}`], { offset })
    .trim()
    .split(/\s+/)
    .filter(Boolean)
    .map(Number);
  const stat = debugfs(image, [`stat ${path}`], { offset });
  // "(IND):1234", "(DIND):…", "(ETB0):5678" are metadata blocks of the file.
  const meta = [...stat.matchAll(/\((?:IND|DIND|TIND|ETB\d+)\):(\d+)/g)].map((m) => Number(m[1]));
  return [...data, ...meta];
}

/** Physical block of logical block `n` of an inode ("<8>" is the journal). */
export function bmap(image: string, inode: string, n: number, offset = 0): number {
  return Number(debugfs(image, [`bmap ${inode} ${n}`], { offset }).trim());
}

/** Writes `bytes` at `position` of a file. */
export async function patch(file: string, position: number, bytes: Buffer): Promise<void> {
  const h = await open(file, 'r+');
  try {
    await h.write(bytes, 0, bytes.length, position);
  } finally {
    await h.close();
  }
}

export async function readAt(file: string, position: number, length: number): Promise<Buffer> {
  const h = await open(file, 'r');
  try {
    const b = Buffer.alloc(length);
    await h.read(b, 0, length, position);
    return b;
  } finally {
    await h.close();
  }
}

/** A ChunkSource over a Buffer (for fuzzing without files). */
export function bufferSource(buf: Buffer, name = 'disk'): ChunkSource {
  return {
    name,
    size: buf.length,
    read(offset: number, length: number, out: Buffer): Promise<void> {
      out.fill(0, 0, length);
      if (offset < buf.length) buf.copy(out, 0, offset, Math.min(buf.length, offset + length));
      return Promise.resolve();
    },
    dataExtents(): Promise<Extent[]> {
      return Promise.resolve([{ start: 0, length: buf.length }]);
    },
  };
}

export interface GroupInfo {
  group: number;
  first: number;
  last: number;
  blockBitmap: number;
  inodeTable: number;
  flags: string;
}

/** Per-group layout from dumpe2fs (where each group's bitmaps and inode table are). */
export function groupsOf(image: string, offset = 0): GroupInfo[] {
  const out = run('dumpe2fs', [dev(image, offset)]);
  const groups: GroupInfo[] = [];
  for (const part of out.split(/^(?=Group \d+:)/m).slice(1)) {
    const head = /^Group (\d+): \(Blocks (\d+)-(\d+)\)(.*)$/m.exec(part);
    const bb = /Block bitmap at (\d+)/.exec(part);
    const it = /Inode table at (\d+)/.exec(part);
    if (!head || !bb || !it) continue;
    groups.push({
      group: Number(head[1]),
      first: Number(head[2]),
      last: Number(head[3]),
      blockBitmap: Number(bb[1]),
      inodeTable: Number(it[1]),
      flags: head[4] ?? '',
    });
  }
  return groups;
}
