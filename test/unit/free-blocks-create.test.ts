/**
 * Chunks whose content does not matter (issue 10): NewChunkedTarget.dontCare in the differ, and
 * `create --free-blocks` on real ext4 images (mke2fs/debugfs, no QEMU). What they protect: such
 * chunks get no record and are rebuilt as the base's content (or zero), the overlay's digest is
 * of that rebuilt content (the rebuild proves itself), nothing references them, every other
 * chunk comes back exactly; a free-blocks overlay of a clean ext4 rebuilds a disk e2fsck finds
 * clean with every file intact; an untrusted file system stays exact; `off` writes the very
 * segments a create without the option writes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BufferSource } from '../../src/delta/buffer-source.js';
import { ChunkMap } from '../../src/delta/chunk-map.js';
import { anchorBase, indexBase } from '../../src/delta/base-index.js';
import { checkChunkRuns, inChunkRuns, subtractChunkRuns } from '../../src/delta/chunk.js';
import { diff } from '../../src/delta/diff.js';
import type { AssemblyOutput } from '../../src/delta/assemble.js';
import { Encoding, ShiftFrom, recordCount, type ChunkRecord, type RecordSink } from '../../src/delta/record.js';
import type { BaseTarget, NewTarget } from '../../src/delta/target.js';
import { initXdelta3 } from '../../src/delta/xdelta3.js';
import { OverlayWriter } from '../../src/overlay/writer.js';
import { OverlayReader } from '../../src/overlay/reader.js';
import type { OverlayHeader } from '../../src/overlay/format.js';
import { createOverlay } from '../../src/api/create.js';
import { applyOverlay } from '../../src/api/apply.js';
import { UsageError } from '../../src/util/errors.js';
import { applyInMemory } from '../helpers/assemble.js';
import { debugfs, hasTool, mkfs } from '../helpers/e2fs.js';
import { rng, textish } from '../helpers/rng.js';

const C = 4096;

test('chunk runs: subtract, membership, checks', () => {
  const r = subtractChunkRuns(
    [
      [0, 10],
      [20, 30],
      [40, 41],
    ],
    [
      { first: 2, count: 3 },
      { first: 8, count: 15 },
      { first: 29, count: 1 },
      { first: 40, count: 1 },
    ],
  );
  assert.deepEqual(r.ranges, [
    [0, 2],
    [5, 8],
    [23, 29],
  ]);
  assert.equal(r.removed, 3 + 2 + 3 + 1 + 1);
  const runs = [
    { first: 2, count: 3 },
    { first: 10, count: 1 },
  ];
  assert.deepEqual(
    [0, 1, 2, 4, 5, 9, 10, 11].map((i) => inChunkRuns(runs, i)),
    [false, false, true, true, false, false, true, false],
  );
  checkChunkRuns(
    [
      { first: 0, count: 2 },
      { first: 2, count: 1 },
    ],
    'ok',
  ); // touching is fine
  assert.throws(
    () =>
      checkChunkRuns(
        [
          { first: 3, count: 2 },
          { first: 4, count: 1 },
        ],
        'x',
      ),
    RangeError,
  );
  assert.throws(() => checkChunkRuns([{ first: 0, count: 0 }], 'x'), RangeError);
});

class Collect implements AssemblyOutput {
  readonly chunks = new Map<number, Buffer | null>();
  readonly ordered = false;
  readonly everyChunk = false;
  async put(i: number, d: Buffer | null): Promise<void> {
    this.chunks.set(i, d ? Buffer.from(d) : null);
  }
  async finish(): Promise<void> {}
  build(base: Buffer, size: number): Buffer {
    const out = Buffer.alloc(size);
    base.copy(out, 0, 0, Math.min(size, base.length));
    for (const [i, d] of this.chunks) {
      if (d) d.copy(out, i * C);
      else out.fill(0, i * C, (i + 1) * C);
    }
    return out;
  }
}

class Records implements RecordSink {
  readonly list: ChunkRecord[] = [];
  constructor(private readonly next: RecordSink) {}
  async push(r: ChunkRecord): Promise<void> {
    this.list.push({ ...r });
    await this.next.push(r);
  }
}

/** Diffs disk + ram with `dontCare` on the disk, rebuilds in memory (digests checked) and returns all. */
async function roundTrip(
  baseDisk: Buffer,
  newDisk: Buffer,
  newRam: Buffer,
  opts: { dontCare?: Array<{ first: number; count: number }>; hinted?: boolean },
): Promise<{ disk: Buffer; ram: Buffer; records: ChunkRecord[]; left: number | undefined }> {
  await initXdelta3();
  const dir = await mkdtemp(join(tmpdir(), 'clo-dc-'));
  try {
    const baseRam = Buffer.alloc(newRam.length);
    const base: BaseTarget[] = [];
    for (const [name, kind, data] of [
      ['disk', 'disk', baseDisk],
      ['pc.ram', 'ram', baseRam],
    ] as const) {
      const source = new BufferSource(name, data);
      base.push({ name, kind, size: data.length, source, map: await ChunkMap.build(source) });
    }
    const targets: NewTarget[] = [
      {
        name: 'disk',
        kind: 'disk',
        source: new BufferSource('disk', newDisk),
        ...(opts.hinted ? { changedHint: [{ start: 0, length: newDisk.length }] } : {}),
        ...(opts.dontCare ? { dontCare: opts.dontCare } : {}),
      },
      { name: 'pc.ram', kind: 'ram', source: new BufferSource('pc.ram', newRam) },
    ];
    const header: OverlayHeader = {
      format: 'cloudlet-overlay',
      version: [1, 0],
      createdAt: new Date().toISOString(),
      creator: 'test',
      chunkSize: C,
      base: {
        id: 'a'.repeat(64),
        targets: base.map((b) => ({ name: b.name, kind: b.kind, size: b.size, digest: 'b'.repeat(64) })),
      },
      targets: targets.map((t) => ({
        name: t.name,
        kind: t.kind,
        size: t.kind === 'blob' ? 0 : t.source.size,
        digest: '',
      })),
      compression: { codec: 'zstd', level: 3 },
    };
    const path = join(dir, 'o.overlay');
    const w = await OverlayWriter.create(path, header);
    const sink = new Records(w);
    const res = await diff(base, indexBase(base), targets, sink, { baseAnchors: await anchorBase(base) });
    await w.finish(res.targets, res.stats);
    await (await OverlayReader.open(path)).close();
    const outs = [new Collect(), new Collect()];
    // The assembler checks every rebuilt target against the overlay's digest.
    await applyInMemory(base, path, outs);
    return {
      disk: outs[0]!.build(baseDisk, newDisk.length),
      ram: outs[1]!.build(baseRam, newRam.length),
      records: sink.list,
      left: res.stats.targets['disk']?.dontCareChunks,
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('dontCare chunks get no record, rebuild as the base (or zero), and the digest proves it', async () => {
  const rand = rng(10);
  const baseDisk = textish(rand, C * 64, 16);
  baseDisk.fill(0, C * 50, C * 56); // the base has nothing here
  const newDisk = Buffer.from(baseDisk);
  const deleted = randomBytes(C * 10);
  deleted.copy(newDisk, C * 10); // a file written, then deleted: free, but not zero
  randomBytes(C * 4).copy(newDisk, C * 30); // a file still in use
  newDisk.fill(0, C * 40, C * 45); // zeroed where the base had data
  randomBytes(C * 4).copy(newDisk, C * 51); // free blocks where the base had zeros
  // The page cache holds the deleted file too: memory must not reference its dontCare chunks.
  const newRam = Buffer.alloc(C * 32);
  deleted.copy(newRam, C * 4);
  const dontCare = [
    { first: 10, count: 10 },
    { first: 42, count: 5 },
    { first: 50, count: 6 },
  ];
  for (const hinted of [false, true]) {
    const r = await roundTrip(baseDisk, newDisk, newRam, { dontCare, hinted });
    const want = Buffer.from(newDisk);
    baseDisk.copy(want, C * 10, C * 10, C * 20); // base content
    baseDisk.copy(want, C * 42, C * 42, C * 47); // base content instead of zeros
    want.fill(0, C * 50, C * 56); // the base's zeros
    assert.ok(r.disk.equals(want), `hinted=${hinted}: rebuilt disk`);
    assert.ok(r.ram.equals(newRam), `hinted=${hinted}: memory exact`);
    const inDc = (t: number, c: number): boolean =>
      t === 0 && dontCare.some((d) => c >= d.first && c < d.first + d.count);
    for (const rec of r.records) {
      for (let k = 0; k < recordCount(rec); k++) {
        assert.ok(!inDc(rec.target, rec.chunk + k), `record at a dontCare chunk ${rec.chunk + k}`);
        if (rec.enc === Encoding.selfRef) assert.ok(!inDc(rec.srcTarget, rec.srcChunk + k), 'a reference to one');
      }
      if ((rec.enc === Encoding.shiftRef || rec.enc === Encoding.shiftDelta) && rec.from === ShiftFrom.self) {
        const first = Math.floor(rec.srcOffset / C);
        assert.ok(!inDc(rec.srcTarget, first) && !inDc(rec.srcTarget, first + 1), 'a shifted reference to one');
      }
    }
    assert.ok((r.left ?? 0) >= 10, `stats count the chunks left out (${r.left})`);
    // Without dontCare, the same inputs come back exactly.
    const exact = await roundTrip(baseDisk, newDisk, newRam, { hinted });
    assert.ok(exact.disk.equals(newDisk));
    assert.equal(exact.left, undefined);
  }
});

const e2fs = hasTool('mke2fs') && hasTool('debugfs') && hasTool('e2fsck') && hasTool('qemu-img');

async function segmentHashes(path: string): Promise<string[]> {
  const r = await OverlayReader.open(path);
  try {
    return r.index.segments.map((s) => s.sha256);
  } finally {
    await r.close();
  }
}

test(
  'create --free-blocks on ext4 images: smaller, e2fsck-clean, files intact; untrusted stays exact; off = today',
  {
    skip: !e2fs && 'needs e2fsprogs and qemu-img',
  },
  async () => {
    const dir = await mkdtemp(join(tmpdir(), 'clo-fb-'));
    try {
      const seed = join(dir, 'seed');
      await mkdir(seed);
      await writeFile(join(seed, 'hello.txt'), 'hello from the base\n');
      const baseDisk = join(dir, 'base.raw');
      mkfs(baseDisk, '64M', ['-b', '4096', '-d', seed]);
      // The customized disk: a 6 MiB "package" written and deleted, a 1 MiB file kept (debugfs: unmounted, clean).
      const keep = randomBytes(1 << 20);
      const pkg = randomBytes(6 << 20);
      await writeFile(join(dir, 'keep.bin'), keep);
      await writeFile(join(dir, 'pkg.deb'), pkg);
      const custom = join(dir, 'custom.raw');
      await copyFile(baseDisk, custom);
      debugfs(
        custom,
        [`write ${join(dir, 'pkg.deb')} pkg.deb`, `write ${join(dir, 'keep.bin')} keep.bin`, 'rm pkg.deb'],
        {
          write: true,
        },
      );
      const baseRef = { baseDisk, baseDiskFormat: 'raw' };
      const make = async (name: string, freeBlocks?: 'off' | 'auto' | 'ext4', disk = custom) =>
        createOverlay({ base: baseRef, disk, diskFormat: 'raw', output: join(dir, name), threads: 1, freeBlocks });
      const plain = await make('plain.overlay');
      const off = await make('off.overlay', 'off');
      const auto = await make('auto.overlay', 'auto');
      const strict = await make('ext4.overlay', 'ext4');
      assert.deepEqual(await segmentHashes(join(dir, 'off.overlay')), await segmentHashes(join(dir, 'plain.overlay')));
      assert.equal(off.free_blocks, undefined);
      assert.ok(auto.free_blocks?.file_systems[0]?.trusted, JSON.stringify(auto.free_blocks));
      assert.ok(
        (auto.free_blocks?.chunks_left_out ?? 0) >= (6 << 20) / C - 2,
        `left out ${auto.free_blocks?.chunks_left_out ?? 0}`,
      );
      assert.ok(auto.size < plain.size - (5 << 20), `auto ${auto.size} vs exact ${plain.size}`);
      assert.equal(strict.size, auto.size);

      // The rebuilt disk: a clean file system with every file as written.
      await applyOverlay({
        overlay: join(dir, 'auto.overlay'),
        base: baseRef,
        outDir: join(dir, 'out'),
        diskFormat: 'raw',
      });
      const rebuilt = join(dir, 'out', 'disk.raw');
      execFileSync('e2fsck', ['-fn', rebuilt], { stdio: 'pipe' }); // throws on any finding
      debugfs(rebuilt, [`dump keep.bin ${join(dir, 'keep.out')}`, `dump hello.txt ${join(dir, 'hello.out')}`]);
      assert.ok((await readFile(join(dir, 'keep.out'))).equals(keep));
      assert.equal(await readFile(join(dir, 'hello.out'), 'utf8'), 'hello from the base\n');
      assert.ok(!(await readFile(rebuilt)).includes(pkg.subarray(0, 4096)), 'the deleted file is gone');

      // A file system mounted read-write (needs_recovery): untrusted, kept exact; ext4 refuses.
      const live = join(dir, 'live.raw');
      await copyFile(custom, live);
      debugfs(live, ['feature needs_recovery'], { write: true });
      const liveAuto = await make('live-auto.overlay', 'auto', live);
      assert.equal(liveAuto.free_blocks?.file_systems[0]?.trusted, false);
      assert.match(liveAuto.free_blocks?.file_systems[0]?.reason ?? '', /needs_recovery/);
      assert.equal(liveAuto.free_blocks?.chunks_left_out, 0);
      await make('live-off.overlay', 'off', live);
      assert.deepEqual(
        await segmentHashes(join(dir, 'live-auto.overlay')),
        await segmentHashes(join(dir, 'live-off.overlay')),
        'an untrusted file system gives the exact overlay',
      );
      await assert.rejects(
        make('live-ext4.overlay', 'ext4', live),
        (err: unknown) => err instanceof UsageError && /--freeze/.test(err.message),
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  },
);

test(
  'trimmed (zero) clusters of a qcow2 over the base: ZERO runs, not read, rebuilt exactly',
  {
    skip: !hasTool('qemu-io') && 'needs qemu-io',
  },
  async () => {
    const dir = await mkdtemp(join(tmpdir(), 'clo-zc-'));
    try {
      const baseDisk = join(dir, 'base.raw');
      await writeFile(baseDisk, randomBytes(8 << 20));
      const top = join(dir, 'top.qcow2');
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', baseDisk, '-F', 'raw', top]);
      // Data written, then discarded as a guest's fstrim does; zeroes written with unmap; data kept.
      execFileSync(
        'qemu-io',
        [
          '-f',
          'qcow2',
          '-c',
          'write -P 0xaa 0 2M',
          '-c',
          'discard 0 1M',
          '-c',
          'write -z -u 4M 2M',
          '-c',
          'write -P 0x55 7M 64k',
          top,
        ],
        {
          stdio: 'pipe',
        },
      );
      const baseRef = { baseDisk, baseDiskFormat: 'raw' };
      const r = await createOverlay({
        base: baseRef,
        disk: top,
        diskFormat: 'qcow2',
        output: join(dir, 'o.overlay'),
        threads: 1,
      });
      assert.equal(r.stats.encodings['zero']?.chunks, (1 << 20) / C + (2 << 20) / C);
      // Only the 1 MiB + 64 KiB of data clusters were read (with the base beside them), not the zeros.
      assert.ok(r.stats.bytesRead <= 2 * ((1 << 20) + (64 << 10)), `read ${r.stats.bytesRead}`);
      await applyOverlay({
        overlay: join(dir, 'o.overlay'),
        base: baseRef,
        outDir: join(dir, 'out'),
        diskFormat: 'raw',
      });
      execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, join(dir, 'want.raw')]);
      assert.ok((await readFile(join(dir, 'out', 'disk.raw'))).equals(await readFile(join(dir, 'want.raw'))));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  },
);
