/**
 * create on worker threads: the overlay is the same whatever the number of threads (proposals
 * on workers, decisions in order on the main thread), and it applies back exactly. A VM pair
 * generated here: disk and memory with shared content (page cache), moved and edited data.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createOverlay } from '../../src/api/create.js';
import { applyOverlay } from '../../src/api/apply.js';
import { OverlayReader } from '../../src/overlay/reader.js';
import { SharedHashes } from '../../src/delta/shared-hashes.js';
import { rng, streamOf, textish } from '../helpers/synthetic-vm.js';
import { chunkHash } from '../../src/delta/hash.js';
import { xorByte } from '../helpers/bytes.js';

interface Pair {
  baseDisk: string;
  baseMem: string;
  disk: string;
  mem: string;
}

async function pair(dir: string): Promise<Pair> {
  const rand = rng(7);
  const baseDisk = Buffer.alloc(12 << 20);
  textish(rand, 6 << 20, 16).copy(baseDisk, 1 << 20);
  const baseRam = textish(rand, 8 << 20, 16);
  const disk = Buffer.from(baseDisk);
  const ram = Buffer.from(baseRam);
  // New files on the disk, also in the page cache (memory); an edit; data moved by 1000 bytes.
  const file = textish(rand, 3 << 20, 20);
  file.copy(disk, 8 << 20);
  file.copy(ram, 2 << 20, 0, 2 << 20);
  for (let i = 0; i < 300; i++) xorByte(disk, (1 << 20) + Math.floor(rand() * (6 << 20)), 0x55);
  baseDisk.copy(disk, (7 << 20) + 1000, 1 << 20, (1 << 20) + (512 << 10));
  const bios = textish(rand, 256 << 10, 12);
  const files = {
    baseDisk: join(dir, 'base.disk'),
    baseMem: join(dir, 'base.mem'),
    disk: join(dir, 'cust.disk'),
    mem: join(dir, 'cust.mem'),
  };
  await writeFile(files.baseDisk, baseDisk);
  await writeFile(files.disk, disk);
  await writeFile(
    files.baseMem,
    streamOf([
      ['pc.ram', baseRam],
      ['pc.bios', bios],
    ]),
  );
  await writeFile(
    files.mem,
    streamOf([
      ['pc.ram', ram],
      ['pc.bios', bios],
    ]),
  );
  return files;
}

test('create: the same overlay with 1, 2 and 3 threads, and it applies back', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'clo-threads-'));
  try {
    const f = await pair(dir);
    const made: Array<{ segments: string[]; targets: string; size: number }> = [];
    for (const threads of [1, 2, 3]) {
      const out = join(dir, `t${threads}.overlay`);
      await createOverlay({
        base: { baseDisk: f.baseDisk, baseMemory: f.baseMem },
        disk: f.disk,
        memory: f.mem,
        output: out,
        threads,
      });
      const r = await OverlayReader.open(out);
      made.push({
        segments: r.index.segments.map((s) => s.sha256),
        targets: JSON.stringify(r.header.targets),
        size: r.fileSize,
      });
      await r.close();
    }
    assert.ok(made[0]!.segments.length > 3, 'several segments');
    for (const m of made.slice(1)) assert.deepEqual(m, made[0], 'byte-identical segments and digests');
    const a = await applyOverlay({
      overlay: join(dir, 't2.overlay'),
      base: { baseDisk: f.baseDisk, baseMemory: f.baseMem },
      outDir: join(dir, 'out'),
      diskFormat: 'raw',
      memoryFormat: 'raw',
    });
    const rebuilt = await readFile(join(a.out_dir, 'disk.raw'));
    assert.ok(rebuilt.equals(await readFile(f.disk)), 'disk rebuilt exactly');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('SharedHashes: what is added is found, in another view of the same memory too', () => {
  const s = new SharedHashes(1000);
  const other = new SharedHashes(0, s.buffer);
  const hs = Array.from({ length: 800 }, (_, i) => chunkHash(Buffer.from(`chunk ${i}`)));
  for (const h of hs.slice(0, 400)) s.add(h);
  for (const h of hs.slice(0, 400)) assert.ok(other.has(h));
  for (const h of hs.slice(400)) assert.ok(!other.has(h));
  // Past its capacity it keeps working, dropping new entries (they are hints only).
  for (let i = 0; i < 5000; i++) s.add(chunkHash(Buffer.from(`more ${i}`)));
  assert.ok(other.has(hs[0]!));
});
