/**
 * Running QEMU: startQemu() spawns it for a VmSpec in a run directory (argv.ts), negotiates QMP,
 * loads an incoming memory snapshot and continues the VM; QemuVm is the running process (exit,
 * stop, kill, stderr tail). Start failures become the most useful error (missing input, port in
 * use, QEMU's own last words).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, open, rm, stat, symlink } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { onCleanup } from '../util/cleanup.js';
import { BusyError, CloudletError, MissingToolError, NotFoundError, QemuError } from '../util/errors.js';
import { findProgram } from '../util/programs.js';
import type { IncomingSpec, VmSpec } from '../spec/vm-spec.js';
import { resolveAccel, type Accel } from './accel.js';
import { buildQemuArgs, incomingUri, runPaths, type RunPaths } from './argv.js';
import { QmpClient } from './qmp.js';
import type { Launcher, QemuExit, StartOptions } from './launcher.js';
import { socketDirFor, VmHandle } from './vm-handle.js';

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
export class QemuVm extends VmHandle {
  readonly launcher = 'qemu' as const;
  readonly exited: Promise<QemuExit>;
  private readonly unregisterCleanup: () => void;

  constructor(
    private readonly child: ChildProcess,
    spec: VmSpec,
    argv: string[],
    accel: Accel,
    paths: RunPaths,
    startedAt: number,
    private readonly extraCleanup: () => Promise<void>,
    detached = false,
  ) {
    super(spec, argv, accel, paths, startedAt);
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

  protected holdOpen(): void {
    this.child.ref(); // a detached QEMU too: its exit is what we wait for
  }

  protected async quitWithoutQmp(): Promise<void> {
    this.child.kill('SIGTERM');
  }

  /** SIGKILL now. */
  kill(): void {
    // A detached (unref'd) QEMU must still be seen to exit by whoever awaits `exited`.
    this.child.ref();
    if (this.running) this.child.kill('SIGKILL');
  }
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
  const { socketDir, cleanup: extraCleanup } = await socketDirFor(runDir, 'serial.sock', 'cq-');
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
