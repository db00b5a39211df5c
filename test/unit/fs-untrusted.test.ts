/**
 * Every way freeSpace() must refuse to trust a file system's bitmaps, each made for real (debugfs
 * set_super_value / feature, direct byte patches at the places dumpe2fs reports), each with a
 * reason that says what is wrong — and the cases that stay trusted with a note.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openDisk } from '../../src/image/disk/open-disk.js';
import { freeSpace, type FileSystemReport, type FreeSpaceOptions } from '../../src/image/fs/free-space.js';
import { bmap, debugfs, dumpe2fs, groupsOf, mkfs, patch, readAt } from '../helpers/e2fs.js';

let dir = '';
let n = 0;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'fs-untrusted-'));
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

function fresh(options: string[] = [], size = '128M', type = 'ext4'): string {
  const image = join(dir, `img${n++}.img`);
  mkfs(image, size, options, { type });
  return image;
}

async function only(image: string, opts: FreeSpaceOptions = {}): Promise<FileSystemReport> {
  const src = await openDisk(image, { format: 'raw' });
  try {
    const r = await freeSpace(src, opts);
    assert.equal(r.filesystems.length, 1, JSON.stringify(r.notes));
    const fs = r.filesystems[0] as FileSystemReport;
    if (!fs.verdict.trusted) {
      assert.deepEqual(fs.free, []);
      assert.equal(fs.freeBytes, 0);
      assert.deepEqual(r.free, []);
    }
    return fs;
  } finally {
    await src.close();
  }
}

async function expectUntrusted(image: string, reason: RegExp, opts: FreeSpaceOptions = {}): Promise<FileSystemReport> {
  const fs = await only(image, opts);
  assert.equal(fs.verdict.trusted, false, `expected untrusted (${reason})`);
  if (!fs.verdict.trusted) assert.match(fs.verdict.reason, reason);
  return fs;
}

/** Flips bit `bit` of the byte at `pos`. */
async function flip(image: string, pos: number, bit = 0): Promise<void> {
  const b = await readAt(image, pos, 1);
  b[0] = (b[0] as number) ^ (1 << bit);
  await patch(image, pos, b);
}

describe('untrusted file systems', () => {
  it('sanity: a fresh file system is trusted', async () => {
    const fs = await only(fresh());
    assert.deepEqual(fs.verdict, { trusted: true });
    assert.equal(fs.state.journalEmpty, true);
    assert.ok(fs.freeBytes > 100 * 1024 * 1024);
  });

  it('needs_recovery set (mounted read-write, or crashed)', async () => {
    const image = fresh();
    debugfs(image, ['feature needs_recovery'], { write: true });
    const fs = await expectUntrusted(image, /journal needs recovery \(needs_recovery set\)/);
    assert.equal(fs.state.needsRecovery, true);
  });

  it('s_state without VALID_FS', async () => {
    const image = fresh();
    debugfs(image, ['ssv state 0'], { write: true });
    const fs = await expectUntrusted(image, /not cleanly unmounted \(s_state lacks VALID_FS\)/);
    assert.equal(fs.state.valid, false);
  });

  it('s_state with ERROR_FS', async () => {
    const image = fresh();
    debugfs(image, ['ssv state 3'], { write: true });
    const fs = await expectUntrusted(image, /has errors \(s_state ERROR_FS\)/);
    assert.equal(fs.state.errors, true);
  });

  it('orphan processing flag (s_state ORPHAN_FS)', async () => {
    const image = fresh();
    debugfs(image, ['ssv state 5'], { write: true });
    await expectUntrusted(image, /orphan processing was under way/);
  });

  it('a block bitmap whose crc32c no longer matches (metadata_csum)', async () => {
    const image = fresh();
    const g = groupsOf(image)[0];
    assert.ok(g);
    const bs = dumpe2fs(image).blockSize;
    // The last byte of group 0's bitmap describes free blocks: mark one used.
    await flip(image, g.blockBitmap * bs + Math.floor((g.last - g.first) / 8) - 1, 3);
    await expectUntrusted(image, /group 0: block bitmap checksum mismatch/);
  });

  it('a bitmap edit without checksums: free count differs from the descriptor', async () => {
    const image = fresh(['-O', '^metadata_csum,^uninit_bg']);
    const g = groupsOf(image)[0];
    assert.ok(g);
    const bs = dumpe2fs(image).blockSize;
    await flip(image, g.blockBitmap * bs + Math.floor((g.last - g.first) / 8) - 1, 3);
    await expectUntrusted(image, /group 0: the descriptor counts \d+ free blocks, the bitmap \d+/);
  });

  it('a bitmap that marks the superblock free (no checksums)', async () => {
    const image = fresh(['-O', '^metadata_csum,^uninit_bg', '-b', '4096']);
    const g = groupsOf(image)[0];
    assert.ok(g);
    await flip(image, g.blockBitmap * 4096, 0);
    await expectUntrusted(image, /group 0: the block bitmap marks metadata block 0 free/);
  });

  it('a group descriptor whose checksum no longer matches (crc32c and crc16)', async () => {
    for (const opts of [[], ['-O', '^metadata_csum,uninit_bg']]) {
      const image = fresh(['-b', '4096', ...opts], '512M');
      // Descriptor table at block 1; descriptor 1's free inode count (offset 0x0e).
      const descSize = dumpe2fs(image).features.includes('64bit') ? 64 : 32;
      await flip(image, 4096 + descSize + 0x0e, 0);
      await expectUntrusted(image, /group descriptor 1 checksum mismatch/);
    }
  });

  it('a superblock whose crc32c no longer matches', async () => {
    const image = fresh();
    await flip(image, 1024 + 0x78, 0); // a byte of the volume name
    await expectUntrusted(image, /superblock checksum mismatch/);
  });

  it('a journal holding transactions while needs_recovery is clear', async () => {
    const image = fresh(['-b', '4096']);
    const j = bmap(image, '<8>', 0);
    await patch(image, j * 4096 + 0x1c, Buffer.from([0, 0, 0, 1]));
    const fs = await expectUntrusted(
      image,
      /journal holds transactions \(s_start 1\) although needs_recovery is clear/,
    );
    assert.equal(fs.state.journalEmpty, false);
  });

  it('a crashed file system: needs_recovery and a non-empty journal', async () => {
    const image = fresh(['-b', '4096']);
    const j = bmap(image, '<8>', 0);
    await patch(image, j * 4096 + 0x1c, Buffer.from([0, 0, 0, 1]));
    debugfs(image, ['feature needs_recovery'], { write: true });
    const fs = await expectUntrusted(image, /needs recovery/);
    assert.equal(fs.state.journalEmpty, false);
  });

  it('a journal that recorded an error', async () => {
    const image = fresh(['-b', '4096']);
    const j = bmap(image, '<8>', 0);
    await patch(image, j * 4096 + 0x20, Buffer.from([0xff, 0xff, 0xff, 0xfb])); // -5 = EIO
    await expectUntrusted(image, /journal recorded an error \(errno -5\)/);
  });

  it('a journal superblock that is not one', async () => {
    const image = fresh(['-b', '4096']);
    const j = bmap(image, '<8>', 0);
    await patch(image, j * 4096, Buffer.alloc(4));
    await expectUntrusted(image, /journal: no jbd2 superblock magic/);
  });

  it('an external journal', async () => {
    const image = fresh();
    debugfs(image, ['ssv journal_inum 0', 'ssv journal_dev 0x801'], { write: true });
    const fs = await expectUntrusted(image, /journal is on another device/);
    assert.equal(fs.state.journal, 'external');
  });

  it('an external journal device itself', async () => {
    const image = join(dir, 'journal-dev.img');
    mkfs(image, '32M', ['-O', 'journal_dev', '-b', '4096']);
    await expectUntrusted(image, /journal_dev \(this is an external journal, not a file system\)/);
  });

  it('an unknown incompat feature, an unknown ro_compat feature', async () => {
    const a = fresh();
    debugfs(a, ['feature FEATURE_I27'], { write: true });
    await expectUntrusted(a, /unknown incompat features 0x8000000/);
    const b = fresh();
    debugfs(b, ['feature FEATURE_R27'], { write: true });
    await expectUntrusted(b, /unknown ro_compat features 0x8000000/);
  });

  it('bigalloc (cluster bitmaps) is refused, not misread', async () => {
    await expectUntrusted(fresh(['-O', 'bigalloc', '-C', '16384']), /bigalloc/);
  });

  it('a file system larger than the image (truncated copy)', async () => {
    const image = fresh();
    await truncate(image, 64 * 1024 * 1024);
    await expectUntrusted(image, /is larger than the space the image gives it/);
  });

  it('more free extents than the bound', async () => {
    const image = fresh(['-b', '1024']);
    await expectUntrusted(image, /more than 3 free extents/, { maxExtents: 3 });
  });

  it('several reasons are all told', async () => {
    const image = fresh();
    debugfs(image, ['feature needs_recovery', 'ssv state 2'], { write: true });
    const fs = await expectUntrusted(image, /has errors/);
    assert.ok(!fs.verdict.trusted && /not cleanly unmounted/.test(fs.verdict.reason));
    assert.ok(!fs.verdict.trusted && /needs recovery/.test(fs.verdict.reason));
  });
});

describe('trusted, with a note', () => {
  it('orphan inodes (deleted while open): their blocks stay in use', async () => {
    const image = fresh();
    debugfs(image, ['ssv last_orphan 12'], { write: true });
    const fs = await only(image);
    assert.deepEqual(fs.verdict, { trusted: true });
    assert.equal(fs.state.orphans, true);
    assert.ok(
      fs.notes.some((s) => /orphan inodes are recorded/.test(s)),
      JSON.stringify(fs.notes),
    );
  });

  it('a stale superblock free count', async () => {
    const image = fresh();
    debugfs(image, ['ssv free_blocks_count 7'], { write: true });
    const fs = await only(image);
    assert.deepEqual(fs.verdict, { trusted: true });
    assert.ok(
      fs.notes.some((s) => /superblock free block count 7 differs/.test(s)),
      JSON.stringify(fs.notes),
    );
  });
});
