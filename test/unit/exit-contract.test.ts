/**
 * One error contract (issue 9, part 4): every exit code of the registry, provoked through the
 * CLI with --json. For each: stdout holds exactly one JSON object, its `exit_code` equals the
 * process status, its `code` is the documented error class, stderr holds one line, and detail
 * keys are snake_case. A test fails when a code of the registry has no case here.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BIN, cli } from '../helpers/cli.js';
import { installFakeQemu } from '../helpers/fake-qemu.js';
import { createTiny, importTiny, makeTinyVm, type TinyVm } from '../helpers/tiny-vm.js';
import { EXIT_CODES, ExitCode } from '../../src/util/exit-codes.js';
import { xorByte } from '../helpers/bytes.js';

const PRELOAD = fileURLToPath(new URL('../helpers/fault-preload.js', import.meta.url));

let dir: string;
let env: NodeJS.ProcessEnv;
let tiny: TinyVm;
let overlay: string;
const seen = new Map<number, string>();

interface Outcome {
  status: number;
  stdout: string;
  stderr: string;
}

function run(args: string[], e: NodeJS.ProcessEnv = env, nodeFlags: string[] = []): Promise<Outcome> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [...nodeFlags, BIN, '--json', ...args],
      { env: e, timeout: 60_000, maxBuffer: 16 << 20 },
      (err, stdout, stderr) => {
        const status = err ? (typeof (err as { code?: unknown }).code === 'number' ? Number(err.code) : -1) : 0;
        resolve({ status, stdout, stderr });
      },
    );
  });
}

/** Checks the contract for one outcome; records the code as covered. */
function contract(o: Outcome, code: number, errorClass: string | null, what: string): Record<string, unknown> {
  assert.equal(o.status, code, `${what}: status ${o.status}, stderr: ${o.stderr}`);
  const lines = o.stdout.split('\n').filter((l) => l.trim() !== '');
  assert.equal(lines.length, 1, `${what}: exactly one JSON object on stdout, got: ${o.stdout}`);
  const json = JSON.parse(lines[0]!) as Record<string, unknown>;
  if (errorClass) {
    assert.equal(json.message_type, 'error', what);
    assert.equal(json.exit_code, code, `${what}: exit_code in the JSON equals the status`);
    assert.equal(json.code, errorClass, what);
    assert.equal(o.stderr.trim().split('\n').length, 1, `${what}: one line on stderr: ${o.stderr}`);
    for (const k of Object.keys(json)) assert.match(k, /^[a-z0-9_]+$/, `${what}: detail key ${k} in snake_case`);
  }
  seen.set(code, what);
  return json;
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'clo-exit-'));
  env = { ...process.env, CLOUDLET_LIBRARY: join(dir, 'lib'), XDG_CONFIG_HOME: join(dir, 'config') };
  tiny = await makeTinyVm(join(dir, 'vm'), 11, 16);
  await importTiny(tiny, env);
  overlay = join(dir, 'app.overlay');
  await createTiny(tiny, env, overlay);
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('every exit code: one JSON object whose exit_code is the status', async () => {
  contract(await run(['base', 'list']), 0, null, 'ok');
  // 1: an unclassified error (a bug), injected below the API by a preload.
  contract(
    await run(['apply', overlay, '--base', 'tiny', '-o', join(dir, 'o1')], env, ['--import', PRELOAD]),
    1,
    'InternalError',
    'internal',
  );
  // 2: usage errors from commander itself, and from our own checks.
  contract(await run(['create', '--disk', 'x']), 2, 'UsageError', 'missing required option');
  contract(await run(['info', overlay, '--bogus']), 2, 'UsageError', 'unknown option');
  contract(await run(['create', '--disk', 'x', '-o', 'y']), 2, 'UsageError', 'no base named');
  // 3: not found; a directory given as a file; a missing output directory.
  contract(await run(['info', join(dir, 'nope.overlay')]), 3, 'NotFoundError', 'missing file');
  contract(await run(['info', dir]), 3, 'NotFoundError', 'a directory as the overlay');
  contract(
    await run(['create', '--base', 'tiny', '--disk', tiny.custDisk, '-o', join(dir, 'no', 'such', 'x.overlay')]),
    3,
    'NotFoundError',
    'missing output directory',
  );
  contract(
    await run(['create', '--base', 'tiny', '--disk', dir, '-o', join(dir, 'd.overlay')]),
    3,
    'NotFoundError',
    'a directory as the disk',
  );
  // 4: corrupt.
  await writeFile(join(dir, 'garbage.overlay'), Buffer.alloc(5000, 0x41));
  contract(await run(['verify', join(dir, 'garbage.overlay')]), 4, 'CorruptInputError', 'corrupt');
  // 5: another base: the same files without the VM spec have another id.
  contract(
    await run(['apply', overlay, '--base-disk', tiny.baseDisk, '--base-memory', tiny.baseMem, '-o', join(dir, 'o5')]),
    5,
    'BaseMismatchError',
    'base mismatch',
  );
  // 7: unsupported: a future major version.
  const v2 = Buffer.from(await readFile(overlay));
  v2.writeUInt16LE(2, 8);
  await writeFile(join(dir, 'v2.overlay'), v2);
  contract(await run(['info', join(dir, 'v2.overlay')]), 7, 'UnsupportedError', 'unsupported');
  // 8 and 9: QEMU failing at once, and a "QEMU" that runs but whose guest never answers.
  const fake = join(dir, 'fakebin');
  await mkdir(fake);
  await installFakeQemu(fake);
  const fakeEnv = { ...env, PATH: `${fake}:${process.env.PATH ?? ''}` };
  const launch = contract(
    await run(['launch', 'tiny', '--accel', 'tcg'], { ...fakeEnv, FAKE_QEMU_MODE: 'die' }),
    8,
    'QemuError',
    'qemu',
  );
  assert.equal(launch.detail_exit_code, 1, "QEMU's own exit status is a detail, never the exit_code");
  contract(
    await run(
      ['synthesize', overlay, '--base', 'tiny', '--accel', 'tcg', '--wait-tcp', '1', '--timeout', '1s', '--detach'],
      {
        ...fakeEnv,
        FAKE_QEMU_MODE: 'serve',
      },
    ),
    9,
    'TimeoutError',
    'timeout',
  );
  // 10: busy: an existing output.
  await writeFile(join(dir, 'exists.overlay'), 'x');
  contract(
    await run(['create', '--base', 'tiny', '--disk', tiny.custDisk, '-o', join(dir, 'exists.overlay')]),
    10,
    'BusyError',
    'busy',
  );
  // 11: qemu-img missing from PATH.
  const bare = join(dir, 'bare');
  await mkdir(bare);
  await symlink('/usr/bin/tar', join(bare, 'tar'));
  contract(
    await run(['base', 'import', '--disk', tiny.baseDisk, '--name', 'x'], { ...env, PATH: bare }),
    11,
    'MissingToolError',
    'missing tool',
  );
  // 12: network.
  const closed = await new Promise<number>((resolve) => {
    const s: Server = createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
  });
  contract(
    await run(['synthesize', `http://127.0.0.1:${closed}/x.overlay`, '--base', 'tiny', '--detach']),
    12,
    'NetworkError',
    'network',
  );
  // 13: untrusted: an unsigned overlay while a key is trusted.
  await run(['key', 'generate', join(dir, 'k')]);
  contract(await run(['verify', overlay, '--trust', join(dir, 'k.pub')]), 13, 'UntrustedError', 'untrusted');
  // 15: unauthorized: a cloudlet that refuses our token (its 401 body, as serve sends it).
  const refusing: Server = createServer((_req, res) => {
    res.writeHead(401, { 'content-type': 'application/json', 'www-authenticate': 'Bearer' });
    res.end(JSON.stringify({ message_type: 'error', code: 'UnauthorizedError', exit_code: 15, message: 'bad token' }));
  });
  await new Promise<void>((r) => refusing.listen(0, '127.0.0.1', r));
  try {
    const url = `http://127.0.0.1:${(refusing.address() as { port: number }).port}`;
    contract(
      await run(['remote', 'info', '--cloudlet', url], { ...env, CLOUDLET_TOKEN: 'wrong' }),
      15,
      'UnauthorizedError',
      'unauthorized',
    );
  } finally {
    refusing.close();
  }
  // 6: a library base whose bytes changed after import (opening does not rehash; rebuilding the
  // chunk the overlay has a delta against does).
  const shown = await cli(['base', 'show', 'tiny'], env);
  const diskFile = join(String(shown.json.dir), 'disk.raw');
  const disk = await readFile(diskFile);
  const damaged = Buffer.from(disk);
  for (let i = 0; i < 4096; i += 64) xorByte(damaged, (1 << 20) + 4096 + i, 0x01);
  await writeFile(diskFile, damaged);
  try {
    contract(
      await run(['apply', overlay, '--base', 'tiny', '-o', join(dir, 'o6')]),
      6,
      'HashMismatchError',
      'verify failed',
    );
  } finally {
    await writeFile(diskFile, disk);
  }
  // 14: no space (a tiny tmpfs; needs root).
  if (process.getuid?.() === 0) {
    const full = join(dir, 'full');
    await mkdir(full);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', full]);
    try {
      await writeFile(join(full, 'filler'), Buffer.alloc(64 << 10)); // the file system is now full
      const o = contract(
        await run([
          'create',
          '--base',
          'tiny',
          '--disk',
          tiny.custDisk,
          '--memory',
          tiny.custMem,
          '-o',
          join(full, 'x.overlay'),
        ]),
        14,
        'NoSpaceError',
        'no space',
      );
      assert.match(String(o.message), new RegExp(full), 'the message names the path');
    } finally {
      execFileSync('umount', [full]);
    }
  } else if (process.env.CI) {
    assert.fail('the no-space case needs root (mount -t tmpfs) and CI runs as root');
  } else {
    process.stderr.write('!!! not root: exit code 14 (no space) not provoked\n');
    seen.set(ExitCode.noSpace, 'skipped');
  }
  // 130: interrupted, while waiting for a stalled download.
  const stall = createServer((_req, res) => {
    res.writeHead(200, { 'content-length': '1000000' });
    res.write('x');
  });
  await new Promise<void>((r) => stall.listen(0, '127.0.0.1', r));
  try {
    const port = (stall.address() as { port: number }).port;
    const child = spawn(
      process.execPath,
      [BIN, '--json', 'synthesize', `http://127.0.0.1:${port}/x`, '--base', 'tiny', '--detach'],
      { env, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = once(child, 'exit') as Promise<[number | null]>;
    await new Promise((r) => setTimeout(r, 1000));
    child.kill('SIGINT');
    const [status] = await exited;
    contract({ status: status ?? -1, stdout, stderr }, 130, 'InterruptedError', 'interrupted');
  } finally {
    stall.closeAllConnections();
    stall.close();
  }
  for (const e of EXIT_CODES) assert.ok(seen.has(e.code), `exit code ${e.code} (${e.name}) has a case`);
});

test('detail keys: one case everywhere, and never one of the four fields every error has', async () => {
  const { QemuError } = await import('../../src/util/errors.js');
  const j = new QemuError('x', { exit_code: 1, stderrTail: 'a', migrationStatus: 'failed' }).toJSON();
  assert.equal(j.exit_code, ExitCode.qemu);
  assert.equal(j.detail_exit_code, 1);
  assert.equal(j.stderr_tail, 'a');
  assert.equal(j.migration_status, 'failed');
});
