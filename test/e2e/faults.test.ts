/**
 * Faults, tested (issue 9, part 6), on the demo VM pair under real QEMU:
 * - kill -9 at 20 seeded random moments each of `base import`, `create`, `apply` and
 *   `synthesize` (moments drawn over the measured length of a clean run, FAULT_SEED to vary);
 * - a full file system (a small tmpfs, filled to leave less and less room) at every phase of
 *   the same operations.
 * Afterwards: no leftovers once the next run (or `base gc`) swept, no QEMU left, every output
 * that exists is complete, earlier outputs unchanged, and `base verify` passes.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, statfs, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BIN, cli, ok, stopAllInstances } from '../helpers/cli.js';
import { captureBaseAndCustomized, type CaptureResult } from '../helpers/demo-vm.js';
import { findQemu } from '../helpers/tiny-qemu.js';
import { rng } from '../helpers/rng.js';
import { OverlayReader } from '../../src/overlay/reader.js';

const hasQemu = findQemu() !== null;
if (!hasQemu && process.env.CI) throw new Error('QEMU is required in CI (apt-get install qemu-system-x86 qemu-utils)');
if (!hasQemu) console.error('\n*** QEMU not found: skipping the fault-injection tests ***\n');
const isRoot = process.getuid?.() === 0;
const KILLS = Number(process.env.FAULT_KILLS ?? 20);
const SEED = Number(process.env.FAULT_SEED ?? 1);

let work: string;
let cap: CaptureResult;
let env: NodeJS.ProcessEnv;
let vmJson: string;
let overlay: string;
let applied: string;
const sums = new Map<string, string>();

async function sha256(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(path)) h.update(c as Buffer);
  return h.digest('hex');
}

async function qemuPids(): Promise<number[]> {
  const out: number[] = [];
  for (const n of await readdir('/proc')) {
    if (!/^\d+$/.test(n)) continue;
    const cmd = await readFile(`/proc/${n}/cmdline`, 'utf8').catch(() => '');
    if (cmd.startsWith('qemu-system') && cmd.includes(work)) out.push(Number(n));
  }
  return out;
}

interface Timed {
  code: number | null;
  killed: boolean;
  ms: number;
}

/** Runs the CLI; SIGKILLs it after `killAfterMs` if it is still running. */
function runKilled(args: string[], e: NodeJS.ProcessEnv, killAfterMs: number): Promise<Timed> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [BIN, '--json', ...args], { env: e, stdio: 'ignore' });
    let killed = false;
    const timer = setTimeout(() => {
      killed = child.kill('SIGKILL');
    }, killAfterMs);
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, killed: killed && code === null, ms: Date.now() - t0 });
    });
  });
}

/** After a sweep: nothing of a dead run is left in the library. */
async function noLeftovers(lib: string, what: string): Promise<void> {
  const gc = await cli(['base', 'gc', '--dry-run'], { ...env, CLOUDLET_LIBRARY: lib });
  const found = (gc.json.leftovers as Array<{ kind: string; path: string }>).filter((l) => l.kind !== 'dead_instance');
  assert.deepEqual(found, [], `${what}: leftovers after the sweep`);
  assert.deepEqual(await readdir(join(lib, 'tmp')).catch(() => []), [], `${what}: library tmp is empty`);
  assert.deepEqual(await readdir(join(lib, 'locks')).catch(() => []), [], `${what}: no locks`);
}

before(async () => {
  if (!hasQemu) return;
  work = await mkdtemp(join(tmpdir(), 'clo-faults-'));
  env = { ...process.env, CLOUDLET_LIBRARY: join(work, 'lib'), XDG_CONFIG_HOME: join(work, 'config') };
  cap = await captureBaseAndCustomized(join(work, 'vm'));
  vmJson = join(work, 'vm.json');
  await writeFile(vmJson, JSON.stringify({ vm: cap.base.info.spec }));
  ok(
    await cli(
      ['base', 'import', '--disk', cap.base.disk, '--memory', cap.base.mem, '--vm', vmJson, '--name', 'demo'],
      env,
    ),
    'import',
  );
  overlay = join(work, 'app.overlay');
  ok(
    await cli(['create', '--base', 'demo', '--disk', cap.custom.disk, '--memory', cap.custom.mem, '-o', overlay], env),
    'create',
  );
  applied = join(work, 'applied');
  ok(await cli(['apply', overlay, '--base', 'demo', '-o', applied], env), 'apply');
  for (const f of [
    overlay,
    join(applied, 'disk.qcow2'),
    join(applied, 'memory.sparse'),
    join(applied, 'manifest.json'),
  ])
    sums.set(f, await sha256(f));
});

after(async () => {
  if (!hasQemu) return;
  await stopAllInstances(env);
  await rm(work, { recursive: true, force: true });
});

test(
  'kill -9 at random moments of import, create, apply and synthesize',
  { skip: !hasQemu, timeout: 600_000 },
  async (t) => {
    const rand = rng(SEED);
    const importLib = join(work, 'lib-import');
    const ops: Array<{
      name: string;
      args: (i: number) => string[];
      e: NodeJS.ProcessEnv;
      check: (i: number) => Promise<void>;
    }> = [
      {
        name: 'base import',
        e: { ...env, CLOUDLET_LIBRARY: importLib },
        args: () => [
          'base',
          'import',
          '--disk',
          cap.base.disk,
          '--memory',
          cap.base.mem,
          '--vm',
          vmJson,
          '--name',
          'demo',
        ],
        check: async () => {
          // A base is either absent or complete (verified at the end).
          const bases = await readdir(join(importLib, 'bases')).catch(() => [] as string[]);
          assert.ok(bases.length <= 1);
        },
      },
      {
        name: 'create',
        e: env,
        args: (i) => [
          'create',
          '--base',
          'demo',
          '--disk',
          cap.custom.disk,
          '--memory',
          cap.custom.mem,
          '-o',
          join(work, `k${i}.overlay`),
        ],
        check: async (i) => {
          const out = join(work, `k${i}.overlay`);
          if (await stat(out).catch(() => undefined)) await (await OverlayReader.open(out)).close(); // complete, or absent
        },
      },
      {
        name: 'apply',
        e: env,
        args: (i) => ['apply', overlay, '--base', 'demo', '-o', join(work, `a${i}`)],
        check: async (i) => {
          const out = join(work, `a${i}`);
          const names = await readdir(out).catch(() => [] as string[]);
          // manifest.json is moved in last: with it, every output is there.
          if (names.includes('manifest.json')) {
            assert.ok(names.includes('disk.qcow2') && names.includes('memory.sparse'), `a${i}: ${names.join(',')}`);
          }
        },
      },
      {
        name: 'synthesize',
        e: env,
        args: () => ['synthesize', overlay, '--base', 'demo', '--detach'],
        check: async () => undefined,
      },
    ];
    for (const op of ops) {
      // The length of a clean run sets the range the kill moments are drawn from.
      const clean = await runKilled(op.args(999), op.e, 600_000);
      assert.equal(clean.code, 0, `${op.name}: a clean run`);
      if (op.name === 'synthesize') await stopAllInstances(env);
      let killedRuns = 0;
      for (let i = 0; i < KILLS; i++) {
        const at = Math.floor(rand() * clean.ms);
        const r = await runKilled(op.args(i), op.e, at);
        if (r.killed) killedRuns++;
        else assert.equal(r.code, 0, `${op.name} #${i} (not killed) must succeed`);
        await op.check(i);
      }
      t.diagnostic(`${op.name}: clean run ${clean.ms} ms, ${killedRuns} of ${KILLS} runs killed`);
      assert.ok(killedRuns >= KILLS / 2, `${op.name}: most runs were killed mid-way`);
      // The next run sweeps what the killed ones left (gc is what every library operation runs first).
      const lib = op.e.CLOUDLET_LIBRARY ?? '';
      ok(await cli(['base', 'gc'], op.e), 'gc');
      await noLeftovers(lib, op.name);
      if (op.name === 'synthesize') {
        await stopAllInstances(env);
        assert.deepEqual(await qemuPids(), [], 'no QEMU left: orphans of killed runs were swept');
        assert.deepEqual(await readdir(join(lib, 'instances')).catch(() => []), [], 'no instance directory left');
      }
    }
    // Temp files beside create's outputs are swept when the same output is written again.
    ok(
      await cli(
        ['create', '--base', 'demo', '--disk', cap.custom.disk, '-o', join(work, 'k0.overlay'), '--force'],
        env,
      ),
      'rerun',
    );
    assert.deepEqual(
      (await readdir(work)).filter((n) => n.startsWith('.k0.overlay.tmp-')),
      [],
      'temp of k0 swept',
    );
    ok(await cli(['base', 'verify', 'demo'], env), 'base verify');
    ok(await cli(['base', 'verify', 'demo'], { ...env, CLOUDLET_LIBRARY: importLib }), 'imported base verify');
    for (const [f, s] of sums) assert.equal(await sha256(f), s, `${f} unchanged`);
  },
);

test(
  'a full file system at every phase: refused with exit 14 naming the path, nothing broken',
  { skip: !hasQemu || !isRoot, timeout: 300_000 },
  async (t) => {
    const mnt = join(work, 'small');
    await mkdir(mnt);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=768m', 'tmpfs', mnt]);
    try {
      const free = async (): Promise<number> => {
        const s = await statfs(mnt);
        return s.bavail * s.bsize;
      };
      /** Fills the file system to leave `room` bytes. */
      const leave = async (room: number): Promise<void> => {
        await rm(join(mnt, 'filler'), { force: true });
        const n = Math.max(0, (await free()) - room);
        if (n > 0) execFileSync('fallocate', ['-l', String(n), join(mnt, 'filler')]);
      };
      const lib = join(mnt, 'lib');
      const e = { ...env, CLOUDLET_LIBRARY: lib };
      const cases: Array<{ name: string; args: (i: number) => string[]; out: (i: number) => string }> = [
        {
          name: 'base import',
          args: () => [
            'base',
            'import',
            '--disk',
            cap.base.disk,
            '--memory',
            cap.base.mem,
            '--vm',
            vmJson,
            '--name',
            'demo',
          ],
          out: () => join(lib, 'bases'),
        },
        {
          name: 'create',
          args: (i) => [
            'create',
            '--base',
            'demo',
            '--disk',
            cap.custom.disk,
            '--memory',
            cap.custom.mem,
            '-o',
            join(mnt, `c${i}.overlay`),
          ],
          out: (i) => join(mnt, `c${i}.overlay`),
        },
        {
          name: 'apply',
          args: (i) => ['apply', overlay, '--base', 'demo', '-o', join(mnt, `a${i}`)],
          out: (i) => join(mnt, `a${i}`),
        },
        {
          name: 'synthesize',
          args: () => ['synthesize', overlay, '--base', 'demo', '--detach'],
          out: () => join(lib, 'instances'),
        },
      ];
      for (const c of cases) {
        // How much the operation needs: one run with room to spare.
        await leave(600 << 20);
        const before = await free();
        const r0 = await cli(c.args(99), e);
        ok(r0, `${c.name} with room`);
        const need = before - (await free());
        if (c.name === 'synthesize') await stopAllInstances(e);
        // (The first import's base stays in `lib`: the other operations use it.)
        const levels = 5;
        let full = 0;
        for (let k = 0; k < levels; k++) {
          const room = Math.floor((need * k) / levels);
          const importLib = join(mnt, `lib-${k}`);
          const ce = c.name === 'base import' ? { ...e, CLOUDLET_LIBRARY: importLib } : e;
          await leave(room);
          const r = await cli(c.args(k), ce);
          if (r.code === 0) {
            if (c.name === 'synthesize') await stopAllInstances(e);
            continue;
          }
          full++;
          assert.equal(r.code, 14, `${c.name} with ${room} bytes left: ${r.stderr}`);
          assert.equal(r.json.exit_code, 14);
          assert.match(String(r.json.message), /no space left on the device holding \//, r.stderr);
          await rm(join(mnt, 'filler'), { force: true });
          const gcLib = ce.CLOUDLET_LIBRARY ?? lib;
          await noLeftovers(gcLib, `${c.name} at ${room} bytes`);
          if (c.name === 'create') assert.equal(await stat(c.out(k)).catch(() => undefined), undefined, 'no overlay');
          if (c.name === 'apply')
            assert.deepEqual(
              (await readdir(c.out(k)).catch(() => [])).filter((n) => !n.startsWith('.')),
              [],
            );
          if (c.name === 'synthesize') assert.deepEqual(await readdir(join(lib, 'instances')).catch(() => []), []);
          if (c.name === 'base import') assert.deepEqual(await readdir(join(importLib, 'bases')).catch(() => []), []);
        }
        t.diagnostic(`${c.name}: needs ${need} bytes; ${full} of ${levels} levels ran out of space`);
        assert.ok(full >= levels / 2, `${c.name}: most levels ran out of space`);
      }
      await rm(join(mnt, 'filler'), { force: true });
      ok(await cli(['base', 'verify', 'demo'], e), 'base verify after the full disks');
      assert.deepEqual(await qemuPids(), [], 'no QEMU left');
    } finally {
      await stopAllInstances({ ...env, CLOUDLET_LIBRARY: join(mnt, 'lib') });
      execFileSync('umount', ['-l', mnt]);
    }
    for (const [f, s] of sums) assert.equal(await sha256(f), s, `${f} unchanged`);
  },
);
