/**
 * What both launchers' running VMs share (process.ts: our child; libvirt.ts: a domain's QEMU):
 * the exit state, our QMP session, stop = QMP `quit` then a kill, waits that end when QEMU
 * does, the incoming load. A subclass says how it sees QEMU exit, how it kills it, and how it
 * asks it to quit without QMP.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { VmSpec } from '../spec/vm-spec.js';
import { QemuError, TimeoutError } from '../util/errors.js';
import type { Accel } from './accel.js';
import type { RunPaths } from './argv.js';
import type { LauncherKind, QemuExit, RunningVm, StartTimings } from './launcher.js';
import type { QmpClient } from './qmp.js';

export abstract class VmHandle implements RunningVm {
  abstract readonly launcher: LauncherKind;
  abstract readonly pid: number;
  abstract readonly exited: Promise<QemuExit>;
  /** Aborted (reason: QemuError) when QEMU exits; pass it to waits that need the VM. */
  readonly exitSignal: AbortSignal;
  timings: StartTimings = { qmpReadyMs: 0, incomingMs: 0, totalMs: 0 };
  protected exitInfo: QemuExit | null = null;
  protected qmpClient: QmpClient | null = null;
  protected readonly abort = new AbortController();

  constructor(
    readonly spec: VmSpec,
    readonly argv: string[],
    readonly accel: Accel,
    readonly paths: RunPaths,
    /** performance.now() at spawn. */
    readonly startedAt: number,
  ) {
    this.exitSignal = this.abort.signal;
  }

  /** SIGKILL now. */
  abstract kill(): void;
  /** Without a QMP session: ask QEMU to end some other way (a signal, libvirt). */
  protected abstract quitWithoutQmp(graceMs: number): Promise<void>;
  /** A detached VM too is waited for once it is stopped: keep Node alive until it exits. */
  protected abstract holdOpen(): void;

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

  /** @internal set by the launcher once QMP is negotiated */
  attachQmp(client: QmpClient): void {
    this.qmpClient = client;
  }

  /** QMP `quit`, then a kill if it is still there after graceMs. Safe to call twice. */
  async stop(options: { graceMs?: number } = {}): Promise<QemuExit> {
    if (!this.running) return this.exited;
    this.holdOpen();
    const graceMs = options.graceMs ?? 5000;
    if (this.qmpClient && !this.qmpClient.closed) {
      await this.qmpClient.execute('quit', undefined, { timeoutMs: graceMs }).catch(() => undefined);
    } else {
      await this.quitWithoutQmp(graceMs);
    }
    try {
      return await this.waitExit(graceMs);
    } catch {
      this.kill();
      return this.exited;
    }
  }

  /** The last `lines` lines of QEMU's own messages. */
  async stderrTail(lines = 20): Promise<string> {
    return tailOfFile(this.paths.stderrLog, lines);
  }

  /**
   * Waits until the incoming snapshot is loaded (QEMU leaves `inmigrate`), checks that the load
   * succeeded, and continues the VM when asked. QemuError when QEMU refused the stream.
   */
  finishIncoming(options: { timeoutMs?: number; cont: boolean }): Promise<void> {
    return finishIncoming(this, options);
  }

  /** Runs the (paused) VM on our monitor (libvirt sees QEMU's RESUME event too). */
  async cont(): Promise<void> {
    await this.qmp.execute('cont');
  }

  /** query-status → e.g. 'running', 'paused', 'inmigrate', 'postmigrate'. */
  async status(): Promise<string> {
    const s = await this.qmp.execute<{ status: string }>('query-status');
    return s.status;
  }

  /** Waits for QEMU to exit; TimeoutError after timeoutMs if given. */
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

/** The last `lines` lines of a text file; empty when it cannot be read. */
export async function tailOfFile(path: string, lines: number): Promise<string> {
  try {
    const text = await readFile(path, 'utf8');
    return text.trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

/**
 * Where a VM's unix sockets go: the run directory, or — when `probe` (the longest socket name)
 * would not fit sun_path's 107 bytes there — a short private directory, removed by `cleanup`.
 */
export async function socketDirFor(
  runDir: string,
  probe: string,
  prefix: string,
): Promise<{ socketDir: string; cleanup: () => Promise<void> }> {
  if (Buffer.byteLength(join(runDir, probe)) <= 100) return { socketDir: runDir, cleanup: async () => undefined };
  const socketDir = await mkdtemp(join(tmpdir(), prefix));
  return { socketDir, cleanup: () => rm(socketDir, { recursive: true, force: true }) };
}
