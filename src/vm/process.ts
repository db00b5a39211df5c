/**
 * Running QEMU: startQemu() spawns it for a VmSpec in a run directory (argv.ts), negotiates QMP,
 * loads an incoming memory snapshot and continues the VM; QemuVm is the running process (exit,
 * stop, kill, stderr tail). Start failures become the most useful error (missing input, port in
 * use, QEMU's own last words).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, open, readFile, rm, stat, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { onCleanup } from '../util/cleanup.js';
import { BusyError, CloudletError, MissingToolError, NotFoundError, QemuError, TimeoutError } from '../util/errors.js';
import { findProgram } from '../util/programs.js';
import type { IncomingSpec, VmSpec } from '../spec/vm-spec.js';
import { resolveAccel, type Accel } from './accel.js';
import { buildQemuArgs, incomingUri, runPaths, type RunPaths } from './argv.js';
import { QmpClient } from './qmp.js';
import type { Launcher, QemuExit, RunningVm, StartOptions, StartTimings } from './launcher.js';

export type { QemuExit, StartOptions, StartTimings } from './launcher.js';

const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // A QEMU we started must not outlive us by accident (a failing test, an uncaught error).
  process.once('exit', () => {
    for (const child of live) child.kill('SIGKILL');
  });
}

/** A running QEMU started by startQemu(). */
export class QemuVm implements RunningVm {
  readonly launcher = 'qemu' as const;
  readonly exited: Promise<QemuExit>;
  /** Aborted (reason: QemuError) when the process exits; pass it to waits that need the VM. */
  readonly exitSignal: AbortSignal;
  timings: StartTimings = { qmpReadyMs: 0, incomingMs: 0, totalMs: 0 };
  private exitInfo: QemuExit | null = null;
  private qmpClient: QmpClient | null = null;
  private readonly abort = new AbortController();
  private readonly unregisterCleanup: () => void;

  constructor(
    private readonly child: ChildProcess,
    readonly spec: VmSpec,
    readonly argv: string[],
    readonly accel: Accel,
    readonly paths: RunPaths,
    /** performance.now() at spawn. */
    readonly startedAt: number,
    private readonly extraCleanup: () => Promise<void>,
    detached = false,
  ) {
    this.exitSignal = this.abort.signal;
    if (detached) {
      this.unregisterCleanup = () => undefined;
    } else {
      live.add(child);
      installExitHook();
      this.unregisterCleanup = onCleanup(() => this.stop({ graceMs: 2000 }).then(() => undefined));
    }
    this.exited = new Promise<QemuExit>((resolveExit) => {
      const finish = (code: number | null, signal: NodeJS.Signals | null, reason: Error): void => {
        if (this.exitInfo) return;
        this.exitInfo = { code, signal };
        live.delete(child);
        this.unregisterCleanup();
        this.abort.abort(reason);
        this.qmpClient?.destroy();
        void this.extraCleanup().finally(() => resolveExit({ code, signal }));
      };
      child.once('exit', (code, signal) =>
        finish(
          code,
          signal,
          new QemuError(`QEMU (pid ${this.pid}) exited (${describeExit({ code, signal })})`, {
            exitCode: code,
            signal: signal ?? null,
          }),
        ),
      );
      // Only when spawn itself fails (no 'exit' follows reliably).
      child.once('error', (err) =>
        finish(
          null,
          null,
          new MissingToolError(`cannot run ${argv[0] ?? 'qemu'}: ${err.message}`, { tool: argv[0] ?? '' }),
        ),
      );
    });
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get running(): boolean {
    return this.exitInfo === null;
  }

  get exitStatus(): QemuExit | null {
    return this.exitInfo;
  }

  get qmp(): QmpClient {
    if (!this.qmpClient) throw new QemuError('QMP is not connected');
    return this.qmpClient;
  }

  /** @internal set by startQemu once negotiated */
  attachQmp(client: QmpClient): void {
    this.qmpClient = client;
  }

  /** Waits for the process to exit; TimeoutError after timeoutMs if given. */
  async waitExit(timeoutMs?: number): Promise<QemuExit> {
    if (timeoutMs === undefined) return this.exited;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new TimeoutError(`QEMU (pid ${this.pid}) still running after ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      return await Promise.race([this.exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** QMP `quit`, then SIGKILL if it is still there after graceMs. Safe to call twice. */
  async stop(options: { graceMs?: number } = {}): Promise<QemuExit> {
    if (!this.running) return this.exited;
    this.child.ref(); // a detached QEMU too: its exit is what we wait for
    const graceMs = options.graceMs ?? 5000;
    if (this.qmpClient && !this.qmpClient.closed) {
      await this.qmpClient.execute('quit', undefined, { timeoutMs: graceMs }).catch(() => undefined);
    } else {
      this.child.kill('SIGTERM');
    }
    try {
      return await this.waitExit(graceMs);
    } catch {
      this.kill();
      return this.exited;
    }
  }

  /** SIGKILL now. */
  kill(): void {
    // A detached (unref'd) QEMU must still be seen to exit by whoever awaits `exited`.
    this.child.ref();
    if (this.running) this.child.kill('SIGKILL');
  }

  /** The last `lines` lines of QEMU's stderr. */
  async stderrTail(lines = 20): Promise<string> {
    return tailOfFile(this.paths.stderrLog, lines);
  }

  /**
   * Waits until the incoming snapshot is loaded (QEMU leaves `inmigrate`), checks that the load
   * succeeded, and continues the VM when asked. QemuError when QEMU refused the stream.
   */
  async finishIncoming(options: { timeoutMs?: number; cont: boolean }): Promise<void> {
    await finishIncoming(this, options);
  }

  async cont(): Promise<void> {
    await this.qmp.execute('cont');
  }

  /** query-status → e.g. 'running', 'paused', 'inmigrate', 'postmigrate'. */
  async status(): Promise<string> {
    const s = await this.qmp.execute<{ status: string }>('query-status');
    return s.status;
  }
}

/**
 * Waits until the incoming snapshot is loaded (QEMU leaves `inmigrate`), checks that the load
 * succeeded, and continues the VM when asked. QemuError when QEMU refused the stream. Shared
 * by both launchers: it needs nothing but our QMP session.
 */
export async function finishIncoming(
  vm: Pick<RunningVm, 'spec' | 'exitSignal' | 'qmp' | 'status'>,
  options: { timeoutMs?: number; cont: boolean },
): Promise<void> {
  const what = vm.spec.incoming?.path ?? 'memory snapshot';
  const timeoutMs = options.timeoutMs ?? 120_000;
  const deadline = Date.now() + timeoutMs;
  let status = 'inmigrate';
  while (status === 'inmigrate') {
    vm.exitSignal.throwIfAborted();
    if (Date.now() > deadline) {
      throw new TimeoutError(`loading the memory snapshot ${what} took over ${timeoutMs} ms`, { path: what });
    }
    await sleep(5);
    status = await vm.status();
  }
  const mig = await vm.qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
  if (mig.status === 'failed' || mig.status === 'cancelled') {
    throw new QemuError(`QEMU could not load the memory snapshot ${what}: ${mig['error-desc'] ?? mig.status}`, {
      path: what,
      migrationStatus: mig.status,
    });
  }
  if (options.cont && status !== 'running') await vm.qmp.execute('cont');
}

/** The direct launcher: QEMU as our own child process. */
export const qemuLauncher: Launcher = { kind: 'qemu', start: (spec, options) => startQemu(spec, options) };

/**
 * Starts QEMU for `spec`. Resolves once QMP is negotiated and, for an incoming spec, the memory
 * snapshot is loaded and the VM continued (unless stayPaused). Throws MissingToolError when the
 * QEMU binary is absent, NotFoundError for missing input files, BusyError when a forwarded port
 * is taken, QemuError (exit status and end of stderr) when QEMU dies or refuses the snapshot.
 */
export async function startQemu(spec: VmSpec, options: StartOptions): Promise<QemuVm> {
  const qemuBinary = options.qemuBinary ?? 'qemu-system-x86_64';
  await findProgram(qemuBinary);
  await checkInputs(spec);
  const runDir = resolve(options.runDir);
  await mkdir(runDir, { recursive: true });
  const accel = await resolveAccel(options.accel ?? 'auto', { qemuBinary });

  // sun_path holds 107 bytes: put sockets in a short private dir when runDir is too deep, and
  // leave symlinks in runDir so operators still find them there.
  let socketDir = runDir;
  let extraCleanup = async (): Promise<void> => undefined;
  if (Buffer.byteLength(join(runDir, 'serial.sock')) > 100) {
    socketDir = await mkdtemp(join(tmpdir(), 'cq-'));
    const dir = socketDir;
    extraCleanup = () => rm(dir, { recursive: true, force: true });
  }
  const paths = runPaths(runDir, socketDir);
  for (const f of [paths.qmpSocket, paths.serialSocket, paths.agentSocket]) await rm(f, { force: true });
  if (socketDir !== runDir) {
    for (const name of ['qmp.sock', 'serial.sock', ...(spec.guestAgent ? ['agent.sock'] : [])]) {
      await rm(join(runDir, name), { force: true });
      await symlink(join(socketDir, name), join(runDir, name)).catch(() => undefined);
    }
  }

  const args = buildQemuArgs(spec, { accel, paths, hostArgs: options.hostArgs });
  const stderrFile = await open(paths.stderrLog, 'w');
  const startedAt = performance.now();
  let child: ChildProcess;
  try {
    child = spawn(qemuBinary, args, {
      stdio: ['ignore', stderrFile.fd, stderrFile.fd],
      detached: options.detach ?? false,
    });
    if (options.detach) child.unref();
  } finally {
    await stderrFile.close();
  }
  const vm = new QemuVm(
    child,
    spec,
    [qemuBinary, ...args],
    accel,
    paths,
    startedAt,
    extraCleanup,
    options.detach ?? false,
  );

  try {
    const qmp = await QmpClient.connect(paths.qmpSocket, {
      timeoutMs: options.startTimeoutMs ?? 15_000,
      signal: vm.exitSignal,
    });
    vm.attachQmp(qmp);
    const qmpReady = performance.now();
    let incomingMs = 0;
    if (spec.incoming !== undefined) {
      const t0 = performance.now();
      await loadIncoming(vm, spec.incoming, options);
      incomingMs = performance.now() - t0;
    }
    vm.timings = {
      qmpReadyMs: qmpReady - startedAt,
      incomingMs,
      totalMs: performance.now() - startedAt,
    };
    return vm;
  } catch (err) {
    throw await failStart(vm, err);
  }
}

async function loadIncoming(vm: QemuVm, incoming: IncomingSpec, options: StartOptions): Promise<void> {
  const qmp = vm.qmp;
  if (options.incomingCapabilities && Object.keys(options.incomingCapabilities).length > 0) {
    await qmp.execute('migrate-set-capabilities', {
      capabilities: Object.entries(options.incomingCapabilities).map(([capability, state]) => ({
        capability,
        state,
      })),
    });
  }
  await qmp.execute('migrate-incoming', { uri: incomingUri(incoming) });
  // From a socket or FIFO the caller streams the snapshot, then calls vm.finishIncoming() itself.
  if (incoming.from !== 'file') return;
  await vm.finishIncoming({ timeoutMs: options.incomingTimeoutMs, cont: !options.stayPaused });
}

/** Turns a start failure into the most useful error, and makes sure QEMU is gone. */
async function failStart(vm: QemuVm, err: unknown): Promise<Error> {
  if (err instanceof MissingToolError) return err;
  // A dying QEMU gets a moment, so that its exit status and stderr can say why.
  if (vm.running) await vm.waitExit(300).catch(() => undefined);
  const died = vm.exitStatus;
  if (vm.running) {
    vm.kill();
    await vm.exited;
  }
  const tail = await vm.stderrTail(10);
  if (died === null) {
    // QEMU was alive: our wait or a QMP command failed. Keep that error, add QEMU's stderr.
    if (err instanceof CloudletError) {
      if (tail) err.details['stderrTail'] = tail;
      return err;
    }
    return new QemuError(String(err), { stderrTail: tail }, { cause: err });
  }
  // QEMU states the cause first and the consequence last ("Not a migration stream" /
  // "load of migration failed"): keep the last two lines, without the program-name prefix.
  const lastLine = tail
    .split('\n')
    .filter((l) => l.trim() && !/warning:/.test(l))
    .slice(-2)
    .map((l) => l.replace(/^[^:\s]*qemu[^:\s]*: /, ''))
    .join('; ');
  const details = { exitCode: died.code, signal: died.signal ?? null, stderrTail: tail };
  if (/Could not set up host forwarding rule/.test(tail)) {
    return new BusyError(`a forwarded host port is already in use: ${lastLine}`, details, { cause: err });
  }
  return new QemuError(`QEMU exited early (${describeExit(died)})${lastLine ? `: ${lastLine}` : ''}`, details, {
    cause: err,
  });
}

function describeExit(e: QemuExit): string {
  return e.signal ? `signal ${e.signal}` : `status ${e.code ?? '?'}`;
}

export async function tailOfFile(path: string, lines: number): Promise<string> {
  try {
    const text = await readFile(path, 'utf8');
    return text.trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

export async function checkInputs(spec: VmSpec): Promise<void> {
  const files: Array<[string, string]> = [];
  if (spec.kernel) files.push(['kernel', spec.kernel]);
  if (spec.initrd) files.push(['initrd', spec.initrd]);
  for (const d of spec.drives ?? []) files.push(['drive', d.file]);
  if (spec.incoming?.from === 'file') files.push(['memory snapshot', spec.incoming.path]);
  for (const d of spec.drives ?? []) if (d.backing?.kind === 'image') files.push(['backing image', d.backing.file]);
  // A shared backend file may be created by QEMU; a private (share=off) one must exist.
  if (spec.memoryBackendFile && !spec.memoryBackendFile.share) {
    files.push(['memory backend file', spec.memoryBackendFile.path]);
  }
  for (const [what, path] of files) {
    try {
      await stat(path);
    } catch {
      throw new NotFoundError(`${what} ${path} does not exist`, { path });
    }
  }
}
