/**
 * openDisk reads every kind of image byte-identical to `qemu-img convert -O raw`, and its
 * dataExtents leave out exactly what reads as zero. Images are generated with qemu-img/qemu-io.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, readdir, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { backingChain, openDisk, type DiskSource } from '../../src/image/disk/open-disk.js';
import { CorruptInputError, NotFoundError } from '../../src/util/errors.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir = '';

function qemuImg(...args: string[]): void {
  execFileSync('qemu-img', args, { stdio: 'ignore' });
}

function qemuIo(format: string, file: string, ...cmds: string[]): void {
  execFileSync('qemu-io', ['-f', format, ...cmds.flatMap((c) => ['-c', c]), file], { stdio: 'ignore' });
}

/** The reference: what qemu itself says the guest sees. */
async function referenceRaw(file: string, format: string): Promise<Buffer> {
  const out = join(dir, `ref-${Math.random().toString(16).slice(2)}.raw`);
  qemuImg('convert', '-f', format, '-O', 'raw', file, out);
  const data = await readFile(out);
  await rm(out);
  return data;
}

/** Reads the whole disk in odd-sized pieces (not aligned to anything). */
async function readAll(d: DiskSource): Promise<Buffer> {
  const out = Buffer.alloc(d.size);
  const step = 300 * KiB + 7;
  const bufs: Promise<void>[] = [];
  for (let pos = 0; pos < d.size; pos += step) {
    const n = Math.min(step, d.size - pos);
    bufs.push(d.read(pos, n, out.subarray(pos, pos + n)));
  }
  await Promise.all(bufs);
  return out;
}

/** Every byte outside the extents is zero; extents are ascending, disjoint, within size. */
async function checkExtents(d: DiskSource, ref: Buffer): Promise<{ covered: number }> {
  const ext = await d.dataExtents();
  let pos = 0;
  let covered = 0;
  for (const e of ext) {
    assert.ok(e.start >= pos && e.length > 0 && e.start + e.length <= d.size, JSON.stringify(e));
    assert.ok(isZero(ref.subarray(pos, e.start)), `non-zero bytes in [${pos}, ${e.start}) outside data extents`);
    covered += e.length;
    pos = e.start + e.length;
  }
  assert.ok(isZero(ref.subarray(pos)), 'non-zero bytes after the last data extent');
  return { covered };
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i += 65536) {
    const part = b.subarray(i, i + 65536);
    if (!part.equals(Buffer.alloc(part.length))) return false;
  }
  return true;
}

async function expectIdentical(file: string, format: string, access: 'direct' | 'converted'): Promise<DiskSource> {
  const d = await openDisk(file, { format, tmpDir: join(dir, 'tmp') });
  const ref = await referenceRaw(file, format);
  assert.equal(d.size, ref.length);
  assert.equal(d.access, access);
  assert.ok((await readAll(d)).equals(ref), `${file}: openDisk bytes differ from qemu-img convert`);
  await checkExtents(d, ref);
  return d;
}

/** Locally a missing qemu-img skips loudly; in CI (CI set) it fails: CI must install qemu-utils. */
const noQemu = spawnSync('qemu-img', ['--version']).error ? 'qemu-img not found: apt-get install qemu-utils' : false;
if (noQemu && process.env['CI']) throw new Error(noQemu);
if (noQemu) console.error(`SKIPPING disk tests: ${noQemu}`);

describe('openDisk', { skip: noQemu }, () => {
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'disk-open-'));
    await mkdir(join(dir, 'tmp'));
    // base.raw: 8 MiB + 1.5 KiB (not a multiple of 4 KiB), data in places, holes elsewhere.
    const base = join(dir, 'base.raw');
    qemuImg('create', '-f', 'raw', base, String(8 * MiB + 1536));
    qemuIo('raw', base, 'write -P 0x11 0 64k', 'write -P 0x12 3M 12k', 'write -P 0x13 8M 1536');
    // mid.qcow2 (64 KiB clusters, bigger than base): data, zeroes over base data, partial clusters.
    const mid = join(dir, 'mid.qcow2');
    qemuImg('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid, String(10 * MiB));
    qemuIo('qcow2', mid, 'write -P 0x21 32k 4k', 'write -z 3M 4k', 'write -P 0x22 9M 100k');
    // top.qcow2 (4 KiB clusters, bigger again, size not a multiple of 4 KiB).
    const top = join(dir, 'top.qcow2');
    qemuImg(
      'create',
      '-f',
      'qcow2',
      '-o',
      'cluster_size=4096',
      '-b',
      'mid.qcow2',
      '-F',
      'qcow2',
      top,
      String(12 * MiB + 512),
    );
    qemuIo('qcow2', top, 'write -P 0x31 36k 4k', 'write -z 9M 8k', 'write -P 0x32 12M 512', 'write -P 0x33 8M 4k');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('raw: direct reads, qemu-rounded size, holes excluded from dataExtents', async () => {
    const d = await expectIdentical(join(dir, 'base.raw'), 'raw', 'direct');
    assert.equal(d.format, 'raw');
    assert.equal(d.size, 8 * MiB + 1536);
    const ext = await d.dataExtents();
    const covered = ext.reduce((s, e) => s + e.length, 0);
    assert.ok(covered < 1 * MiB, `holes must not be data extents (covered ${covered})`);
    assert.deepEqual(await d.ownExtents(), [{ start: 0, length: d.size }]);
    await d.close();
  });

  it('raw: a file whose length is not a multiple of 512 reads as qemu sees it', async () => {
    const f = join(dir, 'odd.raw');
    await writeFile(f, Buffer.alloc(1000001, 0x5a));
    const d = await expectIdentical(f, 'raw', 'direct');
    assert.equal(d.size, 1000448); // qemu rounds up to a sector, the tail reads as zero
    await d.close();
  });

  it('qcow2 with a 2-level backing chain: direct reads from each layer, identical bytes', async () => {
    const d = await expectIdentical(join(dir, 'top.qcow2'), 'qcow2', 'direct');
    assert.equal(d.size, 12 * MiB + 512);
    // Bytes past the end read as zero; reads straddling the end too.
    const buf = Buffer.alloc(8192, 0xff);
    await d.read(12 * MiB, 8192, buf);
    assert.ok(buf.subarray(0, 512).equals(Buffer.alloc(512, 0x32)));
    assert.ok(isZero(buf.subarray(512)));
    await d.close();
  });

  it('ownExtents: only what the top layer defines', async () => {
    const d = await openDisk(join(dir, 'top.qcow2'), { format: 'qcow2' });
    const own = await d.ownExtents();
    assert.deepEqual(own, [
      { start: 36 * KiB, length: 4 * KiB },
      { start: 8 * MiB, length: 4 * KiB },
      { start: 9 * MiB, length: 8 * KiB },
      { start: 12 * MiB, length: 512 },
    ]);
    await d.close();
  });

  it('backingChain lists the backing files, nearest first, as absolute paths', async () => {
    const chain = await backingChain(join(dir, 'top.qcow2'));
    assert.deepEqual(
      chain.map((c) => [c.filename, c.format, c.virtualSize]),
      [
        [join(dir, 'mid.qcow2'), 'qcow2', 10 * MiB],
        [join(dir, 'base.raw'), 'raw', 8 * MiB + 1536],
      ],
    );
    assert.deepEqual(await backingChain(join(dir, 'base.raw'), { format: 'raw' }), []);
  });

  it('probes the format when none is given', async () => {
    const d = await openDisk(join(dir, 'mid.qcow2'));
    assert.equal(d.format, 'qcow2');
    assert.equal(d.size, 10 * MiB);
    await d.close();
  });

  it('compressed qcow2 (zlib and zstd): converted view, temp file removed on close', async () => {
    for (const ct of ['zlib', 'zstd']) {
      const c = join(dir, `c-${ct}.qcow2`);
      qemuImg('convert', '-c', '-o', `compression_type=${ct}`, '-f', 'qcow2', '-O', 'qcow2', join(dir, 'top.qcow2'), c);
      const d = await expectIdentical(c, 'qcow2', 'converted');
      assert.ok((await readdir(join(dir, 'tmp'))).length > 0);
      await d.close();
      assert.deepEqual(await readdir(join(dir, 'tmp')), []);
    }
  });

  it('partly compressed qcow2 (compressed + plain clusters + backing) reads identical', async () => {
    const c = join(dir, 'mixed.qcow2');
    qemuImg('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', c, String(8 * MiB + 1536));
    qemuIo('qcow2', c, 'write -c -P 0x41 1M 64k', 'write -P 0x42 2M 64k');
    const d = await expectIdentical(c, 'qcow2', 'converted');
    await d.close();
  });

  it('other formats (vdi) go through a converted view', async () => {
    const v = join(dir, 'x.vdi');
    qemuImg('convert', '-f', 'qcow2', '-O', 'vdi', join(dir, 'top.qcow2'), v);
    const d = await expectIdentical(v, 'vdi', 'converted');
    await d.close();
  });

  it('a missing image or backing file is NotFoundError', async () => {
    await assert.rejects(openDisk(join(dir, 'nope.qcow2')), NotFoundError);
    await assert.rejects(openDisk(dir), NotFoundError);
    const orphan = join(dir, 'orphan.qcow2');
    qemuImg('create', '-f', 'qcow2', '-u', '-b', 'gone.raw', '-F', 'raw', orphan, '1M');
    await assert.rejects(openDisk(orphan, { format: 'qcow2' }), NotFoundError);
  });

  it('garbage is CorruptInputError with the reason', async () => {
    const g = join(dir, 'garbage.qcow2');
    await writeFile(g, Buffer.from('QFI\xfb\0\0\0\x03not really a qcow2 header', 'latin1'));
    await truncate(g, 65536);
    await assert.rejects(
      openDisk(g),
      (err: unknown) => err instanceof CorruptInputError && /cluster size/i.test(err.message),
    );
    const r = join(dir, 'random.bin');
    await writeFile(r, Buffer.alloc(70000, 7));
    await assert.rejects(
      openDisk(r, { format: 'qcow2' }),
      (err: unknown) => err instanceof CorruptInputError && /not in qcow2 format/.test(err.message),
    );
  });

  it('reads after close are refused', async () => {
    const d = await openDisk(join(dir, 'base.raw'), { format: 'raw' });
    await d.close();
    await assert.rejects(d.read(0, 10, Buffer.alloc(10)));
  });
});
