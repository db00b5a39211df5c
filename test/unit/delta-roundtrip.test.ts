import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { BufferSource } from '../../src/delta/buffer-source.js';
import { ChunkMap } from '../../src/delta/chunk-map.js';
import { anchorBase, indexBase } from '../../src/delta/base-index.js';
import { diff } from '../../src/delta/diff.js';
import type { AssemblyOutput } from '../../src/delta/assemble.js';
import { applyInMemory } from '../helpers/assemble.js';
import { initXdelta3 } from '../../src/delta/xdelta3.js';
import type { BaseTarget, NewTarget } from '../../src/delta/target.js';
import { OverlayWriter } from '../../src/overlay/writer.js';
import { OverlayReader } from '../../src/overlay/reader.js';
import type { OverlayHeader } from '../../src/overlay/format.js';
import { HashMismatchError } from '../../src/util/errors.js';
import { rng, textish } from '../helpers/rng.js';
import { xorByte } from '../helpers/bytes.js';

class Collect implements AssemblyOutput {
  readonly chunks = new Map<number, Buffer | null>();
  readonly ordered = false;
  constructor(readonly everyChunk: boolean) {}
  async put(i: number, d: Buffer | null): Promise<void> {
    this.chunks.set(i, d ? Buffer.from(d) : null);
  }
  async finish(): Promise<void> {}
  /** Rebuild the full target from base + changes (or from all chunks). */
  build(base: Buffer | undefined, size: number): Buffer {
    const out = Buffer.alloc(size);
    if (base && !this.everyChunk) {
      // unchanged chunks = base bytes where lengths match
      base.copy(out, 0, 0, Math.min(size, base.length));
      const lastFull = Math.floor(Math.min(size, base.length) / 4096) * 4096;
      if (size !== base.length) out.fill(0, lastFull); // partial last chunk of differing length is not "same place"
      if (size > base.length) out.fill(0, lastFull);
    }
    for (const [i, d] of this.chunks) {
      const len = Math.min(4096, size - i * 4096);
      if (d) d.copy(out, i * 4096, 0, len);
      else out.fill(0, i * 4096, i * 4096 + len);
    }
    return out;
  }
}

async function roundTrip(
  baseDisk: Buffer,
  baseRam: Buffer,
  newDisk: Buffer,
  newRam: Buffer,
  wantsAll = false,
  tamper?: (t: BaseTarget[]) => void,
): Promise<{ disk: Buffer; ram: Buffer; size: number; stats: Record<string, unknown> }> {
  await initXdelta3();
  const dir = await mkdtemp(join(tmpdir(), 'clo-test-'));
  try {
    const base: BaseTarget[] = [];
    for (const [name, kind, data] of [
      ['disk', 'disk', baseDisk],
      ['pc.ram', 'ram', baseRam],
    ] as const) {
      const source = new BufferSource(name, data);
      base.push({ name, kind, size: data.length, source, map: await ChunkMap.build(source) });
    }
    base.push({ name: 'tail', kind: 'blob', size: 5, blob: Buffer.from('hello') });
    const targets: NewTarget[] = [
      { name: 'tail', kind: 'blob', blob: Buffer.from('hello world') },
      { name: 'disk', kind: 'disk', source: new BufferSource('disk', newDisk) },
      { name: 'pc.ram', kind: 'ram', source: new BufferSource('pc.ram', newRam) },
    ];
    const header: OverlayHeader = {
      format: 'cloudlet-overlay',
      version: [1, 0],
      createdAt: new Date().toISOString(),
      creator: 'test',
      chunkSize: 4096,
      base: {
        id: 'a'.repeat(64),
        targets: base.map((b) => ({ name: b.name, kind: b.kind, size: b.size, digest: 'b'.repeat(64) })),
      },
      targets: [
        { name: 'tail', kind: 'blob', size: 11, digest: '' },
        { name: 'disk', kind: 'disk', size: newDisk.length, digest: '' },
        { name: 'pc.ram', kind: 'ram', size: newRam.length, digest: '' },
      ],
      compression: { codec: 'zstd', level: 3 },
    };
    const path = join(dir, 'o.overlay');
    const w = await OverlayWriter.create(path, header);
    const res = await diff(base, indexBase(base), targets, w, { baseAnchors: await anchorBase(base) });
    const { size } = await w.finish(res.targets, res.stats);
    tamper?.(base);
    await (await OverlayReader.open(path)).close(); // header, footer and index check out
    const outs = [new Collect(wantsAll), new Collect(wantsAll), new Collect(wantsAll)];
    const result = await applyInMemory(base, path, [undefined, outs[1], outs[2]]);
    assert.equal(result.blobs.get('tail')?.toString(), 'hello world');
    return {
      disk: outs[1]!.build(baseDisk, newDisk.length),
      ram: outs[2]!.build(baseRam, newRam.length),
      size,
      stats: res.stats.encodings,
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

// Text-like data uses 16 letters (not textish's default 20): the size and stats bounds below
// were set on exactly these bytes.
test('round trip: random edits, moved blocks, zeroed regions, disk↔memory copies', async () => {
  const rand = rng(1);
  const baseDisk = Buffer.alloc(4096 * 300 + 1234);
  textish(rand, 4096 * 200, 16).copy(baseDisk, 4096 * 20);
  const baseRam = textish(rand, 4096 * 128, 16);
  baseRam.fill(0, 4096 * 100, 4096 * 110);
  const newDisk = Buffer.from(baseDisk);
  const newRam = Buffer.from(baseRam);
  // scattered byte edits
  for (let i = 0; i < 200; i++) xorByte(newDisk, Math.floor(rand() * newDisk.length), 0xff);
  // moved block
  baseDisk.copy(newDisk, 4096 * 250 + 512, 4096 * 30, 4096 * 40);
  baseDisk.copy(newDisk, 4096 * 260, 4096 * 30, 4096 * 40);
  // zeroed region
  newDisk.fill(0, 4096 * 50, 4096 * 60 + 17);
  // new random data written to disk, also in memory (page cache)
  const fresh = randomBytes(4096 * 8);
  fresh.copy(newDisk, 4096 * 280);
  for (let i = 0; i < 50; i++) newRam[Math.floor(rand() * newRam.length)] = 0;
  fresh.copy(newRam, 4096 * 10);
  fresh.copy(newRam, 4096 * 90); // repeated inside overlay
  newRam.fill(7, 4096 * 100, 4096 * 101); // zero → data
  const r = await roundTrip(baseDisk, baseRam, newDisk, newRam);
  assert.ok(r.disk.equals(newDisk), 'disk differs');
  assert.ok(r.ram.equals(newRam), 'ram differs');
  const s = r.stats as Record<string, { chunks: number }>;
  assert.ok((s.base_ref?.chunks ?? 0) >= 10, 'moved block found in base');
  assert.ok((s.self_ref?.chunks ?? 0) >= 16, 'memory copies of new disk data are self refs');
  assert.ok((s.zero?.chunks ?? 0) >= 10, 'zeroed region');
});

test('round trip: target grows and shrinks, sizes not a multiple of 4 KiB, every chunk output', async () => {
  const rand = rng(2);
  const baseDisk = textish(rand, 4096 * 10 + 100, 16);
  const newDisk = Buffer.concat([baseDisk.subarray(0, 4096 * 7 + 5), textish(rand, 4096 * 9, 16)]);
  const baseRam = textish(rand, 4096 * 16, 16);
  const newRam = Buffer.from(baseRam.subarray(0, 4096 * 12 + 3000));
  for (const wantsAll of [false, true]) {
    const r = await roundTrip(baseDisk, baseRam, newDisk, newRam, wantsAll);
    assert.ok(r.disk.equals(newDisk));
    assert.ok(r.ram.equals(newRam));
  }
});

test('identical targets cost almost nothing', async () => {
  const rand = rng(3);
  const d = textish(rand, 4096 * 256, 16);
  const m = textish(rand, 4096 * 256, 16);
  const r = await roundTrip(d, m, Buffer.from(d), Buffer.from(m));
  assert.ok(r.size < 2000, `overlay of identical VM is ${r.size} bytes`);
});

test('a changed base is detected by the digest check', async () => {
  const rand = rng(4);
  const d = textish(rand, 4096 * 64, 16);
  const nd = Buffer.from(d);
  xorByte(nd, 5000, 1);
  await assert.rejects(
    roundTrip(d, Buffer.alloc(8192), nd, Buffer.alloc(8192), false, (base) => {
      // the base disk's bytes change after the overlay was made
      const disk = base[0];
      assert.ok(disk && disk.kind !== 'blob');
      const src = disk.source as BufferSource;
      xorByte(src.data, 4096 + 7, 1); // the chunk the delta record is against
    }),
    HashMismatchError,
  );
});

test('data moved by a non-multiple of 4 KiB is found in the base and earlier in the overlay', async () => {
  const rand = rng(5);
  const baseDisk = Buffer.concat([textish(rand, 4096 * 64, 16), randomBytes(4096 * 64)]);
  const newDisk = Buffer.alloc(baseDisk.length);
  // base content at sector (512) and odd (1000) shifts
  baseDisk.copy(newDisk, 4096 * 2 + 512, 4096 * 70, 4096 * 90);
  baseDisk.copy(newDisk, 4096 * 30 + 1000, 4096 * 100, 4096 * 110);
  // shifted and slightly edited
  baseDisk.copy(newDisk, 4096 * 50 + 300, 4096 * 10, 4096 * 20);
  for (let i = 0; i < 10; i++) xorByte(newDisk, 4096 * 50 + 300 + Math.floor(rand() * 4096 * 10), 0x55);
  // new data, then the same new data again at a shift (a file inside an archive)
  const fresh = randomBytes(4096 * 12);
  fresh.copy(newDisk, 4096 * 70);
  fresh.copy(newDisk, 4096 * 90 + 2048);
  const newRam = Buffer.alloc(4096 * 8);
  fresh.copy(newRam, 1536, 0, 4096 * 6);
  const r = await roundTrip(baseDisk, Buffer.alloc(4096 * 8), newDisk, newRam);
  assert.ok(r.disk.equals(newDisk), 'disk differs');
  assert.ok(r.ram.equals(newRam), 'ram differs');
  const s = r.stats as Record<string, { chunks: number }>;
  assert.ok((s.shift_ref?.chunks ?? 0) >= 40, `shifted copies found: ${JSON.stringify(s)}`);
  assert.ok((s.shift_delta?.chunks ?? 0) >= 5, `shifted edited copies as deltas: ${JSON.stringify(s)}`);
  assert.ok(r.size < 4096 * 16, `overlay ${r.size} bytes: the 48 KiB of fresh data once, the rest references`);
});
