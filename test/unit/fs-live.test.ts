/**
 * What a live ext4 looks like on disk, and what freeSpace() makes of it: a file system mounted
 * through a loop device on this machine's kernel, read (through the image file) while it is
 * mounted and dirty, after sync, frozen (fsfreeze, what the QEMU guest agent's
 * guest-fsfreeze-freeze does), thawed, unmounted and mounted read-only. This is the evidence
 * behind the rule in docs/free-blocks.md: only a frozen, unmounted or read-only file system is
 * trusted; `sync` is not enough.
 *
 * Needs root and a loop device; skipped (with the reason) where there are none.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openDisk } from '../../src/image/disk/open-disk.js';
import { freeSpace, type FileSystemReport } from '../../src/image/fs/free-space.js';
import { dumpe2fs, extentsToBlocks, fileBlocks, mkfs } from '../helpers/e2fs.js';

let dir = '';
let skip: string | false = false;

function sh(cmd: string, ...args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function quiet(cmd: string, ...args: string[]): void {
  try {
    sh(cmd, ...args);
  } catch {
    // best effort (cleanup)
  }
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'fs-live-'));
  if (process.getuid?.() !== 0) {
    skip = 'needs root (loop devices, mount)';
    return;
  }
  // Can this machine loop-mount at all?
  const probe = join(dir, 'probe.img');
  mkfs(probe, '8M', []);
  const mnt = join(dir, 'probe-mnt');
  await mkdir(mnt);
  let loop = '';
  try {
    loop = sh('losetup', '-f', '--show', probe).trim();
    sh('mount', loop, mnt);
    sh('umount', mnt);
  } catch (err) {
    skip = `cannot loop-mount here: ${(err as Error).message.split('\n')[0]}`;
  } finally {
    if (loop) quiet('losetup', '-d', loop);
  }
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function analyse(image: string): Promise<FileSystemReport> {
  const src = await openDisk(image, { format: 'raw' });
  try {
    const r = await freeSpace(src);
    assert.equal(r.filesystems.length, 1);
    return r.filesystems[0] as FileSystemReport;
  } finally {
    await src.close();
  }
}

function reason(fs: FileSystemReport): string {
  return fs.verdict.trusted ? '(trusted)' : fs.verdict.reason;
}

/** Trusted and equal to dumpe2fs; the named files' blocks are not free. */
async function expectCurrent(image: string, files: string[]): Promise<FileSystemReport> {
  const fs = await analyse(image);
  assert.deepEqual(fs.verdict, { trusted: true });
  const ours = extentsToBlocks(fs.free, 0, fs.blockSize);
  assert.deepEqual(ours, dumpe2fs(image).free);
  for (const f of files) {
    for (const b of fileBlocks(image, f)) assert.ok(!ours.some(([x, y]) => b >= x && b <= y), `${f}: ${b}`);
  }
  return fs;
}

/** Mounts image on a fresh loop device; returns the cleanup. */
async function mounted(image: string, mnt: string, options: string[] = []): Promise<() => void> {
  await mkdir(mnt, { recursive: true });
  const loop = sh('losetup', '-f', '--show', image).trim();
  try {
    sh('mount', ...options, loop, mnt);
  } catch (err) {
    quiet('losetup', '-d', loop);
    throw err;
  }
  return () => {
    quiet('fsfreeze', '-u', mnt);
    quiet('umount', mnt);
    quiet('losetup', '-d', loop);
  };
}

describe('a live ext4 on a loop device', () => {
  it('mounted, dirty, synced, frozen, thawed, unmounted, read-only', async (t) => {
    if (skip) return t.skip(skip);
    const image = join(dir, 'live.img');
    const mnt = join(dir, 'mnt');
    mkfs(image, '512M', ['-b', '4096']);
    const cleanup = await mounted(image, mnt);
    try {
      const idle = await analyse(image);
      assert.match(reason(idle), /needs recovery/, 'mounted read-write: needs_recovery is set at mount');
      assert.equal(idle.state.valid, true, 'with a journal, VALID_FS stays set while mounted');
      assert.equal(idle.state.journalEmpty, true, 'no commit yet since mount');

      await writeFile(join(mnt, 'a'), randomBytes(30 * 1024 * 1024));
      await writeFile(join(mnt, 'b'), randomBytes(20 * 1024 * 1024));
      const dirty = await analyse(image);
      assert.match(reason(dirty), /needs recovery/);

      sh('sync');
      const synced = await analyse(image);
      assert.match(reason(synced), /needs recovery/, 'sync commits the journal but leaves needs_recovery set');
      assert.equal(synced.state.journalEmpty, false, 'after sync the journal holds the committed transaction');

      sh('fsfreeze', '-f', mnt);
      const frozen = await expectCurrent(image, ['/a', '/b']);
      assert.equal(frozen.state.needsRecovery, false, 'ext4_freeze clears needs_recovery after flushing the journal');
      assert.equal(frozen.state.journalEmpty, true);
      sh('fsfreeze', '-u', mnt);
      assert.match(reason(await analyse(image)), /needs recovery/, 'thawing sets needs_recovery again');

      await unlink(join(mnt, 'a'));
      sh('sync');
      assert.match(reason(await analyse(image)), /needs recovery/);
      sh('fsfreeze', '-f', mnt);
      const refrozen = await expectCurrent(image, ['/b']);
      assert.ok(refrozen.freeBytes >= frozen.freeBytes + 29 * 1024 * 1024, 'the deleted file is free once frozen');
      sh('fsfreeze', '-u', mnt);
    } finally {
      cleanup();
    }
    await expectCurrent(image, ['/b']);
    const ro = await mounted(image, mnt, ['-o', 'ro']);
    try {
      await expectCurrent(image, ['/b']);
    } finally {
      ro();
    }
  });

  it('without a journal: never trusted while mounted, even frozen', async (t) => {
    if (skip) return t.skip(skip);
    const image = join(dir, 'nojournal.img');
    const mnt = join(dir, 'mnt2');
    mkfs(image, '128M', ['-O', '^has_journal']);
    const cleanup = await mounted(image, mnt);
    try {
      await writeFile(join(mnt, 'x'), randomBytes(1024 * 1024));
      sh('sync');
      assert.match(reason(await analyse(image)), /not cleanly unmounted.*no journal/);
      sh('fsfreeze', '-f', mnt);
      assert.match(reason(await analyse(image)), /not cleanly unmounted/);
      sh('fsfreeze', '-u', mnt);
    } finally {
      cleanup();
    }
    await expectCurrent(image, ['/x']);
  });
});
