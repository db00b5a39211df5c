/**
 * Launchers: who runs a VM's QEMU. `qemu` spawns it directly (process.ts); `libvirt` has the
 * system libvirt daemon run it as a transient domain (libvirt.ts), so that `virsh list`,
 * `dominfo`, `destroy` and `console` handle it like any other. Both start the same QEMU for a
 * VmSpec — same machine, devices, RAM file mapped copy-on-write — paused and waiting for its
 * memory (`-incoming defer`) with the disk opened over the base; what the caller then does is
 * the same for both: stream the memory in, `finishIncoming`, `swapBacking`, `cont` (or `kill`).
 * The common part is one interface, RunningVm; synthesize only ever sees that.
 */
import type { VmSpec } from '../spec/vm-spec.js';
import type { Accel, AccelChoice } from './accel.js';
import type { RunPaths } from './argv.js';
import type { QmpClient } from './qmp.js';

export type LauncherKind = 'qemu' | 'libvirt';
/** `auto`: libvirt when its daemon answers (qemu:///system), else qemu; `$CLOUDLET_LAUNCHER` overrides. */
export type LauncherChoice = LauncherKind | 'auto';

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
   * Let QEMU outlive this process (not killed at exit or by the cleanup registry). Close
   * `vm.qmp` when done so Node can exit.
   */
  detach?: boolean;
  /** libvirt: the domain name (default cloudlet-<basename of runDir>). */
  domainName?: string;
  /** Raw QEMU options given by the operator on the host (--qemu-arg), appended last. */
  hostArgs?: readonly string[];
}

/** A started QEMU, whoever runs it. */
export interface RunningVm {
  readonly launcher: LauncherKind;
  /** The libvirt domain's name (libvirt only). */
  readonly domain?: string;
  readonly spec: VmSpec;
  /** QEMU's command line, program first. */
  readonly argv: string[];
  readonly accel: Accel;
  readonly paths: RunPaths;
  /** performance.now() at spawn. */
  readonly startedAt: number;
  timings: StartTimings;
  readonly pid: number;
  readonly running: boolean;
  readonly exitStatus: QemuExit | null;
  readonly exited: Promise<QemuExit>;
  /** Aborted (reason: QemuError) when QEMU exits; pass it to waits that need the VM. */
  readonly exitSignal: AbortSignal;
  /** Our QMP session (with libvirt: a second monitor beside libvirt's own). */
  readonly qmp: QmpClient;
  waitExit(timeoutMs?: number): Promise<QemuExit>;
  /** Waits until the incoming memory is loaded and checks it; `cont` runs the VM too. */
  finishIncoming(options: { timeoutMs?: number; cont: boolean }): Promise<void>;
  /** Runs the (paused) VM. */
  cont(): Promise<void>;
  /** QMP `quit`, then a kill after graceMs. */
  stop(options?: { graceMs?: number }): Promise<QemuExit>;
  /** SIGKILL now. */
  kill(): void;
  /** The last lines of QEMU's own messages. */
  stderrTail(lines?: number): Promise<string>;
  status(): Promise<string>;
}

export interface Launcher {
  readonly kind: LauncherKind;
  /**
   * Starts QEMU for `spec`: resolves once our QMP session is up and, for a spec whose incoming
   * is a file, the memory is loaded (and the VM continued unless stayPaused). An incoming unix
   * socket is left to the caller: stream into it, then finishIncoming().
   */
  start(spec: VmSpec, options: StartOptions): Promise<RunningVm>;
}
