/**
 * Qcow2Writer and RawWriter against references built independently in memory: random changed,
 * zeroed and rewritten chunks over a random base (raw and qcow2 backing), several cluster sizes,
 * virtual size bigger and smaller than the base. qcow2 outputs must pass `qemu-img check`
 * with nothing to say and `qemu-img compare` equal to the reference.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtemp, open, readFile, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ChunkSource, Extent } from '../../src/delta/source.js';
import { openDisk, type DiskSource } from '../../src/image/disk/open-disk.js';
import { decodeHeader } from '../../src/image/disk/qcow2-header.js';
import { Qcow2Writer, refcountLayout } from '../../src/image/disk/qcow2-writer.js';
import { RawWriter } from '../../src/image/disk/raw-writer.js';
import type { DiskWriter } from '../../src/image/disk/writer.js';
import { runCleanup } from '../../src/util/cleanup.js';
import { CloudletError, UnsupportedError } from '../../src/util/errors.js';
import { rng } from '../helpers/rng.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 4096;
let dir = '';
let seq = 0;

function randomBytes(r: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i += 4) b.writeUInt32LE(Math.floor(r() * 2 ** 32), i);
  return b;
}

/** Writes `data` sparsely: only its non-zero 4 KiB blocks, file length = data.length. */
async function writeSparse(path: string, data: Buffer): Promise<void> {
  const h = await open(path, 'w');
  await h.truncate(data.length);
  const zero = Buffer.alloc(CHUNK);
  for (let pos = 0; pos < data.length; pos += CHUNK) {
    const block = data.subarray(pos, Math.min(pos + CHUNK, data.length));
    if (!block.equals(zero.subarray(0, block.length))) await h.write(block, 0, block.length, pos);
  }
  await h.close();
}

/** A random base: data in about a third of its 64 KiB regions, partly filled, holes elsewhere. */
async function makeBase(size: number, seed: number): Promise<{ raw: string; qcow2: string; data: Buffer }> {
  const r = rng(seed);
  const data = Buffer.alloc(size);
  for (let pos = 0; pos < size; pos += 64 * KiB) {
    if (r() < 0.35) {
      for (let c = pos; c < Math.min(pos + 64 * KiB, size); c += CHUNK) {
        if (r() < 0.6) randomBytes(r, CHUNK).copy(data, c, 0, Math.min(CHUNK, size - c));
      }
    }
  }
  const raw = join(dir, `base-${seed}.raw`);
  const qcow2 = join(dir, `base-${seed}.qcow2`);
  await writeSparse(raw, data);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
  return { raw, qcow2, data };
}

/** Counts what a writer reads from its base: the cost must follow the changes. */
class CountingSource implements ChunkSource {
  bytesRead = 0;
  constructor(private readonly inner: DiskSource) {}
  get name(): string {
    return this.inner.name;
  }
  get size(): number {
    return this.inner.size;
  }
  async read(offset: number, length: number, buf: Buffer): Promise<void> {
    this.bytesRead += length;
    await this.inner.read(offset, length, buf);
  }
  dataExtents(): Promise<Extent[]> {
    return this.inner.dataExtents();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

interface Scenario {
  baseSize: number;
  virtualSize: number;
  clusterSize: number;
  backing: 'raw' | 'qcow2';
  seed: number;
}

/**
 * Feeds a writer random operations in ascending order and returns the reference bytes.
 * Also checks readBack along the way: final bytes behind the cursor, base bytes ahead of it.
 */
async function drive(w: DiskWriter, base: Buffer, s: Scenario, clusterSize: number): Promise<Buffer> {
  const r = rng(s.seed * 7 + 1);
  const V = s.virtualSize;
  const ref = Buffer.alloc(V);
  base.copy(ref, 0, 0, Math.min(base.length, V));
  const before = Buffer.from(ref);
  const nChunks = Math.ceil(V / CHUNK);
  let c = 0;
  let ops = 0;
  while (c < nChunks) {
    const off = c * CHUNK;
    const roll = r();
    // Whole-cluster runs hit the zero-flag and full-cluster paths; single chunks the partial path.
    const clusterStart = off % clusterSize === 0;
    let len = Math.min(CHUNK, V - off);
    if (clusterStart && roll < 0.08) {
      len = Math.min(clusterSize, V - off);
      for (let p = off; p < off + len; p += CHUNK) await w.zeroChunk(p, Math.min(CHUNK, off + len - p));
      ref.fill(0, off, off + len);
    } else if (clusterStart && roll < 0.12) {
      len = Math.min(clusterSize, V - off);
      const data = randomBytes(r, len);
      await w.writeChunk(off, data);
      data.copy(ref, off);
    } else if (roll < 0.17) {
      const data = randomBytes(r, len);
      await w.writeChunk(off, data);
      data.copy(ref, off);
    } else if (roll < 0.2) {
      await w.zeroChunk(off);
      ref.fill(0, off, off + len);
    } else if (roll < 0.21) {
      await w.writeChunk(off, Buffer.alloc(len)); // zeros written as data
      ref.fill(0, off, off + len);
    } else if (roll < 0.22 && off + 3 * CHUNK <= V) {
      len = 3 * CHUNK;
      const data = randomBytes(r, len);
      await w.writeChunk(off, data);
      data.copy(ref, off);
    } else {
      len = CHUNK; // untouched
    }
    c += Math.ceil(len / CHUNK);
    if (++ops % 97 === 0) {
      const done = Math.min(c * CHUNK, V);
      const a = Math.floor(r() * done);
      const n = Math.min(done - a, 1 + Math.floor(r() * 3 * clusterSize));
      if (n > 0)
        assert.ok((await w.readBack(a, n)).equals(ref.subarray(a, a + n)), `readBack behind cursor at ${a}+${n}`);
      if (done < V) {
        const b = done + Math.floor(r() * (V - done));
        const m = Math.min(V - b, 1 + Math.floor(r() * clusterSize));
        assert.ok((await w.readBack(b, m)).equals(before.subarray(b, b + m)), `readBack ahead of cursor at ${b}+${m}`);
      }
    }
  }
  // Past the virtual size reads as zero.
  const tail = await w.readBack(V - 10, 20);
  assert.ok(tail.subarray(0, 10).equals(ref.subarray(V - 10)));
  assert.ok(tail.subarray(10).equals(Buffer.alloc(10)));
  return ref;
}

function qemuCheck(path: string): { json: Record<string, unknown>; stderr: string; status: number | null } {
  const p = spawnSync('qemu-img', ['check', '--output=json', '-f', 'qcow2', path], { encoding: 'utf8' });
  return { json: JSON.parse(p.stdout) as Record<string, unknown>, stderr: p.stderr, status: p.status };
}

function qemuCompare(a: string, fa: string, b: string, fb: string): number | null {
  return spawnSync('qemu-img', ['compare', '-f', fa, '-F', fb, a, b], { encoding: 'utf8' }).status;
}

function assertClean(path: string): void {
  const c = qemuCheck(path);
  assert.equal(c.status, 0, `qemu-img check exit ${c.status}: ${c.stderr}`);
  assert.equal(c.stderr.trim(), '', 'qemu-img check must have nothing to say');
  assert.equal(c.json['check-errors'], 0);
  assert.equal(c.json['corruptions'] ?? 0, 0);
  assert.equal(c.json['leaks'] ?? 0, 0);
}

async function noTempFiles(): Promise<void> {
  const left = (await readdir(dir)).filter((f) => f.includes('.tmp-'));
  assert.deepEqual(left, []);
}

/** Locally a missing qemu-img skips loudly; in CI (CI set) it fails: CI must install qemu-utils. */
const noQemu = spawnSync('qemu-img', ['--version']).error ? 'qemu-img not found: apt-get install qemu-utils' : false;
if (noQemu && process.env['CI']) throw new Error(noQemu);
if (noQemu) console.error(`SKIPPING disk tests: ${noQemu}`);

describe('disk writers', { skip: noQemu }, () => {
  const bases = new Map<number, { raw: string; qcow2: string; data: Buffer }>();
  const baseFor = async (size: number, seed: number): Promise<{ raw: string; qcow2: string; data: Buffer }> => {
    const key = size * 1000 + seed;
    let b = bases.get(key);
    if (!b) {
      b = await makeBase(size, seed);
      bases.set(key, b);
    }
    return b;
  };

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'disk-writers-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const B = 6 * MiB + 1536; // not a multiple of 4 KiB
  const sizes = [
    { label: 'same size', v: B },
    { label: 'bigger', v: B + 3 * MiB + 512 },
    { label: 'smaller', v: B - 2 * MiB - 2560 },
  ];
  for (const clusterSize of [4 * KiB, 64 * KiB, 2 * MiB]) {
    for (const { label, v } of sizes) {
      for (const backing of ['raw', 'qcow2'] as const) {
        const s: Scenario = { baseSize: B, virtualSize: v, clusterSize, backing, seed: ++seq };
        const title =
          `qcow2 ${clusterSize / KiB} KiB clusters, ${label}, ${backing} backing: ` + 'check clean, compare equal';
        it(title, async () => {
          const base = await baseFor(B, 1);
          const src = await openDisk(backing === 'raw' ? base.raw : base.qcow2, { format: backing });
          const out = join(dir, `out-${s.seed}.qcow2`);
          const backingName = `base-1.${backing}`; // relative: resolved against the output's directory
          const w = await Qcow2Writer.create(out, {
            virtualSize: v,
            backingFile: backingName,
            backingFormat: backing,
            base: src,
            clusterSize,
          });
          const ref = await drive(w, base.data, s, clusterSize);
          const stats = await w.finish();
          await src.close();
          const refPath = join(dir, `ref-${s.seed}.raw`);
          await writeSparse(refPath, ref);
          assertClean(out);
          assert.equal(qemuCompare(out, 'qcow2', refPath, 'raw'), 0, 'qemu-img compare: output differs from reference');
          assert.equal((await stat(out)).size, stats.file_size);
          assert.ok((stats.zero_clusters ?? 0) > 0 || v < clusterSize * 8, 'zero flags expected');
          // Our own reader agrees too (it reads the written clusters directly).
          const back = await openDisk(out, { format: 'qcow2' });
          const all = Buffer.alloc(v);
          await back.read(0, v, all);
          await back.close();
          assert.ok(all.equals(ref));
          await noTempFiles();
          await rm(out);
          await rm(refPath);
        });
      }
    }
  }

  for (const { label, v } of sizes) {
    for (const backing of ['raw', 'qcow2'] as const) {
      const s: Scenario = { baseSize: B, virtualSize: v, clusterSize: 64 * KiB, backing, seed: ++seq };
      it(`raw writer, ${label}, ${backing} base: identical to reference, holes kept`, async () => {
        const base = await baseFor(B, 1);
        const src = new CountingSource(await openDisk(backing === 'raw' ? base.raw : base.qcow2, { format: backing }));
        const out = join(dir, `out-${s.seed}.raw`);
        const w = await RawWriter.create(out, { virtualSize: v, base: src });
        const ref = await drive(w, base.data, s, 64 * KiB);
        const stats = await w.finish();
        const got = await readFile(out);
        assert.equal(got.length, v);
        assert.ok(got.equals(ref), 'raw output differs from reference');
        assert.equal(stats.file_size, v);
        // Sparse: allocated blocks stay near the non-zero data, not the virtual size.
        let nonZero = 0;
        for (let p = 0; p < v; p += CHUNK)
          if (!ref.subarray(p, p + CHUNK).equals(Buffer.alloc(Math.min(CHUNK, v - p)))) nonZero++;
        const allocated = (await stat(out)).blocks * 512;
        // (slack: the file system's extent tree blocks count in st_blocks too)
        assert.ok(
          allocated <= nonZero * CHUNK * 1.05 + 64 * KiB,
          `allocated ${allocated} for ${nonZero} non-zero chunks`,
        );
        assert.ok(allocated < v / 2);
        await src.close();
        await noTempFiles();
        await rm(out);
      });
    }
  }

  it('qcow2 cost follows changes: 1 GiB disk, 10 changed chunks → small file, little base read', async () => {
    const size = 1024 * MiB;
    const r = rng(99);
    const baseRaw = join(dir, 'big-base.raw');
    const h = await open(baseRaw, 'w');
    await h.truncate(size);
    for (let i = 0; i < 20; i++)
      await h.write(randomBytes(r, 64 * KiB), 0, 64 * KiB, Math.floor(r() * (size / (64 * KiB))) * 64 * KiB);
    await h.close();
    for (const clusterSize of [4 * KiB, 64 * KiB]) {
      const src = new CountingSource(await openDisk(baseRaw, { format: 'raw' }));
      const out = join(dir, `big-${clusterSize}.qcow2`);
      const t0 = performance.now();
      const w = await Qcow2Writer.create(out, {
        virtualSize: size,
        backingFile: 'big-base.raw',
        backingFormat: 'raw',
        base: src,
        clusterSize,
      });
      const offsets = Array.from({ length: 10 }, () => Math.floor(r() * (size / CHUNK)) * CHUNK).sort((a, b) => a - b);
      const changes = new Map<number, Buffer>();
      for (const off of new Set(offsets)) {
        const data = randomBytes(r, CHUNK);
        changes.set(off, data);
        await w.writeChunk(off, data);
      }
      const stats = await w.finish();
      const ms = performance.now() - t0;
      const fileSize = (await stat(out)).size;
      // header + ≤10 data + ≤10 L2 + L1 + refcount table + refcount block
      assert.ok(fileSize <= 24 * clusterSize, `file ${fileSize} bytes for 10 changed chunks`);
      assert.ok(src.bytesRead <= 10 * clusterSize, `read ${src.bytesRead} base bytes`);
      assert.ok(ms < 2000, `took ${ms} ms`);
      assert.equal(stats.data_clusters, changes.size);
      assertClean(out);
      // Reference: the base with the changes, built with plain file I/O.
      const refPath = join(dir, 'big-ref.raw');
      execFileSync('cp', ['--sparse=always', baseRaw, refPath]);
      const rh = await open(refPath, 'r+');
      for (const [off, data] of changes) await rh.write(data, 0, data.length, off);
      await rh.close();
      assert.equal(qemuCompare(out, 'qcow2', refPath, 'raw'), 0);
      await src.close();
      await rm(out);
      await rm(refPath);
    }
    await rm(baseRaw);
  });

  it('qcow2 header: v3, refcount_order 4, no feature bits, backing name and format; qemu-img info agrees', async () => {
    const base = await baseFor(B, 1);
    const src = await openDisk(base.raw, { format: 'raw' });
    const out = join(dir, 'hdr.qcow2');
    const w = await Qcow2Writer.create(out, {
      virtualSize: B,
      backingFile: 'base-1.raw',
      backingFormat: 'raw',
      base: src,
    });
    await w.writeChunk(8192, Buffer.alloc(CHUNK, 1));
    await w.finish();
    await src.close();
    const buf = await readFile(out);
    assert.equal(buf.toString('latin1', 0, 4), 'QFI\xfb');
    assert.equal(buf.readUInt32BE(4), 3);
    assert.equal(buf.readUInt32BE(96), 4);
    assert.equal(buf.readUInt32BE(100), 112);
    assert.equal(buf.readBigUInt64BE(72), 0n);
    assert.equal(buf.readBigUInt64BE(80), 0n);
    assert.equal(buf.readBigUInt64BE(88), 0n);
    const h = decodeHeader(buf);
    assert.equal(h.backingFile, 'base-1.raw');
    assert.equal(h.backingFormat, 'raw');
    assert.equal(h.virtualSize, B);
    const info = JSON.parse(
      execFileSync('qemu-img', ['info', '--output=json', '-f', 'qcow2', out], { encoding: 'utf8' }),
    ) as Record<string, unknown>;
    assert.equal(info['backing-filename'], 'base-1.raw');
    assert.equal(info['backing-filename-format'], 'raw');
    assert.equal(info['cluster-size'], 65536);
    assert.equal(info['virtual-size'], B);
    const spec = info['format-specific'] as { data: Record<string, unknown> };
    assert.equal(spec.data['compat'], '1.1');
    assert.equal(spec.data['refcount-bits'], 16);
    assert.equal(spec.data['corrupt'], false);
    // COPIED flags right: qemu writes in place (no COW), and the image stays clean.
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 8192 4096', '-c', 'write -P 0x5b 100k 4k', out], {
      stdio: 'ignore',
    });
    assertClean(out);
    const after = JSON.parse(
      execFileSync('qemu-img', ['check', '--output=json', '-f', 'qcow2', out], { encoding: 'utf8' }),
    ) as Record<string, unknown>;
    assert.equal(after['allocated-clusters'], 2);
    await rm(out);
  });

  it('refcount layout is a fixed point that counts itself', () => {
    for (const cs of [4096, 65536, 2 * MiB]) {
      const perBlock = cs / 2;
      for (const used of [
        1,
        2,
        perBlock - 2,
        perBlock - 1,
        perBlock,
        perBlock + 1,
        10 * perBlock - 3,
        1000 * perBlock,
      ]) {
        const { tableClusters, blocks } = refcountLayout(used, cs);
        const total = used + tableClusters + blocks;
        assert.ok(blocks * perBlock >= total, `cs ${cs} used ${used}: blocks cover everything`);
        assert.ok((blocks - 1) * perBlock < total, `cs ${cs} used ${used}: no spare block`);
        assert.ok(tableClusters * (cs / 8) >= blocks);
      }
    }
  });

  it('abort (and the cleanup registry) leave no file behind', async () => {
    const base = await baseFor(B, 1);
    const src = await openDisk(base.raw, { format: 'raw' });
    for (const make of [
      (p: string): Promise<DiskWriter> =>
        Qcow2Writer.create(p, { virtualSize: B, backingFile: 'base-1.raw', backingFormat: 'raw', base: src }),
      (p: string): Promise<DiskWriter> => RawWriter.create(p, { virtualSize: B, base: src }),
    ]) {
      const out = join(dir, 'aborted.img');
      const w = await make(out);
      await w.writeChunk(0, Buffer.alloc(CHUNK, 3));
      await w.writeChunk(5 * MiB, Buffer.alloc(CHUNK, 4));
      await w.abort();
      await w.abort();
      await assert.rejects(stat(out));
      await noTempFiles();
      await assert.rejects(w.writeChunk(6 * MiB, Buffer.alloc(CHUNK)), CloudletError);

      const w2 = await make(out);
      await w2.writeChunk(0, Buffer.alloc(CHUNK, 3));
      await runCleanup(); // what SIGINT does
      await assert.rejects(stat(out));
      await noTempFiles();
    }
    await src.close();
  });

  it('empty and sub-cluster disks: check clean, right size', async () => {
    const base = await baseFor(B, 1);
    const src = await openDisk(base.raw, { format: 'raw' });
    for (const v of [0, 512, 3584]) {
      const out = join(dir, `tiny-${v}.qcow2`);
      const w = await Qcow2Writer.create(out, {
        virtualSize: v,
        backingFile: 'base-1.raw',
        backingFormat: 'raw',
        base: src,
      });
      if (v > 0) await w.writeChunk(0, Buffer.alloc(v, 9));
      await w.finish();
      assertClean(out);
      const info = JSON.parse(
        execFileSync('qemu-img', ['info', '--output=json', '-f', 'qcow2', out], { encoding: 'utf8' }),
      ) as Record<string, unknown>;
      assert.equal(info['virtual-size'], v);
      const rawOut = join(dir, `tiny-${v}.raw`);
      const rw = await RawWriter.create(rawOut, { virtualSize: v, base: src });
      if (v > 0) await rw.writeChunk(0, Buffer.alloc(v, 9));
      await rw.finish();
      assert.ok((await readFile(rawOut)).equals(Buffer.alloc(v, 9)));
      await rm(out);
      await rm(rawOut);
    }
    await src.close();
  });

  it('contract violations are refused without spoiling the writer', async () => {
    const base = await baseFor(B, 1);
    const src = await openDisk(base.raw, { format: 'raw' });
    const out = join(dir, 'contract.qcow2');
    const w = await Qcow2Writer.create(out, {
      virtualSize: B,
      backingFile: 'base-1.raw',
      backingFormat: 'raw',
      base: src,
    });
    await w.writeChunk(MiB, Buffer.alloc(CHUNK, 1));
    await assert.rejects(w.writeChunk(0, Buffer.alloc(CHUNK, 1)), /out of order/);
    await assert.rejects(w.writeChunk(2 * MiB + 1, Buffer.alloc(CHUNK)), /aligned/);
    await assert.rejects(w.writeChunk(3 * MiB, Buffer.alloc(100)), /short chunk/);
    await assert.rejects(w.writeChunk(6 * MiB + CHUNK, Buffer.alloc(CHUNK)), /past the virtual size/);
    await w.writeChunk(B - 1536, Buffer.alloc(1536, 2)); // the short last chunk
    await w.finish();
    await assert.rejects(w.writeChunk(B, Buffer.alloc(CHUNK)), /finished/);
    assertClean(out);
    await rm(out);
    await assert.rejects(
      Qcow2Writer.create(out, {
        virtualSize: B,
        backingFile: 'x',
        backingFormat: 'raw',
        base: src,
        clusterSize: 8192 * 3,
      }),
      UnsupportedError,
    );
    await assert.rejects(
      Qcow2Writer.create(out, { virtualSize: B + 1, backingFile: 'x', backingFormat: 'raw', base: src }),
      UnsupportedError,
    );
    await assert.rejects(
      Qcow2Writer.create(out, { virtualSize: B, backingFile: 'x'.repeat(1024), backingFormat: 'raw', base: src }),
      UnsupportedError,
    );
    await src.close();
  });
});
