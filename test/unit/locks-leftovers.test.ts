/**
 * Locks and leftovers (issue 9, part 5): a base in use by an operation cannot be removed (busy,
 * naming the holder), a holder that died leaves a stale lock that is ignored and swept;
 * leftovers of killed runs (temp and staging names carry their owner) are swept by the next run
 * and shown/removed by `base gc`, while those of live processes are kept; outputs that exist are
 * refused unless --force.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { BIN, cli } from '../helpers/cli.js';
import { createTiny, importTiny, makeTinyVm, type TinyVm } from '../helpers/tiny-vm.js';
import { lockBase } from '../../src/base/locks.js';
import { ownerTag } from '../../src/util/owner.js';

let dir: string;
let env: NodeJS.ProcessEnv;
let tiny: TinyVm;
let id: string;
let overlay: string;
const lib = (): string => join(dir, 'lib');

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'clo-locks-'));
  env = { ...process.env, CLOUDLET_LIBRARY: lib(), XDG_CONFIG_HOME: join(dir, 'config') };
  tiny = await makeTinyVm(join(dir, 'vm'));
  id = await importTiny(tiny, env);
  overlay = join(dir, 'app.overlay');
  await createTiny(tiny, env, overlay);
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A pid that is certainly gone, with the owner tag it would have had. */
function deadTag(): string {
  const r = spawnSync('true');
  return `${r.pid ?? 999999}.1`;
}

test('a base held by an operation cannot be removed; released, it can', async () => {
  const release = await lockBase(lib(), id);
  const busy = await cli(['base', 'rm', 'tiny'], env);
  assert.equal(busy.code, 10, busy.stderr);
  assert.match(busy.stderr, new RegExp(`in use by pid ${process.pid}`));
  assert.ok(await stat(join(lib(), 'bases', id)), 'the base is still there (put back)');
  await release();
  assert.deepEqual(await readdir(join(lib(), 'locks')), [], 'the lock is gone');
});

test('base rm during an apply from that base: refused, and the apply completes', async () => {
  const out = join(dir, 'out-apply');
  const child = spawn(process.execPath, [BIN, '--json', 'apply', overlay, '--base', 'tiny', '-o', out], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  // Stop the apply the moment it holds its lock, so `base rm` surely meets it mid-way.
  for (let i = 0; i < 400; i++) {
    const locks = await readdir(join(lib(), 'locks')).catch(() => [] as string[]);
    if (locks.some((n) => n.includes(`.${child.pid}.`))) break;
    await sleep(5);
  }
  child.kill('SIGSTOP');
  try {
    const busy = await cli(['base', 'rm', 'tiny'], env);
    assert.equal(busy.code, 10, `refused while the apply holds the base: ${busy.stderr}`);
  } finally {
    child.kill('SIGCONT');
  }
  assert.equal(await exited, 0, stdout);
  assert.ok(await stat(join(out, 'disk.qcow2')), 'the apply wrote its output');
  assert.equal((await cli(['base', 'verify', 'tiny'], env)).code, 0);
});

test('leftovers of dead runs are shown and removed by base gc; live ones are kept', async () => {
  const dead = deadTag();
  const tmp = join(lib(), 'tmp');
  await mkdir(tmp, { recursive: true });
  await mkdir(join(tmp, `import-${dead}-AbC123`), { recursive: true });
  await writeFile(join(tmp, `import-${dead}-AbC123`, 'disk.raw'), Buffer.alloc(1 << 20, 1));
  await writeFile(join(tmp, `download-${dead}-0123456789ab.overlay`), 'partial');
  await mkdir(join(tmp, `pkg-${ownerTag()}-LiVe01`)); // ours: alive
  await writeFile(join(lib(), 'locks', `${id}.${dead}-deadbeef.lock`), '{}');
  const inst = join(lib(), 'instances', 'i-deadbeef');
  await mkdir(inst, { recursive: true });
  await writeFile(join(inst, '.owner'), `${dead}-0\n`);
  await writeFile(join(inst, 'memory.sparse'), Buffer.alloc(4096));
  // Staging and temp names beside outputs, too.
  const out = join(dir, 'out-gc');
  await mkdir(join(out, `.staging-${dead}-XyZ987`), { recursive: true });

  const dry = await cli(['base', 'gc', '--dry-run'], env);
  assert.equal(dry.code, 0, dry.stderr);
  const listed = (dry.json.leftovers as Array<{ path: string; kind: string; removed: boolean }>).map((l) => l.path);
  for (const p of [
    join(tmp, `import-${dead}-AbC123`),
    join(tmp, `download-${dead}-0123456789ab.overlay`),
    join(lib(), 'locks', `${id}.${dead}-deadbeef.lock`),
    inst,
  ])
    assert.ok(listed.includes(p), `gc lists ${p}`);
  assert.ok(!listed.includes(join(tmp, `pkg-${ownerTag()}-LiVe01`)), 'a live owner is not a leftover');
  assert.ok(await stat(inst), 'dry run removes nothing');
  assert.ok(Number(dry.json.bytes) >= 1 << 20, 'and says how much would be freed');

  // The next run that uses the library sweeps them anyway (here: an apply).
  const a = await cli(['apply', overlay, '--base', 'tiny', '-o', out], env);
  assert.equal(a.code, 0, a.stderr);
  assert.deepEqual((await readdir(tmp)).sort(), [`pkg-${ownerTag()}-LiVe01`], 'tmp holds only the live entry');
  assert.equal(await stat(inst).catch(() => undefined), undefined, 'the unrecorded instance is gone');
  assert.ok(!(await readdir(out)).some((n) => n.startsWith('.staging-')), 'the dead staging dir is gone');
  assert.deepEqual(await readdir(join(lib(), 'locks')), [], 'stale lock swept');
  const gc = await cli(['base', 'gc'], env);
  assert.equal(gc.code, 0);
  assert.deepEqual(gc.json.leftovers, []);
  await rm(join(tmp, `pkg-${ownerTag()}-LiVe01`), { recursive: true });
});

test('SIGINT during a base import: exit 130, one JSON object, nothing left in the library', async () => {
  const big = await makeTinyVm(join(dir, 'vm-big'), 5, 256);
  const lib2 = join(dir, 'lib-int');
  let interrupted = 0;
  for (const at of [150, 400, 800]) {
    const child = spawn(
      process.execPath,
      [BIN, '--json', 'base', 'import', '--disk', big.baseDisk, '--memory', big.baseMem, '--vm', big.vmJson],
      { env: { ...env, CLOUDLET_LIBRARY: lib2 }, stdio: ['ignore', 'pipe', 'ignore'] },
    );
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    await sleep(at);
    child.kill('SIGINT');
    const code = await exited;
    const lines = out.trim().split('\n').filter(Boolean);
    if (code === null) continue; // the signal came before the CLI had its handlers (default: killed)
    if (code === 0) {
      // finished before the signal: start over
      await rm(lib2, { recursive: true, force: true });
      continue;
    }
    interrupted++;
    assert.equal(code, 130, `interrupted at ${at} ms: ${out}`);
    assert.equal(lines.length, 1, `one JSON object: ${out}`);
    assert.equal((JSON.parse(lines[0]!) as { exit_code: number }).exit_code, 130);
    assert.deepEqual(await readdir(join(lib2, 'tmp')).catch(() => []), [], 'the import removed its work');
    assert.deepEqual(await readdir(join(lib2, 'bases')).catch(() => []), [], 'no half base');
  }
  assert.ok(interrupted > 0, 'at least one import was interrupted mid-way');
});

test('outputs that exist are refused unless --force', async () => {
  const o = join(dir, 'exists.overlay');
  await writeFile(o, 'precious');
  const refused = await cli(['create', '--base', 'tiny', '--disk', tiny.custDisk, '-o', o], env);
  assert.equal(refused.code, 10, refused.stderr);
  assert.equal(await readFile(o, 'utf8'), 'precious', 'untouched');
  const forced = await cli(['create', '--base', 'tiny', '--disk', tiny.custDisk, '-o', o, '--force'], env);
  assert.equal(forced.code, 0, forced.stderr);
  assert.notEqual(await readFile(o, 'utf8'), 'precious');
  const a1 = await cli(['apply', o, '--base', 'tiny', '-o', join(dir, 'twice')], env);
  assert.equal(a1.code, 0, a1.stderr);
  const a2 = await cli(['apply', o, '--base', 'tiny', '-o', join(dir, 'twice')], env);
  assert.equal(a2.code, 10, 'apply into a directory that has the outputs');
});

test('a holder killed with -9 leaves a stale lock: ignored, and the base can be removed', async () => {
  const holder = spawn(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      `import { lockBase } from ${JSON.stringify(new URL('../../src/base/locks.js', import.meta.url).href)};
       await lockBase(${JSON.stringify(lib())}, ${JSON.stringify(id)}); console.log('locked'); setInterval(() => {}, 1000);`,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  await new Promise<void>((r) => holder.stdout.once('data', () => r()));
  assert.equal((await cli(['base', 'rm', 'tiny'], env)).code, 10, 'a live holder counts');
  holder.kill('SIGKILL');
  await new Promise((r) => holder.once('exit', r));
  const rm2 = await cli(['base', 'rm', 'tiny'], env);
  assert.equal(rm2.code, 0, rm2.stderr);
  assert.equal(await stat(join(lib(), 'bases', id)).catch(() => undefined), undefined);
});
