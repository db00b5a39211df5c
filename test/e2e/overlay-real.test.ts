/**
 * create + apply on real QEMU snapshots (issue: "a test on real QEMU snapshots"): the demo
 * guest booted under TCG, snapshotted (base), resumed from that snapshot, changed, snapshotted
 * again (customized). The overlay made from files must rebuild the customized memory page by
 * page (full stream and sparse stream over the base RAM file) and the disk byte for byte.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { captureBaseAndCustomized, type CaptureResult } from '../helpers/demo-vm.js';
import { cli } from '../helpers/cli.js';
import { findQemu } from '../helpers/tiny-qemu.js';
import { qemuImg } from '../helpers/synthetic-vm.js';
import { openMemorySnapshot, type MemorySnapshot } from '../../src/image/memory/snapshot.js';
import { writeRamFile } from '../../src/image/memory/ram-file.js';

const hasQemu = findQemu() !== null;
if (!hasQemu && process.env.CI) throw new Error('QEMU is required in CI (apt-get install qemu-system-x86 qemu-utils)');
if (!hasQemu) console.error('\n*** QEMU not found: skipping the real-snapshot overlay test ***\n');

let work: string;
let cap: CaptureResult;

before(async () => {
  if (!hasQemu) return;
  work = await mkdtemp(join(tmpdir(), 'clo-real-'));
  cap = await captureBaseAndCustomized(join(work, 'vm'));
});

after(async () => {
  if (hasQemu) await rm(work, { recursive: true, force: true });
});

/** Compares every page of every block; `over` = the base to apply a sparse stream onto. */
async function samePages(got: MemorySnapshot, want: MemorySnapshot, over?: MemorySnapshot): Promise<number> {
  assert.deepEqual(
    got.blocks.map((b) => [b.name, b.length]),
    want.blocks.map((b) => [b.name, b.length]),
  );
  const a = Buffer.alloc(4096);
  const b = Buffer.alloc(4096);
  let pages = 0;
  for (const blk of want.blocks) {
    const states = got.pages(blk.name);
    for (let p = 0; p < blk.pages; p++) {
      const src = over && !states.isSent(p) ? over : got;
      await src.block(blk.name).read(p * 4096, 4096, a);
      await want.block(blk.name).read(p * 4096, 4096, b);
      if (!a.equals(b)) assert.fail(`${blk.name} page ${p} differs`);
      pages++;
    }
  }
  assert.ok((await got.tail()).equals(await want.tail()), 'device state tail identical');
  return pages;
}

test(
  'real QEMU snapshots: overlay rebuilds memory page by page and the disk byte for byte',
  { skip: !hasQemu, timeout: 180_000 },
  async (t) => {
    assert.notEqual(cap.statuses.custom.marker, cap.statuses.base.marker, 'the guest was customized');
    const overlay = join(work, 'app.overlay');
    const c = await cli([
      'create',
      '--base-disk',
      cap.base.disk,
      '--base-memory',
      cap.base.mem,
      '--disk',
      cap.custom.disk,
      '--memory',
      cap.custom.mem,
      '-o',
      overlay,
    ]);
    assert.equal(c.code, 0, c.stderr);
    const size = (await stat(overlay)).size;
    const customized = (await stat(cap.custom.mem)).size + (await stat(cap.custom.disk)).size;
    t.diagnostic(
      `overlay ${size} bytes for ${customized} bytes of customized VM; ` +
        JSON.stringify((c.json.stats as { encodings: unknown }).encodings),
    );

    const base = ['--base-disk', cap.base.disk, '--base-memory', cap.base.mem];
    const a = await cli(['apply', overlay, ...base, '-o', join(work, 'full')]);
    assert.equal(a.code, 0, a.stderr);
    assert.match(
      qemuImg('compare', '-f', 'qcow2', '-F', 'raw', join(work, 'full', 'disk.qcow2'), cap.custom.disk),
      /identical/,
    );
    const check = JSON.parse(qemuImg('check', '--output=json', join(work, 'full', 'disk.qcow2'))) as Record<
      string,
      number
    >;
    assert.equal(check['check-errors'], 0);
    assert.equal(check['corruptions'] ?? 0, 0);
    assert.equal(check['leaks'] ?? 0, 0);

    const want = await openMemorySnapshot(cap.custom.mem);
    const got = await openMemorySnapshot(join(work, 'full', 'memory.stream'));
    try {
      const pages = await samePages(got, want);
      t.diagnostic(`${pages} pages identical`);
    } finally {
      await got.close();
    }

    // Sparse: the base's pc.ram as a raw file, the changed pages on top.
    const baseSnap = await openMemorySnapshot(cap.base.mem);
    try {
      await writeRamFile(baseSnap, 'pc.ram', join(work, 'base-pc.ram'));
      const s = await cli([
        'apply',
        overlay,
        ...base,
        '-o',
        join(work, 'sparse'),
        '--memory-format',
        'sparse',
        '--base-ram',
        join(work, 'base-pc.ram'),
        '--disk-format',
        'raw',
      ]);
      assert.equal(s.code, 0, s.stderr);
      assert.match(
        qemuImg('compare', '-f', 'raw', '-F', 'raw', join(work, 'sparse', 'disk.raw'), cap.custom.disk),
        /identical/,
      );
      const sparse = await openMemorySnapshot(join(work, 'sparse', 'memory.sparse'));
      try {
        await samePages(sparse, want, baseSnap);
        const sent = sparse.pages('pc.ram').counts();
        t.diagnostic(
          `sparse stream: ${sent.data + sent.zero + sent.fill} pc.ram pages of ${sparse.pages('pc.ram').pages}`,
        );
      } finally {
        await sparse.close();
      }
    } finally {
      await baseSnap.close();
      await want.close();
    }
  },
);
