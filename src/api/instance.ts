/**
 * Running a library base's VM as an instance: the resume spec (the base's exact machine and
 * devices, this instance's disk layer, the base RAM file mapped copy-on-write, the memory
 * stream to load), starting QEMU, recording state.json, and stopping it again.
 */
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  instanceDir,
  listInstances,
  processStart,
  readInstance,
  writeInstance,
  type InstanceState,
  type InstanceStatus,
} from '../instance/state.js';
import type { LibraryBase } from '../base/open.js';
import type { DriveSpec, IncomingSpec, PortForward, VmSpec } from '../spec/vm-spec.js';
import { qemuLauncher } from '../vm/process.js';
import { libvirtLauncher, resolveLauncherKind, virsh, waitDomainGone } from '../vm/libvirt.js';
import type { LauncherChoice, RunningVm } from '../vm/launcher.js';
import type { AccelChoice } from '../vm/accel.js';
import { diagnoseQemu } from '../vm/diagnose.js';
import { QmpClient } from '../vm/qmp.js';
import { NotFoundError, QemuError, UsageError } from '../util/errors.js';

export interface InstanceStart {
  root: string;
  base: LibraryBase;
  iid: string;
  /** The memory stream to load (a file, or a socket we stream into): sparse over the base RAM file, or full. */
  memory: { incoming: IncomingSpec; sparse: boolean };
  /** The instance's disk over another backing node than its header names (see DriveSpec.backing). */
  diskBacking?: DriveSpec['backing'];
  /** Host-side options of the instance's disk (launch: discard=unmap for customization). */
  diskOptions?: Pick<DriveSpec, 'discard' | 'detectZeroes'>;
  forwards: PortForward[];
  accel?: AccelChoice;
  detach?: boolean;
  overlay: string;
  /** Who runs QEMU; default qemu (direct). */
  launcher?: LauncherChoice;
  /** Raw QEMU options from the operator (--qemu-arg): appended to argv, never part of a base. */
  qemuArgs?: readonly string[];
}

export function newInstanceId(): string {
  return `i-${Date.now().toString(36).slice(-4)}${Math.random().toString(36).slice(2, 6)}`;
}

/** The base's VM spec with this instance's disk, the base RAM file and the stream to load. */
export function resumeSpecFor(
  base: LibraryBase,
  dir: string,
  memory: InstanceStart['memory'],
  forwards: PortForward[],
  diskBacking?: DriveSpec['backing'],
  diskOptions?: Pick<DriveSpec, 'discard' | 'detectZeroes'>,
): VmSpec {
  const vm = base.manifest.vm;
  if (!vm)
    throw new UsageError(
      `base ${base.id.slice(0, 12)} has no VM spec: import it from a snapshot directory (or with --vm) to resume it`,
    );
  const spec: VmSpec = { ...vm };
  delete spec.name;
  if (spec.kernel) spec.kernel = join(base.dir, spec.kernel);
  if (spec.initrd) spec.initrd = join(base.dir, spec.initrd);
  const drive = spec.drives?.[0];
  if (drive) {
    spec.drives = [{ ...drive, file: join(dir, 'disk.qcow2'), format: 'qcow2', backing: diskBacking, ...diskOptions }];
  }
  if (spec.network) {
    spec.network = { ...spec.network, forwards };
    if (spec.network.romfile) spec.network.romfile = join(base.dir, spec.network.romfile);
  } else if (forwards.length > 0) throw new UsageError('this base VM has no network card: --forward is not possible');
  if (memory.sparse) {
    if (!base.ramFile) throw new UsageError(`base ${base.id.slice(0, 12)} has no memory snapshot: nothing to resume`);
    spec.memoryBackendFile = { path: base.ramFile, share: false };
  }
  spec.incoming = memory.incoming;
  return spec;
}

export async function startInstance(s: InstanceStart): Promise<{ vm: RunningVm; state: InstanceState }> {
  const dir = instanceDir(s.root, s.iid);
  const spec = resumeSpecFor(s.base, dir, s.memory, s.forwards, s.diskBacking, s.diskOptions);
  const launcher = (await resolveLauncherKind(s.launcher ?? 'qemu')) === 'libvirt' ? libvirtLauncher : qemuLauncher;
  const vm = await launcher
    .start(spec, { runDir: dir, accel: s.accel ?? 'auto', detach: s.detach, hostArgs: s.qemuArgs })
    .catch((err: unknown) => {
      throw withHint(err);
    });
  const state: InstanceState = {
    id: s.iid,
    base_id: s.base.id,
    overlay: s.overlay,
    pid: vm.pid,
    pid_start: (await processStart(vm.pid)) ?? '',
    created_at: new Date().toISOString(),
    accel: vm.accel,
    dir,
    qmp_socket: vm.paths.qmpSocket,
    serial_socket: vm.paths.serialSocket,
    serial_log: vm.paths.serialLog,
    stderr_log: vm.paths.stderrLog,
    ...(spec.guestAgent ? { agent_socket: vm.paths.agentSocket } : {}),
    forwards: s.forwards,
    launcher: vm.launcher,
    domain: vm.domain,
    spec,
    ...(s.qemuArgs?.length ? { host_args: [...s.qemuArgs] } : {}),
  };
  await writeInstance(s.root, state);
  return { vm, state };
}

/** Adds the likely cause to a QEMU failure (diagnose.ts). */
export function withHint(err: unknown): unknown {
  if (!(err instanceof QemuError)) return err;
  const tail = typeof err.details['stderrTail'] === 'string' ? err.details['stderrTail'] : '';
  const hint = diagnoseQemu(`${err.message}\n${tail}`);
  if (!hint) return err;
  return new QemuError(`${err.message} — likely cause: ${hint}`, { ...err.details, hint }, { cause: err });
}

export interface StopResult {
  message_type: 'stop';
  instance: string;
  /** What was found: a running VM that was stopped, or one already dead. */
  was: 'running' | 'dead';
  removed: boolean;
}

/** Stops an instance's QEMU (QMP quit, then SIGKILL) and removes its directory unless kept. */
export async function stopInstance(root: string, iid: string, keep = false): Promise<StopResult> {
  const all = await listInstances(root);
  const inst = all.find((i) => i.id === iid) ?? all.find((i) => i.id.startsWith(iid));
  if (!inst) throw new NotFoundError(`no instance ${iid} (see: cloudlet-overlay ps)`, { instance: iid });
  if (inst.status === 'running') {
    try {
      const qmp = await QmpClient.connect(inst.qmp_socket, { timeoutMs: 2000 });
      await qmp.execute('quit', undefined, { timeoutMs: 3000 }).catch(() => undefined);
      qmp.destroy();
    } catch {
      // QMP gone: fall through to signals
    }
    for (let i = 0; i < 60 && (await processStart(inst.pid)) === inst.pid_start; i++) await sleep(50);
    if (inst.domain && (await processStart(inst.pid)) === inst.pid_start) {
      await virsh(['destroy', inst.domain], { timeoutMs: 10_000 }).catch(() => undefined);
    }
    if ((await processStart(inst.pid)) === inst.pid_start) {
      process.kill(inst.pid, 'SIGKILL');
      for (let i = 0; i < 40 && (await processStart(inst.pid)) === inst.pid_start; i++) await sleep(50);
    }
  }
  // libvirt drops a transient domain a moment after its QEMU is gone: stopped means not listed.
  if (inst.domain && inst.status === 'running') await waitDomainGone(inst.domain, 5000);
  if (!keep) await rm(inst.dir, { recursive: true, force: true });
  return { message_type: 'stop', instance: inst.id, was: inst.status, removed: !keep };
}

export async function findInstance(root: string, ref: string): Promise<InstanceState> {
  const s = (await readInstance(root, ref)) ?? (await listInstances(root)).find((i) => i.id.startsWith(ref));
  if (!s) throw new NotFoundError(`no instance ${ref} (see: cloudlet-overlay ps)`, { instance: ref });
  return s;
}

/** One line of `ps`: an instance's state without its VM spec, and whether its QEMU still runs. */
export type InstanceSummary = Omit<InstanceState, 'spec'> & { status: InstanceStatus };

export async function listInstanceSummaries(
  root: string,
): Promise<{ message_type: 'ps'; instances: InstanceSummary[] }> {
  const list = await listInstances(root);
  return { message_type: 'ps', instances: list.map(({ spec: _spec, ...rest }) => rest) };
}

/** An instance's serial console log, or with `qemu` QEMU's own stderr. */
export async function instanceLog(
  root: string,
  ref: string,
  qemu = false,
): Promise<{ message_type: 'logs'; instance: string; path: string; text: string }> {
  const s = await findInstance(root, ref);
  const path = qemu ? s.stderr_log : s.serial_log;
  const text = await readFile(path, 'utf8').catch(() => {
    throw new NotFoundError(`no log at ${path}`, { path });
  });
  return { message_type: 'logs', instance: s.id, path, text };
}
