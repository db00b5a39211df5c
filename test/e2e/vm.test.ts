/**
 * The QEMU layer against real QEMU (TCG here): the demo VM boots and answers HTTP; a memory
 * snapshot resumes on another port with the *same* boot token (memory came back, not a reboot)
 * and the request counter continuing; the full base → customized capture flow works and its
 * customized snapshot resumes with the new disk marker and the app still running.
 * Skips loudly without QEMU outside CI; in CI (CI=true) a missing QEMU fails.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BusyError, MissingToolError, QemuError, UsageError } from '../../src/util/errors.js';
import { probeKvm, resolveAccel } from '../../src/vm/accel.js';
import { findProgram } from '../../src/util/programs.js';
import { startQemu } from '../../src/vm/process.js';
import { captureSnapshot, copyDiskWhileStopped, copySparse } from '../../src/vm/snapshot.js';
import {
  bootDemoVm,
  captureBaseAndCustomized,
  demoVmSpec,
  ensureDemoVm,
  getStatus,
  resumeVm,
  type DemoStatus,
  type RunningDemoVm,
} from '../helpers/demo-vm.js';

const haveQemu = await findProgram('qemu-system-x86_64').then(
  () => true,
  () => false,
);
if (!haveQemu && process.env['CI'] !== 'true') {
  console.error('\n*** SKIPPING QEMU end-to-end tests: qemu-system-x86_64 is not installed ***\n');
}
const skip = !haveQemu && process.env['CI'] !== 'true';

/** Reads the 'QEVM' magic and the trailing vmdesc JSON of a migration stream. */
async function streamLooksComplete(path: string): Promise<boolean> {
  const { open } = await import('node:fs/promises');
  const h = await open(path, 'r');
  try {
    const head = Buffer.alloc(8);
    await h.read(head, 0, 8, 0);
    const size = (await h.stat()).size;
    const tail = Buffer.alloc(Math.min(4096, size));
    await h.read(tail, 0, tail.length, size - tail.length);
    return head.subarray(0, 4).toString('latin1') === 'QEVM' && tail.toString('latin1').trimEnd().endsWith('}');
  } finally {
    await h.close();
  }
}

describe('QEMU layer end to end', { skip, timeout: 240_000 }, () => {
  let work = '';
  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'cloudlet-vm-e2e-'));
    await ensureDemoVm();
  });
  after(async () => {
    if (work && !process.env['KEEP_E2E']) await rm(work, { recursive: true, force: true });
  });

  it('accel: auto picks what the probe proved; kvm fails clearly when unusable', async () => {
    const probe = await probeKvm();
    assert.ok(probe.elapsedMs < 5000, `probe took ${probe.elapsedMs} ms`);
    assert.equal(await resolveAccel('auto'), probe.usable ? 'kvm' : 'tcg');
    assert.equal(await resolveAccel('tcg'), 'tcg');
    if (!probe.usable) {
      await assert.rejects(resolveAccel('kvm'), (err: unknown) => err instanceof UsageError && /KVM/.test(err.message));
    }
  });

  let first: RunningDemoVm | null = null;
  let firstStatus: DemoStatus | null = null;

  it('boots the demo VM and gets a real HTTP answer', async () => {
    first = await bootDemoVm({ workDir: join(work, 'boot') });
    firstStatus = await getStatus(first);
    assert.match(firstStatus.token, /^[0-9a-f]{32}$/);
    assert.equal(firstStatus.marker, 'base');
    assert.equal(firstStatus.app, 'none');
    assert.ok(firstStatus.counter >= 1);
    console.error(`boot → HTTP ${first.readyMs.toFixed(0)} ms (accel ${first.vm.accel})`);
  });

  it('snapshots, keeps running, and resumes elsewhere with the same token', async () => {
    assert.ok(first && firstStatus, 'needs the booted VM');
    const vm = first;

    // A snapshot that cannot be written fails clearly and leaves the VM running.
    await assert.rejects(
      captureSnapshot(vm.vm, {
        memPath: join(work, 'no-such-dir', 'x.mem'),
        afterCapture: 'resume',
        timeoutMs: 20_000,
      }),
      (err: unknown) => err instanceof QemuError && /snapshot failed/.test(err.message),
    );
    assert.equal(await vm.vm.status(), 'running');
    assert.equal((await getStatus(vm)).token, firstStatus.token);
    // A disk copy of a running VM would match no memory image: refused.
    await assert.rejects(copyDiskWhileStopped(vm.vm, vm.disk, join(work, 'x.raw')), QemuError);
    const snap = await captureSnapshot(vm.vm, {
      memPath: join(work, 'boot.mem'),
      disks: [{ from: vm.disk, to: join(work, 'boot.disk.raw') }],
      infoPath: join(work, 'boot.json'),
      afterCapture: 'resume',
    });
    assert.ok(await streamLooksComplete(snap.memPath), 'complete migration stream');
    assert.equal(snap.info.machine, 'pc-q35-7.2');
    assert.equal(snap.info.memoryMiB, 128);
    assert.equal(snap.info.cpuModel, 'qemu64');
    assert.equal(snap.info.smp, 1);
    assert.ok(snap.info.argv.includes('-kernel'));
    assert.equal((await stat(join(work, 'boot.disk.raw'))).size, 64 * 2 ** 20);
    console.error(`snapshot ${(snap.memBytes / 2 ** 20).toFixed(1)} MiB in ${snap.timings.migrateMs.toFixed(0)} ms`);

    // `afterCapture: 'resume'` continued the source: it still answers, same token, next counter.
    const after = await getStatus(vm);
    assert.equal(after.token, firstStatus.token);
    const counterAtSnapshot = after.counter - 1;
    await vm.vm.stop();
    first = null;

    const disk = join(work, 'resume1', 'disk.raw');
    await copySparse(join(work, 'boot.disk.raw'), disk, { fsync: false });
    const resumed = await resumeVm({
      workDir: join(work, 'resume1'),
      incoming: snap.memPath,
      disk,
      spec: snap.info.spec,
    });
    try {
      assert.notEqual(resumed.port, vm.port);
      const s = await getStatus(resumed);
      assert.equal(s.token, firstStatus.token, 'same boot token: memory came back, no reboot');
      // The counter continues from the snapshot (waitHttp's request counted one, this one the
      // next; a slow request that timed out on our side may have counted too), never from 1.
      assert.ok(
        s.counter >= counterAtSnapshot + 2 && s.counter <= counterAtSnapshot + 4,
        `counter ${s.counter} after ${counterAtSnapshot} at the snapshot`,
      );
      assert.equal(s.marker, 'base');
      console.error(
        `resume → HTTP ${resumed.readyMs.toFixed(0)} ms (load ${resumed.vm.timings.incomingMs.toFixed(0)} ms)`,
      );
    } finally {
      await resumed.vm.stop();
    }
  });

  it('captureBaseAndCustomized: base → resume → customize → snapshot, and the result resumes', async () => {
    const dir = join(work, 'flow');
    const r = await captureBaseAndCustomized(dir);
    assert.equal(r.tokens.resumed, r.tokens.base, 'the customized VM descends from the base snapshot');
    assert.equal(r.statuses.custom.token, r.tokens.base);
    assert.equal(r.statuses.custom.marker, r.customization.marker);
    assert.match(r.statuses.custom.app, /^demo-app-v1 ticks=\d+$/);
    assert.ok(r.customization.bytesWritten > 3 * 2 ** 20, `wrote ${r.customization.bytesWritten} bytes`);
    for (const f of [r.base.mem, r.base.disk, r.custom.mem, r.custom.disk, r.base.infoPath, r.custom.infoPath]) {
      assert.ok((await stat(f)).size > 0, f);
    }
    assert.deepEqual(r.custom.info.spec.kernel, r.base.info.spec.kernel);
    console.error(
      `flow timings ` +
        JSON.stringify(Object.fromEntries(Object.entries(r.timings).map(([k, v]) => [k, Math.round(v)]))),
    );

    // The customized snapshot resumes with its disk: new marker, app still ticking, same token.
    const disk = join(dir, 'check', 'disk.raw');
    await copySparse(r.custom.disk, disk, { fsync: false });
    const vm = await resumeVm({ workDir: join(dir, 'check'), incoming: r.custom.mem, disk, spec: r.custom.info.spec });
    try {
      const s = await getStatus(vm);
      assert.equal(s.token, r.tokens.base);
      assert.equal(s.marker, r.customization.marker);
      assert.match(s.app, /^demo-app-v1 ticks=\d+$/);
      assert.ok(s.counter > r.statuses.custom.counter);
    } finally {
      await vm.vm.stop();
    }
  });

  it('errors: missing QEMU, taken port, snapshot that does not fit', async () => {
    const demo = await ensureDemoVm();
    const runDir = join(work, 'errors');
    await assert.rejects(
      startQemu(demoVmSpec(demo, demo.disk, 1), { runDir, accel: 'tcg', qemuBinary: 'qemu-system-nonexistent' }),
      MissingToolError,
    );

    const blocker = createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', r));
    const addr = blocker.address();
    const port = addr && typeof addr === 'object' ? addr.port : 0;
    try {
      const disk = join(runDir, 'disk.raw');
      await copySparse(demo.disk, disk, { fsync: false });
      await assert.rejects(startQemu(demoVmSpec(demo, disk, port), { runDir, accel: 'tcg' }), BusyError);
    } finally {
      blocker.close();
    }

    // A snapshot of a 128 MiB guest cannot load into a 256 MiB one: QemuError with QEMU's words.
    const spec = {
      ...demoVmSpec(demo, join(work, 'boot.disk.raw'), 1),
      memoryMiB: 256,
      incoming: { from: 'file' as const, path: join(work, 'boot.mem') },
    };
    delete spec.network;
    await assert.rejects(startQemu(spec, { runDir, accel: 'tcg' }), (err: unknown) => {
      assert.ok(err instanceof QemuError, String(err));
      assert.match(String(err.details['stderrTail']), /Length mismatch|load of migration failed|error while loading/i);
      return true;
    });
  });
});
