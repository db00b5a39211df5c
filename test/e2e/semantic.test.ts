/**
 * The semantic gap on real QEMU (issue 10), with the demo VM (busybox guest: every step goes
 * through the serial console; the agent path is tested against qemu-ga in the unit tests and by
 * the semantic bench). One base, one launched customization that writes its data, downloads a
 * "package" and deletes it; then snapshots with each technique (--then resume), each made into an
 * overlay and synthesized. Every synthesized VM must answer with the base's RAM token, show the
 * app's marker and still-ticking state, find its data intact (sha256sum -c in the guest), write
 * to its disk (a frozen snapshot thaws itself), and after a clean stop (umount) its disk must pass
 * e2fsck -fn. Also: a base snapshot taken without discard resumes on a drive with it (launch),
 * and snapshots taken with discard resume without it (synthesis uses the base's drive spec).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ensureDemoVm, freePort, parseStatus, captureDemoBase } from '../helpers/demo-vm.js';
import { cli, ok, stopAllInstances } from '../helpers/cli.js';
import { findQemu } from '../helpers/tiny-qemu.js';

const exec = promisify(execFile);
const hasQemu = findQemu() !== null;
if (!hasQemu && process.env.CI) throw new Error('QEMU is required in CI (apt-get install qemu-system-x86 qemu-utils)');
if (!hasQemu) console.error('\n*** QEMU not found: skipping the semantic-gap end-to-end test ***\n');

let work: string;
let env: NodeJS.ProcessEnv;

before(async () => {
  if (!hasQemu) return;
  work = await mkdtemp(join(tmpdir(), 'clo-sem-'));
  env = { ...process.env, CLOUDLET_LIBRARY: join(work, 'lib') };
  await ensureDemoVm();
});

after(async () => {
  if (!hasQemu) return;
  await stopAllInstances(env);
  await rm(work, { recursive: true, force: true });
});

interface Variant {
  name: string;
  flags: string[];
  freeBlocks: 'off' | 'auto';
}

test(
  'trim, freeze + free blocks, zeroed free memory: smaller overlays, same token, intact data, e2fsck clean',
  { skip: !hasQemu, timeout: 240_000 },
  async () => {
    // A base captured from a boot, on a drive without discard.
    const captured = await captureDemoBase(env, join(work, 'boot'));
    const token = captured.status.token;

    // Launched: the same snapshot resumed on a drive with discard=unmap,detect-zeroes=unmap.
    const p0 = await freePort();
    const launched = ok(await cli(['launch', 'demo', '--forward', `${p0}:8080`], env), 'launch');
    const iid = String(launched.instance);
    const state = JSON.parse(await readFile(join(String(launched.dir), 'state.json'), 'utf8')) as {
      spec: { drives: Array<{ discard?: string; detectZeroes?: string }> };
    };
    assert.deepEqual(
      [state.spec.drives[0]?.discard, state.spec.drives[0]?.detectZeroes],
      ['unmap', 'unmap'],
      'launch passes discards on',
    );
    const resumed = parseStatus(await (await fetch(`http://127.0.0.1:${p0}/cgi-bin/status`)).text());
    assert.equal(resumed.token, token, 'a base snapshot taken without discard resumes with it');

    // The app: its data (checksummed), a marker, a ticking state in RAM; a package downloaded and deleted.
    const marker = `sem-${Date.now().toString(36)}`;
    const customize = [
      `echo ${marker} > /mnt/marker && mkdir -p /mnt/app`,
      'dd if=/dev/urandom of=/mnt/app/data.bin bs=64k count=24 2>/dev/null && seq 1 50000 > /mnt/app/numbers.txt',
      'cd /mnt/app && sha256sum data.bin numbers.txt > /mnt/app/SHA256SUMS && cd /',
      'dd if=/dev/urandom of=/mnt/pkg.deb bs=1M count=8 2>/dev/null && sync && rm /mnt/pkg.deb && sync',
      '(setsid sh -c \'n=0; while :; do n=$((n+1)); echo "sem-app ticks=$n" > /tmp/app-state; sleep 1; done\' ' +
        '</dev/null >/dev/null 2>&1 &)',
    ];
    for (const line of customize) {
      const r = ok(await cli(['console', iid, '--run', line], env), 'customize');
      assert.equal(r.status, 0, `${line}: ${String(r.output)}`);
    }

    const variants: Variant[] = [
      { name: 'plain', flags: [], freeBlocks: 'off' },
      { name: 'trim', flags: ['--trim'], freeBlocks: 'off' },
      { name: 'freeze', flags: ['--freeze'], freeBlocks: 'auto' },
      { name: 'all', flags: ['--drop-caches', '--zero-free-memory', '--trim', '--freeze'], freeBlocks: 'auto' },
    ];
    const sizes: Record<string, number> = {};
    for (const [i, v] of variants.entries()) {
      const last = i === variants.length - 1;
      const dir = join(work, `snap-${v.name}`);
      const snap = ok(
        await cli(['snapshot', '--instance', iid, '-o', dir, ...v.flags, '--then', last ? 'quit' : 'resume'], env),
        `snapshot ${v.name}`,
      );
      const guest = snap.guest as { channel?: string; trimmed_bytes?: number; zeroed_mib?: number } | undefined;
      if (v.flags.length) assert.equal(guest?.channel, 'console');
      // The first trim after boot trims all free space; ext4 then remembers what it trimmed.
      if (v.name === 'trim') assert.ok((guest?.trimmed_bytes ?? 0) > 8 << 20, 'fstrim trimmed the package');
      if (v.flags.includes('--trim')) assert.notEqual(guest?.trimmed_bytes, undefined);
      if (v.flags.includes('--zero-free-memory')) assert.ok((guest?.zeroed_mib ?? 0) > 0, 'free memory zeroed');
      if (v.flags.includes('--freeze')) {
        const fs = snap.file_systems as Array<{ trusted: boolean; reason?: string }>;
        assert.equal(fs[0]?.trusted, true, `the frozen disk copy is trusted: ${fs[0]?.reason}`);
      }
      const overlay = join(work, `${v.name}.overlay`);
      const created = ok(
        await cli(
          [
            'create',
            '--base',
            'demo',
            '--disk',
            join(dir, 'disk.qcow2'),
            '--memory',
            join(dir, 'memory.stream'),
            '-o',
            overlay,
            '--free-blocks',
            v.freeBlocks,
          ],
          env,
        ),
        `create ${v.name}`,
      );
      sizes[v.name] = Number(created.size);
      // The disk alone: what trimming and free blocks take out (the memory still holds the
      // deleted package in free pages until --zero-free-memory).
      const diskOnly = ok(
        await cli(
          [
            'create',
            '--base',
            'demo',
            '--disk',
            join(dir, 'disk.qcow2'),
            '-o',
            `${overlay}.disk`,
            '--free-blocks',
            v.freeBlocks,
          ],
          env,
        ),
        `create ${v.name} (disk only)`,
      );
      sizes[`${v.name} (disk)`] = Number(diskOnly.size);
      if (v.freeBlocks === 'auto') {
        const fb = created.free_blocks as { chunks_left_out: number; file_systems: Array<{ trusted: boolean }> };
        assert.equal(fb.file_systems[0]?.trusted, true);
        assert.ok(fb.chunks_left_out > 0, 'free chunks left out');
      }

      // Synthesized (on the base's drive spec: no discard), with the base's RAM token.
      const port = await freePort();
      const syn = ok(
        await cli(
          [
            'synthesize',
            overlay,
            '--base',
            'demo',
            '--forward',
            `${port}:8080`,
            '--wait-http',
            `http://127.0.0.1:${port}/cgi-bin/status`,
            '--detach',
            '--keep',
            '--launcher',
            'qemu',
          ],
          env,
        ),
        `synthesize ${v.name}`,
      );
      const sid = String(syn.instance);
      const st = parseStatus(String((syn.answer as { body: string }).body));
      assert.equal(st.token, token, `${v.name}: the base's RAM token`);
      assert.equal(st.marker, marker);
      assert.match(st.app, /^sem-app ticks=\d+/);
      const check = ok(
        await cli(
          [
            'console',
            sid,
            '--run',
            // Data intact; then a write (a frozen snapshot has thawed itself) and a clean unmount.
            'cd /mnt/app && sha256sum -c SHA256SUMS && cd / && echo after > /mnt/after && sync && umount /mnt && echo UNMOUNTED',
            '--timeout',
            '60s',
          ],
          env,
        ),
        `check ${v.name}`,
      );
      assert.equal(check.status, 0, `${v.name}: ${String(check.output)}`);
      assert.match(String(check.output), /data\.bin: OK[\s\S]*numbers\.txt: OK[\s\S]*UNMOUNTED/);
      const stopped = ok(await cli(['stop', sid, '--keep'], env), 'stop');
      assert.equal(stopped.was, 'running');
      const raw = join(work, `${v.name}-synth.raw`);
      await exec('qemu-img', ['convert', '-O', 'raw', join(String(syn.dir), 'disk.qcow2'), raw]);
      const fsck = await exec('e2fsck', ['-fn', raw]).then(
        (r) => ({ code: 0, out: r.stdout }),
        (e: { code?: number; stdout?: string }) => ({ code: e.code ?? -1, out: e.stdout ?? '' }),
      );
      assert.equal(fsck.code, 0, `${v.name}: e2fsck -fn on the synthesized disk:\n${fsck.out}`);
      await rm(raw, { force: true });
      await rm(String(syn.dir), { recursive: true, force: true });
    }
    ok(await cli(['stop', iid], env), 'stop launched');
    // What the deleted package and the freed memory cost, by technique.
    console.error(`semantic overlays: ${JSON.stringify(sizes)}`);
    assert.ok(sizes['all']! < sizes['plain']! / 2, `all techniques ${sizes['all']} vs plain ${sizes['plain']}`);
    for (const v of ['trim', 'freeze', 'all']) {
      assert.ok(
        sizes[`${v} (disk)`]! < sizes['plain (disk)']! - (6 << 20),
        `${v}: the deleted package is out of the disk part`,
      );
    }
  },
);
