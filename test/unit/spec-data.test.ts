/**
 * The VM spec is data, never code (issue 9, part 2). The attack of the issue: a base package
 * edited so that its manifest's `extraArgs` make QEMU (root) create a file on the host; it must
 * be refused at import and at open, and no file may appear. Also: paths in a spec stay inside
 * the base directory, every value that reaches argv is on the closed list, and the base id
 * covers the spec (an in-place edit is refused on open).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cli } from '../helpers/cli.js';
import { installFakeQemu } from '../helpers/fake-qemu.js';
import { importTiny, makeTinyVm, type TinyVm } from '../helpers/tiny-vm.js';
import { parseSpec, checkRuntimeSpec, storedSpecOf } from '../../src/spec/validate.js';
import { buildQemuArgs, runPaths } from '../../src/vm/argv.js';
import { CloudletError, CorruptInputError, UnsupportedError } from '../../src/util/errors.js';
import type { VmSpec } from '../../src/spec/vm-spec.js';

let dir: string;
let env: NodeJS.ProcessEnv;
let tiny: TinyVm;
let id: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'clo-spec-'));
  env = { ...process.env, CLOUDLET_LIBRARY: join(dir, 'lib'), XDG_CONFIG_HOME: join(dir, 'config') };
  tiny = await makeTinyVm(join(dir, 'vm'));
  id = await importTiny(tiny, env);
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** The package of the tiny base, unpacked into a fresh directory; returns that directory. */
async function unpacked(name: string): Promise<string> {
  const pkg = join(dir, `${name}.tar`);
  const e = await cli(['base', 'export', 'tiny', '-o', pkg, '--force'], env);
  assert.equal(e.code, 0, e.stderr);
  const work = join(dir, name);
  await mkdir(work, { recursive: true });
  execFileSync('tar', ['-xf', pkg, '-C', work]);
  return work;
}

async function repack(work: string, name: string): Promise<string> {
  const out = join(dir, `${name}-edited.tar`);
  execFileSync('tar', ['--sparse', '-cf', out, '-C', work, id]);
  return out;
}

test('the attack: a package whose extraArgs make QEMU create a file is refused, no file appears', async () => {
  const pwned = join(dir, 'pwned-by-package');
  const work = await unpacked('attack');
  const manifestPath = join(work, id, 'manifest.json');
  const m = JSON.parse(await readFile(manifestPath, 'utf8')) as { vm: VmSpec };
  m.vm.extraArgs = ['-D', pwned, '-d', 'guest_errors'];
  await writeFile(manifestPath, JSON.stringify(m, null, 2));
  const pkg = await repack(work, 'attack');
  const lib = join(dir, 'lib-attacked');
  const r = await cli(['base', 'import', pkg], { ...env, CLOUDLET_LIBRARY: lib });
  assert.equal(r.code, 7, `refused as unsupported: ${r.stderr}`);
  assert.match(r.stderr, /extraArgs .*cannot be part of a base.*--qemu-arg/);
  assert.deepEqual(await readdir(join(lib, 'bases')).catch(() => []), [], 'nothing imported');
  assert.equal(await stat(pwned).catch(() => undefined), undefined, 'no file created');

  // The same edit made in place in a library: every open refuses it, nothing starts.
  const inPlace = join(dir, 'lib', 'bases', id, 'manifest.json');
  const original = await readFile(inPlace, 'utf8');
  await chmod(inPlace, 0o644);
  try {
    await writeFile(inPlace, JSON.stringify({ ...JSON.parse(original), vm: m.vm }, null, 2));
    const listed = await cli(['base', 'list'], env);
    assert.match(String((listed.json.bases as Array<{ damaged?: string }>)[0]?.damaged), /extraArgs/);
    const launch = await cli(['launch', id.slice(0, 12), '--accel', 'tcg'], env);
    assert.notEqual(launch.code, 0);
    assert.ok([4, 7].includes(launch.code), `refused as corrupt/unsupported, got ${launch.code}: ${launch.stderr}`);
    assert.equal(await stat(pwned).catch(() => undefined), undefined, 'no file created');
    // A spec value changed in place (still on the closed list): the id no longer covers it.
    const edited = JSON.parse(original) as { vm: VmSpec };
    edited.vm.append = 'console=ttyS0 init=/bin/sh';
    await writeFile(inPlace, JSON.stringify(edited, null, 2));
    const verify = await cli(['base', 'verify', id.slice(0, 12)], env);
    assert.equal(verify.code, 4, verify.stderr);
    assert.match(verify.stderr, /id does not cover/);
  } finally {
    await writeFile(inPlace, original);
    await chmod(inPlace, 0o444);
  }
  assert.equal((await cli(['base', 'verify', 'tiny'], env)).code, 0, 'restored');
});

test('paths in a spec stay inside the base directory', async () => {
  for (const kernel of ['../../../etc/passwd', '/etc/passwd', 'kernel/../../x']) {
    const work = await unpacked(`path-${Math.random().toString(36).slice(2)}`);
    const manifestPath = join(work, id, 'manifest.json');
    const m = JSON.parse(await readFile(manifestPath, 'utf8')) as { vm: VmSpec };
    m.vm.kernel = kernel;
    await writeFile(manifestPath, JSON.stringify(m, null, 2));
    const r = await cli(['base', 'import', await repack(work, 'path')], { ...env, CLOUDLET_LIBRARY: join(dir, 'lp') });
    assert.equal(r.code, 4, `${kernel}: ${r.stderr}`);
    assert.match(r.stderr, /kernel: must be "kernel"/);
  }
  // A symlink where the base's kernel was: refused on open (before QEMU could read through it).
  const kernel = join(dir, 'lib', 'bases', id, 'kernel');
  const saved = await readFile(kernel);
  await rm(kernel);
  await symlink('/etc/hostname', kernel);
  try {
    const r = await cli(['launch', 'tiny', '--accel', 'tcg'], env);
    assert.equal(r.code, 4, r.stderr);
    assert.match(r.stderr, /kernel is not a regular file/);
  } finally {
    await rm(kernel);
    await writeFile(kernel, saved);
    await chmod(kernel, 0o444);
  }
});

test('a snapshot whose VM has options we do not model is refused at import, with what to do', async () => {
  const vmJson = join(dir, 'vm-extra.json');
  const spec = JSON.parse(await readFile(tiny.vmJson, 'utf8')) as VmSpec;
  spec.extraArgs = ['-device', 'virtio-rng-pci'];
  await writeFile(vmJson, JSON.stringify({ vm: spec }));
  const r = await cli(
    ['base', 'import', '--disk', tiny.baseDisk, '--memory', tiny.baseMem, '--vm', vmJson, '--name', 'extra'],
    env,
  );
  assert.equal(r.code, 7, r.stderr);
  assert.match(r.stderr, /virtio-rng-pci.*--qemu-arg/);
});

test('the closed list: patterns, enums and bounds on every field; unknown fields refused', () => {
  const good = (): Record<string, unknown> => ({
    machine: 'pc-q35-7.2',
    memoryMiB: 128,
    cpu: 'Skylake-Client-v4,+ssse3,-x2apic,pmu=off',
    smp: 2,
    kernel: 'kernel',
    append: 'console=ttyS0 quiet',
    network: { model: 'e1000', romfile: '', mac: '52:54:00:12:34:56', forwards: [] },
    noReboot: true,
    name: 'web-1',
    guestAgent: true,
  });
  assert.equal(parseSpec(good(), 'stored').guestAgent, true, 'the agent channel is guest-visible: stored');
  // What QEMU does with discards is host-side: read from a launched VM, never part of a base.
  const launched = {
    ...good(),
    drives: [{ file: '/x/disk.qcow2', format: 'qcow2', if: 'virtio', discard: 'unmap', detectZeroes: 'unmap' }],
  };
  const input = parseSpec(launched, 'input');
  assert.equal(input.drives?.[0]?.discard, 'unmap');
  const stored = storedSpecOf(input, { file: 'disk.raw', format: 'raw' }).spec;
  assert.deepEqual(stored.drives, [{ file: 'disk.raw', format: 'raw', if: 'virtio' }], 'stored without discard');
  const bad: Array<[string, (o: Record<string, unknown>) => void]> = [
    ['machine alias', (o) => (o.machine = 'q35')],
    ['machine with options', (o) => (o.machine = 'pc-q35-7.2,accel=kvm')],
    ['RAM too small', (o) => (o.memoryMiB = 0)],
    ['RAM too large', (o) => (o.memoryMiB = 2 ** 40)],
    ['cpu with a path', (o) => (o.cpu = 'qemu64,file=/etc/shadow')],
    ['cpu with a space', (o) => (o.cpu = 'qemu64 -S')],
    ['smp', (o) => (o.smp = 100000)],
    ['NIC model with options', (o) => ((o.network as Record<string, unknown>).model = 'e1000,romfile=/etc/shadow')],
    ['mac with options', (o) => ((o.network as Record<string, unknown>).mac = '52:54:00:12:34:56,x=y')],
    ['romfile outside', (o) => ((o.network as Record<string, unknown>).romfile = '/etc/shadow')],
    ['forwards in a base', (o) => ((o.network as Record<string, unknown>).forwards = [{ hostPort: 1, guestPort: 2 }])],
    ['append with a newline', (o) => (o.append = 'a\nb')],
    ['drive interface', (o) => (o.drives = [{ file: 'disk.raw', format: 'raw', if: 'scsi' }])],
    ['drive id with options', (o) => (o.drives = [{ file: 'disk.raw', format: 'raw', if: 'virtio', id: 'a,file=/x' }])],
    ['drive format', (o) => (o.drives = [{ file: 'disk.raw', format: 'vmdk', if: 'virtio' }])],
    ['discard in a base', (o) => (o.drives = [{ file: 'disk.raw', format: 'raw', if: 'virtio', discard: 'unmap' }])],
    ['guest agent not a boolean', (o) => (o.guestAgent = 'yes')],
    ['unknown field', (o) => (o.qemuOptions = '-S')],
    ['unknown network field', (o) => ((o.network as Record<string, unknown>).netdev = 'tap')],
    ['incoming in a base', (o) => (o.incoming = '/x')],
    ['RAM backend in a base', (o) => (o.memoryBackendFile = { path: '/dev/mem', share: true })],
    ['name with a comma', (o) => (o.name = 'a,debug-threads=on')],
  ];
  for (const [what, edit] of bad) {
    const o = good();
    edit(o);
    assert.throws(() => parseSpec(o, 'stored'), CorruptInputError, what);
  }
  const badInput = { ...launched, drives: [{ ...launched.drives[0], discard: 'unmap,file=/etc/shadow' }] };
  assert.throws(() => parseSpec(badInput, 'input'), CorruptInputError, 'discard mode with options');
  const extra = good();
  extra.extraArgs = ['-S'];
  assert.throws(() => parseSpec(extra, 'stored'), UnsupportedError);
});

test('--qemu-arg: raw options from the host reach argv last, recorded in the instance, not in the base', async () => {
  const e = { ...env, CLOUDLET_LIBRARY: join(dir, 'lib-qa') };
  const t16 = await makeTinyVm(join(dir, 'vm16'), 12, 16);
  await importTiny(t16, e);
  const fake = join(dir, 'fakebin');
  await mkdir(fake, { recursive: true });
  await installFakeQemu(fake);
  const fe = { ...e, PATH: `${fake}:${process.env.PATH ?? ''}`, FAKE_QEMU_MODE: 'serve' };
  const r = await cli(
    ['launch', 'tiny', '--accel', 'tcg', '--qemu-arg', '-device', '--qemu-arg', 'virtio-rng-pci'],
    fe,
  );
  assert.equal(r.code, 0, r.stderr);
  try {
    const argv = (await readFile(`/proc/${String(r.json.pid)}/cmdline`, 'utf8')).split('\0').filter(Boolean);
    assert.deepEqual(argv.slice(-2), ['-device', 'virtio-rng-pci']);
    const state = JSON.parse(await readFile(join(String(r.json.dir), 'state.json'), 'utf8')) as {
      host_args: string[];
      spec: VmSpec;
    };
    assert.deepEqual(state.host_args, ['-device', 'virtio-rng-pci']);
    assert.equal(state.spec.extraArgs, undefined, 'not part of the spec');
  } finally {
    await cli(['stop', String(r.json.instance)], fe);
  }
});

test('nothing outside the closed list reaches argv; host options only through hostArgs', () => {
  const spec: VmSpec = {
    machine: 'pc-q35-7.2',
    memoryMiB: 128,
    drives: [{ file: '/d/disk.raw', format: 'raw', if: 'virtio', id: 'd0,file=/etc/shadow' }],
  };
  const ctx = { accel: 'tcg' as const, paths: runPaths('/run/x') };
  assert.throws(() => buildQemuArgs(spec, ctx), CloudletError, 'drive id');
  spec.drives = [{ file: '/d/disk.raw', format: 'raw', if: 'virtio' }];
  spec.network = { model: 'virtio-net-pci,romfile=/etc/shadow', forwards: [] };
  assert.throws(() => buildQemuArgs(spec, ctx), CloudletError, 'NIC model');
  spec.network = { forwards: [{ hostAddr: '127.0.0.1,hostfwd=tcp::22-:22', hostPort: 1, guestPort: 2 }] };
  assert.throws(() => checkRuntimeSpec(spec), CloudletError, 'host address');
  delete spec.network;
  assert.throws(() => buildQemuArgs({ ...spec, extraArgs: ['-S'] }, ctx), UnsupportedError, 'extraArgs never run');
  const args = buildQemuArgs(spec, { ...ctx, hostArgs: ['-device', 'virtio-rng-pci'] });
  assert.deepEqual(args.slice(-2), ['-device', 'virtio-rng-pci'], 'host options go last');
});
