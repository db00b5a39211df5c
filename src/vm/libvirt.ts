/**
 * The libvirt launcher: the VM runs as a transient domain of the system libvirt daemon
 * (qemu:///system), created paused, so `virsh list`, `dominfo`, `destroy` and `console` see
 * and handle it; it is still resumed from its memory, at a cost that follows the overlay.
 * docs/libvirt.md says why it is built this way; in short:
 *
 * - What libvirt models natively it gets in the domain XML: name, machine type, RAM size,
 *   vCPUs, CPU model, ACPI, the direct-boot kernel/initrd/append, the serial console (a pty,
 *   which `virsh console` needs, logged to the instance's serial.log).
 * - What the resume must reproduce byte for byte, and libvirt cannot express, is passed
 *   through `<qemu:commandline>` exactly as the direct launcher writes it (argv.ts): the
 *   drives (the instance's qcow2 opened over the base disk with named nodes, for the backing
 *   swap), the user-mode NIC with its host forwards (its slirp state is in the migration
 *   stream), `-incoming defer`, and a second QMP monitor for us (libvirt keeps its own).
 * - The main RAM must be the base RAM file mapped share=off, with the id `pc.ram` the stream
 *   names; libvirt always emits its own `pc.ram` object and QEMU refuses a second one, so the
 *   domain's emulator is a small wrapper that swaps libvirt's RAM object for ours (given in
 *   the domain's `<qemu:env>`) and execs QEMU. Nothing else is changed.
 * - QEMU runs with our uid/gid and no relabelling (a static DAC seclabel): it reads the same
 *   files as under the direct launcher, and libvirt never chowns the base library.
 *
 * libvirt's seccomp sandbox forbids QEMU to spawn programs, so nothing here uses `exec:`
 * migration URIs: memory comes in on a unix socket (from a file: we stream the file into it).
 */
import { execFile } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { chmod, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, join, resolve } from 'node:path';
import { relayFifoToSocket } from './relay.js';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { VmSpec } from '../spec/vm-spec.js';
import { validateSpec, DEFAULT_CPU } from '../spec/vm-spec.js';
import { onCleanup } from '../util/cleanup.js';
import { BusyError, CloudletError, QemuError, UsageError } from '../util/errors.js';
import { findProgram, findTool, locateProgram } from '../util/programs.js';
import { resolveAccel, type Accel } from './accel.js';
import { deviceArgs, mainRamObject, qemuOptValue, runPaths, type RunPaths } from './argv.js';
import type { Launcher, LauncherChoice, LauncherKind, QemuExit, StartOptions } from './launcher.js';
import { checkInputs } from './process.js';
import { socketDirFor, tailOfFile, VmHandle } from './vm-handle.js';
import { QmpClient } from './qmp.js';

/** The libvirt connection (`$CLOUDLET_LIBVIRT_URI`, default the system daemon). */
export function libvirtUri(): string {
  return process.env['CLOUDLET_LIBVIRT_URI'] || 'qemu:///system';
}

/** Runs virsh against libvirtUri(); rejects with virsh's own last words. */
export async function virsh(args: string[], options: { timeoutMs?: number } = {}): Promise<string> {
  const program = await findTool('virsh');
  return new Promise((resolvePromise, reject) => {
    execFile(
      program,
      ['-q', '-c', libvirtUri(), ...args],
      { timeout: options.timeoutMs ?? 60_000, maxBuffer: 16 << 20 },
      (err, stdout, stderr) => {
        if (err) {
          const said = (stderr || err.message)
            .split('\n')
            .filter((l) => l.trim() && !l.startsWith('Authorization not available'))
            .join('\n')
            .trim();
          reject(new QemuError(`virsh ${args[0] ?? ''} failed: ${said}`, { virsh: args.join(' ') }));
        } else resolvePromise(stdout);
      },
    );
  });
}

let reachable: Promise<boolean> | undefined;

/** Whether a libvirt daemon answers on libvirtUri() (asked once per process). */
export function libvirtReachable(): Promise<boolean> {
  reachable ??= (async () => {
    if (!(await locateProgram('virsh'))) return false;
    return virsh(['uri'], { timeoutMs: 5000 }).then(
      () => true,
      () => false,
    );
  })();
  return reachable;
}

/** auto → libvirt when the daemon answers, else qemu; `$CLOUDLET_LAUNCHER` decides auto. */
export async function resolveLauncherKind(choice: LauncherChoice = 'auto'): Promise<LauncherKind> {
  let c = choice;
  if (c === 'auto') {
    const env = process.env['CLOUDLET_LAUNCHER'];
    if (env === 'qemu' || env === 'libvirt') c = env;
  }
  if (c !== 'auto') {
    if (c === 'libvirt' && !(await libvirtReachable())) {
      throw new UsageError(`no libvirt daemon answers on ${libvirtUri()} (start libvirtd, or use --launcher qemu)`, {
        uri: libvirtUri(),
      });
    }
    return c;
  }
  return (await libvirtReachable()) ? 'libvirt' : 'qemu';
}

export const libvirtLauncher: Launcher = { kind: 'libvirt', start: (spec, options) => startLibvirt(spec, options) };

/** The environment variable that carries our RAM object to the wrapper. */
const RAM_ENV = 'CLOUDLET_MAIN_RAM';

/**
 * The emulator wrapper: replaces libvirt's own main-RAM object (`{"qom-type":"memory-backend-
 * ram","id":"pc.ram",…}`, libvirt 9's JSON form) by $CLOUDLET_MAIN_RAM when that is set, then
 * execs QEMU. libvirt also runs it to probe QEMU's capabilities: then it changes nothing.
 */
export function wrapperScript(qemu: string): string {
  return `#!/bin/bash
# cloudlet-overlay's QEMU wrapper for libvirt domains (written by cloudlet-overlay; see
# docs/libvirt.md): with $${RAM_ENV} set, libvirt's main-RAM object is replaced by it, so that
# guest RAM is the base RAM file mapped copy-on-write. Nothing else changes.
if [[ -n \${${RAM_ENV}:-} ]]; then
  args=()
  for a in "$@"; do
    case $a in
      '{"qom-type":"memory-backend-ram","id":"pc.ram",'* | 'memory-backend-ram,id=pc.ram,'*) a=\$${RAM_ENV} ;;
    esac
    args+=("$a")
  done
  set -- "\${args[@]}"
fi
exec ${shellWord(qemu)} "$@"
`;
}

function shellWord(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/** Where the wrapper lives: root-owned when we are root (libvirt probes it once per path). */
export function wrapperDir(): string {
  if (process.env['CLOUDLET_LIBVIRT_DIR']) return process.env['CLOUDLET_LIBVIRT_DIR'];
  if (process.getuid?.() === 0) return '/var/lib/cloudlet-overlay/libvirt';
  return join(
    process.env['XDG_DATA_HOME'] ?? join(process.env['HOME'] ?? tmpdir(), '.local', 'share'),
    'cloudlet-overlay',
    'libvirt',
  );
}

/** Writes the wrapper (only when its content changed: libvirt re-probes a changed emulator). */
export async function ensureWrapper(qemuBinary: string, dir = wrapperDir()): Promise<string> {
  const qemu = (await findProgram(qemuBinary)).startsWith('/') ? await findProgram(qemuBinary) : resolve(qemuBinary);
  const path = join(dir, 'qemu-wrapper');
  const text = wrapperScript(qemu);
  const current = await readFile(path, 'utf8').catch(() => '');
  if (current === text) return path;
  await mkdir(dir, { recursive: true, mode: 0o755 });
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, text, { mode: 0o755 });
  await chmod(tmp, 0o755);
  await rename(tmp, path);
  return path;
}

function xml(s: string): string {
  return s
    .replaceAll('&', '&amp;')
    .replaceAll('<', '&lt;')
    .replaceAll('>', '&gt;')
    .replaceAll("'", '&apos;')
    .replaceAll('"', '&quot;');
}

export interface DomainContext {
  name: string;
  accel: Accel;
  emulator: string;
  paths: RunPaths;
  uid: number;
  gid: number;
  description?: string;
  /** Raw QEMU options from the host's command line (--qemu-arg), last; never from a spec. */
  hostArgs?: readonly string[];
}

/** The domain XML that runs `spec` (pure; see the module comment for what goes where). */
export function domainXml(spec: VmSpec, ctx: DomainContext): string {
  validateSpec(spec);
  const passthrough = [
    '-chardev',
    `socket,id=cl-qmp,path=${qemuOptValue(ctx.paths.qmpSocket)},server=on,wait=off`,
    '-mon',
    'chardev=cl-qmp,mode=control',
    ...deviceArgs(spec, ctx.paths),
    ...(spec.incoming !== undefined ? ['-incoming', 'defer'] : []),
    ...(ctx.hostArgs ?? []),
  ];
  const ram = mainRamObject(spec);
  const os = [`    <type arch='x86_64' machine='${xml(spec.machine)}'>hvm</type>`];
  if (spec.kernel) os.push(`    <kernel>${xml(spec.kernel)}</kernel>`);
  if (spec.initrd) os.push(`    <initrd>${xml(spec.initrd)}</initrd>`);
  if (spec.append !== undefined) os.push(`    <cmdline>${xml(spec.append)}</cmdline>`);
  const reboot = (spec.noReboot ?? true) ? 'destroy' : 'restart';
  return [
    `<domain type='${ctx.accel === 'kvm' ? 'kvm' : 'qemu'}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>`,
    `  <name>${xml(ctx.name)}</name>`,
    ...(ctx.description ? [`  <description>${xml(ctx.description)}</description>`] : []),
    `  <memory unit='MiB'>${spec.memoryMiB}</memory>`,
    `  <vcpu>${spec.smp ?? 1}</vcpu>`,
    '  <os>',
    ...os,
    '  </os>',
    '  <features><acpi/></features>',
    `  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>${xml(spec.cpu ?? DEFAULT_CPU)}</model></cpu>`,
    "  <clock offset='utc'/>",
    `  <on_poweroff>destroy</on_poweroff><on_reboot>${reboot}</on_reboot><on_crash>destroy</on_crash>`,
    '  <devices>',
    `    <emulator>${xml(ctx.emulator)}</emulator>`,
    "    <controller type='usb' model='none'/>",
    "    <memballoon model='none'/>",
    `    <serial type='pty'><log file='${xml(ctx.paths.serialLog)}' append='on'/><target port='0'/></serial>`,
    "    <console type='pty'><target type='serial' port='0'/></console>",
    '  </devices>',
    `  <seclabel type='static' model='dac' relabel='no'><label>+${ctx.uid}:+${ctx.gid}</label></seclabel>`,
    '  <qemu:commandline>',
    ...passthrough.map((a) => `    <qemu:arg value='${xml(a)}'/>`),
    ...(ram ? [`    <qemu:env name='${RAM_ENV}' value='${xml(ram)}'/>`] : []),
    '  </qemu:commandline>',
    '</domain>',
    '',
  ].join('\n');
}

const live = new Set<LibvirtVm>();
let exitHookInstalled = false;

/** A QEMU that libvirt runs for us: our QMP monitor, its pid, libvirt's domain name. */
export class LibvirtVm extends VmHandle {
  readonly launcher = 'libvirt' as const;
  readonly exited: Promise<QemuExit>;
  private readonly poll: NodeJS.Timeout;
  private readonly unregisterCleanup: () => void;

  constructor(
    readonly domain: string,
    readonly pid: number,
    private readonly pidStart: string | undefined,
    spec: VmSpec,
    argv: string[],
    accel: Accel,
    paths: RunPaths,
    startedAt: number,
    private readonly extraCleanup: () => Promise<void>,
    detached: boolean,
  ) {
    super(spec, argv, accel, paths, startedAt);
    let resolveExit: (e: QemuExit) => void = () => undefined;
    this.exited = new Promise<QemuExit>((r) => (resolveExit = r));
    this.poll = setInterval(() => {
      void processStart(this.pid).then((s) => {
        if (this.exitInfo || (s !== undefined && s === this.pidStart)) return;
        this.exitInfo = { code: null, signal: null };
        clearInterval(this.poll);
        live.delete(this);
        this.unregisterCleanup();
        this.abort.abort(new QemuError(`QEMU (pid ${this.pid}, libvirt domain ${this.domain}) exited`, { domain }));
        this.qmpClient?.destroy();
        void this.extraCleanup().finally(() => resolveExit({ code: null, signal: null }));
      });
    }, 100);
    if (detached) {
      this.poll.unref();
      this.unregisterCleanup = () => undefined;
    } else {
      live.add(this);
      installExitHook();
      this.unregisterCleanup = onCleanup(() => this.stop({ graceMs: 2000 }).then(() => undefined));
    }
  }

  /** Whoever waits for the exit keeps Node alive (a detached VM's poll does not, else). */
  override waitExit(timeoutMs?: number): Promise<QemuExit> {
    this.holdOpen();
    return super.waitExit(timeoutMs);
  }

  protected holdOpen(): void {
    this.poll.ref();
  }

  protected async quitWithoutQmp(graceMs: number): Promise<void> {
    await virsh(['destroy', this.domain], { timeoutMs: graceMs }).catch(() => undefined);
  }

  /** SIGKILL now; libvirt sees its monitor close and drops the transient domain. */
  kill(): void {
    this.poll.ref();
    if (this.running) killPid(this.pid, this.pidStart);
  }
}

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // Not our child: nothing kills it when we die, unless we do (a failing test, an uncaught error).
  process.once('exit', () => {
    for (const vm of live) {
      try {
        process.kill(vm.pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  });
}

function killPid(pid: number, start: string | undefined): void {
  void processStart(pid).then((s) => {
    if (s !== undefined && s === start) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
  });
}

/** Start time of a process (field 22 of /proc/<pid>/stat), undefined when gone or a zombie. */
async function processStart(pid: number): Promise<string | undefined> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (fields[0] === 'Z') return undefined;
    return fields[19];
  } catch {
    return undefined;
  }
}

/** libvirt's pid file of a running domain of the system daemon (or the process found by name). */
async function domainPid(name: string): Promise<number> {
  for (const f of [`/run/libvirt/qemu/${name}.pid`, `/var/run/libvirt/qemu/${name}.pid`]) {
    const text = await readFile(f, 'utf8').catch(() => '');
    if (/^\d+\s*$/.test(text)) return Number(text.trim());
  }
  const { readdir } = await import('node:fs/promises');
  for (const p of await readdir('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    const cmd = await readFile(`/proc/${p}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(`guest=${name},`) || cmd.includes(`guest=${name}\0`)) return Number(p);
  }
  throw new QemuError(`libvirt started domain ${name} but its QEMU process is not to be found`, { domain: name });
}

/** Connects once QEMU created the socket (it does so before libvirt returns, but be patient). */
async function connectQmp(path: string, timeoutMs: number): Promise<QmpClient> {
  return QmpClient.connect(path, { timeoutMs });
}

function connectUnix(path: string): Promise<Socket> {
  return new Promise((resolvePromise, reject) => {
    const s = connect(path);
    s.once('error', reject);
    s.once('connect', () => {
      s.off('error', reject);
      resolvePromise(s);
    });
  });
}

/** Starts `spec` as a transient libvirt domain; see RunningVm and the module comment. */
export async function startLibvirt(spec: VmSpec, options: StartOptions): Promise<LibvirtVm> {
  const qemuBinary = options.qemuBinary ?? 'qemu-system-x86_64';
  await findProgram(qemuBinary);
  await findTool('virsh');
  await checkInputs(spec);
  const runDir = resolve(options.runDir);
  await mkdir(runDir, { recursive: true });
  const accel = await resolveAccel(options.accel ?? 'auto', { qemuBinary });
  const name = options.domainName ?? `cloudlet-${basename(runDir)}`;
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(name)) throw new UsageError(`invalid libvirt domain name ${name}`);

  // Sockets in a short private directory when the run directory is too deep for sun_path.
  const { socketDir, cleanup: extraCleanup } = await socketDirFor(runDir, 'memory.sock', 'cl-');
  const base = runPaths(runDir, socketDir);
  const paths: RunPaths = { ...base, serialSocket: '', stderrLog: `/var/log/libvirt/qemu/${name}.log` };
  await rm(paths.qmpSocket, { force: true });
  await rm(paths.agentSocket, { force: true });
  const emulator = await ensureWrapper(qemuBinary);
  const xmlText = domainXml(spec, {
    name,
    accel,
    emulator,
    paths,
    uid: process.getuid?.() ?? 0,
    gid: process.getgid?.() ?? 0,
    description: `cloudlet-overlay instance (run directory ${runDir})`,
    hostArgs: options.hostArgs,
  });
  const xmlPath = join(runDir, 'domain.xml');
  await writeFile(xmlPath, xmlText);

  const startedAt = performance.now();
  try {
    await virsh(['create', xmlPath, ...(spec.incoming !== undefined ? ['--paused'] : [])], {
      timeoutMs: options.startTimeoutMs ?? 60_000,
    });
  } catch (err) {
    await extraCleanup();
    throw await startError(err, paths);
  }
  const pid = await domainPid(name);
  // The console is libvirt's pty (`virsh console` needs one): our console API opens it too.
  const liveXml = await virsh(['dumpxml', name]).catch(() => '');
  paths.serialSocket = /<serial type='pty'>\s*<source path='([^']+)'/.exec(liveXml)?.[1] ?? '';
  const vm = new LibvirtVm(
    name,
    pid,
    await processStart(pid),
    spec,
    await readFile(`/proc/${pid}/cmdline`, 'utf8').then(
      (c) => c.split('\0').filter(Boolean),
      () => [],
    ),
    accel,
    paths,
    startedAt,
    extraCleanup,
    options.detach ?? false,
  );
  try {
    const qmp = await connectQmp(paths.qmpSocket, options.startTimeoutMs ?? 15_000);
    vm.attachQmp(qmp);
    const qmpReady = performance.now();
    let incomingMs = 0;
    const incoming = spec.incoming;
    if (incoming) {
      if (options.incomingCapabilities && Object.keys(options.incomingCapabilities).length > 0) {
        await qmp.execute('migrate-set-capabilities', {
          capabilities: Object.entries(options.incomingCapabilities).map(([capability, state]) => ({
            capability,
            state,
          })),
        });
      }
      if (incoming.from === 'unix') {
        await qmp.execute('migrate-incoming', { uri: `unix:${incoming.path}` });
      } else if (incoming.from === 'fifo') {
        // The caller writes the stream into the FIFO and finishes the load itself (no exec:).
        const sock = join(socketDir, 'memory.sock');
        await rm(sock, { force: true });
        await qmp.execute('migrate-incoming', { uri: `unix:${sock}` });
        relayFifoToSocket(incoming.path, sock).catch(() => undefined); // QEMU reports a short stream
      } else {
        // No exec: under libvirt's sandbox: stream the file into a socket QEMU listens on.
        const t0 = performance.now();
        const sock = join(socketDir, 'memory.sock');
        await rm(sock, { force: true });
        await qmp.execute('migrate-incoming', { uri: `unix:${sock}` });
        const s = await connectUnix(sock);
        await pipeline(createReadStream(incoming.path, { highWaterMark: 1 << 20 }), s);
        await vm.finishIncoming({ timeoutMs: options.incomingTimeoutMs, cont: !options.stayPaused });
        incomingMs = performance.now() - t0;
      }
    }
    vm.timings = { qmpReadyMs: qmpReady - startedAt, incomingMs, totalMs: performance.now() - startedAt };
    return vm;
  } catch (err) {
    const tail = await vm.stderrTail(10);
    await virsh(['destroy', name], { timeoutMs: 10_000 }).catch(() => vm.kill());
    await vm.exited;
    if (err instanceof CloudletError) {
      if (tail && !err.details['stderrTail']) err.details['stderrTail'] = tail;
      throw err;
    }
    throw new QemuError(String(err), { stderrTail: tail, domain: name }, { cause: err });
  }
}

/** A failed `virsh create` as the most useful error: a taken port is BusyError, as for QEMU. */
async function startError(err: unknown, paths: RunPaths): Promise<Error> {
  const tail = await tailOfFile(paths.stderrLog, 10);
  const text = `${err instanceof Error ? err.message : String(err)}\n${tail}`;
  if (/Could not set up host forwarding rule/.test(text)) {
    return new BusyError(`a forwarded host port is already in use (libvirt: ${firstLine(err)})`, { stderrTail: tail });
  }
  if (err instanceof CloudletError) {
    if (tail) err.details['stderrTail'] = tail;
    return err;
  }
  return new QemuError(text);
}

function firstLine(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).split('\n')[0] ?? '';
}

/** Waits until libvirt no longer lists `name` (after destroy or QEMU's exit). */
export async function waitDomainGone(name: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const list = await virsh(['list', '--name']).catch(() => '');
    if (!list.split('\n').some((l) => l.trim() === name)) return;
    await sleep(100);
  }
}
