/**
 * freeSpace() on what is not a well-formed file system: empty, tiny, random and truncated images,
 * crafted superblocks that claim absurd sizes, and thousands of random byte flips in the metadata
 * of real images. Nothing may throw, time and memory stay bounded by the image, and whenever a
 * mutated image is still trusted its free set must be the pristine one's (never more).
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ChunkSource, Extent } from '../../src/delta/source.js';
import { freeSpace, type FreeSpaceResult } from '../../src/image/fs/free-space.js';
import { bufferSource, mkfs, run } from '../helpers/e2fs.js';
import { rng } from '../helpers/rng.js';

let dir = '';
let tree = '';

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'fs-garbage-'));
  tree = join(dir, 'tree');
  await mkdir(join(tree, 'd'), { recursive: true });
  for (let i = 0; i < 30; i++) await writeFile(join(tree, 'd', `f${i}`), randomBytes(100 + i * 7000));
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

function nothingFound(r: FreeSpaceResult): void {
  assert.deepEqual(r.filesystems, []);
  assert.deepEqual(r.free, []);
  assert.equal(r.freeBytes, 0);
}

/** A source of `size` bytes (sparse: zero but for the given pieces). */
function sparseSource(size: number, pieces: { at: number; bytes: Buffer }[]): ChunkSource {
  return {
    name: 'disk',
    size,
    read(offset: number, length: number, out: Buffer): Promise<void> {
      out.fill(0, 0, length);
      for (const p of pieces) {
        const from = Math.max(offset, p.at);
        const to = Math.min(offset + length, p.at + p.bytes.length);
        if (from < to) p.bytes.copy(out, from - offset, from - p.at, to - p.at);
      }
      return Promise.resolve();
    },
    dataExtents(): Promise<Extent[]> {
      return Promise.resolve([{ start: 0, length: size }]);
    },
  };
}

describe('not a file system', () => {
  it('empty and tiny images', async () => {
    for (const n of [0, 1, 100, 511, 512, 1024, 1500, 2047, 2048, 4096]) {
      nothingFound(await freeSpace(bufferSource(Buffer.alloc(n))));
      nothingFound(await freeSpace(bufferSource(Buffer.alloc(n, 0xff))));
    }
  });

  it('random bytes', async () => {
    const rand = rng(10);
    for (let i = 0; i < 20; i++) {
      const b = Buffer.alloc(1 << 20);
      for (let k = 0; k < b.length; k++) b[k] = Math.floor(rand() * 256);
      nothingFound(await freeSpace(bufferSource(b)));
    }
  });

  it('an MBR signature over garbage entries, a GPT signature alone', async () => {
    const b = Buffer.alloc(1 << 20, 0x41);
    b[510] = 0x55;
    b[511] = 0xaa;
    nothingFound(await freeSpace(bufferSource(b)));
    const g = Buffer.alloc(1 << 20);
    g.write('EFI PART', 512, 'latin1');
    const r = await freeSpace(bufferSource(g));
    nothingFound(r);
    assert.ok(
      r.notes.some((s) => /primary header damaged/.test(s)),
      JSON.stringify(r.notes),
    );
  });
});

describe('crafted superblocks', () => {
  let sb: Buffer;

  before(async () => {
    const image = join(dir, 'tiny.img');
    mkfs(image, '8M', ['-b', '1024', '-O', '^metadata_csum']);
    sb = (await readFile(image)).subarray(1024, 2048);
  });

  function crafted(edit: (b: Buffer) => void): Buffer {
    const b = Buffer.from(sb);
    edit(b);
    return b;
  }

  it('claims of 2^32 groups or 2^64 blocks on a huge sparse image: refused fast, little memory', async () => {
    const cases: [string, (b: Buffer) => void, RegExp][] = [
      [
        '2^32 groups of 256 blocks',
        (b) => {
          b.writeUInt32LE(0xffffffff, 0x04); // blocks
          b.writeUInt32LE(256, 0x20); // blocks per group
          b.writeUInt32LE(256, 0x24);
        },
        /inode count|block groups|larger than/,
      ],
      [
        '2^63 blocks (64bit)',
        (b) => {
          b.writeUInt32LE(b.readUInt32LE(0x60) | 0x80, 0x60);
          b.writeUInt16LE(64, 0xfe);
          b.writeUInt32LE(0x7fffffff, 0x150);
        },
        /larger than the space/,
      ],
      [
        'inodes count matching 2^22 groups',
        (b) => {
          b.writeUInt32LE(2 ** 22 * 256 + 1, 0x04);
          b.writeUInt32LE(256, 0x20);
          b.writeUInt32LE(256, 0x24);
          b.writeUInt32LE(1, 0x28); // 1 inode per group
          b.writeUInt32LE(2 ** 22, 0x00);
          b.writeUInt32LE(b.readUInt32LE(0x60) | 0x10, 0x60); // meta_bg: no single descriptor table
        },
        /block groups \(at most/,
      ],
      ['8 blocks per group', (b) => b.writeUInt32LE(8, 0x20), /blocks per group/],
      ['block size 2^40', (b) => b.writeUInt32LE(30, 0x18), /block size/],
      ['revision 7', (b) => b.writeUInt32LE(7, 0x4c), /revision level/],
    ];
    for (const [name, edit, reason] of cases) {
      const before = process.memoryUsage().rss;
      const t = performance.now();
      const src = sparseSource(2 ** 50, [{ at: 1024, bytes: crafted(edit) }]);
      const r = await freeSpace(src);
      const ms = performance.now() - t;
      const grown = process.memoryUsage().rss - before;
      assert.equal(r.filesystems.length, 1, name);
      const v = r.filesystems[0]?.verdict;
      assert.ok(v && !v.trusted, name);
      assert.match(v.reason, reason, name);
      assert.ok(ms < 1000, `${name}: ${ms} ms`);
      assert.ok(grown < 64 * 1024 * 1024, `${name}: rss grew ${grown}`);
    }
  });

  it('groups within the bound but zeroed descriptors: refused at the first one', async () => {
    const b = crafted((x) => {
      x.writeUInt32LE(2 ** 20 * 256 + 1, 0x04);
      x.writeUInt32LE(256, 0x20);
      x.writeUInt32LE(256, 0x24);
      x.writeUInt32LE(1, 0x28);
      x.writeUInt32LE(2 ** 20, 0x00);
      x.writeUInt32LE(x.readUInt32LE(0x60) | 0x10, 0x60);
    });
    const t = performance.now();
    const r = await freeSpace(sparseSource(2 ** 40, [{ at: 1024, bytes: b }]));
    const v = r.filesystems[0]?.verdict;
    assert.ok(v && !v.trusted);
    assert.match(v.reason, /group 0: block bitmap at 0 lies outside the file system/);
    assert.ok(performance.now() - t < 5000);
  });
});

/** Flips random bits in [from, to) of a copy, `rounds` times; checks the soundness property. */
async function mutate(pristine: Buffer, regions: [number, number][], rounds: number, seed: number): Promise<number> {
  const base = await freeSpace(bufferSource(pristine));
  const ref = base.free;
  assert.ok(base.filesystems.every((f) => f.verdict.trusted));
  const rand = rng(seed);
  let trusted = 0;
  for (let i = 0; i < rounds; i++) {
    const b = Buffer.from(pristine);
    const flips = 1 + Math.floor(rand() * 4);
    for (let k = 0; k < flips; k++) {
      const [from, to] = regions[Math.floor(rand() * regions.length)] as [number, number];
      const pos = from + Math.floor(rand() * (to - from));
      b[pos] = (b[pos] as number) ^ (1 << Math.floor(rand() * 8));
    }
    const r = await freeSpace(bufferSource(b));
    for (const fs of r.filesystems) {
      if (!fs.verdict.trusted) continue;
      trusted++;
      // Never more free than the pristine image: every reported range lies in a pristine one.
      for (const e of fs.free) {
        assert.ok(
          ref.some((x) => x.start <= e.start && e.start + e.length <= x.start + x.length),
          `round ${i}: ${e.start}+${e.length} free but not in the pristine image`,
        );
      }
    }
  }
  return trusted;
}

describe('random bit flips in real metadata', () => {
  for (const [name, opts] of [
    ['metadata_csum', ['-b', '1024']],
    ['no checksums', ['-b', '1024', '-O', '^metadata_csum,^uninit_bg']],
    ['gdt_csum, 32-bit, 4 KiB', ['-b', '4096', '-O', '^metadata_csum,^64bit,uninit_bg']],
  ] as [string, string[]][]) {
    it(name, async () => {
      const image = join(dir, 'fuzz.img');
      mkfs(image, '16M', ['-d', tree, ...opts]);
      const pristine = await readFile(image);
      // Superblock, descriptors, bitmaps and inode tables of group 0 sit in the first ~600 KiB;
      // the journal superblock where debugfs says.
      const bs = opts.includes('4096') ? 4096 : 1024;
      const j = Number(run('debugfs', ['-R', 'bmap <8> 0', image]).trim());
      const regions: [number, number][] = [
        [1024, 2048],
        [bs, 8 * bs],
        [0, 600 * 1024],
        [j * bs, j * bs + 1024],
      ];
      const t = performance.now();
      const trusted = await mutate(pristine, regions, 400, name.length);
      const ms = performance.now() - t;
      console.log(`# ${name}: 400 mutants, ${trusted} still trusted, ${(ms / 400).toFixed(2)} ms each`);
      await rm(image);
    });
  }

  it('a GPT disk: flips in both tables never throw', async () => {
    const image = join(dir, 'gpt-fuzz.img');
    await writeFile(image, '');
    run('truncate', ['-s', '24M', image]);
    run('sfdisk', ['-q', image], 'label: gpt\nsize=10MiB, type=linux\ntype=linux\n');
    mkfs(image, '10240k', ['-d', tree], { offset: 2048 * 512 });
    const pristine = await readFile(image);
    const end = pristine.length;
    await mutate(
      pristine,
      [
        [0, 34 * 512],
        [end - 33 * 512, end],
      ],
      300,
      7,
    );
  });
});
