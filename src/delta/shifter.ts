/**
 * The shifter: finds a chunk's bytes at any byte offset of the base or of a target already
 * emitted, through content anchors (anchors.ts): an exact copy becomes SHIFT_REF, a similar
 * region the dictionary of SHIFT_DELTA. It catches data that moved by a non-multiple of 4 KiB.
 * Candidates in the base were looked up and tried ahead (propose.ts, on a worker); those in
 * this overlay are looked up here, in order, and the candidates tried in anchor order.
 */
import type { AnchorIndex } from './anchors.js';
import { CHUNK_SIZE } from './chunk.js';
import { ANCHOR_ROW, Eval, SHIFT_TRIES, type Proposals } from './propose.js';
import { Encoding, ShiftFrom, type ChunkRecord } from './record.js';
import type { NewTarget } from './target.js';
import { compressWithDict } from './zstd.js';

export { SHIFT_WORTH } from './propose.js';

export class Shifter {
  private readonly src = Buffer.alloc(CHUNK_SIZE);

  constructor(
    private readonly targets: readonly NewTarget[],
    private readonly selfAnchors: AnchorIndex,
  ) {}

  /**
   * The cheapest SHIFT_* record under `limit` bytes for chunk `c` of target `t`, whose anchors
   * are rows [first, first + count) of `p.anchors`.
   */
  async find(
    data: Buffer,
    t: number,
    c: number,
    limit: number,
    p: Proposals,
    first: number,
    count: number,
  ): Promise<ChunkRecord | undefined> {
    // Candidates in anchor order: the base's (if any), then this overlay's; at most SHIFT_TRIES.
    const cands: Array<{ from: number; target: number; offset: number; row: number }> = [];
    for (let i = first; i < first + count; i++) {
      if (cands.length >= SHIFT_TRIES) break;
      const a = i * ANCHOR_ROW;
      const pos = p.anchors[a]!;
      if (p.anchors[a + 3]! >= 0) {
        cands.push({ from: ShiftFrom.base, target: p.anchors[a + 3]!, offset: p.anchors[a + 4]!, row: a });
      }
      const s = this.selfAnchors.get(p.anchors[a + 1]!, p.anchors[a + 2]!);
      if (s) cands.push({ from: ShiftFrom.self, target: s.target, offset: s.offset - pos, row: -1 });
    }
    let best: ChunkRecord | undefined;
    let bestCost = limit;
    const len = data.length;
    const src = this.src.subarray(0, len);
    const seen = new Set<string>();
    const payloads = Buffer.from(p.payloads.buffer, p.payloads.byteOffset, p.payloads.byteLength);
    for (const k of cands) {
      const r = { target: t, chunk: c, from: k.from, srcTarget: k.target, srcOffset: k.offset };
      if (k.from === ShiftFrom.base) {
        // Tried on the worker, with the same skipping rules.
        const ev = p.anchors[k.row + 5]!;
        if (ev === Eval.none || ev === Eval.invalid) continue;
        if (ev === Eval.exact) return { enc: Encoding.shiftRef, ...r, payload: Buffer.alloc(0) };
        const dlen = p.anchors[k.row + 7]!;
        if (dlen + 8 < bestCost) {
          bestCost = dlen + 8;
          const off = p.anchors[k.row + 6]!;
          best = { enc: Encoding.shiftDelta, ...r, payload: Buffer.from(payloads.subarray(off, off + dlen)) };
        }
        continue;
      }
      const key = `${k.from}:${k.target}:${k.offset}`;
      if (seen.has(key) || k.offset < 0) continue;
      seen.add(key);
      const s = this.targets[k.target];
      const end = k.offset + len;
      if (!s || s.kind === 'blob' || k.target > t || end > s.source.size) continue;
      if (k.target === t && end > c * CHUNK_SIZE) continue;
      await s.source.read(k.offset, len, src);
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
