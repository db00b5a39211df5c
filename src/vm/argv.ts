/**
 * A VmSpec as QEMU's argv (pure, unit-tested), with everything an operator needs in one run
 * directory: the QMP socket, the serial console as a unix socket that is also logged to a file,
 * and QEMU's stderr. A spec with `incoming` waits for a migration stream (`-incoming defer`).
 */
import { join } from 'node:path';
import { DEFAULT_CPU, validateSpec, type IncomingSpec, type VmSpec } from '../spec/vm-spec.js';
import type { Accel } from './accel.js';

/** Files of one running VM inside its run directory. */
export interface RunPaths {
  runDir: string;
  qmpSocket: string;
  serialSocket: string;
  serialLog: string;
  stderrLog: string;
  /** The guest agent channel's host end (used when the spec has guestAgent). */
  agentSocket: string;
}

export interface ArgsContext {
  accel: Accel;
  paths: RunPaths;
  /** Raw QEMU options from the host's command line (--qemu-arg), last; never from a spec. */
  hostArgs?: readonly string[];
}

/** Paths of the run files; sockets may live elsewhere when runDir is too long (see startQemu). */
export function runPaths(runDir: string, socketDir: string = runDir): RunPaths {
  return {
    runDir,
    qmpSocket: join(socketDir, 'qmp.sock'),
    serialSocket: join(socketDir, 'serial.sock'),
    serialLog: join(runDir, 'serial.log'),
    stderrLog: join(runDir, 'qemu.stderr'),
    agentSocket: join(socketDir, 'agent.sock'),
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

/** The argv (without the program name) that runs `spec`. Pure: same input, same output. */
export function buildQemuArgs(spec: VmSpec, ctx: ArgsContext): string[] {
  validateSpec(spec);
  const args: string[] = [];
  const machineOpts = [spec.machine];
  if (spec.memoryBackendFile) machineOpts.push('memory-backend=pc.ram');
  args.push('-machine', machineOpts.join(','));
  args.push('-accel', ctx.accel);
  args.push('-m', String(spec.memoryMiB));
  const ram = mainRamObject(spec);
  if (ram) args.push('-object', ram);
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
    `socket,id=serial0,path=${qemuOptValue(p.serialSocket)},server=on,wait=off,` +
      `logfile=${qemuOptValue(p.serialLog)},logappend=on`,
    '-serial',
    'chardev:serial0',
  );

  args.push(...deviceArgs(spec, p));

  // -S: after loading, the VM stays paused until it is told to run (cont) — for a synthesized
  // VM only once everything is proven.
  if (spec.incoming !== undefined) args.push('-S', '-incoming', 'defer');
  args.push(...(ctx.hostArgs ?? []));
  return args;
}

/** The main RAM object when RAM is backed by a file (id pc.ram, as the migration stream names it). */
export function mainRamObject(spec: VmSpec): string | undefined {
  const m = spec.memoryBackendFile;
  if (!m) return undefined;
  return (
    `memory-backend-file,id=pc.ram,size=${spec.memoryMiB}M,` +
    `mem-path=${qemuOptValue(m.path)},share=${m.share ? 'on' : 'off'}`
  );
}

/** The name of the guest agent's virtio-serial port (what qemu-ga opens in the guest). */
export const AGENT_PORT_NAME = 'org.qemu.guest_agent.0';

/**
 * The guest's drives, NIC and guest agent channel, in the order that gives them their PCI
 * slots: what a resume must reproduce exactly (the libvirt launcher passes these through
 * unchanged). `paths` gives the agent channel's socket.
 */
export function deviceArgs(spec: VmSpec, paths: Pick<RunPaths, 'agentSocket'>): string[] {
  const args: string[] = [];
  (spec.drives ?? []).forEach((d, i) => {
    const opts = [`file=${qemuOptValue(d.file)}`, `format=${d.format}`, `if=${d.if}`];
    opts.push(`id=${d.id ?? `drive${i}`}`);
    if (d.readOnly) opts.push('readonly=on');
    if (d.cache) opts.push(`cache=${d.cache}`);
    if (d.discard) opts.push(`discard=${d.discard}`);
    if (d.detectZeroes) opts.push(`detect-zeroes=${d.detectZeroes}`);
    if (d.backing) {
      // Named nodes, so that a QMP blockdev-reopen can later put another backing under the drive.
      const n = driveNodes(i);
      const b = d.backing;
      if (b.kind === 'image') {
        args.push('-blockdev', `driver=file,filename=${qemuOptValue(b.file)},node-name=${n.backing}-file,read-only=on`);
        args.push('-blockdev', `driver=${b.format},file=${n.backing}-file,node-name=${n.backing},read-only=on`);
      } else {
        // An NBD client that waits for a dropped server instead of failing reads at once.
        args.push(
          '-blockdev',
          `driver=nbd,server.type=unix,server.path=${qemuOptValue(b.socket)},export=${qemuOptValue(b.export)},` +
            `node-name=${n.backing},read-only=on,reconnect-delay=5`,
        );
      }
      opts.push(`node-name=${n.top}`, `file.node-name=${n.file}`, `backing=${n.backing}`);
    }
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
  if (spec.guestAgent) {
    args.push(
      '-chardev',
      `socket,id=cl-agent,path=${qemuOptValue(paths.agentSocket)},server=on,wait=off`,
      '-device',
      'virtio-serial-pci,id=cl-vser0',
      '-device',
      `virtserialport,bus=cl-vser0.0,chardev=cl-agent,name=${AGENT_PORT_NAME}`,
    );
  }
  return args;
}

/** The migration URI of an incoming spec: a file or FIFO read by cat, or a unix socket QEMU listens on. */
export function incomingUri(incoming: IncomingSpec): string {
  return incoming.from === 'unix' ? `unix:${incoming.path}` : `exec:cat ${shellQuote(incoming.path)}`;
}

/** Node names of drive i when it has a backing override. */
export function driveNodes(i: number): { top: string; file: string; backing: string } {
  return { top: `disk${i}`, file: `disk${i}-file`, backing: `disk${i}-back` };
}
