/** The qemu-img wrapper: typed results, exit-code handling, error classes. Needs qemu-utils. */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as qemuImg from '../../src/image/disk/qemu-img.js';
import { MissingToolError, QemuError, UnsupportedError } from '../../src/util/errors.js';

const MiB = 1024 * 1024;
let dir = '';

function qemuIo(format: string, file: string, ...cmds: string[]): void {
  execFileSync('qemu-io', ['-f', format, ...cmds.flatMap((c) => ['-c', c]), file], { stdio: 'ignore' });
}

/** Locally a missing qemu-img skips loudly; in CI (CI set) it fails: CI must install qemu-utils. */
const noQemu = spawnSync('qemu-img', ['--version']).error ? 'qemu-img not found: apt-get install qemu-utils' : false;
if (noQemu && process.env['CI']) throw new Error(noQemu);
if (noQemu) console.error(`SKIPPING disk tests: ${noQemu}`);

describe('qemu-img wrapper', { skip: noQemu }, () => {
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'disk-qemu-img-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('create + info report format, size, cluster size and backing file', async () => {
    const base = join(dir, 'base.raw');
    const top = join(dir, 'top.qcow2');
    await qemuImg.create(base, { format: 'raw', size: 4 * MiB });
    await qemuImg.create(top, {
      format: 'qcow2',
      size: 6 * MiB,
      backingFile: 'base.raw',
      backingFormat: 'raw',
      options: { cluster_size: 4096 },
    });
    const i = await qemuImg.info(top, { format: 'qcow2' });
    assert.equal(i.format, 'qcow2');
    assert.equal(i.virtualSize, 6 * MiB);
    assert.equal(i.clusterSize, 4096);
    assert.equal(i.backingFilename, 'base.raw');
    assert.equal(i.backingFormat, 'raw');
    assert.equal(i.encrypted, false);
    assert.equal(i.compressionType, 'zlib');

    const chain = await qemuImg.info(top, { format: 'qcow2', backingChain: true });
    assert.deepEqual(
      chain.map((c) => [c.format, c.virtualSize]),
      [
        ['qcow2', 6 * MiB],
        ['raw', 4 * MiB],
      ],
    );
  });

  it('map covers the disk and tells data, zero and depth apart', async () => {
    const base = join(dir, 'm-base.raw');
    const top = join(dir, 'm-top.qcow2');
    await qemuImg.create(base, { format: 'raw', size: 2 * MiB });
    qemuIo('raw', base, 'write -P 0x11 0 64k');
    await qemuImg.create(top, { format: 'qcow2', backingFile: 'm-base.raw', backingFormat: 'raw' });
    qemuIo('qcow2', top, 'write -P 0x22 1M 64k', 'write -z 0 64k');
    const entries = await qemuImg.map(top, 'qcow2');
    let pos = 0;
    for (const e of entries) {
      assert.equal(e.start, pos);
      pos += e.length;
    }
    assert.equal(pos, 2 * MiB);
    const at = (o: number): qemuImg.MapEntry => {
      const e = entries.find((x) => x.start <= o && o < x.start + x.length);
      assert.ok(e);
      return e;
    };
    assert.deepEqual([at(0).zero, at(0).depth], [true, 0]); // zeroed over base data
    assert.deepEqual([at(MiB).data, at(MiB).depth, typeof at(MiB).offset], [true, 0, 'number']);
    assert.equal(at(512 * 1024).zero, true); // base hole
  });

  it('convert, compare and check', async () => {
    const src = join(dir, 'c.raw');
    const dst = join(dir, 'c.qcow2');
    await qemuImg.create(src, { format: 'raw', size: MiB });
    qemuIo('raw', src, 'write -P 0x33 4k 8k');
    await qemuImg.convert(src, dst, { srcFormat: 'raw', dstFormat: 'qcow2', compress: true });
    assert.equal(await qemuImg.compare(src, dst, { formatA: 'raw', formatB: 'qcow2' }), true);
    qemuIo('qcow2', dst, 'write -P 0x44 0 512');
    assert.equal(await qemuImg.compare(src, dst, { formatA: 'raw', formatB: 'qcow2' }), false);
    const r = await qemuImg.check(dst, 'qcow2');
    assert.equal(r.corruptions, 0);
    assert.equal(r.leaks, 0);
    assert.equal(r.checkErrors, 0);
    assert.ok((r.imageEndOffset ?? 0) > 0);
    await assert.rejects(qemuImg.check(src, 'raw'), UnsupportedError);
  });

  it('check returns corruptions instead of throwing (exit 2)', async () => {
    const img = join(dir, 'bad.qcow2');
    await qemuImg.create(img, { format: 'qcow2', size: MiB });
    qemuIo('qcow2', img, 'write -P 0x55 0 64k');
    // Zero the first refcount block: every cluster in use now has refcount 0.
    const h = await open(img, 'r+');
    const hdr = Buffer.alloc(64);
    await h.read(hdr, 0, 64, 0);
    const rt = Number(hdr.readBigUInt64BE(48));
    const entry = Buffer.alloc(8);
    await h.read(entry, 0, 8, rt);
    await h.write(Buffer.alloc(65536), 0, 65536, Number(entry.readBigUInt64BE(0)));
    await h.close();
    const r = await qemuImg.check(img, 'qcow2');
    assert.ok(r.corruptions > 0, JSON.stringify(r));
    assert.ok(r.messages.some((m) => m.includes('ERROR')));
  });

  it('rebase -u rewrites only the backing file name', async () => {
    const a = join(dir, 'r-a.raw');
    const b = join(dir, 'r-b.raw');
    const top = join(dir, 'r-top.qcow2');
    await qemuImg.create(a, { format: 'raw', size: MiB });
    await writeFile(b, await readFile(a));
    await qemuImg.create(top, { format: 'qcow2', backingFile: 'r-a.raw', backingFormat: 'raw' });
    await qemuImg.rebase(top, { format: 'qcow2', backingFile: 'r-b.raw', backingFormat: 'raw', unsafe: true });
    assert.equal((await qemuImg.info(top, { format: 'qcow2' })).backingFilename, 'r-b.raw');
  });

  it('a failure is a QemuError with exit code and the end of stderr', async () => {
    const err = await qemuImg.info(join(dir, 'nope.qcow2')).catch((e: unknown) => e);
    assert.ok(err instanceof QemuError);
    assert.equal(err.details['exit_code'], 1);
    assert.match(String(err.details['stderr']), /No such file or directory/);
    assert.match(err.message, /No such file or directory/);
    await assert.rejects(
      qemuImg.compare(join(dir, 'nope.raw'), join(dir, 'c.raw'), { formatA: 'raw', formatB: 'raw' }),
      QemuError,
    );
  });

  it('a backing file without a backing format is refused (no probing)', async () => {
    await assert.rejects(
      qemuImg.create(join(dir, 'x.qcow2'), { format: 'qcow2', backingFile: 'c.raw' }),
      UnsupportedError,
    );
  });

  it('a missing binary is a MissingToolError naming qemu-utils', async () => {
    const saved = process.env['QEMU_IMG'];
    process.env['QEMU_IMG'] = join(dir, 'no-such-qemu-img');
    try {
      const err = await qemuImg.info(join(dir, 'c.raw')).catch((e: unknown) => e);
      assert.ok(err instanceof MissingToolError);
      assert.equal(err.details['package'], 'qemu-utils');
      assert.match(err.message, /qemu-utils/);
    } finally {
      if (saved === undefined) delete process.env['QEMU_IMG'];
      else process.env['QEMU_IMG'] = saved;
    }
  });
});
