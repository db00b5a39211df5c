/**
 * Run merging: consecutive zero chunks and consecutive references (to consecutive source
 * chunks) become one record with a count, before they reach the record sink.
 */
import { Encoding, type ChunkRecord, type RecordSink } from './record.js';
import { countRecord, type DiffStats } from './stats.js';

export class RunMerger {
  private run: Extract<ChunkRecord, { count: number }> | undefined;

  constructor(
    private readonly sink: RecordSink,
    private readonly stats: DiffStats,
  ) {}

  async zero(target: number, chunk: number): Promise<void> {
    const r = this.run;
    if (r && r.enc === Encoding.zero && r.target === target && r.chunk + r.count === chunk) {
      r.count++;
      countRecord(this.stats, Encoding.zero, 1, 0, false);
      return;
    }
    await this.flush();
    this.run = { enc: Encoding.zero, target, chunk, count: 1 };
    countRecord(this.stats, Encoding.zero, 1, 0, true);
  }

  async ref(
    enc: typeof Encoding.baseRef | typeof Encoding.selfRef,
    target: number,
    chunk: number,
    srcTarget: number,
    srcChunk: number,
  ): Promise<void> {
    const r = this.run;
    if (
      r &&
      r.enc === enc &&
      r.target === target &&
      r.chunk + r.count === chunk &&
      r.srcTarget === srcTarget &&
      r.srcChunk + r.count === srcChunk
    ) {
      r.count++;
      countRecord(this.stats, enc, 1, 0, false);
      return;
    }
    await this.flush();
    this.run = { enc, target, chunk, srcTarget, srcChunk, count: 1 };
    countRecord(this.stats, enc, 1, 0, true);
  }

  /** Emits a record that is not part of a run (ends the current run first). */
  async push(r: ChunkRecord, chunks: number): Promise<void> {
    await this.flush();
    countRecord(this.stats, r.enc, chunks, 'payload' in r ? r.payload.length : 0, true);
    await this.sink.push(r);
  }

  async flush(): Promise<void> {
    const r = this.run;
    this.run = undefined;
    if (r) await this.sink.push(r);
  }
}
