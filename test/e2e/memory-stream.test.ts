/**
 * Memory snapshots against real QEMU 7.2 (SeaBIOS guest, TCG, no kernel needed):
 *  (i)   real streams parse: blocks, page counts equal to QEMU's own counters, BIOS bytes;
 *  (ii)  a re-emitted full stream loads, and migrating out again gives identical memory;
 *  (iii) a sparse stream loads on top of the base RAM file mapped share=off and gives memory
 *        identical to the customized snapshot, leaving the base file unchanged — and dropping
 *        its ZERO records for data→zero pages visibly corrupts memory;
 *  (iv)  a libvirt-wrapped copy parses the same;
 *  (v)   streams saved with x-ignore-shared parse (RAM reported as not in the stream) and
 *        streams saved with compress are refused, naming the capability.
 * "Customized" snapshot B: snapshot A with known pc.ram pages changed / added / zeroed, loaded
 * into QEMU (paused) and migrated out again, so B is written by QEMU itself.
 * Runs in CI (QEMU installed); fails there rather than skip when QEMU is missing.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { xorByte } from '../helpers/bytes.js';
import {
  MigrationStreamWriter,
  buildLibvirtHeader,
  copyBlock,
  openMemorySnapshot,
  openRamFile,
  sparseStreamPagesVsBase,
  writeRamFile,
  writeSparseStream,
  type MemorySnapshot,
} from '../../src/image/memory/index.js';
import { patternPage } from '../helpers/synthetic-stream.js';
import { TinyQemu, requireQemu } from '../helpers/tiny-qemu.js';
import { UnsupportedError } from '../../src/util/errors.js';

const PAGE = 4096;
const MiB = 1024 * 1024;
const RAM_MIB = 64;

const running = new Set<TinyQemu>();
const opened = new Set<MemorySnapshot>();
let dir = '';

after(async () => {
  for (const vm of running) await vm.quit();
  for (const s of opened) await s.close();
  if (dir !== '' && !process.env.KEEP_MEMORY_E2E) await rm(dir, { recursive: true, force: true });
});

async function start(name: string, extra: Partial<Parameters<typeof TinyQemu.start>[0]> = {}): Promise<TinyQemu> {
  const vm = await TinyQemu.start({ dir, name, memMiB: RAM_MIB, ...extra });
  running.add(vm);
  return vm;
}

async function stop(vm: TinyQemu): Promise<void> {
  await vm.quit();
  running.delete(vm);
}

async function open(path: string): Promise<MemorySnapshot> {
  const s = await openMemorySnapshot(path);
  opened.add(s);
  return s;
}

async function blockBytes(s: MemorySnapshot, name: string): Promise<Buffer> {
  const src = s.block(name);
  const buf = Buffer.alloc(src.size);
  await src.read(0, src.size, buf);
  return buf;
}

/** Pages (by index) where two equally long buffers differ. */
function differingPages(a: Buffer, b: Buffer): number[] {
  const out: number[] = [];
  for (let p = 0; p * PAGE < a.length; p++) {
    if (!a.subarray(p * PAGE, (p + 1) * PAGE).equals(b.subarray(p * PAGE, (p + 1) * PAGE))) out.push(p);
  }
  return out;
}

/** Every block of `b` is page-by-page identical to `a`'s (names, lengths, bytes). */
async function assertSameMemory(a: MemorySnapshot, b: MemorySnapshot, what: string): Promise<void> {
  assert.deepEqual(b.blocks, a.blocks, `${what}: block list`);
  for (const blk of a.blocks) {
    const diff = differingPages(await blockBytes(a, blk.name), await blockBytes(b, blk.name));
    assert.deepEqual(diff, [], `${what}: block ${blk.name} differs in pages ${diff.slice(0, 10).join(', ')}`);
  }
}

/** Loads `streamPath` into a paused QEMU (-S -incoming), checks it loaded, migrates it out to `outPath`. */
async function loadAndSave(
  name: string,
  streamPath: string,
  outPath: string,
  args: string[] = [],
  machine?: string,
): Promise<void> {
  const vm = await start(name, { incoming: `exec:cat ${streamPath}`, args, ...(machine ? { machine } : {}) });
  const status = await vm.waitIncoming();
  assert.equal(status, 'paused', `${name}: status after incoming (QEMU log: ${vm.log})`);
  await vm.migrateToFile(outPath);
  await stop(vm);
}

async function sha256(path: string): Promise<string> {
  return createHash('sha256')
    .update(await readFile(path))
    .digest('hex');
}

test(
  'QEMU 7.2 memory snapshots: parse, full re-emit, sparse resume, libvirt wrapping',
  { timeout: 300_000 },
  async (t) => {
    if (!requireQemu(t)) return;
    dir = await mkdtemp(join(tmpdir(), 'memory-e2e-'));
    const path = (n: string): string => join(dir, n);

    // Snapshot A: SeaBIOS booted for a moment, migrated out while running (pages may repeat).
    const src = await start('a');
    await sleep(800);
    const countersA = await src.migrateToFile(path('a.stream'));
    await stop(src);

    let a!: MemorySnapshot;
    await t.test("(i) a real stream parses: blocks, QEMU's page counters, BIOS bytes", async () => {
      const t0 = performance.now();
      a = await open(path('a.stream'));
      const ms = performance.now() - t0;
      const size = (await stat(path('a.stream'))).size;
      t.diagnostic(`parsed ${size} bytes in ${ms.toFixed(1)} ms; records ${JSON.stringify(a.records)}`);
      assert.equal(a.machineType, 'pc-q35-7.2');
      const names = a.blocks.map((b) => b.name);
      for (const n of ['pc.ram', 'pc.bios', 'pc.rom', '/rom@etc/acpi/tables'])
        assert.ok(names.includes(n), `${n} in ${names.join(', ')}`);
      assert.equal(a.blocks.find((b) => b.name === 'pc.ram')!.length, RAM_MIB * MiB);
      a.assertComplete();
      assert.equal(a.records.page, countersA.normal, 'PAGE records = QEMU "normal" pages');
      assert.equal(a.records.zero, countersA.duplicate, 'ZERO records = QEMU "duplicate" pages');
      assert.ok(a.pages('pc.ram').counts().data > 0);
      assert.equal(a.hasVmdesc, true);
      // The BIOS ROM block holds SeaBIOS's image byte for byte (Debian: package seabios).
      const bios = ['/usr/share/seabios/bios-256k.bin', '/usr/share/qemu/bios-256k.bin'].find((p) => existsSync(p));
      if (bios !== undefined)
        assert.ok((await blockBytes(a, 'pc.bios')).equals(await readFile(bios)), `pc.bios = ${bios}`);
      else t.diagnostic('bios-256k.bin not found: BIOS byte check skipped');
    });

    await t.test(
      '(ii) a re-emitted full stream (pages shuffled across blocks) loads and round-trips exactly',
      async () => {
        const w = new MigrationStreamWriter(path('a-full.stream'));
        await w.begin(await a.prefixBytes(), await a.startSectionBytes(), a.ramSectionId);
        // Round-robin over blocks, pages descending: CONTINUE is used and broken constantly.
        const data = new Map<string, Buffer>();
        for (const b of a.blocks) data.set(b.name, await blockBytes(a, b.name));
        const maxPages = Math.max(...a.blocks.map((b) => b.pages));
        const t0 = performance.now();
        for (let p = maxPages - 1; p >= 0; p--) {
          for (const b of a.blocks) {
            if (p >= b.pages) continue;
            await w.writePage(
              b.name,
              p,
              a.pages(b.name).isZero(p) ? null : data.get(b.name)!.subarray(p * PAGE, (p + 1) * PAGE),
            );
          }
        }
        const stats = await w.finish(await a.tail());
        t.diagnostic(`full stream: ${stats.bytes} bytes in ${(performance.now() - t0).toFixed(1)} ms`);

        const vm = await start('a-full', { incoming: `exec:cat ${path('a-full.stream')}` });
        assert.equal(await vm.waitIncoming(), 'paused', vm.log);
        // QEMU's own view of guest RAM above 1 MiB (below it, ROM shadows overlay pc.ram).
        await vm.execute('pmemsave', { val: MiB, size: (RAM_MIB - 1) * MiB, filename: path('a-full.pmem') });
        const pmem = await readFile(path('a-full.pmem'));
        assert.ok(pmem.equals(data.get('pc.ram')!.subarray(MiB)), 'pmemsave after load = pc.ram of A');
        await vm.migrateToFile(path('a-full-out.stream'));
        await stop(vm);
        await assertSameMemory(a, await open(path('a-full-out.stream')), 'A → writer → QEMU → stream');
      },
    );

    // Customized snapshot B: pc.ram pages added (zero→data), changed (data→data), zeroed (data→zero).
    const ramA = await blockBytes(a, 'pc.ram');
    const ramB = Buffer.from(ramA);
    const dataPages: number[] = [];
    for (let p = 0; p < ramA.length / PAGE; p++) if (a.pages('pc.ram').isData(p)) dataPages.push(p);
    assert.ok(dataPages.length >= 12, `A has ${dataPages.length} data pages in pc.ram`);
    const added = Array.from({ length: 40 }, (_, i) => 16 * 256 + i * 3);
    const changedPages = dataPages.slice(-6);
    const zeroed = dataPages.slice(-12, -6);
    for (const p of added) patternPage(1, p).copy(ramB, p * PAGE);
    for (const p of changedPages) xorByte(ramB, p * PAGE + 100, 0x5a);
    for (const p of zeroed) ramB.fill(0, p * PAGE, (p + 1) * PAGE);
    const expectedDiff = [...added, ...changedPages, ...zeroed].sort((x, y) => x - y);

    let b!: MemorySnapshot;
    await t.test('making B: crafted stream loaded into QEMU and migrated out again', async () => {
      const w = new MigrationStreamWriter(path('b-craft.stream'));
      await w.begin(await a.prefixBytes(), await a.startSectionBytes(), a.ramSectionId);
      for (const blk of a.blocks) {
        if (blk.name !== 'pc.ram') {
          await copyBlock(a, blk.name, w);
          continue;
        }
        for (let p = 0; p < blk.pages; p++) await w.writePage('pc.ram', p, ramB.subarray(p * PAGE, (p + 1) * PAGE));
      }
      await w.finish(await a.tail());
      await loadAndSave('b', path('b-craft.stream'), path('b.stream'));
      b = await open(path('b.stream'));
      b.assertComplete();
      assert.deepEqual(differingPages(ramA, await blockBytes(b, 'pc.ram')), expectedDiff);
    });

    await t.test('(iii) sparse stream on the base RAM file (share=off) = B; base file unchanged', async () => {
      let t0 = performance.now();
      const ramStats = await writeRamFile(a, 'pc.ram', path('base.ram'));
      t.diagnostic(
        `base RAM file: ${ramStats.writtenPages} pages written in ${(performance.now() - t0).toFixed(1)} ms`,
      );
      const st = await stat(path('base.ram'));
      assert.equal(st.size, RAM_MIB * MiB);
      assert.ok(st.blocks * 512 < 8 * MiB, `base RAM file is sparse (${st.blocks * 512} bytes allocated)`);
      const baseHash = await sha256(path('base.ram'));

      const base = await openRamFile(path('base.ram'));
      t0 = performance.now();
      const stats = await writeSparseStream(b, base, path('sparse.stream'));
      t.diagnostic(`sparse stream: ${JSON.stringify(stats)} in ${(performance.now() - t0).toFixed(1)} ms`);
      assert.equal(stats.changedPages, expectedDiff.length);
      assert.equal(stats.zeroedPages, zeroed.length);

      // Without data→zero pages: the same stream minus ZERO records for pc.ram.
      const w = new MigrationStreamWriter(path('sparse-no-zero.stream'));
      await w.begin(await b.prefixBytes(), await b.startSectionBytes(), b.ramSectionId);
      for (const blk of b.blocks) {
        if (blk.name !== 'pc.ram') await copyBlock(b, blk.name, w);
        else
          for await (const p of sparseStreamPagesVsBase(b, 'pc.ram', base))
            if (p.data !== null) await w.writePage('pc.ram', p.pageIndex, p.data);
      }
      await w.finish(await b.tail());
      await base.close();

      const backend = [
        '-object',
        `memory-backend-file,id=pc.ram,size=${RAM_MIB}M,mem-path=${path('base.ram')},share=off`,
      ];
      const machine = 'pc-q35-7.2,memory-backend=pc.ram';
      await loadAndSave('sparse', path('sparse.stream'), path('sparse-out.stream'), backend, machine);
      await assertSameMemory(b, await open(path('sparse-out.stream')), 'base RAM file + sparse stream');
      assert.equal(await sha256(path('base.ram')), baseHash, 'base RAM file unchanged');

      await loadAndSave(
        'sparse-no-zero',
        path('sparse-no-zero.stream'),
        path('sparse-no-zero-out.stream'),
        backend,
        machine,
      );
      const broken = await blockBytes(await open(path('sparse-no-zero-out.stream')), 'pc.ram');
      assert.deepEqual(
        differingPages(await blockBytes(b, 'pc.ram'), broken),
        zeroed,
        'omitting ZERO records leaves base bytes',
      );
      assert.equal(await sha256(path('base.ram')), baseHash, 'base RAM file still unchanged');
    });

    await t.test('(iv) a libvirt save image around B parses the same', async () => {
      const xml = '<domain type="qemu"><name>b</name><memory unit="MiB">64</memory></domain>';
      await writeFile(
        path('b.libvirt'),
        Buffer.concat([buildLibvirtHeader(xml, true), await readFile(path('b.stream'))]),
      );
      const l = await open(path('b.libvirt'));
      assert.equal(l.libvirt?.xml, xml);
      assert.equal(l.machineType, b.machineType);
      assert.deepEqual(l.records, b.records);
      await assertSameMemory(b, l, 'libvirt-wrapped B');
      for (const blk of b.blocks) {
        const x = b.pages(blk.name);
        const y = l.pages(blk.name);
        for (let p = 0; p < blk.pages; p++) {
          if (x.isData(p) !== y.isData(p) || x.fillByte(p) !== y.fillByte(p))
            assert.fail(`${blk.name} page ${p}: state differs`);
        }
      }
      assert.ok((await l.prefixBytes()).equals(await b.prefixBytes()));
      assert.ok((await l.startSectionBytes()).equals(await b.startSectionBytes()));
      assert.ok((await l.tail()).equals(await b.tail()));
    });

    await t.test('(v) x-ignore-shared streams parse; compress streams are refused by name', async () => {
      await writeFile(path('shared.ram'), Buffer.alloc(0));
      await truncate(path('shared.ram'), RAM_MIB * MiB);
      const shared = await start('shared', {
        machine: 'pc-q35-7.2,memory-backend=pc.ram',
        args: ['-object', `memory-backend-file,id=pc.ram,size=${RAM_MIB}M,mem-path=${path('shared.ram')},share=on`],
      });
      await shared.migrateToFile(path('ignore-shared.stream'), ['x-ignore-shared']);
      await stop(shared);
      const s = await open(path('ignore-shared.stream'));
      assert.deepEqual(s.capabilities, ['x-ignore-shared']);
      assert.equal(s.pages('pc.ram').counts().unsent, s.pages('pc.ram').pages);
      assert.equal(s.pages('pc.bios').counts().unsent, 0);
      assert.throws(() => s.assertComplete(), UnsupportedError);

      const compressing = await start('compress');
      await compressing.migrateToFile(path('compress.stream'), ['compress']);
      await stop(compressing);
      await assert.rejects(openMemorySnapshot(path('compress.stream')), (err: unknown) => {
        assert.ok(err instanceof UnsupportedError);
        assert.match(err.message, /"compress"/);
        return true;
      });
    });
  },
);
