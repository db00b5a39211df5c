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
import { setTimeout as sleep } from 'node:timers/promises';
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tmpDir } from '../base/paths.js';
import { isGlanceRef } from '../glance/image.js';
import { resolveOverlaySource } from '../glance/overlays.js';
import { DEFAULT_MAX_BYTES, fetchToFile, type FetchLimits } from '../net/fetch.js';
import type { TrustedKey } from '../util/sign.js';
import { sweepLibrary } from './gc.js';
import { openLibraryBase, type LibraryBase } from '../base/open.js';
import { resolveBaseId } from '../base/library.js';
import { claimInstanceDir, instanceDir, type InstanceState } from '../instance/state.js';
import type { AssemblyOutput } from '../delta/assemble.js';
import { Qcow2Writer } from '../image/disk/qcow2-writer.js';
import { ScratchStore } from '../image/scratch-store.js';
import { MigrationStreamWriter } from '../image/memory/writer.js';
import { fifoSink } from '../image/memory/stream-sink.js';
import type { Assembler } from '../delta/assemble.js';
import { NbdServer } from '../nbd/index.js';
import { httpRange } from '../net/http-stream.js';
import { OverlayReader } from '../overlay/reader.js';
import { EarlyDisk } from '../pipeline/early-disk.js';
import { DiskChunks, SharedStream, StreamBlock } from '../pipeline/outputs.js';
import { rebuild } from '../pipeline/rebuild.js';
import type { PortForward } from '../spec/vm-spec.js';
import { BLOB_PREFIX, BLOB_START, BLOB_TAIL } from '../targets/blobs.js';
import type { LauncherChoice, RunningVm } from '../vm/launcher.js';
import type { AccelChoice } from '../vm/accel.js';
import { swapBacking } from '../vm/block.js';
import { waitHttp, waitTcp } from '../vm/ready.js';
import { CloudletError, CorruptInputError, UsageError, withPath } from '../util/errors.js';
import { thawAfterResume, type ThawOutcome } from '../vm/guest-prep.js';
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
  /**
   * Let the VM run as soon as its memory is proven, its disk served from here (over NBD) while
   * the rest of the overlay arrives; synthesize returns once the VM no longer needs this process.
   */
  earlyStart?: boolean;
  /** Trusted keys: refuse an unsigned or wrongly signed overlay before anything is written or run. */
  trust?: readonly TrustedKey[];
  /** Download bounds for a URL overlay (idle timeout, size). */
  fetch?: FetchLimits;
  /** Raw QEMU options from the operator (--qemu-arg): this host only, never part of a base. */
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
  if (opts.earlyStart && opts.pipeline === 'sequential') {
    throw new UsageError('--early-start runs the VM from the stream: it cannot be combined with --pipeline sequential');
  }
  await sweepLibrary(opts.root); // leftovers of killed runs (api/gc.ts)
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
    const ov = await timings.time('open_overlay', () => openOverlayInput(input, silent, { trust: opts.trust }));
    opened = ov;
    const header = ov.header;
    checkBase(header, base);
    checkRamLayout(header, base);
    if (!header.targets.some((t) => t.kind === 'ram') || !header.memory) {
      throw new UsageError(
        'this overlay has no memory snapshot: a disk-only overlay cannot be resumed (use apply and boot it)',
      );
    }
    await claimInstanceDir(dir); // owned: swept if this process dies before the instance is recorded
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
    // Early start: the rest of the overlay failing (a damaged segment the guest needed) ends the
    // wait for the first answer with that error, not with a timeout.
    const restFailed = new AbortController();
    started.complete.catch((err: unknown) => restFailed.abort(err));
    const wait = {
      timeoutMs: opts.readyTimeoutMs ?? 60_000,
      signal: AbortSignal.any([running.exitSignal, restFailed.signal]),
    };
    const { waitHttp: url, waitTcp: port } = opts;
    try {
      if (url) {
        progress.step(`waiting for ${url}`);
        const a = await timings.time('first_response', () => waitHttp(url, wait));
        answer = { status: a.status, body: a.body };
      } else if (port) {
        await timings.time('first_response', () => waitTcp('127.0.0.1', port, wait));
      }
    } catch (err) {
      // The VM stopped because the rest failed: that failure is the one to report.
      if (!restFailed.signal.aborted) await Promise.race([started.complete.catch(() => undefined), sleep(1000)]);
      throw restFailed.signal.aborted ? restFailed.signal.reason : err;
    }
    timings.phases['answered'] = timings.total();
    const thawed = thawing ? await thawing : undefined;
    // Early start: the rest of the overlay still arrives; done when the VM needs us no more.
    await started.complete;
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
  if (!isGlanceRef(opts.overlay)) {
    const input = overlayInput(opts.overlay);
    if (input.kind !== 'url') return input;
    return { ...input, maxBytes: opts.fetch?.maxBytes ?? DEFAULT_MAX_BYTES, idleMs: opts.fetch?.idleMs };
  }
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

/** What a run started: the VM, once it runs; `complete` settles when it needs this process no more. */
interface Started {
  vm: RunningVm;
  state: InstanceState;
  complete: Promise<void>;
}

/**
 * The pipeline: QEMU, decoding and assembly at once; memory straight into QEMU. With early
 * start the VM runs as soon as its memory is proven, its disk served over NBD from here
 * (pipeline/early-disk.ts) until the rest has arrived and is proven too; then the disk is put
 * onto the rebuilt local layer and `complete` settles.
 */
async function streamed(c: RunContext): Promise<Started> {
  const { opts, base, opened, dir, timings, progress } = c;
  const header = opened.header;
  const memory = header.memory!;
  const sparse = (opts.memoryFormat ?? 'sparse') === 'sparse';
  const diskTarget = header.targets.find((t) => t.kind === 'disk');
  const diskIndex = diskTarget ? header.targets.indexOf(diskTarget) : -1;
  const baseDisk = base.targets.find((t) => t.kind === 'disk');
  if (diskTarget && (baseDisk?.kind !== 'disk' || !base.diskPath || !base.diskFormat)) {
    throw new UsageError('the overlay rebuilds a disk: the base needs its disk');
  }
  const baseImage = base.diskPath ? { file: base.diskPath, format: base.diskFormat as 'raw' | 'qcow2' } : undefined;
  // Early start needs the overlay's index up front (random access: the file, or Range requests).
  const random = opts.earlyStart && diskTarget ? await openRandom(opts, opened) : undefined;
  if (random) c.cleanups.push(() => random.close());
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

  // Early start: the disk over NBD, answered from the assembler once there is one.
  const asmReady = deferred<Assembler>();
  // One EarlyDisk (one segment cache, one set of counters) for reads that arrive together.
  const earlyDiskReady = asmReady.promise.then((a) => {
    if (!random) throw new Error('early start without random access to the overlay');
    return new EarlyDisk(a, diskIndex, random, { targets: header.targets, base: base.targets }, base.targets);
  });
  earlyDiskReady.catch(() => undefined);
  let earlyDisk: EarlyDisk | undefined;
  let nbd: NbdServer | undefined;
  // A disk read that failed (a segment fetched out of turn was damaged, or its server went
  // away for good): the guest got EIO, so this VM is not the one the overlay describes: the
  // synthesis fails with that error and the VM is stopped.
  const earlyFailure = deferred<never>();
  let earlyError: Error | undefined;
  earlyFailure.promise.catch(() => undefined);
  if (random && diskTarget) {
    nbd = new NbdServer({
      name: 'disk',
      export: {
        size: diskTarget.size,
        readOnly: true,
        read: async (offset, length, buf) => {
          earlyDisk = await earlyDiskReady;
          await earlyDisk.read(offset, length, buf);
        },
      },
      onError: (e) => {
        if (e.kind !== 'export' || earlyError !== undefined) return;
        earlyError = e.cause instanceof Error ? e.cause : e;
        earlyFailure.reject(earlyError);
      },
    });
    await nbd.listen(join(fifoDir, 'disk.nbd'));
    const server = nbd;
    c.cleanups.push(() => server.close());
  }

  const t0 = performance.now();
  const starting = startInstance({
    root: opts.root,
    base,
    iid: c.iid,
    memory: { incoming: { from: 'fifo', path: fifo }, sparse },
    diskBacking: !diskTarget
      ? undefined
      : nbd
        ? { kind: 'nbd', socket: join(fifoDir, 'disk.nbd'), export: 'disk' }
        : baseImage && { kind: 'image', ...baseImage },
    forwards: opts.forwards,
    accel: opts.accel,
    detach: opts.detach,
    overlay: opened.name,
    launcher: opts.launcher ?? 'auto',
    qemuArgs: opts.qemuArgs,
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
  const ready = deferred<Started>();
  ready.promise.catch(() => undefined);
  /** Memory proven: give QEMU the device state, wait for its load, let it run. */
  const resume = async (): Promise<void> => {
    await stream!.end();
    const { vm, state } = await starting;
    try {
      progress.step('resuming VM');
      await timings.time('load_wait', () => vm.finishIncoming({ cont: false }));
      if (disk && !nbd) await timings.time('disk_switch', () => swapBacking(vm, 0, { file: rebuilt, format: 'qcow2' }));
      await vm.qmp.execute('cont');
      ready.resolve({ vm, state, complete });
    } catch (err) {
      if (err instanceof Object) vmOfError.set(err, vm);
      throw err;
    }
  };
  let resuming: Promise<void> | undefined;
  const memoryTargets = new Set(header.targets.flatMap((t, i) => (t.kind === 'disk' ? [] : [i])));
  const watchdog = random ? starting.then((s) => watchOver(s.vm.pid, dir)) : undefined;
  watchdog?.catch(() => undefined);

  let rebuilding: Promise<unknown> | undefined;
  const complete = (async (): Promise<void> => {
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
      const rebuildRun = timings.time('rebuild', () =>
        rebuild({
          reader: opened.reader,
          header,
          base: base.targets,
          baseSources: base.sources,
          store,
          threads: opts.threads,
          onBytes: (n) => progress.advance(n),
          onAssembler: (a) => asmReady.resolve(a),
          lastSegment: random && lastSegments(random, header.targets.length),
          onTargetDone: (t) => {
            memoryTargets.delete(t);
            // Early start: memory (and the stream's pieces) proven — the VM may run.
            if (nbd && memoryTargets.size === 0 && !resuming) {
              timings.phases['memory_proven'] = timings.total();
              resuming = resume();
              resuming.catch(() => undefined);
            }
          },
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
      rebuilding = rebuildRun;
      rebuildRun.catch(() => undefined);
      const rebuiltRun = await Promise.race([rebuildRun, earlyFailure.promise]);
      for (const [k, v] of Object.entries(rebuiltRun.stats) as Array<[string, number]>) {
        if (k.endsWith('_ms')) timings.phases[`pipeline_${k}`] = v;
      }
      opened.verifyWhole();
      // Everything is proven: without early start, the device state completes QEMU's load now.
      await (resuming ?? (resuming = resume()));
      if (nbd && disk) {
        // The rebuilt layer is complete and proven: the VM leaves our NBD export for it.
        const { vm } = await ready.promise;
        if (earlyError !== undefined) throw earlyError;
        await timings.time('disk_switch', () => swapBacking(vm, 0, { file: rebuilt, format: 'qcow2' }, baseImage));
        await nbd.close();
        if (earlyDisk) {
          timings.phases['early_segments_fetched'] = earlyDisk.stats.fetched;
          timings.phases['early_bytes_fetched'] = earlyDisk.stats.fetchedBytes;
          timings.phases['early_chunks_on_demand'] = earlyDisk.stats.onDemand;
        }
        timings.phases['independent'] = timings.total();
      }
      (await watchdog)?.release();
    } catch (err) {
      asmReady.reject(err); // a disk read still waiting for the assembler fails now, not never
      await writer.abort();
      await disk?.abort();
      // An early-start failure can win while the rebuild still runs: with its outputs aborted it
      // fails at its next write; let it end (bounded) before its scratch store goes away.
      if (rebuilding) await Promise.race([rebuilding.catch(() => undefined), sleep(2000)]);
      // The caller stops the VM now; the watchdog must not kill a pid that may be reused later.
      (await watchdog?.catch(() => undefined))?.release();
      // When QEMU did not start, that is the error to report (the stream only failed because of it).
      const started = await starting.then(
        (s) => ({ ok: true as const, s }),
        (e: unknown) => ({ ok: false as const, e }),
      );
      if (!started.ok) throw started.e;
      if (err instanceof Object) vmOfError.set(err, started.s.vm);
      if (resuming && err instanceof CloudletError) {
        err.message = `${err.message} — found after the VM had started (early start); the VM was stopped`;
      }
      throw err;
    } finally {
      await store.close();
    }
  })();
  complete.catch((err: unknown) => ready.reject(err));
  return ready.promise;
}

/** Per target, the last segment with records for it (-1: none), from the checked index. */
function lastSegments(random: OverlayReader, targets: number): number[] {
  const last = Array.from({ length: targets }, () => -1);
  random.index.segments.forEach((seg, i) => {
    for (const [t] of seg.covers) if (t >= 0 && t < targets) last[t] = i;
  });
  return last;
}

/** Random access to the overlay for early start: the local file, or ranged GETs of its URL. */
async function openRandom(opts: SynthesizeOptions, opened: OpenedOverlay): Promise<OverlayReader> {
  if (opened.header.index_sha256 === undefined) {
    // Without it nothing ties the index read out of turn to the header the stream proved.
    throw new UsageError(
      'early start needs an overlay of format 1.1 or later (its header holds the index checksum): ' +
        're-create the overlay, or synthesize it without --early-start',
    );
  }
  const input = await resolveInput(opts, opened.header.base.id);
  const trust = { trust: opts.trust };
  let random: OverlayReader;
  if (input.kind === 'file') random = await OverlayReader.open(input.path, trust);
  else if (input.kind === 'url')
    random = await OverlayReader.fromRange(await httpRange(input.url, { headers: input.headers }), input.url, trust);
  else throw new UsageError('early start needs random access to the overlay: a file or a URL, not an upload');
  // The same overlay as the stream (a server could answer ranges with another file): the same
  // header, hence the same index_sha256, which the random reader checked its index against.
  if (JSON.stringify(random.header) !== JSON.stringify(opened.header)) {
    await random.close();
    throw new CorruptInputError(`${opened.name}: ranged reads return another overlay than the stream`);
  }
  return random;
}

/**
 * Until the VM no longer needs us, a watchdog ends it if this process dies (even by SIGKILL):
 * a shell reading one line from us; end of file without "keep" kills QEMU and removes its
 * instance directory. release() says "keep".
 */
function watchOver(pid: number, dir: string): { release(): void } {
  const sh = spawn(
    '/bin/sh',
    ['-c', 'read cmd; [ "$cmd" = keep ] || { kill -9 "$0" 2>/dev/null; rm -rf "$1"; }', String(pid), dir],
    { stdio: ['pipe', 'ignore', 'ignore'], detached: true },
  );
  sh.unref();
  sh.stdin.on('error', () => undefined);
  (sh.stdin as unknown as { unref?: () => void }).unref?.();
  return {
    release() {
      sh.stdin.end('keep\n');
    },
  };
}

function deferred<T>(): { promise: Promise<T>; resolve(v: T): void; reject(e: unknown): void } {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** Rebuild into files, then start QEMU on them (the way before the pipeline). */
async function sequential(c: RunContext): Promise<Started> {
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
      fetchToFile(input.url, tmpDir(opts.root), progress, opts.fetch ?? {}, {
        headers: input.headers,
        sha256: input.sha256,
      }),
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
      trust: opts.trust,
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
      qemuArgs: opts.qemuArgs,
    }),
  );
  timings.phases['qemu_start'] = Math.round(started.vm.timings.qmpReadyMs);
  timings.phases['incoming_load'] = Math.round(started.vm.timings.incomingMs);
  return { ...started, complete: Promise.resolve() };
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
  // A full disk (or a missing directory) is reported naming the library, not as a bare errno.
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
