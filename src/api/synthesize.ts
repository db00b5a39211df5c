/**
 * synthesize: base (from the library) + overlay (file or URL) → a running VM that answers.
 * Phases, each timed: fetch, open+check (header, footer, index, base id: all before anything
 * is written or launched), apply (rebuild disk as qcow2 over the base disk and memory as a
 * sparse stream over the base RAM file, every target proven), QEMU start, incoming load,
 * first response. A failure at any phase stops QEMU and removes the instance directory.
 */
import { once } from 'node:events';
import { mkdir, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { OverlayReader } from '../overlay/reader.js';
import { openLibraryBase } from '../base/open.js';
import { resolveBaseId } from '../base/library.js';
import { claimInstanceDir, instanceDir, type InstanceState } from '../instance/state.js';
import { tmpDir } from '../base/paths.js';
import { fetchToFile, isUrl, type Fetched, type FetchLimits } from '../net/fetch.js';
import type { TrustedKey } from '../util/sign.js';
import type { PortForward } from '../spec/vm-spec.js';
import type { QemuVm } from '../vm/process.js';
import type { AccelChoice } from '../vm/accel.js';
import { waitHttp, waitTcp } from '../vm/ready.js';
import { CloudletError, UsageError, withPath } from '../util/errors.js';
import { onCleanup } from '../util/cleanup.js';
import { scratchWrites } from '../util/atomic.js';
import { silent, Timings, type Progress } from '../util/progress.js';
import { applyOverlay, checkBase } from './apply.js';
import { newInstanceId, startInstance } from './instance.js';
import { sweepLibrary } from './gc.js';

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
  /** Trusted keys: refuse an unsigned or wrongly signed overlay before anything is written. */
  trust?: readonly TrustedKey[];
  /** Download bounds for a URL overlay (net/fetch.ts). */
  fetch?: FetchLimits;
  /** Raw QEMU options from the operator (--qemu-arg). */
  qemuArgs?: string[];
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
}

export interface Synthesized {
  result: SynthesizeResult;
  vm: QemuVm;
  state: InstanceState;
}

export async function synthesize(opts: SynthesizeOptions): Promise<Synthesized> {
  const progress = opts.progress ?? silent;
  const timings = new Timings();
  await sweepLibrary(opts.root);
  const id = await resolveBaseId(opts.root, opts.base);
  const base = await timings.time('open_base', () => openLibraryBase(opts.root, id));
  let fetched: Fetched | undefined;
  let vm: QemuVm | undefined;
  const iid = newInstanceId();
  const dir = instanceDir(opts.root, iid);
  const unregister = onCleanup(() => rm(dir, { recursive: true, force: true }));
  const sparse = (opts.memoryFormat ?? 'sparse') === 'sparse';
  try {
    if (!base.manifest.vm) {
      throw new UsageError(
        `base ${id.slice(0, 12)} has no VM spec: import it from a snapshot directory (or with --vm) to resume it`,
      );
    }
    let overlayPath = opts.overlay;
    if (isUrl(opts.overlay)) {
      await mkdir(tmpDir(opts.root), { recursive: true });
      fetched = await timings.time('fetch', () => fetchToFile(opts.overlay, tmpDir(opts.root), progress, opts.fetch));
      overlayPath = fetched.path;
    }
    const reader = await timings.time('open_overlay', () => OverlayReader.open(overlayPath, { trust: opts.trust }));
    try {
      checkBase(reader.header, base);
      if (!reader.header.targets.some((t) => t.kind === 'ram')) {
        throw new UsageError(
          'this overlay has no memory snapshot: a disk-only overlay cannot be resumed (use apply and boot it)',
        );
      }
      await claimInstanceDir(dir);
      // Instance files are scratch: written atomically, but not fsynced (see scratchWrites).
      await timings.time('apply', () =>
        scratchWrites(() =>
          applyOverlay({
            overlay: reader,
            base,
            outDir: dir,
            diskFormat: 'qcow2',
            memoryFormat: sparse ? 'sparse' : 'stream',
            progress,
          }),
        ),
      );
    } finally {
      await reader.close();
    }
    await fetched?.remove();

    progress.step('resuming VM');
    const started = await timings.time('qemu', () =>
      startInstance({
        root: opts.root,
        base,
        iid,
        memory: { path: join(dir, sparse ? 'memory.sparse' : 'memory.stream'), sparse },
        forwards: opts.forwards,
        accel: opts.accel,
        detach: opts.detach,
        overlay: isUrl(opts.overlay) ? opts.overlay : resolve(opts.overlay),
        qemuArgs: opts.qemuArgs,
      }),
    );
    const running = started.vm;
    vm = running;
    timings.phases['qemu_start'] = Math.round(running.timings.qmpReadyMs);
    timings.phases['incoming_load'] = Math.round(running.timings.incomingMs);
    let answer: SynthesizeResult['answer'];
    const wait = { timeoutMs: opts.readyTimeoutMs ?? 60_000, signal: running.exitSignal };
    const { waitHttp: url, waitTcp: port } = opts;
    if (url) {
      progress.step(`waiting for ${url}`);
      const a = await timings.time('first_response', () => waitHttp(url, wait));
      answer = { status: a.status, body: a.body };
    } else if (port) {
      await timings.time('first_response', () => waitTcp('127.0.0.1', port, wait));
    }
    progress.done('VM resumed');
    timings.phases['total'] = timings.total();
    unregister();
    return {
      vm: running,
      state: started.state,
      result: {
        message_type: 'synthesize',
        instance: iid,
        base_id: id,
        pid: running.pid,
        accel: running.accel,
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

export interface RunSynthesisOptions extends SynthesizeOptions {
  /** Keep the instance directory when a foreground VM stops. */
  keep?: boolean;
  /** Aborting it stops a foreground VM (the CLI aborts it on Ctrl-C). */
  signal?: AbortSignal;
  /** Called with the result once the VM answers, before a foreground run starts waiting. */
  onReady?: (result: SynthesizeResult) => void;
}

/**
 * synthesize(), then either leave the VM running (detach) or run it in the foreground: until
 * QEMU exits or `signal` aborts; then stop it and remove its instance directory (unless keep).
 */
export async function runSynthesis(opts: RunSynthesisOptions): Promise<SynthesizeResult> {
  const { result, vm, state } = await withPath(opts.root, () => synthesize(opts));
  opts.onReady?.(result);
  if (opts.detach) {
    await vm.qmp.close();
    return result;
  }
  const signal = opts.signal;
  if (signal && !signal.aborted) {
    await Promise.race([vm.exited, once(signal, 'abort')]);
  } else if (!signal) {
    await vm.exited;
  }
  await vm.stop({ graceMs: 3000 });
  if (!opts.keep) await rm(state.dir, { recursive: true, force: true });
  return result;
}
