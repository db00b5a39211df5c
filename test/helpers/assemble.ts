/**
 * Applies an overlay file to an in-memory base the way the pipeline does (stream reader →
 * segment decoder → assembler), on this thread: for unit tests of the delta library.
 */
import { createReadStream } from 'node:fs';
import { Assembler, type AssembleResult, type AssemblyOutput } from '../../src/delta/assemble.js';
import { MemoryChunkStore } from '../../src/delta/chunk-store.js';
import { decodeSegment, type DecodeContext } from '../../src/delta/segment-decode.js';
import type { BaseTarget } from '../../src/delta/target.js';
import { initXdelta3 } from '../../src/delta/xdelta3.js';
import { OverlayStreamReader } from '../../src/overlay/stream-reader.js';

export async function applyInMemory(
  base: readonly BaseTarget[],
  path: string,
  outputs: ReadonlyArray<AssemblyOutput | undefined>,
): Promise<AssembleResult> {
  await initXdelta3();
  const reader = new OverlayStreamReader(createReadStream(path));
  try {
    const { header } = await reader.open();
    const ctx: DecodeContext = { targets: header.targets, base };
    const asm = new Assembler(base, header.targets, { passes: header.version[0] >= 2, store: new MemoryChunkStore() });
    asm.attach(outputs);
    for await (const seg of reader.segments()) {
      const input = {
        segment: seg.index,
        frame: seg.frame,
        rawLength: seg.rawLength,
        records: seg.records,
        sha256: seg.sha256,
      };
      let d = await decodeSegment(input, ctx);
      await asm.add(d);
      while (d.nextRecord < d.records) {
        d = await decodeSegment(input, ctx, d.nextRecord);
        await asm.add(d);
      }
    }
    return await asm.finish();
  } finally {
    await reader.close();
  }
}
