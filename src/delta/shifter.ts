/**
 * The shifter: finds a chunk's bytes at any byte offset of the base or of a target already
 * emitted, through content anchors (anchors.ts): an exact copy becomes SHIFT_REF, a similar
 * region the dictionary of SHIFT_DELTA. It catches data that moved by a non-multiple of 4 KiB.
 */
import { anchorKey, forEachAnchor, type AnchorIndex } from './anchors.js';
import { CHUNK_SIZE } from './chunk.js';
import { Encoding, ShiftFrom, type ChunkRecord } from './record.js';
import type { BaseTarget, NewTarget } from './target.js';
import { compressWithDict } from './zstd.js';

/** Literals already this small are not worth a search for shifted copies. */
export const SHIFT_WORTH = 48;
/** Candidate sources tried per chunk. */
const SHIFT_TRIES = 4;

export class Shifter {
  private readonly src = Buffer.alloc(CHUNK_SIZE);

  constructor(
    private readonly base: readonly BaseTarget[],
    private readonly targets: readonly NewTarget[],
    private readonly baseAnchors: AnchorIndex | undefined,
    private readonly selfAnchors: AnchorIndex,
  ) {}

  /** The cheapest SHIFT_* record for chunk `c` of target `t` under `limit` bytes, if any. */
  async find(data: Buffer, t: number, c: number, limit: number): Promise<ChunkRecord | undefined> {
    const cands: Array<{ from: number; target: number; offset: number }> = [];
    forEachAnchor(data, 0, data.length, (pos) => {
      if (cands.length >= SHIFT_TRIES) return;
      const [k0, k1] = anchorKey(data, pos);
      const b = this.baseAnchors?.get(k0, k1);
      if (b) cands.push({ from: ShiftFrom.base, target: b.target, offset: b.offset - pos });
      const s = this.selfAnchors.get(k0, k1);
      if (s) cands.push({ from: ShiftFrom.self, target: s.target, offset: s.offset - pos });
    });
    let best: ChunkRecord | undefined;
    let bestCost = limit;
    const len = data.length;
    const src = this.src.subarray(0, len);
    const seen = new Set<string>();
    for (const k of cands) {
      const key = `${k.from}:${k.target}:${k.offset}`;
      if (seen.has(key) || k.offset < 0) continue;
      seen.add(key);
      if (k.from === ShiftFrom.base) {
        const b = this.base[k.target];
        if (!b || b.kind === 'blob' || k.offset + len > b.size) continue;
        await b.source.read(k.offset, len, src);
      } else {
        const s = this.targets[k.target];
        const end = k.offset + len;
        if (!s || s.kind === 'blob' || k.target > t || end > s.source.size) continue;
        if (k.target === t && end > c * CHUNK_SIZE) continue;
        await s.source.read(k.offset, len, src);
      }
      const r = { target: t, chunk: c, from: k.from, srcTarget: k.target, srcOffset: k.offset };
      if (src.equals(data)) return { enc: Encoding.shiftRef, ...r, payload: Buffer.alloc(0) };
      const d = compressWithDict(data, src, 3);
      if (d.length + 8 < bestCost) {
        bestCost = d.length + 8;
        best = { enc: Encoding.shiftDelta, ...r, payload: d };
      }
    }
    return best;
  }
}
