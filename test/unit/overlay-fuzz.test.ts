/**
 * Seeded, time-bounded fuzzing of overlay files: every mutation of a valid overlay must end in
 * a CloudletError (or, if it happens to leave the file valid, in the exact original result) —
 * never another exception, a hang or a huge allocation.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BufferSource } from '../../src/delta/buffer-source.js';
import { ChunkMap } from '../../src/delta/chunk-map.js';
import { indexBase } from '../../src/delta/base-index.js';
import { diff } from '../../src/delta/diff.js';
import type { AssemblyOutput } from '../../src/delta/assemble.js';
import { applyInMemory } from '../helpers/assemble.js';
import { initXdelta3 } from '../../src/delta/xdelta3.js';
import { baseIdOf, type BaseTarget } from '../../src/delta/target.js';
import { OverlayWriter } from '../../src/overlay/writer.js';
import { OverlayReader } from '../../src/overlay/reader.js';
import { CloudletError } from '../../src/util/errors.js';
import { rng, textish } from '../helpers/synthetic-vm.js';
import { xorByte } from '../helpers/bytes.js';

class Sink implements AssemblyOutput {
  readonly everyChunk = true;
  readonly ordered = false;
  readonly out: Buffer;
  constructor(size: number) {
    this.out = Buffer.alloc(size);
  }
  async put(i: number, d: Buffer | null): Promise<void> {
    if (d) d.copy(this.out, i * 4096);
  }
  async finish(): Promise<void> {}
}

test('overlay fuzz: mutated overlays end in clean errors', async () => {
  await initXdelta3();
  const seed = Number(process.env.OVERLAY_FUZZ_SEED ?? 1);
  const rand = rng(seed);
  const dir = await mkdtemp(join(tmpdir(), 'clo-fuzz-'));
  try {
    const baseDisk = textish(rand, 64 * 4096);
    const newDisk = Buffer.from(baseDisk);
    for (let i = 0; i < 40; i++) xorByte(newDisk, Math.floor(rand() * newDisk.length), 1);
    baseDisk.copy(newDisk, 40 * 4096, 0, 8 * 4096);
    textish(rand, 8 * 4096).copy(newDisk, 50 * 4096);
    newDisk.copy(newDisk, 58 * 4096, 50 * 4096, 54 * 4096);
    newDisk.fill(0, 20 * 4096, 22 * 4096);
    const src = new BufferSource('disk', baseDisk);
    const baseMap = await ChunkMap.build(src);
    const base: BaseTarget[] = [
      { name: 'tail', kind: 'blob', size: 9, blob: Buffer.from('base tail') },
      { name: 'disk', kind: 'disk', size: baseDisk.length, source: src, map: baseMap },
    ];
    const infos = [
      { name: 'tail', kind: 'blob' as const, size: 9, digest: '0'.repeat(64) },
      { name: 'disk', kind: 'disk' as const, size: baseDisk.length, digest: baseMap.digest() },
    ];
    const path = join(dir, 'good.overlay');
    const w = await OverlayWriter.create(path, {
      format: 'cloudlet-overlay',
      version: [1, 0],
      createdAt: 'now',
      creator: 'fuzz',
      chunkSize: 4096,
      base: { id: baseIdOf(infos), targets: infos },
      targets: [
        { name: 'tail', kind: 'blob', size: 12, digest: '' },
        { name: 'disk', kind: 'disk', size: newDisk.length, digest: '' },
      ],
      compression: { codec: 'zstd', level: 3 },
    });
    const res = await diff(
      base,
      indexBase(base),
      [
        { name: 'tail', kind: 'blob', blob: Buffer.from('custom tail!') },
        { name: 'disk', kind: 'disk', source: new BufferSource('disk', newDisk) },
      ],
      w,
    );
    await w.finish(res.targets, res.stats);
    const good = await readFile(path);

    const applyFile = async (file: string): Promise<Buffer> => {
      // As apply does for a file: random-access checks first, then the stream.
      await (await OverlayReader.open(file)).close();
      const sink = new Sink(newDisk.length);
      await applyInMemory(base, file, [undefined, sink]);
      return sink.out;
    };
    assert.ok((await applyFile(path)).equals(newDisk), 'the unmutated overlay applies');

    const deadline = Date.now() + 2500;
    let runs = 0;
    let failures = 0;
    while (Date.now() < deadline) {
      const m = mutate(good, rand);
      const file = join(dir, `m.overlay`);
      await writeFile(file, m);
      runs++;
      try {
        const out = await applyFile(file);
        assert.ok(out.equals(newDisk), `mutation ${runs} (seed ${seed}) applied to a wrong result`);
      } catch (err) {
        if (!(err instanceof CloudletError)) {
          throw new Error(`mutation ${runs} (seed ${seed}) raised ${(err as Error).name}: ${(err as Error).message}`);
        }
        failures++;
      }
    }
    assert.ok(runs > 100, `only ${runs} runs`);
    assert.ok(failures > runs * 0.9, `${failures} of ${runs} mutations were refused`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

function mutate(good: Buffer, rand: () => number): Buffer {
  const b = Buffer.from(good);
  const at = Math.floor(rand() * b.length);
  switch (Math.floor(rand() * 6)) {
    case 0:
      xorByte(b, at, 1 << Math.floor(rand() * 8));
      return b;
    case 1:
      b[at] = Math.floor(rand() * 256);
      return b;
    case 2:
      return b.subarray(0, at);
    case 3:
      return Buffer.concat([b.subarray(0, at), Buffer.from([Math.floor(rand() * 256)]), b.subarray(at)]);
    case 4:
      b.fill(0, at, Math.min(b.length, at + 1 + Math.floor(rand() * 64)));
      return b;
    default: {
      // A big number where a length might be.
      if (at + 4 <= b.length) b.writeUInt32LE(0xfffffff0, at);
      return b;
    }
  }
}
