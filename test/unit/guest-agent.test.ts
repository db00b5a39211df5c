/**
 * The guest agent client and the guest preparation around snapshots, without a VM: a fake qemu-ga
 * (stale replies before the sync, an error reply, exec with base64 output, freeze state), one that
 * never answers (how "no agent" looks), and the real qemu-ga of Debian's qemu-guest-agent run on
 * the host over a unix socket with everything that touches the host's file systems blocked.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { GuestAgent } from '../../src/vm/guest-agent.js';
import { consoleScripts, prepareGuest, thawAfterResume, trimmedBytes } from '../../src/vm/guest-prep.js';
import { QemuError, TimeoutError } from '../../src/util/errors.js';

interface Fake {
  server: Server;
  path: string;
  calls: string[];
  state: { frozen: boolean };
}

/** A qemu-ga look-alike: newline-delimited JSON, 0xFF resets, sync-delimited answered after 0xFF. */
async function fakeAgent(
  dir: string,
  opts: { silent?: boolean; slowFreezeMs?: number; flood?: boolean } = {},
): Promise<Fake> {
  const path = join(dir, `ga-${Math.random().toString(36).slice(2)}.sock`);
  const calls: string[] = [];
  const state = { frozen: true };
  const server = createServer((sock: Socket) => {
    if (opts.silent) return;
    sock.on('error', () => undefined); // the client may hang up on a flood
    sock.write('{"return": 12345}\n'); // a reply nobody read in an earlier session
    let buf = '';
    sock.on('data', (d: Buffer) => {
      buf += d.toString('latin1').replaceAll('\xff', '');
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const cmd = JSON.parse(line) as { execute: string; arguments?: Record<string, unknown> };
        calls.push(cmd.execute);
        const reply = (v: unknown): boolean => sock.write(JSON.stringify({ return: v }) + '\n');
        switch (cmd.execute) {
          case 'guest-sync-delimited':
            sock.write(Buffer.from([0xff]));
            reply(cmd.arguments?.['id']);
            break;
          case 'guest-fsfreeze-status':
            // A hostile guest: megabytes without a newline.
            if (opts.flood) for (let i = 0; i < 6; i++) sock.write(Buffer.alloc(1 << 20, 0x41));
            else reply(state.frozen ? 'frozen' : 'thawed');
            break;
          case 'guest-fsfreeze-freeze':
            state.frozen = true;
            if (opts.slowFreezeMs) setTimeout(() => reply(3), opts.slowFreezeMs);
            else reply(2);
            break;
          case 'guest-fsfreeze-thaw':
            state.frozen = false;
            reply(2);
            break;
          case 'guest-fstrim':
            reply({
              paths: [
                { path: '/', trimmed: 1000, minimum: 0 },
                { path: '/boot', trimmed: 24 },
              ],
            });
            break;
          case 'guest-exec':
            reply({ pid: 77 });
            break;
          case 'guest-exec-status':
            reply({ exited: true, exitcode: 0, 'out-data': Buffer.from('done\n').toString('base64') });
            break;
          default:
            sock.write(JSON.stringify({ error: { class: 'CommandNotFound', desc: `no ${cmd.execute}` } }) + '\n');
        }
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  return { server, path, calls, state };
}

test('guest agent: sync skips stale replies, commands, error replies, exec output', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'clo-ga-'));
  const fake = await fakeAgent(dir);
  try {
    const ga = await GuestAgent.connect(fake.path, { timeoutMs: 2000 });
    assert.equal(await ga.fsfreezeStatus(), 'frozen');
    assert.equal(await ga.thaw(), 2);
    assert.equal(await ga.fsfreezeStatus(), 'thawed');
    await assert.rejects(
      ga.execute('guest-nonsense'),
      (e: unknown) => e instanceof QemuError && /no guest-nonsense/.test(e.message),
    );
    assert.deepEqual(await ga.shell('sync'), { status: 0, output: 'done\n' });
    // Concurrent calls are serialized: each gets its own reply.
    const [a, b] = await Promise.all([ga.fsfreezeStatus(), ga.execute<number>('guest-fsfreeze-freeze')]);
    assert.deepEqual([a, b], ['thawed', 2]);
    ga.close();
  } finally {
    fake.server.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('guest agent: a late reply after a timeout is not taken for the next answer; a flood ends the session', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'clo-ga-'));
  const slow = await fakeAgent(dir, { slowFreezeMs: 300 });
  const flood = await fakeAgent(dir, { flood: true });
  try {
    const ga = await GuestAgent.connect(slow.path, { timeoutMs: 2000 });
    await assert.rejects(ga.freeze(100), /did not answer guest-fsfreeze-freeze/);
    await new Promise((r) => setTimeout(r, 400)); // the freeze's late `3` has arrived by now
    assert.equal(await ga.thaw(), 2, "the thaw's own answer, not the freeze's late one");
    ga.close();
    const hostile = await GuestAgent.connect(flood.path, { timeoutMs: 2000 });
    await assert.rejects(hostile.fsfreezeStatus(), /closed/);
    hostile.close();
  } finally {
    slow.server.close();
    flood.server.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('guest agent: nothing answering is "no agent", quickly', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'clo-ga-'));
  const fake = await fakeAgent(dir, { silent: true });
  try {
    const t0 = performance.now();
    await assert.rejects(GuestAgent.connect(fake.path, { timeoutMs: 300 }), TimeoutError);
    assert.equal(await thawAfterResume(fake.path, 300), 'no-agent');
    assert.equal(await thawAfterResume(join(dir, 'nothing.sock'), 300), 'no-agent');
    assert.ok(performance.now() - t0 < 3000);
  } finally {
    fake.server.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('after a resume a frozen guest is thawed, once', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'clo-ga-'));
  const fake = await fakeAgent(dir);
  try {
    assert.equal(await thawAfterResume(fake.path), 'thawed');
    assert.equal(fake.state.frozen, false);
    assert.equal(await thawAfterResume(fake.path), 'not-frozen');
  } finally {
    fake.server.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('prepareGuest through the agent: sync, trim, freeze last, thaw on request', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'clo-ga-'));
  const fake = await fakeAgent(dir);
  fake.state.frozen = false;
  try {
    const p = await prepareGuest({ agentSocket: fake.path }, { trim: true, freeze: true, dropCaches: true });
    assert.equal(p.report.channel, 'agent');
    assert.equal(p.report.trimmed_bytes, 1024);
    assert.equal(p.report.frozen, 2);
    assert.equal(p.report.dropped_caches, true);
    const work = fake.calls.filter((c) => !c.startsWith('guest-sync') && c !== 'guest-exec-status');
    assert.deepEqual(work, ['guest-exec', 'guest-exec', 'guest-fstrim', 'guest-fsfreeze-freeze']);
    assert.equal(fake.state.frozen, true);
    assert.equal(await p.thaw(), 2);
    assert.equal(fake.state.frozen, false);
    assert.equal(await p.thaw(), 0, 'a second thaw does nothing');
    await p.close();
    // No agent and no console: a clear error.
    await assert.rejects(prepareGuest({}, { trim: true }), /cannot reach the guest/);
    await assert.rejects(prepareGuest({}, { trim: true, via: 'agent' }), /no guest agent channel/);
  } finally {
    fake.server.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('console scripts fit on one console line; fstrim -v output is summed', () => {
  for (const s of [
    consoleScripts.dropCaches,
    consoleScripts.trim,
    consoleScripts.zeroFree,
    consoleScripts.freeze(3600),
  ]) {
    assert.ok(s.length < 900 && !s.includes('\n'), s);
  }
  assert.equal(trimmedBytes('/mnt: 58642432 bytes trimmed\n'), 58642432); // busybox
  assert.equal(
    trimmedBytes(
      '/boot: 200 MiB (209715200 bytes) trimmed on /dev/vda1\n/: 1 GiB (1073741824 bytes) trimmed on /dev/vda2',
    ),
    209715200 + 1073741824,
  ); // util-linux -av
  assert.equal(trimmedBytes('nothing'), undefined);
});

const qemuGa = spawnSync('sh', ['-c', 'command -v qemu-ga || test -x /usr/sbin/qemu-ga']).status === 0;

test(
  'the real qemu-ga (on the host, unix-listen, host-touching commands blocked)',
  { skip: !qemuGa && 'no qemu-ga (Debian: qemu-guest-agent)' },
  async () => {
    const dir = await mkdtemp(join(tmpdir(), 'clo-qga-'));
    const sock = join(dir, 'qga.sock');
    const blocked = [
      'guest-fsfreeze-freeze',
      'guest-fsfreeze-freeze-list',
      'guest-fsfreeze-thaw',
      'guest-fstrim',
      'guest-shutdown',
      'guest-suspend-disk',
      'guest-suspend-ram',
      'guest-suspend-hybrid',
      'guest-set-time',
      'guest-set-user-password',
      'guest-set-vcpus',
      'guest-set-memory-blocks',
      'guest-file-open',
      'guest-ssh-add-authorized-keys',
      'guest-ssh-remove-authorized-keys',
    ];
    const bin = spawnSync('sh', ['-c', 'command -v qemu-ga || echo /usr/sbin/qemu-ga'], {
      encoding: 'utf8',
    }).stdout.trim();
    const ga = spawn(
      bin,
      ['-m', 'unix-listen', '-p', sock, '-t', dir, '-f', join(dir, 'qga.pid'), '-b', blocked.join(',')],
      {
        stdio: 'ignore',
      },
    );
    try {
      let agent: GuestAgent | undefined;
      for (let i = 0; i < 100 && !agent; i++) {
        agent = await GuestAgent.connect(sock, { timeoutMs: 2000 }).catch(() => undefined);
        if (!agent) await sleep(50);
      }
      assert.ok(agent, 'qemu-ga answered');
      assert.deepEqual(await agent.execute('guest-ping'), {});
      assert.equal(await agent.fsfreezeStatus(), 'thawed');
      const r = await agent.shell('echo hello; echo oops >&2; exit 3');
      assert.equal(r.status, 3);
      assert.match(r.output, /hello/);
      assert.match(r.output, /oops/);
      await assert.rejects(
        agent.fstrim(5000),
        (e: unknown) => e instanceof QemuError && /disabled|not/.test(e.message),
      );
      agent.close();
      // A second session on the same agent syncs again.
      const again = await GuestAgent.connect(sock, { timeoutMs: 2000 });
      assert.deepEqual(await again.execute('guest-ping'), {});
      again.close();
    } finally {
      ga.kill('SIGTERM');
      await new Promise((r) => ga.once('exit', r));
      await rm(dir, { recursive: true, force: true });
    }
  },
);
