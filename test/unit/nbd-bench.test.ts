/**
 * Throughput of the NBD server against qemu-nbd serving the same raw file, in one run, with
 * QEMU's own clients: `qemu-img bench` (sequential reads of one size at queue depth 1 and 16)
 * and `qemu-img convert` to a null target with requests capped at 4 KiB / 64 KiB by blkdebug.
 * Opt-in (it takes about a minute): NBD_BENCH=1 node --test dist/test/unit/nbd-bench.test.js
 * Prints a markdown table; results are in docs/nbd.md.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdtemp, open, readFile, rm, writeFile, type FileHandle } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { NbdServer, nbdUnixUri } from '../../src/nbd/server.js';
import type { NbdExport } from '../../src/nbd/export.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const SIZE = 256 * MiB;
const ROUNDS = Number(process.env['NBD_BENCH_ROUNDS'] ?? 3);
const skip = process.env['NBD_BENCH'] ? false : 'set NBD_BENCH=1 to run the NBD benchmark';

interface Case {
  name: string;
  /** Bytes moved (for MiB/s) and requests sent (for IOPS). */
  bytes: number;
  requests: number;
  run(socket: string): Promise<number>;
}

/** `qemu-img bench` reports its own run time ("Run completed in X seconds"). */
function benchCase(size: number, depth: number, count: number): Case {
  return {
    name: `qemu-img bench, ${size / 1024} KiB reads, depth ${depth}`,
    bytes: size * count,
    requests: count,
    async run(socket) {
      const uri = nbdUnixUri(socket, 'disk');
      const args = ['bench', '-f', 'raw', '-s', String(size), '-d', String(depth), '-c', String(count), uri];
      const { stdout } = await run('qemu-img', args);
      return Number(/Run completed in ([\d.]+) seconds/.exec(stdout)![1]);
    },
  };
}

/** Whole-image `qemu-img convert` to null-co, requests capped at `maxTransfer` by blkdebug. */
function convertCase(maxTransfer: number): Case {
  return {
    name: `qemu-img convert, ${maxTransfer / 1024} KiB requests`,
    bytes: SIZE,
    requests: SIZE / maxTransfer,
    async run(socket) {
      const src =
        `driver=raw,file.driver=blkdebug,file.max-transfer=${maxTransfer},file.image.driver=nbd,` +
        `file.image.server.type=unix,file.image.server.path=${socket},file.image.export=disk`;
      const t0 = process.hrtime.bigint();
      const dst = `driver=null-co,size=${SIZE}`;
      await run('qemu-img', ['convert', '-n', '--image-opts', src, '--target-image-opts', dst]);
      return Number(process.hrtime.bigint() - t0) / 1e9;
    },
  };
}

function fileExport(fh: FileHandle): NbdExport {
  return {
    size: SIZE,
    readOnly: true,
    async read(offset, length, buf) {
      for (let done = 0; done < length;) {
        const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) throw new Error(`short read at ${offset + done}`);
        done += bytesRead;
      }
    },
  };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

describe('NBD server throughput vs qemu-nbd', { skip, timeout: 15 * 60_000 }, () => {
  let dir = '';
  let fh: FileHandle;
  let qemuNbd: ChildProcess;
  const servers: NbdServer[] = [];
  const sockets: Record<string, string> = {};

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbd-bench-'));
    const image = join(dir, 'disk.raw');
    const data = Buffer.allocUnsafe(SIZE);
    randomFillSync(data);
    await writeFile(image, data);
    fh = await open(image, 'r');

    const file = new NbdServer({ name: 'disk', export: fileExport(fh) });
    sockets['ours, file (FileHandle.read)'] = join(dir, 'file.sock');
    await file.listen(join(dir, 'file.sock'));
    const inMemory = await readFile(image);
    const buffer = new NbdServer({
      name: 'disk',
      export: {
        size: SIZE,
        readOnly: true,
        async read(offset, length, buf) {
          inMemory.copy(buf, 0, offset, offset + length);
        },
      },
    });
    sockets['ours, in-memory buffer'] = join(dir, 'buffer.sock');
    await buffer.listen(join(dir, 'buffer.sock'));
    servers.push(file, buffer);

    const qemuNbdSocket = join(dir, 'qemu-nbd.sock');
    sockets['qemu-nbd -r (same file)'] = qemuNbdSocket;
    const qemuNbdArgs = ['-r', '-t', '-k', qemuNbdSocket, '-x', 'disk', '-f', 'raw', image];
    qemuNbd = spawn('qemu-nbd', qemuNbdArgs, { stdio: 'ignore' });
    for (let i = 0; i < 100; i++) {
      const ok = await run('qemu-img', ['info', nbdUnixUri(qemuNbdSocket, 'disk')]).then(
        () => true,
        () => false,
      );
      if (ok) break;
      await sleep(50);
    }
  });

  after(async () => {
    qemuNbd?.kill();
    for (const s of servers) await s.close();
    await fh?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('sequential reads, 4 KiB and 64 KiB, through qemu-img bench and qemu-img convert', async () => {
    const cases = [
      benchCase(4096, 1, 20_000),
      benchCase(65536, 1, 4_000),
      benchCase(4096, 16, 100_000),
      benchCase(65536, 16, 16_000),
      convertCase(4096),
      convertCase(65536),
    ];
    const names = Object.keys(sockets);
    const rows: string[] = [];
    for (const c of cases) {
      const times: Record<string, number[]> = {};
      for (const n of names) {
        await c.run(sockets[n]!); // warm-up: page cache, JIT
        times[n] = [];
      }
      for (let r = 0; r < ROUNDS; r++) for (const n of names) times[n]!.push(await c.run(sockets[n]!));
      const cells = names.map((n) => {
        const t = median(times[n]!);
        return `${(c.bytes / MiB / t).toFixed(0)} MiB/s, ${(c.requests / t / 1000).toFixed(1)}k req/s`;
      });
      rows.push(`| ${c.name} | ${cells.join(' | ')} |`);
    }
    const table = [`| client | ${names.join(' | ')} |`, `|---|${names.map(() => '---').join('|')}|`, ...rows].join(
      '\n',
    );
    const load = loadavg()
      .map((l) => l.toFixed(2))
      .join(' ');
    console.error(`\n${cpus().length} CPUs (${cpus()[0]?.model}), load ${load}, median of ${ROUNDS}\n${table}\n`);
    assert.ok(rows.length === cases.length);
  });
});
