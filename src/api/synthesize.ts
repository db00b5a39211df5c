/**
 * synthesize: base (from the library) + overlay (file or URL) → a running VM that answers.
 * Phases, each timed: fetch, open+check (header, footer, index, base id: all before anything
 * is written or launched), apply (rebuild disk as qcow2 over the base disk and memory as a
 * sparse stream over the base RAM file, every target proven), QEMU start, incoming load,
 * first response. A failure at any phase stops QEMU and removes the instance directory.
 */
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { OverlayReader } from '../overlay/reader.js';
import { openLibraryBase } from '../base/open.js';
import { resolveBaseId } from '../base/library.js';
import { instanceDir, processStart, writeInstance, type InstanceState } from '../base/instances.js';
import { tmpDir } from '../base/paths.js';
import { fetchToFile, isUrl, type Fetched } from '../net/fetch.js';
import { startQemu, type PortForward, type QemuVm, type VmSpec } from '../vm/qemu.js';
import type { AccelChoice } from '../vm/accel.js';
import { waitHttp, waitTcp } from '../vm/ready.js';
import { diagnoseQemu } from '../vm/diagnose.js';
import { CloudletError, QemuError, UsageError } from '../util/errors.js';
import { onCleanup } from '../util/cleanup.js';
import { silent, Timings, type Progress } from '../util/progress.js';
import { applyOverlay, checkBase } from './apply.js';

export interface SynthesizeOptions {
  root: string;
  /** Base id, unique id prefix or name. */
  base: string;
  overlay: string;
  forwards: PortForward[];
  waitHttp?: string;
  waitTcp?: number;
  accel?: AccelChoice;
  /** Leave the VM running and return (instance state in the library). */
  detach?: boolean;
  readyTimeoutMs?: number;
  progress?: Progress;
  /** Resume the full customized stream instead of the sparse one (benchmarks). */
  memoryFormat?: 'sparse' | 'stream';
}

export interface SynthesizeResult {
  message_type: 'synthesize';
  instance: string;
  base_id: string;
  pid: number;
  accel: string;
  dir: string;
  forwards: PortForward[];
  /** The guest's first answer, when waited for. */
  answer?: { status: number; body: string };
  timings_ms: { [phase: string]: number };
  /** Set by runForeground once the VM has stopped. */
  exit?: { code: number | null; signal: string | null };
}

export interface Synthesized {
  result: SynthesizeResult;
  vm: QemuVm;
  state: InstanceState;
}

export async function synthesize(opts: SynthesizeOptions): Promise<Synthesized> {
  const progress = opts.progress ?? silent;
  const timings = new Timings();
  const id = await resolveBaseId(opts.root, opts.base);
  const base = await timings.time('open_base', () => openLibraryBase(opts.root, id));
  let fetched: Fetched | undefined;
  let vm: QemuVm | undefined;
  const iid = `i-${randomBytes(4).toString('hex')}`;
  const dir = instanceDir(opts.root, iid);
  const unregister = onCleanup(() => rm(dir, { recursive: true, force: true }));
  try {
    if (!base.manifest.vm) {
      throw new UsageError(`base ${id.slice(0, 12)} has no VM spec: import it from a snapshot directory (or with --vm) to resume it`);
    }
    if (!base.ramFile && (opts.memoryFormat ?? 'sparse') === 'sparse') {
      throw new UsageError(`base ${id.slice(0, 12)} has no memory snapshot: nothing to resume`);
    }
    let overlayPath = opts.overlay;
    if (isUrl(opts.overlay)) {
      await mkdir(tmpDir(opts.root), { recursive: true });
      fetched = await timings.time('fetch', () => fetchToFile(opts.overlay, tmpDir(opts.root), progress));
      overlayPath = fetched.path;
    }
    const reader = await timings.time('open_overlay', () => OverlayReader.open(overlayPath));
    try {
      checkBase(reader.header, base);
      if (!reader.header.targets.some((t) => t.kind === 'ram')) {
        throw new UsageError('this overlay has no memory snapshot: a disk-only overlay cannot be resumed (use apply and boot it)');
      }
      await mkdir(dir, { recursive: true });
      await timings.time('apply', () =>
        applyOverlay({
          overlay: reader,
          base,
          outDir: dir,
          diskFormat: 'qcow2',
          memoryFormat: opts.memoryFormat ?? 'sparse',
          progress,
        }),
      );
    } finally {
      await reader.close();
    }
    await fetched?.remove();

    const spec = resumeSpecFor(base.manifest.vm, base.dir, dir, base.ramFile, opts);
    progress.step('resuming VM');
    vm = await timings.time('qemu', () =>
      startQemu(spec, { runDir: dir, accel: opts.accel ?? 'auto', detach: opts.detach }).catch((err: unknown) => {
        throw withHint(err);
      }),
    );
    timings.phases['qemu_start'] = Math.round(vm.timings.qmpReadyMs);
    timings.phases['incoming_load'] = Math.round(vm.timings.incomingMs);
    const state: InstanceState = {
      id: iid,
      base_id: id,
      overlay: isUrl(opts.overlay) ? opts.overlay : join(process.cwd(), opts.overlay),
      pid: vm.pid,
      pid_start: (await processStart(vm.pid)) ?? '',
      created_at: new Date().toISOString(),
      accel: vm.accel,
      dir,
      qmp_socket: vm.paths.qmpSocket,
      serial_socket: vm.paths.serialSocket,
      serial_log: vm.paths.serialLog,
      stderr_log: vm.paths.stderrLog,
      forwards: opts.forwards,
    };
    await writeInstance(opts.root, state);
    let answer: SynthesizeResult['answer'];
    if (opts.waitHttp) {
      progress.step(`waiting for ${opts.waitHttp}`);
      const a = await timings.time('first_response', () =>
        waitHttp(opts.waitHttp!, { timeoutMs: opts.readyTimeoutMs ?? 60_000, signal: vm!.exitSignal }),
      );
      answer = { status: a.status, body: a.body };
    } else if (opts.waitTcp) {
      await timings.time('first_response', () =>
        waitTcp('127.0.0.1', opts.waitTcp!, { timeoutMs: opts.readyTimeoutMs ?? 60_000, signal: vm!.exitSignal }),
      );
    }
    progress.done('VM resumed');
    timings.phases['total'] = timings.total();
    unregister();
    return {
      vm,
      state,
      result: {
        message_type: 'synthesize',
        instance: iid,
        base_id: id,
        pid: vm.pid,
        accel: vm.accel,
        dir,
        forwards: opts.forwards,
        answer,
        timings_ms: timings.phases,
      },
    };
  } catch (err) {
    progress.fail('synthesis failed');
    if (vm) {
      const tail = await vm.stderrTail(10).catch(() => '');
      vm.kill();
      await vm.exited;
      if (err instanceof CloudletError && tail && !err.details['stderrTail']) err.details['stderrTail'] = tail;
    }
    await fetched?.remove();
    await rm(dir, { recursive: true, force: true });
    unregister();
    throw err;
  } finally {
    await base.close();
  }
}

/** The base's VM spec with this instance's disk, the base RAM file and the sparse stream. */
function resumeSpecFor(vmSpec: VmSpec, baseDir: string, dir: string, ramFile: string | undefined, opts: SynthesizeOptions): VmSpec {
  const spec: VmSpec = { ...vmSpec, name: undefined };
  if (spec.kernel) spec.kernel = join(baseDir, spec.kernel);
  if (spec.initrd) spec.initrd = join(baseDir, spec.initrd);
  if (spec.drives?.[0]) spec.drives = [{ ...spec.drives[0], file: join(dir, 'disk.qcow2'), format: 'qcow2' }];
  if (spec.network) spec.network = { ...spec.network, forwards: opts.forwards };
  else if (opts.forwards.length > 0) throw new UsageError('this base VM has no network card: --forward is not possible');
  if ((opts.memoryFormat ?? 'sparse') === 'sparse') {
    spec.memoryBackendFile = { path: ramFile!, share: false };
    spec.incoming = join(dir, 'memory.sparse');
  } else {
    spec.incoming = join(dir, 'memory.stream');
  }
  return spec;
}

function withHint(err: unknown): unknown {
  if (!(err instanceof QemuError)) return err;
  const tail = typeof err.details['stderrTail'] === 'string' ? err.details['stderrTail'] : '';
  const hint = diagnoseQemu(`${err.message}\n${tail}`);
  if (!hint) return err;
  return new QemuError(`${err.message} — likely cause: ${hint}`, { ...err.details, hint }, { cause: err });
}
