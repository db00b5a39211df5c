/**
 * Launching QEMU. A VmSpec says what the guest sees (pinned machine type, RAM, CPU, devices);
 * buildQemuArgs() turns it into argv (pure, unit-tested); startQemu() runs it with everything
 * an operator needs in one run directory: the QMP socket, the serial console as a unix socket
 * that is also logged to a file, and QEMU's stderr. A spec with `incoming` resumes from a
 * migration stream (memory snapshot) instead of booting.
 *
 * Why these choices: a snapshot only resumes on an identical virtual machine, so the spec pins
 * everything that changes guest-visible state (machine version, CPU model, NIC option ROM) and
 * keeps the host-only parts (port forwards, file paths, sockets) separate and free to change.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { constants } from 'node:fs';
import { access, mkdir, mkdtemp, open, readFile, rm, stat, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { onCleanup } from '../util/cleanup.js';
import {
  BusyError,
  CloudletError,
  MissingToolError,
  NotFoundError,
  QemuError,
  TimeoutError,
  UsageError,
} from '../util/errors.js';
import { resolveAccel, type Accel, type AccelChoice } from './accel.js';
import { QmpClient } from './qmp.js';

export interface DriveSpec {
  file: string;
  format: 'raw' | 'qcow2';
  /** Bus as in QEMU's -drive if=; the guest sees a different device for each. */
  if: 'virtio' | 'ide' | 'none';
  id?: string;
  readOnly?: boolean;
  /** QEMU's cache mode; default QEMU's own (writeback). */
  cache?: 'writeback' | 'none' | 'writethrough' | 'directsync' | 'unsafe';
}

/** A host-side TCP forward of user-mode networking; not guest state, may differ on resume. */
export interface PortForward {
  /** Default 127.0.0.1. */
  hostAddr?: string;
  hostPort: number;
  guestPort: number;
}

/** One user-mode NIC. The model and its option ROM are guest-visible: keep them on resume. */
export interface NetworkSpec {
  /** Default virtio-net-pci. */
  model?: string;
  /** NIC option ROM; '' (the default) means none: nothing to match on resume, faster boot. */
  romfile?: string;
  mac?: string;
  forwards: PortForward[];
}

/** Guest RAM backed by a file (memory-backend-file, id pc.ram). */
export interface MemoryBackendFile {
  path: string;
  /** share=on writes through to the file; off maps it private copy-on-write. */
  share: boolean;
}

export interface VmSpec {
  /** Pinned machine type, e.g. 'pc-q35-7.2' (never a bare alias like 'q35'). */
  machine: string;
  memoryMiB: number;
  /** CPU model; default 'qemu64' (the same under TCG and KVM). */
  cpu?: string;
  /** vCPUs; default 1. */
  smp?: number;
  kernel?: string;
  initrd?: string;
  append?: string;
  drives?: DriveSpec[];
  network?: NetworkSpec;
  memoryBackendFile?: MemoryBackendFile;
  /** Resume from this migration stream (a memory snapshot file) instead of booting. */
  incoming?: string;
  /** Exit instead of rebooting (a guest panic then ends QEMU, visibly). Default true. */
  noReboot?: boolean;
  name?: string;
  extraArgs?: string[];
}

/** Files of one running VM inside its run directory. */
export interface RunPaths {
  runDir: string;
  qmpSocket: string;
  serialSocket: string;
  serialLog: string;
  stderrLog: string;
}

export interface ArgsContext {
  accel: Accel;
  paths: RunPaths;
}

export const DEFAULT_CPU = 'qemu64';

/** Paths of the run files; sockets may live elsewhere when runDir is too long (see startQemu). */
export function runPaths(runDir: string, socketDir: string = runDir): RunPaths {
  return {
    runDir,
    qmpSocket: join(socketDir, 'qmp.sock'),
    serialSocket: join(socketDir, 'serial.sock'),
    serialLog: join(runDir, 'serial.log'),
    stderrLog: join(runDir, 'qemu.stderr'),
  };
}

/** QEMU's option syntax: a comma inside a value is written as two commas. */
export function qemuOptValue(value: string): string {
  return value.replaceAll(',', ',,');
}

/** Quotes for /bin/sh, as QEMU's exec: migration URIs run through it. */
export function shellQuote(value: string): string {
  return `'${value.replaceAll("'", `'\\''`)}'`;
}

/** Checks a spec before QEMU sees it; throws UsageError with the offending field. */
export function validateSpec(spec: VmSpec): void {
  if (!/^[a-z0-9][a-z0-9.-]*-\d+\.\d+$/.test(spec.machine)) {
    throw new UsageError(`machine type '${spec.machine}' must be a pinned version like pc-q35-7.2`, {
      field: 'machine',
    });
  }
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 16) {
    throw new UsageError(`memoryMiB must be an integer ≥ 16, got ${spec.memoryMiB}`, { field: 'memoryMiB' });
  }
  if (spec.smp !== undefined && (!Number.isInteger(spec.smp) || spec.smp < 1)) {
    throw new UsageError(`smp must be a positive integer, got ${spec.smp}`, { field: 'smp' });
  }
  if ((spec.initrd !== undefined || spec.append !== undefined) && spec.kernel === undefined) {
    throw new UsageError('initrd/append need a kernel', { field: 'kernel' });
  }
  for (const f of spec.network?.forwards ?? []) {
    for (const port of [f.hostPort, f.guestPort]) {
      if (!Number.isInteger(port) || port < 1 || port > 65535) {
        throw new UsageError(`invalid port ${port} in a port forward`, { field: 'network.forwards' });
      }
    }
  }
}

/** The argv (without the program name) that runs `spec`. Pure: same input, same output. */
export function buildQemuArgs(spec: VmSpec, ctx: ArgsContext): string[] {
  validateSpec(spec);
  const args: string[] = [];
  const machineOpts = [spec.machine];
  if (spec.memoryBackendFile) machineOpts.push('memory-backend=pc.ram');
  args.push('-machine', machineOpts.join(','));
  args.push('-accel', ctx.accel);
  args.push('-m', String(spec.memoryMiB));
  if (spec.memoryBackendFile) {
    const m = spec.memoryBackendFile;
    args.push(
      '-object',
      `memory-backend-file,id=pc.ram,size=${spec.memoryMiB}M,mem-path=${qemuOptValue(m.path)},share=${m.share ? 'on' : 'off'}`,
    );
  }
  args.push('-cpu', spec.cpu ?? DEFAULT_CPU);
  args.push('-smp', String(spec.smp ?? 1));
  args.push('-nodefaults', '-no-user-config', '-display', 'none');
  if (spec.noReboot ?? true) args.push('-no-reboot');
  if (spec.name) args.push('-name', qemuOptValue(spec.name));
  if (spec.kernel) args.push('-kernel', spec.kernel);
  if (spec.initrd) args.push('-initrd', spec.initrd);
  if (spec.append !== undefined) args.push('-append', spec.append);

  const p = ctx.paths;
  args.push(
    '-chardev',
    `socket,id=qmp,path=${qemuOptValue(p.qmpSocket)},server=on,wait=off`,
    '-mon',
    'chardev=qmp,mode=control',
  );
  args.push(
    '-chardev',
    `socket,id=serial0,path=${qemuOptValue(p.serialSocket)},server=on,wait=off,logfile=${qemuOptValue(p.serialLog)},logappend=on`,
    '-serial',
    'chardev:serial0',
  );

  (spec.drives ?? []).forEach((d, i) => {
    const opts = [`file=${qemuOptValue(d.file)}`, `format=${d.format}`, `if=${d.if}`];
    opts.push(`id=${d.id ?? `drive${i}`}`);
    if (d.readOnly) opts.push('readonly=on');
    if (d.cache) opts.push(`cache=${d.cache}`);
    args.push('-drive', opts.join(','));
  });

  if (spec.network) {
    const n = spec.network;
    const netdev = ['user', 'id=n0'];
    for (const f of n.forwards) {
      netdev.push(`hostfwd=tcp:${f.hostAddr ?? '127.0.0.1'}:${f.hostPort}-:${f.guestPort}`);
    }
    args.push('-netdev', netdev.join(','));
    const dev = [n.model ?? 'virtio-net-pci', 'netdev=n0', `romfile=${qemuOptValue(n.romfile ?? '')}`];
    if (n.mac) dev.push(`mac=${n.mac}`);
    args.push('-device', dev.join(','));
  }

  if (spec.incoming !== undefined) args.push('-incoming', 'defer');
  args.push(...(spec.extraArgs ?? []));
  return args;
}

/**
 * The spec to resume a snapshot of `spec` elsewhere: the same guest-visible machine, with new
 * host-side parts (drive files in order, port forwards) and the memory snapshot to load.
 */
export function resumeSpec(
  spec: VmSpec,
  changes: { incoming: string; driveFiles?: string[]; forwards?: PortForward[] },
): VmSpec {
  const drives = spec.drives?.map((d, i) => ({ ...d, file: changes.driveFiles?.[i] ?? d.file }));
  if (changes.driveFiles && changes.driveFiles.length !== (spec.drives?.length ?? 0)) {
    throw new UsageError(
      `the snapshot has ${spec.drives?.length ?? 0} drive(s) but ${changes.driveFiles.length} file(s) were given`,
    );
  }
  const out: VmSpec = { ...spec, incoming: changes.incoming };
  if (drives) out.drives = drives;
  if (spec.network) out.network = { ...spec.network, forwards: changes.forwards ?? spec.network.forwards };
  return out;
}

/** The migration URI that streams `path` into an incoming QEMU. */
export function incomingUri(path: string): string {
  return `exec:cat ${shellQuote(path)}`;
}

export interface StartOptions {
  /** Directory for sockets and logs (created). */
  runDir: string;
  accel?: AccelChoice;
  qemuBinary?: string;
  /** Spawn → QMP ready. Default 15 s. */
  startTimeoutMs?: number;
  /** Loading a memory snapshot. Default 120 s. */
  incomingTimeoutMs?: number;
  /** After an incoming migration, stay paused instead of `cont`. */
  stayPaused?: boolean;
  /** migrate-set-capabilities on the destination before loading (e.g. x-ignore-shared). */
  incomingCapabilities?: Record<string, boolean>;
  /**
   * Let QEMU outlive this process (own process group, not killed at exit or by the cleanup
   * registry). Close `vm.qmp` when done so Node can exit.
   */
  detach?: boolean;
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface StartTimings {
  /** process spawn → QMP negotiated */
  qmpReadyMs: number;
  /** migrate-incoming → VM left inmigrate (0 without incoming) */
  incomingMs: number;
  /** spawn → running (or paused when asked) */
  totalMs: number;
}

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
export class QemuVm {
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
    if (this.running) this.child.kill('SIGKILL');
  }

  /** The last `lines` lines of QEMU's stderr. */
  async stderrTail(lines = 20): Promise<string> {
    return tailOfFile(this.paths.stderrLog, lines);
  }

  /** query-status → e.g. 'running', 'paused', 'inmigrate', 'postmigrate'. */
  async status(): Promise<string> {
    const s = await this.qmp.execute<{ status: string }>('query-status');
    return s.status;
  }
}

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
  for (const f of [paths.qmpSocket, paths.serialSocket]) await rm(f, { force: true });
  if (socketDir !== runDir) {
    for (const name of ['qmp.sock', 'serial.sock']) {
      await rm(join(runDir, name), { force: true });
      await symlink(join(socketDir, name), join(runDir, name)).catch(() => undefined);
    }
  }

  const args = buildQemuArgs(spec, { accel, paths });
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

async function loadIncoming(vm: QemuVm, path: string, options: StartOptions): Promise<void> {
  const qmp = vm.qmp;
  if (options.incomingCapabilities && Object.keys(options.incomingCapabilities).length > 0) {
    await qmp.execute('migrate-set-capabilities', {
      capabilities: Object.entries(options.incomingCapabilities).map(([capability, state]) => ({
        capability,
        state,
      })),
    });
  }
  await qmp.execute('migrate-incoming', { uri: incomingUri(path) });
  const timeoutMs = options.incomingTimeoutMs ?? 120_000;
  const deadline = Date.now() + timeoutMs;
  let status = 'inmigrate';
  while (status === 'inmigrate') {
    vm.exitSignal.throwIfAborted();
    if (Date.now() > deadline) {
      throw new TimeoutError(`loading the memory snapshot ${path} took over ${timeoutMs} ms`, { path });
    }
    await sleep(10);
    status = await vm.status();
  }
  const mig = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
  if (mig.status === 'failed' || mig.status === 'cancelled') {
    throw new QemuError(`QEMU could not load the memory snapshot ${path}: ${mig['error-desc'] ?? mig.status}`, {
      path,
      migrationStatus: mig.status,
    });
  }
  if (!options.stayPaused && status !== 'running') await qmp.execute('cont');
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

async function tailOfFile(path: string, lines: number): Promise<string> {
  try {
    const text = await readFile(path, 'utf8');
    return text.trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

/** Throws MissingToolError unless `program` is runnable (absolute/relative path or on PATH). */
export async function findProgram(program: string): Promise<string> {
  const candidates = program.includes('/')
    ? [program]
    : (process.env['PATH'] ?? '/usr/bin:/bin').split(delimiter).map((d) => join(d, program));
  for (const c of candidates) {
    try {
      await access(c, constants.X_OK);
      return c;
    } catch {
      // next
    }
  }
  throw new MissingToolError(
    `${program} not found on PATH; install QEMU (Debian: apt-get install qemu-system-x86 qemu-utils)`,
    { tool: program },
  );
}

async function checkInputs(spec: VmSpec): Promise<void> {
  const files: Array<[string, string]> = [];
  if (spec.kernel) files.push(['kernel', spec.kernel]);
  if (spec.initrd) files.push(['initrd', spec.initrd]);
  for (const d of spec.drives ?? []) files.push(['drive', d.file]);
  if (spec.incoming !== undefined) files.push(['memory snapshot', spec.incoming]);
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
