/**
 * MigrationStreamWriter, writeRamFile and the sparse stream on synthetic snapshots: what is
 * written parses back to the same memory; the sparse stream applied over the base RAM file (as
 * QEMU does: only received pages are written) gives the customized memory — which needs the
 * data→zero pages as ZERO records.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { xorByte } from '../helpers/bytes.js';
import {
  MigrationStreamWriter,
  memorySnapshotFromBuffer,
  openMemorySnapshot,
  openRamFile,
  sparseStreamPagesVsBase,
  writeFullStream,
  writeRamFile,
  writeSparseStream,
  type MemorySnapshot,
} from '../../src/image/memory/index.js';
import { patternPage, sampleStream } from '../helpers/synthetic-stream.js';
import { BaseMismatchError, CloudletError, CorruptInputError } from '../../src/util/errors.js';

const PAGE = 4096;
let dir = '';

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'memory-writer-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function blockBytes(s: MemorySnapshot, name: string): Promise<Buffer> {
  const src = s.block(name);
  const buf = Buffer.alloc(src.size);
  await src.read(0, src.size, buf);
  return buf;
}

async function assertSameMemory(a: MemorySnapshot, b: MemorySnapshot): Promise<void> {
  assert.deepEqual(a.blocks, b.blocks);
  for (const blk of a.blocks)
    assert.ok((await blockBytes(a, blk.name)).equals(await blockBytes(b, blk.name)), blk.name);
}

/** A customized version of the sample: changed, new, and zeroed pages of pc.ram. */
function customize(base: Buffer): { ram: Buffer; changed: number[]; zeroed: number[] } {
  const ram = Buffer.from(base);
  const changed = [2, 20, 40, 41, 63];
  for (const p of changed) patternPage(99, p).copy(ram, p * PAGE);
  const zeroed = [1, 16]; // data pages of the sample
  for (const p of zeroed) ram.fill(0, p * PAGE, (p + 1) * PAGE);
  xorByte(ram, 21 * PAGE + 5, 0xff); // page 21 was data: one byte differs
  changed.push(21);
  return { ram, changed: [...changed, ...zeroed].sort((x, y) => x - y), zeroed };
}

/** Writes a snapshot whose pc.ram is `ram` and other blocks equal `like`. */
async function writeWithRam(like: MemorySnapshot, ram: Buffer, path: string): Promise<void> {
  const w = new MigrationStreamWriter(path);
  await w.begin(await like.prefixBytes(), await like.startSectionBytes(), like.ramSectionId);
  for (const b of like.blocks) {
    const data = b.name === 'pc.ram' ? ram : await blockBytes(like, b.name);
    for (let p = 0; p < b.pages; p++) await w.writePage(b.name, p, data.subarray(p * PAGE, (p + 1) * PAGE));
  }
  await w.finish(await like.tail());
}

describe('MigrationStreamWriter', () => {
  it('writes pages in any order, switching blocks (CONTINUE), and parses back identical', async () => {
    const sample = sampleStream(3);
    const src = await memorySnapshotFromBuffer(sample.bytes);
    const out = join(dir, 'shuffled.stream');
    const w = new MigrationStreamWriter(out);
    await w.begin(await src.prefixBytes(), await src.startSectionBytes(), src.ramSectionId);
    // interleave blocks, pages descending; write a few pages twice (the second copy must win)
    const queue: [string, number][] = [];
    const maxPages = Math.max(...src.blocks.map((b) => b.pages));
    for (let p = maxPages - 1; p >= 0; p--) for (const b of src.blocks) if (p < b.pages) queue.push([b.name, p]);
    for (const [name] of [['pc.ram'], ['pc.bios']] as const) await w.writePage(name, 1, patternPage(42, 42));
    for (const [name, p] of queue) {
      const buf = Buffer.alloc(PAGE);
      await src.block(name).read(p * PAGE, PAGE, buf);
      await w.writePage(name, p, src.pages(name).isZero(p) ? null : buf);
    }
    await assert.rejects(stat(out), 'nothing at the final path before finish()');
    const stats = await w.finish(await src.tail());
    assert.equal(stats.bytes, (await stat(out)).size);
    const back = await openMemorySnapshot(out);
    try {
      await assertSameMemory(src, back);
      assert.equal(back.records.repeated, 2);
      assert.ok((await back.tail()).equals(await src.tail()));
      assert.ok((await back.prefixBytes()).equals(await src.prefixBytes()));
      assert.ok((await back.startSectionBytes()).equals(await src.startSectionBytes()));
    } finally {
      await back.close();
    }
  });

  it('writes all-zero data as ZERO records', async () => {
    const src = await memorySnapshotFromBuffer(sampleStream().bytes);
    const out = join(dir, 'full.stream');
    await writeFullStream(src, out);
    const back = await openMemorySnapshot(out);
    try {
      await assertSameMemory(src, back);
      const pages = src.blocks.reduce((n, b) => n + b.pages, 0);
      const nonZero = src.blocks.reduce(
        (n, b) => n + src.pages(b.name).counts().data + src.pages(b.name).counts().fill,
        0,
      );
      assert.equal(back.records.page, nonZero, 'fill pages become data pages, zero pages stay ZERO');
      assert.equal(back.records.zero, pages - nonZero);
    } finally {
      await back.close();
    }
  });

  it('refuses misuse and a START section that does not match', async () => {
    const src = await memorySnapshotFromBuffer(sampleStream().bytes);
    const prefix = await src.prefixBytes();
    const start = await src.startSectionBytes();
    const w = new MigrationStreamWriter(join(dir, 'misuse.stream'));
    await assert.rejects(w.begin(prefix, start, src.ramSectionId + 1), CorruptInputError);
    await assert.rejects(w.begin(prefix.subarray(0, 10), start, src.ramSectionId), CorruptInputError);
    const ok = new MigrationStreamWriter(join(dir, 'misuse2.stream'));
    await ok.begin(prefix, start, src.ramSectionId);
    await assert.rejects(ok.writePage('nosuch', 0, null), CloudletError);
    await assert.rejects(ok.writePage('pc.ram', 64, null), CloudletError);
    await assert.rejects(ok.writePage('pc.ram', 0, Buffer.alloc(100)), CloudletError);
    await assert.rejects(ok.finish(Buffer.from('garbage')), CorruptInputError);
    await ok.abort();
    await assert.rejects(stat(join(dir, 'misuse2.stream')));
  });
});

describe('RAM files and the sparse stream', () => {
  it('writeRamFile writes the block exactly, long zero runs as holes', async () => {
    const sample = sampleStream(4);
    const src = await memorySnapshotFromBuffer(sample.bytes);
    const path = join(dir, 'pc.ram');
    const stats = await writeRamFile(src, 'pc.ram', path);
    const data = await readFile(path);
    assert.ok(data.equals(sample.contents.get('pc.ram')!));
    // Non-zero pages are 1, 6, 7 (fill), 11, …, 61: gaps shorter than 16 pages are written as zeros.
    assert.equal(stats.writtenPages, 61);
    const st = await stat(path);
    assert.ok(st.blocks * 512 <= 62 * PAGE, `allocated ${st.blocks * 512} bytes for 61 pages`);
  });

  it('sends exactly the changed pages (zeroed ones as ZERO) and every page of small blocks', async () => {
    const sample = sampleStream(5);
    const a = await memorySnapshotFromBuffer(sample.bytes);
    const basePath = join(dir, 'base-a.ram');
    await writeRamFile(a, 'pc.ram', basePath);
    const { ram, changed, zeroed } = customize(sample.contents.get('pc.ram')!);
    const bPath = join(dir, 'b.stream');
    await writeWithRam(a, ram, bPath);
    const b = await openMemorySnapshot(bPath);
    const base = await openRamFile(basePath);
    try {
      const listed: number[] = [];
      for await (const p of sparseStreamPagesVsBase(b, 'pc.ram', base)) listed.push(p.pageIndex);
      assert.deepEqual(listed, changed);

      const sPath = join(dir, 'sparse.stream');
      const stats = await writeSparseStream(b, base, sPath);
      assert.equal(stats.changedPages, changed.length);
      assert.equal(stats.zeroedPages, zeroed.length);
      const s = await openMemorySnapshot(sPath);
      try {
        const st = s.pages('pc.ram');
        for (let p = 0; p < st.pages; p++) assert.equal(st.isSent(p), changed.includes(p), `page ${p}`);
        for (const p of zeroed) assert.equal(st.fillByte(p), 0, `page ${p} is a ZERO record`);
        for (const blk of s.blocks) if (blk.name !== 'pc.ram') assert.equal(s.pages(blk.name).counts().unsent, 0);
        // Apply like QEMU on a share=off mapping of the base file: received pages only.
        const mem = await readFile(basePath);
        for (let p = 0; p < st.pages; p++) {
          if (!st.isSent(p)) continue;
          await s.block('pc.ram').read(p * PAGE, PAGE, mem.subarray(p * PAGE, (p + 1) * PAGE));
        }
        assert.ok(mem.equals(ram), 'base + sparse stream = customized memory');
      } finally {
        await s.close();
      }
    } finally {
      await b.close();
      await base.close();
    }
  });

  it('refuses a base RAM file of another size', async () => {
    const a = await memorySnapshotFromBuffer(sampleStream().bytes);
    const path = join(dir, 'short.ram');
    await writeFile(path, Buffer.alloc(PAGE));
    const base = await openRamFile(path);
    try {
      await assert.rejects(writeSparseStream(a, base, join(dir, 'never.stream')), BaseMismatchError);
      await assert.rejects(stat(join(dir, 'never.stream')));
    } finally {
      await base.close();
    }
  });
});
