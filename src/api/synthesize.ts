/**
 * synthesize: base (from the library) + overlay (file, URL or any byte stream) → a running VM
 * that answers. One pipeline: QEMU starts at once (paused, waiting for its memory on a unix
 * socket, its disk opened over the base disk); the overlay is read front to back, its segments
 * decoded on worker threads and assembled here; memory pages flow into QEMU as they are rebuilt
 * (changed pages only, over the base RAM file mapped copy-on-write), disk chunks into a qcow2
 * layer over the base disk. Only when every target is proven against the overlay's digests and
 * the index and footer check out does QEMU get the device state that completes its load; the
 * rebuilt disk layer is then put under the guest's write layer, and only then is the VM told to
 * run. Any failure kills QEMU and removes the instance: nothing unproven ever runs.
 *
 * `pipeline: 'sequential'` does the same in phases (rebuild into files, then start QEMU and let
 * it read them) — the way it was done before, kept for comparison.
 */
import { once } from 'node:events';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tmpDir } from '../base/paths.js';
import { isGlanceRef } from '../glance/image.js';
import { resolveOverlaySource } from '../glance/overlays.js';
import { fetchToFile } from '../net/fetch.js';
import { openLibraryBase, type LibraryBase } from '../base/open.js';
import { resolveBaseId } from '../base/library.js';
import { instanceDir, type InstanceState } from '../instance/state.js';
import type { AssemblyOutput } from '../delta/assemble.js';
import { Qcow2Writer } from '../image/disk/qcow2-writer.js';
import { ScratchStore } from '../image/scratch-store.js';
import { MigrationStreamWriter } from '../image/memory/writer.js';
import { fifoSink } from '../image/memory/stream-sink.js';
import { DiskChunks, SharedStream, StreamBlock } from '../pipeline/outputs.js';
import { rebuild } from '../pipeline/rebuild.js';
import type { PortForward } from '../spec/vm-spec.js';
import { BLOB_PREFIX, BLOB_START, BLOB_TAIL } from '../targets/blobs.js';
import type { LauncherChoice, RunningVm } from '../vm/launcher.js';
import type { AccelChoice } from '../vm/accel.js';
import { swapBacking } from '../vm/block.js';
import { waitHttp, waitTcp } from '../vm/ready.js';
import { thawAfterResume, type ThawOutcome } from '../vm/guest-prep.js';
import { CloudletError, UsageError } from '../util/errors.js';
import { onCleanup } from '../util/cleanup.js';
import { findProgram } from '../util/programs.js';
import { silent, Timings, type Progress } from '../util/progress.js';
import { applyOverlay, checkBase, checkRamLayout } from './apply.js';
import { newInstanceId, startInstance } from './instance.js';
import { openOverlayInput, overlayInput, type OpenedOverlay, type OverlayInput } from './overlay-input.js';

const exec = promisify(execFile);

export interface SynthesizeOptions {
  root: string;
  /** Base id, unique id prefix or name. */
  base: string;
  /** A path, an http(s) URL, glance://IMAGE_ID, or any overlay input (an upload). */
  overlay: string | OverlayInput;
  /** Glance endpoint for glance:// overlays (else $CLOUDLET_GLANCE_URL or the OS_* environment). */
  glance?: string;
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
  /** Default 'stream'; 'sequential' rebuilds into files first (benchmarks). */
  pipeline?: 'stream' | 'sequential';
  /** Decode threads (default: every core). */
  threads?: number;
  /** Who runs QEMU: libvirt (a transient domain), qemu (our child), auto (libvirt when reachable; default). */
  launcher?: LauncherChoice;
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
  /** VMs with a guest agent channel: whether the resumed guest had to be thawed (snapshot --freeze). */
  guest_thaw?: ThawOutcome;
  /** For an overlay streamed from a URL: what arrived, and connections resumed after a drop. */
  download?: { bytes: number; resumed: number };
  timings_ms: { [phase: string]: number };
}

export interface Synthesized {
  result: SynthesizeResult;
  vm: RunningVm;
  state: InstanceState;
}

export async function synthesize(opts: SynthesizeOptions): Promise<Synthesized> {
  const progress = opts.progress ?? silent;
  const timings = new Timings();
  const id = await resolveBaseId(opts.root, opts.base);
  const base = await timings.time('open_base', () => openLibraryBase(opts.root, id));
  const iid = newInstanceId();
  const dir = instanceDir(opts.root, iid);
  const unregister = onCleanup(() => rm(dir, { recursive: true, force: true }));
  const cleanups: Array<() => Promise<void>> = [];
  let vm: RunningVm | undefined;
  let opened: OpenedOverlay | undefined;
  try {
    if (!base.manifest.vm) {
      throw new UsageError(
        `base ${id.slice(0, 12)} has no VM spec: import it from a snapshot directory (or with --vm) to resume it`,
      );
    }
    const input = await timings.time('resolve', () => resolveInput(opts, id));
    // The pipeline reports the overlay bytes it consumes: the download itself stays silent.
    const ov = await timings.time('open_overlay', () => openOverlayInput(input));
    opened = ov;
    const header = ov.header;
    checkBase(header, base);
    checkRamLayout(header, base);
    if (!header.targets.some((t) => t.kind === 'ram') || !header.memory) {
      throw new UsageError(
        'this overlay has no memory snapshot: a disk-only overlay cannot be resumed (use apply and boot it)',
      );
    }
    await mkdir(dir, { recursive: true });
    const run = opts.pipeline === 'sequential' ? sequential : streamed;
    // Instance files are scratch: written atomically, but not fsynced (see util/atomic.ts).
    const started = await run({ opts, base, opened: ov, dir, iid, timings, progress, cleanups });
    vm = started.vm;
    const running = started.vm;
    // A guest snapshotted frozen through its agent (snapshot --freeze) is frozen here too: thaw it
    // while the first answer is awaited (reads work frozen; writes would wait).
    const thawing = running.spec.guestAgent
      ? thawAfterResume(running.paths.agentSocket).catch(() => 'no-agent' as const)
      : undefined;
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
    const thawed = thawing ? await thawing : undefined;
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
        ...(thawed ? { guest_thaw: thawed } : {}),
        download: ov.transfer ? { bytes: ov.transfer.received, resumed: ov.transfer.resumed } : undefined,
        timings_ms: timings.phases,
      },
    };
  } catch (err) {
    progress.fail('synthesis failed');
    vm ??= failedVm(err);
    if (vm) {
      const tail = await vm.stderrTail(10).catch(() => '');
      vm.kill();
      await vm.exited;
      if (err instanceof CloudletError && tail && !err.details['stderrTail']) err.details['stderrTail'] = tail;
    }
    await rm(dir, { recursive: true, force: true });
    unregister();
    throw err;
  } finally {
    await opened?.close();
    for (const c of cleanups) await c().catch(() => undefined);
    await base.close();
  }
}

/** The overlay to read: glance://ID resolved (type and base checked on the image, before any byte). */
async function resolveInput(opts: SynthesizeOptions, baseId: string): Promise<OverlayInput> {
  if (typeof opts.overlay !== 'string') return opts.overlay;
  if (!isGlanceRef(opts.overlay)) return overlayInput(opts.overlay);
  const src = await resolveOverlaySource(opts.overlay, { endpoint: opts.glance, expectBase: baseId });
  return {
    kind: 'url',
    url: src.url,
    headers: src.headers,
    maxBytes: src.size,
    sha256: src.sha256,
    name: opts.overlay,
  };
}

interface RunContext {
  opts: SynthesizeOptions;
  base: LibraryBase;
  opened: OpenedOverlay;
  dir: string;
  iid: string;
  timings: Timings;
  progress: Progress;
  cleanups: Array<() => Promise<void>>;
}

/** A VM started by a run that failed later is attached to its error, so it can be stopped. */
const vmOfError = new WeakMap<object, RunningVm>();
function failedVm(err: unknown): RunningVm | undefined {
  return typeof err === 'object' && err !== null ? vmOfError.get(err) : undefined;
}

/** The pipeline: QEMU, decoding and assembly at once; memory straight into QEMU. */
async function streamed(c: RunContext): Promise<{ vm: RunningVm; state: InstanceState }> {
  const { opts, base, opened, dir, timings, progress } = c;
  const header = opened.header;
  const memory = header.memory!;
  const sparse = (opts.memoryFormat ?? 'sparse') === 'sparse';
  const diskTarget = header.targets.find((t) => t.kind === 'disk');
  const baseDisk = base.targets.find((t) => t.kind === 'disk');
  if (diskTarget && (baseDisk?.kind !== 'disk' || !base.diskPath || !base.diskFormat)) {
    throw new UsageError('the overlay rebuilds a disk: the base needs its disk');
  }
  // The guest's disk: an empty qcow2 for its own writes, whose header names the rebuilt layer
  // (so tools see the real chain); QEMU opens it over the base disk until that layer is proven.
  const top = join(dir, 'disk.qcow2');
  const rebuilt = join(dir, 'disk.rebuilt.qcow2');
  if (base.diskPath && base.diskFormat && baseDisk?.kind === 'disk') {
    const size = diskTarget?.size ?? baseDisk.size;
    const w = await Qcow2Writer.create(top, {
      virtualSize: size,
      backingFile: diskTarget ? rebuilt : base.diskPath,
      backingFormat: diskTarget ? 'qcow2' : base.diskFormat,
      base: baseDisk.source,
      durable: false,
    });
    await w.finish();
  }
  await findProgram('qemu-system-x86_64'); // before anything is made for it
  // QEMU reads its memory from a FIFO (through cat): writes to it block on libuv's thread pool
  // until QEMU took the bytes, so QEMU is fed at its pace however busy this thread is.
  const fifoDir = await mkdtemp(join(tmpdir(), 'cm-'));
  const fifo = join(fifoDir, 'memory.fifo');
  const sink = fifoSink(fifo);
  // Run after QEMU is gone (synthesize's cleanups): a cat still waiting on the FIFO is let go.
  const dropFifo = async (): Promise<void> => {
    await sink.abort();
    await rm(fifoDir, { recursive: true, force: true });
  };
  const unregister = onCleanup(dropFifo);
  c.cleanups.push(async () => {
    unregister();
    await dropFifo();
  });
  await exec(await findProgram('mkfifo'), ['-m', '600', fifo]);

  const t0 = performance.now();
  const starting = startInstance({
    root: opts.root,
    base,
    iid: c.iid,
    memory: { incoming: { from: 'fifo', path: fifo }, sparse },
    diskBacking:
      diskTarget && base.diskPath ? { file: base.diskPath, format: base.diskFormat as 'raw' | 'qcow2' } : undefined,
    forwards: opts.forwards,
    accel: opts.accel,
    detach: opts.detach,
    overlay: opened.name,
    launcher: opts.launcher ?? 'auto',
  }).then((s) => {
    timings.phases['qemu_start'] = Math.round(performance.now() - t0);
    return s;
  });
  // QEMU did not start: nobody will read the FIFO; release whatever waits on it.
  starting.catch(() => sink.abort());
  const writer = new MigrationStreamWriter(sink);
  const store = new ScratchStore(join(dir, '.rebuilt'));
  let disk: Qcow2Writer | undefined;
  let stream: SharedStream | undefined;
  try {
    if (diskTarget && baseDisk?.kind === 'disk' && base.diskPath && base.diskFormat) {
      disk = await Qcow2Writer.create(rebuilt, {
        virtualSize: diskTarget.size,
        backingFile: base.diskPath,
        backingFormat: base.diskFormat,
        base: baseDisk.source,
        durable: false,
      });
    }
    const dw = disk;
    progress.step('synthesizing', opened.size);
    const rebuiltRun = await timings.time('rebuild', () =>
      rebuild({
        reader: opened.reader,
        header,
        base: base.targets,
        baseSources: base.sources,
        store,
        threads: opts.threads,
        onBytes: (n) => progress.advance(n),
        outputs: (blob) => {
          stream = new SharedStream(writer, blob, memory.ramSectionId, {
            prefix: BLOB_PREFIX,
            start: BLOB_START,
            tail: BLOB_TAIL,
          });
          const s = stream;
          return header.targets.map((t): AssemblyOutput | undefined => {
            if (t.kind === 'disk') return dw ? new DiskChunks(dw, t.size) : undefined;
            if (t.kind === 'ram') return new StreamBlock(s, t.name, !sparse || t.name !== memory.mainBlock);
            return undefined;
          });
        },
      }),
    );
    for (const [k, v] of Object.entries(rebuiltRun.stats) as Array<[string, number]>) {
      if (k.endsWith('_ms')) timings.phases[`pipeline_${k}`] = v;
    }
    opened.verifyWhole();
    // Everything is proven: the device state completes QEMU's load.
    await stream!.end();
  } catch (err) {
    await writer.abort();
    await disk?.abort();
    // When QEMU did not start, that is the error to report (the stream only failed because of it).
    const started = await starting.then(
      (s) => ({ ok: true as const, s }),
      (e: unknown) => ({ ok: false as const, e }),
    );
    if (!started.ok) throw started.e;
    if (err instanceof Object) vmOfError.set(err, started.s.vm);
    throw err;
  } finally {
    await store.close();
  }
  const { vm, state } = await starting;
  try {
    progress.step('resuming VM');
    await timings.time('load_wait', () => vm.finishIncoming({ cont: false }));
    if (disk) await timings.time('disk_switch', () => swapBacking(vm, 0, { file: rebuilt, format: 'qcow2' }));
    await vm.qmp.execute('cont');
    return { vm, state };
  } catch (err) {
    if (err instanceof Object) vmOfError.set(err, vm);
    throw err;
  }
}

/** Rebuild into files, then start QEMU on them (the way before the pipeline). */
async function sequential(c: RunContext): Promise<{ vm: RunningVm; state: InstanceState }> {
  const { opts, base, dir, timings, progress } = c;
  const sparse = (opts.memoryFormat ?? 'sparse') === 'sparse';
  // The stream opened to check the header is not used: the overlay is fetched whole, then applied.
  await c.opened.close();
  const input = await resolveInput(opts, base.id);
  let path: string;
  if (input.kind === 'file') path = input.path;
  else if (input.kind === 'url') {
    await mkdir(tmpDir(opts.root), { recursive: true });
    const fetched = await timings.time('fetch', () =>
      fetchToFile(input.url, tmpDir(opts.root), progress, undefined, { headers: input.headers, sha256: input.sha256 }),
    );
    c.cleanups.push(() => fetched.remove());
    path = fetched.path;
  } else throw new UsageError('the sequential pipeline takes a file or a URL');
  await timings.time('apply', () =>
    applyOverlay({
      overlay: path,
      base,
      outDir: dir,
      diskFormat: 'qcow2',
      memoryFormat: sparse ? 'sparse' : 'stream',
      progress,
      threads: opts.threads ?? 0,
      durable: false,
    }),
  );
  progress.step('resuming VM');
  const started = await timings.time('qemu', () =>
    startInstance({
      root: opts.root,
      base,
      iid: c.iid,
      memory: { incoming: { from: 'file', path: join(dir, sparse ? 'memory.sparse' : 'memory.stream') }, sparse },
      forwards: opts.forwards,
      accel: opts.accel,
      detach: opts.detach,
      overlay: c.opened.name,
      launcher: opts.launcher ?? 'auto',
    }),
  );
  timings.phases['qemu_start'] = Math.round(started.vm.timings.qmpReadyMs);
  timings.phases['incoming_load'] = Math.round(started.vm.timings.incomingMs);
  return started;
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
  const { result, vm, state } = await synthesize(opts);
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
