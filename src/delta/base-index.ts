/**
 * Indexing a base for the differ: the hash index of every chunk of every chunked base target
 * (from their chunk maps, no reading), and the content anchors over their bytes (read once).
 * Target numbers are positions in the base list.
 */
import { AnchorIndex } from './anchors.js';
import { CHUNK_SIZE, extentsToChunkRanges } from './chunk.js';
import { HashIndex } from './hash-index.js';
import type { BaseTarget, TargetKind } from './target.js';

/** Builds the hash index over every chunked base target (target = position in `base`). */
export function indexBase(base: readonly BaseTarget[]): HashIndex {
  const total = base.reduce((n, b) => n + (b.kind === 'blob' ? 0 : b.map.count), 0);
  const index = new HashIndex(total);
  // Memory first: Elijah found modified chunks most often in base memory.
  const order = base.map((b, i) => ({ b, i })).sort((x, y) => rank(x.b.kind) - rank(y.b.kind));
  for (const { b, i } of order) if (b.kind !== 'blob') index.addMap(b.map, i);
  return index;
}

function rank(kind: TargetKind): number {
  return kind === 'ram' ? 0 : kind === 'disk' ? 1 : 2;
}

/** Anchors of every chunked base target, read in 1 MiB batches (target = position in `base`). */
export async function anchorBase(
  base: readonly BaseTarget[],
  onBytes: (n: number) => void = () => undefined,
): Promise<AnchorIndex> {
  const total = base.reduce((n, b) => n + (b.kind === 'blob' ? 0 : b.map.count), 0);
  const index = new AnchorIndex(total * 2);
  const step = 256 * CHUNK_SIZE;
  const buf = Buffer.alloc(step);
  for (const [i, b] of base.entries()) {
    if (b.kind === 'blob') continue;
    for (const [first, end] of extentsToChunkRanges(await b.source.dataExtents(), b.size)) {
      for (let off = first * CHUNK_SIZE; off < Math.min(end * CHUNK_SIZE, b.size); off += step) {
        const len = Math.min(step, b.size - off, end * CHUNK_SIZE - off);
        await b.source.read(off, len, buf);
        index.addAll(buf, 0, len, i, off);
        onBytes(len);
      }
    }
  }
  return index;
}
