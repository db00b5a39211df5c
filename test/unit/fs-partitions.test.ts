/**
 * Partitioned images made with sfdisk (MBR with logical partitions, GPT) and file systems put at
 * the partition offsets with mke2fs -E offset=…: every file system is found at the right place
 * and its free set equals dumpe2fs's; damaged GPTs fall back to the backup or are refused;
 * ranges claimed twice are never trusted.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openDisk } from '../../src/image/disk/open-disk.js';
import { freeSpace, type FreeSpaceResult } from '../../src/image/fs/free-space.js';
import { dumpe2fs, extentsToBlocks, fileBlocks, hasTool, mkfs, patch, readAt, run } from '../helpers/e2fs.js';
import { xorByte } from '../helpers/bytes.js';

let dir = '';
let tree = '';

interface SfdiskPartition {
  node: string;
  start: number;
  size: number;
  type: string;
}

function sfdisk(image: string, script: string): SfdiskPartition[] {
  run('sfdisk', ['-q', '--wipe', 'never', image], script);
  const json = JSON.parse(run('sfdisk', ['-J', image])) as { partitiontable: { partitions: SfdiskPartition[] } };
  return json.partitiontable.partitions;
}

async function analyse(image: string): Promise<FreeSpaceResult> {
  const src = await openDisk(image, { format: 'raw' });
  try {
    return await freeSpace(src);
  } finally {
    await src.close();
  }
}

/** The file system at `offset` is trusted and its free set is dumpe2fs's. */
function expectOracle(r: FreeSpaceResult, image: string, offset: number, files: string[] = []): void {
  const fs = r.filesystems.find((f) => f.offset === offset);
  assert.ok(fs, `no file system at ${offset}; found ${r.filesystems.map((f) => f.offset).join(', ')}`);
  assert.deepEqual(fs.verdict, { trusted: true });
  const dump = dumpe2fs(image, offset);
  const ours = extentsToBlocks(fs.free, offset, fs.blockSize);
  assert.deepEqual(ours, dump.free);
  for (const f of files) {
    for (const b of fileBlocks(image, f, offset)) {
      assert.ok(!ours.some(([x, y]) => b >= x && b <= y), `block ${b} of ${f} free`);
    }
  }
  // The union only holds trusted ranges, and this file system's are in it.
  for (const e of fs.free) {
    assert.ok(r.free.some((u) => u.start <= e.start && e.start + e.length <= u.start + u.length));
  }
}

before(async () => {
  assert.ok(hasTool('sfdisk'), 'sfdisk (Debian package fdisk) is needed: scripts/setup.sh installs it');
  dir = await mkdtemp(join(tmpdir(), 'fs-parts-'));
  tree = join(dir, 'tree');
  await mkdir(tree);
  await writeFile(join(tree, 'data'), randomBytes(3 * 1024 * 1024));
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** An all-zero sparse file. */
async function sparse(path: string, size: number): Promise<void> {
  await writeFile(path, '');
  await truncate(path, size);
}

const kib = (sectors: number): string => `${(sectors * 512) / 1024}k`;

describe('MBR', () => {
  it('primary and logical partitions, each with its own file system; a swap partition is noted', async () => {
    const image = join(dir, 'mbr.img');
    await sparse(image, 400 * 1024 * 1024);
    const parts = sfdisk(
      image,
      [
        'label: dos',
        'mbr.img1 : start=2048, size=204800, type=83',
        'mbr.img2 : start=206848, size=122880, type=83',
        'mbr.img3 : start=329728, size=307200, type=5',
        'mbr.img5 : start=331776, size=102400, type=83',
        'mbr.img6 : start=436224, type=82',
      ].join('\n'),
    );
    const by = (node: string): SfdiskPartition => parts.find((p) => p.node.endsWith(node)) as SfdiskPartition;
    const p1 = by('img1');
    const p2 = by('img2');
    const p5 = by('img5');
    mkfs(image, kib(p1.size), ['-b', '4096', '-d', tree], { offset: p1.start * 512 });
    mkfs(image, kib(p2.size), ['-b', '1024', '-d', tree], { offset: p2.start * 512 });
    mkfs(image, kib(p5.size), ['-d', tree], { offset: p5.start * 512, type: 'ext2' });
    const r = await analyse(image);
    assert.equal(r.scheme, 'mbr');
    assert.deepEqual(
      r.partitions.map((p) => p.number),
      [1, 2, 5, 6],
    );
    assert.equal(r.filesystems.length, 3);
    for (const p of [p1, p2, p5]) expectOracle(r, image, p.start * 512, ['/data']);
    assert.equal(r.filesystems[2]?.type, 'ext2');
    assert.equal(r.filesystems[2]?.partition?.number, 5);
    assert.ok(
      r.notes.some((s) => /mbr partition 6 \(type 0x82\): no ext2\/3\/4/.test(s)),
      JSON.stringify(r.notes),
    );
    assert.equal(
      r.freeBytes,
      r.filesystems.reduce((a, f) => a + f.freeBytes, 0),
    );
    await rm(image);
  });

  it('an EBR chain that loops ends with a note', async () => {
    const image = join(dir, 'loop.img');
    await sparse(image, 16 * 1024 * 1024);
    const mbr = Buffer.alloc(512);
    const entry = (b: Buffer, i: number, type: number, lba: number, sectors: number): void => {
      const e = 446 + 16 * i;
      b[e + 4] = type;
      b.writeUInt32LE(lba, e + 8);
      b.writeUInt32LE(sectors, e + 12);
    };
    entry(mbr, 0, 0x05, 2048, 20000);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    // EBR at 2048 → logical partition, next EBR at 2048 + 100; that one links to itself.
    const ebr = Buffer.alloc(512);
    entry(ebr, 0, 0x83, 2048, 4096);
    entry(ebr, 1, 0x05, 100, 100);
    ebr[510] = 0x55;
    ebr[511] = 0xaa;
    await patch(image, 0, mbr);
    await patch(image, 2048 * 512, ebr);
    await patch(image, 2148 * 512, ebr);
    const r = await analyse(image);
    assert.equal(r.scheme, 'mbr');
    assert.ok(
      r.notes.some((s) => /EBR chain loops/.test(s)),
      JSON.stringify(r.notes),
    );
    assert.deepEqual(r.filesystems, []);
  });

  it('overlapping partition entries: neither file system is trusted', async () => {
    const image = join(dir, 'overlap.img');
    await sparse(image, 200 * 1024 * 1024);
    sfdisk(image, 'label: dos\nstart=2048, size=204800, type=83\n');
    mkfs(image, kib(204800), [], { offset: 2048 * 512 });
    // A second entry over the same sectors.
    const mbr = await readAt(image, 0, 512);
    mbr.copy(mbr, 446 + 16, 446, 446 + 16);
    await patch(image, 0, mbr);
    const r = await analyse(image);
    assert.equal(r.filesystems.length, 2);
    for (const fs of r.filesystems) {
      assert.equal(fs.verdict.trusted, false);
      assert.ok(!fs.verdict.trusted && /overlaps mbr partition/.test(fs.verdict.reason));
    }
    assert.deepEqual(r.free, []);
  });

  it('a stale whole-disk superblock under a partition table is not trusted', async () => {
    const image = join(dir, 'stale.img');
    mkfs(image, '128M', ['-b', '4096']);
    sfdisk(image, 'label: dos\nstart=2048, type=83\n');
    const r = await analyse(image);
    const whole = r.filesystems.find((f) => f.partition === null);
    assert.ok(whole);
    const why = whole.verdict.trusted ? '' : whole.verdict.reason;
    assert.match(why, /a partition table \(mbr partition 1\) also describes this disk/);
    assert.deepEqual(r.free, []);
  });
});

describe('GPT', () => {
  let image = '';
  let parts: SfdiskPartition[] = [];
  let pristine: Buffer;

  before(async () => {
    image = join(dir, 'gpt.img');
    await sparse(image, 300 * 1024 * 1024);
    parts = sfdisk(image, 'label: gpt\nsize=100MiB, type=linux\ntype=linux\n');
    mkfs(image, kib(parts[0]?.size ?? 0), ['-b', '4096', '-d', tree], { offset: (parts[0]?.start ?? 0) * 512 });
    mkfs(image, kib(parts[1]?.size ?? 0), ['-b', '1024', '-d', tree], { offset: (parts[1]?.start ?? 0) * 512 });
    pristine = await readAt(image, 0, 34 * 512);
  });

  async function restore(): Promise<void> {
    await patch(image, 0, pristine);
  }

  it('both partitions are found and match dumpe2fs', async () => {
    const r = await analyse(image);
    assert.equal(r.scheme, 'gpt');
    assert.deepEqual(
      r.partitions.map((p) => [p.number, p.type]),
      [
        [1, '0FC63DAF-8483-4772-8E79-3D69D8477DE4'],
        [2, '0FC63DAF-8483-4772-8E79-3D69D8477DE4'],
      ],
    );
    for (const p of parts) expectOracle(r, image, p.start * 512, ['/data']);
    assert.deepEqual(r.notes, []);
  });

  it('a damaged primary header: the backup is used', async () => {
    const h = await readAt(image, 512, 512);
    xorByte(h, 0x38, 1); // a byte of the disk GUID: CRC32 no longer matches
    await patch(image, 512, h);
    const r = await analyse(image);
    assert.ok(
      r.notes.some((s) => /primary header damaged \(header CRC32 mismatch\)/.test(s)),
      JSON.stringify(r.notes),
    );
    assert.ok(r.notes.some((s) => /using the backup header/.test(s)));
    assert.equal(r.filesystems.filter((f) => f.verdict.trusted).length, 2);
    await restore();
  });

  it('a damaged primary entry array: the backup is used', async () => {
    const e = await readAt(image, 1024, 512);
    xorByte(e, 0x38, 1); // partition 1's name
    await patch(image, 1024, e);
    const r = await analyse(image);
    assert.ok(
      r.notes.some((s) => /primary entry array fails its CRC32/.test(s)),
      JSON.stringify(r.notes),
    );
    assert.equal(r.filesystems.filter((f) => f.verdict.trusted).length, 2);
    await restore();
  });

  it('a wiped primary (protective MBR left): the backup is used', async () => {
    await patch(image, 512, Buffer.alloc(33 * 512));
    const r = await analyse(image);
    assert.equal(r.scheme, 'gpt');
    assert.equal(r.filesystems.filter((f) => f.verdict.trusted).length, 2);
    await restore();
  });

  it('primary and backup damaged: refused, no partitions read', async () => {
    const size = 300 * 1024 * 1024;
    const last = await readAt(image, size - 512, 512);
    const h = await readAt(image, 512, 512);
    xorByte(h, 0x38, 1);
    xorByte(last, 0x38, 1);
    await patch(image, 512, h);
    await patch(image, size - 512, last);
    const r = await analyse(image);
    assert.equal(r.scheme, 'gpt');
    assert.deepEqual(r.partitions, []);
    assert.deepEqual(r.filesystems, []);
    assert.ok(
      r.notes.some((s) => /no valid GPT/.test(s)),
      JSON.stringify(r.notes),
    );
    xorByte(last, 0x38, 1);
    await patch(image, size - 512, last);
    await restore();
  });
});
