/**
 * The NBD server with QEMU's own tools as clients (qemu-img, qemu-io, qemu-nbd -L): what they
 * read is byte-identical to the export, sizes and zero ranges come through, writes to the
 * read-only export are refused, a slow read does not stall a concurrent one, and a failing read
 * is an I/O error for that read only. Everything runs twice: with structured replies and
 * base:allocation, and with them refused. Needs qemu-utils.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { NbdServer, nbdUnixUri } from '../../src/nbd/server.js';
import { allocationStatus, type NbdExport } from '../../src/nbd/export.js';
import type { NbdError } from '../../src/nbd/errors.js';
import { rng } from '../helpers/rng.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

const noQemu = spawnSync('qemu-io', ['--version']).error ? 'qemu-io not found: apt-get install qemu-utils' : false;
if (noQemu && process.env['CI']) throw new Error(noQemu);
if (noQemu) console.error(`SKIPPING NBD qemu tool tests: ${noQemu}`);

/** MiB i < 48: byte patternOf(i), except every 8th MiB is a hole (zeros); MiB 48..63: seeded noise. */
const patternOf = (i: number): number => (i * 7 + 1) & 0xff;
const isHole = (i: number): boolean => i < 48 && i % 8 === 7;
const hex = (b: number): string => `0x${b.toString(16)}`;

function makeDisk(): { data: Buffer; extents: Array<{ start: number; length: number }> } {
  const data = Buffer.alloc(SIZE);
  const extents: Array<{ start: number; length: number }> = [];
  for (let i = 0; i < 48; i++) {
    if (isHole(i)) continue;
    data.fill(patternOf(i), i * MiB, (i + 1) * MiB);
    const last = extents.at(-1);
    if (last && last.start + last.length === i * MiB) last.length += MiB;
    else extents.push({ start: i * MiB, length: MiB });
  }
  const rand = rng(7);
  for (let at = 48 * MiB; at < SIZE; at += 4) data.writeUInt32LE(Math.floor(rand() * 2 ** 32), at);
  extents.push({ start: 48 * MiB, length: 16 * MiB });
  return { data, extents };
}

interface Harness {
  server: NbdServer;
  uri: string;
  errors: NbdError[];
  /** Offsets of completed reads, in completion order. */
  done: number[];
  /** Reads at this offset sleep 500 ms. */
  slowAt: number | null;
  /** Reads at this offset reject. */
  failAt: number | null;
}

type Extents = Array<{ start: number; length: number }>;

async function serve(dir: string, data: Buffer, extents: Extents, structured: boolean): Promise<Harness> {
  const exp: NbdExport = {
    size: SIZE,
    readOnly: true,
    async read(offset, length, buf) {
      if (offset === h.slowAt) await sleep(500);
      if (offset === h.failAt) throw new Error('segment fetch failed (injected)');
      data.copy(buf, 0, offset, offset + length);
      h.done.push(offset);
    },
    async blockStatus(offset, length) {
      return allocationStatus(extents, offset, length);
    },
  };
  const path = join(dir, `nbd-${structured ? 'sr' : 'simple'}.sock`);
  const errors: NbdError[] = [];
  const server = new NbdServer({
    name: 'disk0',
    export: exp,
    structuredReplies: structured,
    onError: (e) => errors.push(e),
  });
  const h: Harness = { server, uri: nbdUnixUri(path, 'disk0'), errors, done: [], slowAt: null, failAt: null };
  await server.listen(path);
  return h;
}

async function qemuIo(uri: string, ...cmds: string[]): Promise<string> {
  const { stdout } = await run('qemu-io', ['-f', 'raw', '-r', uri, ...cmds.flatMap((c) => ['-c', c])]);
  return stdout;
}

for (const structured of [true, false]) {
  const mode = structured ? 'structured replies' : 'simple replies';
  describe(`NBD server with qemu-img / qemu-io (${mode})`, { skip: noQemu }, () => {
    let dir = '';
    let disk: ReturnType<typeof makeDisk>;
    let h: Harness;

    before(async () => {
      dir = await mkdtemp(join(tmpdir(), 'nbd-tools-'));
      disk = makeDisk();
      h = await serve(dir, disk.data, disk.extents, structured);
    });
    after(async () => {
      await h.server.close();
      await rm(dir, { recursive: true, force: true });
    });

    it('qemu-img info shows the size; qemu-img convert copies it byte for byte', async () => {
      const { stdout } = await run('qemu-img', ['info', '--output=json', h.uri]);
      assert.equal((JSON.parse(stdout) as Record<string, unknown>)['virtual-size'], SIZE);
      const out = join(dir, 'out.raw');
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', h.uri, out]);
      assert.ok((await readFile(out)).equals(disk.data), 'converted image equals the export');
    });

    it('qemu-io read -P verifies every pattern region; a wrong pattern is caught', async () => {
      const cmds: string[] = [];
      for (let i = 0; i < 48; i += 3) cmds.push(`read -P ${hex(isHole(i) ? 0 : patternOf(i))} ${i}M 1M`);
      cmds.push('read -P 0 7M 1M', 'read -P 0x2b 6M 512', `read -P 0x2b ${7 * MiB - 512} 512`);
      const out = await qemuIo(h.uri, ...cmds);
      assert.doesNotMatch(out, /Pattern verification failed|error/i);
      assert.equal(out.match(/^read /gm)?.length, cmds.length);
      const wrong = await qemuIo(h.uri, 'read -P 0x55 2M 4k').catch((e: { stdout: string }) => e.stdout);
      assert.match(wrong, /Pattern verification failed/);
    });

    it('a write through qemu-io is refused: the export is read-only', async () => {
      await assert.rejects(
        run('qemu-io', ['-f', 'raw', h.uri, '-c', 'write -P 0x11 0 4k']),
        (err: { stderr: string }) => /read-only|Permission denied/i.test(err.stderr),
      );
    });

    it('a 500 ms read does not stall a concurrent one (qemu-io aio_read + read on one connection)', async () => {
      h.done.length = 0;
      h.slowAt = 40 * MiB;
      const out = await qemuIo(
        h.uri,
        `aio_read -P ${hex(patternOf(40))} 40M 64k`,
        `read -P ${hex(patternOf(20))} 20M 64k`,
        'aio_flush',
      );
      assert.doesNotMatch(out, /Pattern verification failed/);
      h.slowAt = null;
      assert.deepEqual(h.done, [20 * MiB, 40 * MiB], 'the fast read finished first');
      const lines = out.split('\n').filter((l) => l.startsWith('64 KiB'));
      const secs = (l: string): number => Number(/; (\d+:)?(\d+\.\d+) sec/.exec(l)![2]);
      assert.ok(secs(lines[0]!) < 0.3, `fast read took ${lines[0]}`);
      assert.ok(secs(lines[1]!) >= 0.45, `slow read took ${lines[1]}`);
    });

    it('a read whose callback fails is an I/O error for that read only, and is reported', async () => {
      const before = h.errors.length;
      h.failAt = 44 * MiB;
      const out = await qemuIo(h.uri, 'read 44M 4k', `read -P ${hex(patternOf(20))} 20M 4k`).catch(
        (e: { stdout: string }) => e.stdout,
      );
      h.failAt = null;
      assert.match(out, /read failed: Input\/output error/);
      assert.match(out, /read 4096\/4096 bytes at offset 20971520/);
      const reported = h.errors.slice(before);
      assert.equal(reported.length, 1);
      assert.equal(reported[0]!.kind, 'export');
      assert.match(reported[0]!.message, /injected/);
    });

    if (structured) {
      it('base:allocation: qemu-img map reports the holes; qemu-nbd -L lists the context', async () => {
        const { stdout } = await run('qemu-img', ['map', '--output=json', '-f', 'raw', h.uri]);
        const map = JSON.parse(stdout) as Array<{ start: number; length: number; zero: boolean; data: boolean }>;
        const zeroes = map.filter((m) => m.zero).map((m) => [m.start / MiB, m.length / MiB]);
        assert.deepEqual(zeroes, [
          [7, 1],
          [15, 1],
          [23, 1],
          [31, 1],
          [39, 1],
          [47, 1],
        ]);
        const list = await run('qemu-nbd', ['-L', '-k', h.server.paths[0]!]);
        assert.match(list.stdout, /export: 'disk0'/);
        assert.match(list.stdout, /size: +67108864/);
        assert.match(list.stdout, /base:allocation/);
      });
    }
  });
}

describe('NBD server, writable export, with qemu-io', { skip: noQemu }, () => {
  it('writes land in the export and read back', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'nbd-tools-'));
    const disk = Buffer.alloc(8 * MiB);
    let flushes = 0;
    const server = new NbdServer({
      name: 'rw',
      export: {
        size: disk.length,
        readOnly: false,
        async read(o, l, b) {
          disk.copy(b, 0, o, o + l);
        },
        async write(o, d) {
          d.copy(disk, o);
        },
        async flush() {
          flushes++;
        },
      },
    });
    const path = join(dir, 'rw.sock');
    await server.listen(path);
    const uri = nbdUnixUri(path, 'rw');
    const cmds = ['write -P 0xab 1M 64k', 'flush', 'read -P 0xab 1M 64k'];
    const { stdout } = await run('qemu-io', ['-f', 'raw', uri, ...cmds.flatMap((c) => ['-c', c])]);
    assert.doesNotMatch(stdout, /failed/);
    assert.ok(disk.subarray(MiB, MiB + 65536).every((b) => b === 0xab));
    assert.ok(flushes >= 1);
    await server.close();
    await rm(dir, { recursive: true, force: true });
  });
});
